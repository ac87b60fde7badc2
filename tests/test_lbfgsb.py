"""``posconstr.minimize`` (bounded L-BFGS) against independent references.

References: ``scipy.optimize.nnls`` (active-set NNLS), SciPy's Fortran
L-BFGS-B, closed-form vertices of linear objectives, and KKT conditions
checked in NumPy with gradients that JAX did not compute. float64 is enabled
only inside the tests that ask for the ``x64`` fixture, so it never leaks into
other test files run in the same process.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so
from _reference import standardized_diabetes
from sklearn import datasets

import posconstr
from posconstr.solvers import _lbfgsb_core as core

# ------------------------------------------------------------ problems


_diabetes = standardized_diabetes


@functools.lru_cache(maxsize=None)
def _digits_columns():
  """64 x 1000: digit images as columns; b is a held-out image."""
  data = datasets.load_digits().data
  return data[:1000].T / 16.0, data[1500] / 16.0


def _digits_random():
  """The same columns, b a seeded random vector: x* has one non-zero."""
  return _digits_columns()[0], np.random.default_rng(0).normal(size=64)


_PROBLEMS = {"diabetes": _diabetes, "digits": _digits_columns,
             "digits_random": _digits_random}


@functools.partial(jax.jit, static_argnames=("tol",))
def _nnls(A, b, x0, tol=1e-8):
  return posconstr.minimize(lambda x: 0.5 * jnp.sum((A @ x - b) ** 2), x0,
                            lower=0.0, tol=tol, maxiter=1000)


def _lsq(A, b, x):
  x = np.asarray(x, np.float64)
  return 0.5 * np.sum((A @ x - b) ** 2)


def _box_pg(x, g, lo, hi):
  """``||x - clip(x - g, lo, hi)||_inf`` in NumPy."""
  return np.max(np.abs(x - np.clip(x - g, lo, hi)))


def _scipy_lbfgsb(fun, jac, x0, lo, hi):
  r = so.minimize(fun, x0, jac=jac, method="L-BFGS-B",
                  bounds=list(zip(lo, hi)),
                  options=dict(maxiter=20000, maxfun=40000, ftol=1e-16,
                               gtol=1e-13, maxcor=10))
  return r.x, r.fun


# ------------------------------------------------------------ NNLS, float64

# Measured (jax 0.10.2, CPU), iterations / evaluations, posconstr vs SciPy's
# L-BFGS-B stopped at the same projected gradient: diabetes 13/15 vs 15/17,
# digits 90/118 vs 471/487, digits_random 15/25 vs 34/47. The Wolfe search
# may spend more evaluations per iteration than the earlier backtracking one
# (up to 1.67 against 1.26) and needs fewer in all (digits 118 against 137):
# the total, against SciPy's, is what is checked.
@pytest.mark.parametrize("name,tol", [
    ("diabetes", 1e-10), pytest.param("digits", 5e-9, marks=pytest.mark.slow),
    ("digits_random", 5e-9)])
def test_nnls_float64_matches_scipy(x64, name, tol):
  A, b = _PROBLEMS[name]()
  n = A.shape[1]
  r = _nnls(jnp.asarray(A), jnp.asarray(b), jnp.zeros(n), tol=tol)
  x = np.asarray(r.params)
  assert x.dtype == np.float64
  assert bool(r.converged) and not bool(r.linesearch_failed)
  # Feasible bit for bit: no -1e-20 entries.
  assert np.all(x >= 0.0), x.min()
  x_ref, _ = so.nnls(A, b, maxiter=50 * n)
  f_ref = _lsq(A, b, x_ref)
  _, f_lb = _scipy_lbfgsb(lambda z: _lsq(A, b, z), lambda z: A.T @ (A @ z - b),
                          np.zeros(n), np.zeros(n), np.full(n, np.inf))
  f = _lsq(A, b, x)
  assert (f - f_ref) / abs(f_ref) <= 1e-10
  assert (f - f_lb) / abs(f_lb) <= 1e-10
  np.testing.assert_allclose(float(r.value), f, rtol=1e-12)
  # Projected gradient recomputed here, relative to the one at x0 = 0.
  pg = _box_pg(x, A.T @ (A @ x - b), 0.0, np.inf)
  pg0 = _box_pg(np.zeros(n), -A.T @ b, 0.0, np.inf)
  assert pg <= 1e-8 * pg0, pg / pg0
  # The exact zeros are nnls' active set.
  np.testing.assert_array_equal(x == 0, x_ref == 0)
  print(f"{name}: {int(r.num_iter)} it, {int(r.num_fun_evals)} fev, "
        f"gap {(f - f_ref) / abs(f_ref):.2e}")
  # No more evaluations than SciPy's L-BFGS-B needs for the same test.
  scipy_run = so.minimize(
      lambda z: (_lsq(A, b, z), A.T @ (A @ z - b)), np.zeros(n), jac=True,
      method="L-BFGS-B", bounds=[(0.0, None)] * n,
      options=dict(maxcor=10, ftol=0.0, gtol=tol * pg0, maxiter=20000))
  assert int(r.num_fun_evals) <= scipy_run.nfev, scipy_run.nfev


# ------------------------------------------------------------ float32

# Measured with tol=1e-4: diabetes gap 9e-11 (9 it, 11 fev), digits gap
# 1.1e-5 (80 it, 103 fev). Below ~1e-5 float32 runs into its precision floor.
@pytest.mark.parametrize("name,max_gap", [
    ("diabetes", 1e-7), pytest.param("digits", 3e-5, marks=pytest.mark.slow)])
def test_nnls_float32_documented_tolerance(name, max_gap):
  A, b = _PROBLEMS[name]()
  with jax.enable_x64(False):
    r = _nnls(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32),
              jnp.zeros(A.shape[1], jnp.float32), tol=1e-4)
    x = np.asarray(r.params)
  assert x.dtype == np.float32 and r.value.dtype == jnp.float32
  assert bool(r.converged)
  assert np.all(x >= 0.0)
  x_ref, _ = so.nnls(A, b, maxiter=50 * A.shape[1])
  f_ref = _lsq(A, b, x_ref)
  gap = (_lsq(A, b, x) - f_ref) / f_ref
  assert gap <= max_gap, gap
  assert int(r.num_fun_evals) <= 1.5 * int(r.num_iter)


# ------------------------------------------------------------ Rosenbrock

_ROSEN_LO = np.array([0, 0, 0, 0, 0, 0.05, 0, 0, 0, 0.02])
_ROSEN_HI = np.where(np.arange(10) % 2 == 0, 0.5, 2.0)
_EVALS = []  # (outside, #at lower, #at upper) for every evaluation


def _rosen(x):
  """Rosenbrock, NaN outside the box, recording where it is evaluated."""
  lo, hi = jnp.asarray(_ROSEN_LO), jnp.asarray(_ROSEN_HI)
  outside = jnp.any(x < lo) | jnp.any(x > hi)
  # Only exact types go to the callback: it runs on another thread, where
  # the test's x64 context is off and float64 arrays arrive as float32.
  jax.debug.callback(lambda *a: _EVALS.append(tuple(int(v) for v in a)),
                     outside, jnp.sum(x == lo), jnp.sum(x == hi))
  value = jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
  return jnp.where(outside, jnp.nan, value)


@jax.jit
def _rosen_solve(x0):
  return posconstr.minimize(_rosen, x0, _ROSEN_LO, _ROSEN_HI, tol=1e-10,
                            maxiter=1000)


def _rosen_x0():
  """Outside the box on purpose; the solver projects it first."""
  return np.random.default_rng(1).uniform(-1.0, 2.0, 10)


def test_bounded_rosenbrock_matches_scipy_and_kkt(x64):
  lo, hi = _ROSEN_LO, _ROSEN_HI
  x0 = np.clip(_rosen_x0(), lo, hi)
  r = _rosen_solve(jnp.asarray(x0))
  x = np.asarray(r.params)
  assert bool(r.converged)
  assert np.all(x >= lo) and np.all(x <= hi)
  x_ref, f_ref = _scipy_lbfgsb(so.rosen, so.rosen_der, x0, lo, hi)
  assert abs(so.rosen(x) - f_ref) <= 1e-12 * f_ref
  np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-8)
  # The constrained minimum is not the unconstrained one (1, ..., 1).
  assert np.max(np.abs(x - 1)) > 0.5
  # KKT with SciPy's gradient: zero on free coordinates, pointing out of
  # the box (multiplier >= 0) at active ones.
  g = so.rosen_der(x)
  at_lo, at_hi = x == lo, x == hi
  free = ~(at_lo | at_hi)
  assert np.max(np.abs(g[free])) <= 1e-8
  assert np.all(g[at_lo] > 1.0) and np.all(g[at_hi] < -1.0)
  np.testing.assert_array_equal(at_lo, x_ref == lo)
  np.testing.assert_array_equal(at_hi, x_ref == hi)
  assert at_lo.sum() == 2 and at_hi.sum() == 1
  assert _box_pg(x, g, lo, hi) <= 1e-8


def test_infeasible_x0_is_projected_first(x64):
  raw = _rosen_x0()
  assert np.any(raw < _ROSEN_LO) and np.any(raw > _ROSEN_HI)
  a = _rosen_solve(jnp.asarray(raw))
  b = _rosen_solve(jnp.asarray(np.clip(raw, _ROSEN_LO, _ROSEN_HI)))
  np.testing.assert_array_equal(np.asarray(a.params), np.asarray(b.params))
  assert int(a.num_iter) == int(b.num_iter)
  assert int(a.num_fun_evals) == int(b.num_fun_evals)
  x = np.asarray(a.params)
  assert np.all(x >= _ROSEN_LO) and np.all(x <= _ROSEN_HI)


def test_line_search_never_evaluates_outside_bounds(x64):
  """``fun`` is NaN outside the box; every evaluation is recorded."""
  jax.effects_barrier()  # callbacks of earlier solves have all landed
  _EVALS.clear()
  r = _rosen_solve(jnp.asarray(_rosen_x0()))  # infeasible x0
  jax.effects_barrier()
  assert bool(r.converged) and np.isfinite(float(r.value))
  evals = np.array(_EVALS)
  assert len(evals) == int(r.num_fun_evals) > int(r.num_iter) > 10
  assert not evals[:, 0].any()  # never outside
  # Trial points did land on the bounds (clipped there by the search).
  assert (evals[1:, 1] > 0).any() and (evals[1:, 2] > 0).any()


# ------------------------------------------------------------ vmap, pytrees


def test_vmap_batch_matches_single_solves_and_nnls(x64):
  rng = np.random.default_rng(0)
  As = rng.normal(size=(16, 200, 50))
  bs = rng.normal(size=(16, 200))
  x0 = jnp.zeros((16, 50))
  batched = jax.vmap(_nnls)(jnp.asarray(As), jnp.asarray(bs), x0)
  assert batched.params.shape == (16, 50)
  assert np.all(np.asarray(batched.params) >= 0)
  # Measured: all 16 converge in 15-19 it / 17-22 fev. (Before the
  # noise-floor acceptance, problem 6 stalled at pg 5e-7, where the decrease
  # left, ~5e-16, is below an ulp of f = 91.4, and took 44 it / 351 fev.)
  assert np.asarray(batched.converged).all()
  assert int(jnp.max(batched.num_fun_evals)) <= 1.3 * int(
      jnp.max(batched.num_iter))
  for i in range(16):
    single = _nnls(jnp.asarray(As[i]), jnp.asarray(bs[i]), x0[i])
    np.testing.assert_allclose(np.asarray(batched.params[i]),
                               np.asarray(single.params), rtol=0, atol=1e-12)
    # vmap's batched matmul rounds f in other last bits; at the noise floor
    # that can cost or save one backtrack (measured: 2 of 16 lanes, +-1).
    assert int(batched.num_iter[i]) == int(single.num_iter)
    assert abs(int(batched.num_fun_evals[i])
               - int(single.num_fun_evals)) <= 1
    assert bool(batched.converged[i]) == bool(single.converged)
    x_ref, _ = so.nnls(As[i], bs[i])
    x = np.asarray(batched.params[i])
    np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-8)
    np.testing.assert_array_equal(x == 0, x_ref == 0)
    f_ref = _lsq(As[i], bs[i], x_ref)
    assert (_lsq(As[i], bs[i], x) - f_ref) / f_ref <= 1e-12


def test_pytree_per_leaf_bounds_and_dtypes(x64):
  """A float32 vector and a float64 matrix; ``lower`` is a tree prefix."""
  rng = np.random.default_rng(3)
  A = rng.normal(size=(60, 26))
  b = 2.0 * rng.normal(size=60)
  row = np.array([0.2, 0.3, np.inf, 0.1])  # broadcast over the rows of M
  # Raveled order: v (6,), then M (5, 4).
  lo = np.concatenate([np.zeros(6), np.full(20, -0.1)])
  hi = np.concatenate([np.full(6, np.inf), np.tile(row, 5)])
  Aj, bj = jnp.asarray(A), jnp.asarray(b)

  def ravel(p):
    return jnp.concatenate([p["v"].astype(jnp.float64),
                            p["dense"]["M"].ravel()])

  params = {"dense": {"M": jnp.zeros((5, 4))}, "v": jnp.ones(6, jnp.float32)}
  lower = {"dense": -0.1, "v": 0.0}
  upper = {"dense": {"M": jnp.asarray(row)}, "v": None}
  r = jax.jit(lambda p: posconstr.minimize(
      lambda q: 0.5 * jnp.sum((Aj @ ravel(q) - bj) ** 2), p, lower, upper,
      tol=1e-6, memory_size=4))(params)  # m=4: compiles in half the time
  assert bool(r.converged)
  assert r.params["v"].dtype == jnp.float32
  assert r.grad["v"].dtype == jnp.float32
  assert r.params["dense"]["M"].dtype == jnp.float64
  assert r.params["dense"]["M"].shape == (5, 4)
  z = np.asarray(ravel(r.params))
  assert np.all(z >= lo) and np.all(z <= hi)
  def f(u):
    return 0.5 * np.sum((A @ u - b) ** 2)
  z_ref, f_ref = _scipy_lbfgsb(f, lambda u: A.T @ (A @ u - b), np.zeros(26),
                               lo, hi)
  # Measured: |z - z_ref| 2.5e-7 (float32 leaf), gap 1e-13.
  np.testing.assert_allclose(z, z_ref, rtol=0, atol=2e-6)
  assert (f(z) - f_ref) / f_ref <= 1e-10
  np.testing.assert_array_equal(z == lo, z_ref == lo)
  np.testing.assert_array_equal(z == hi, z_ref == hi)
  assert (z == lo).sum() >= 5 and (z == hi).sum() >= 3


# ------------------------------------------------------------ safety


def test_linear_objective_reaches_vertex_without_nan(x64):
  """Gradient constant: every pair has y = 0 and must be skipped."""
  c = np.random.default_rng(7).normal(size=12)
  lo, hi = np.full(12, -0.5), np.linspace(0.5, 3.0, 12)
  r = jax.jit(lambda x: posconstr.minimize(lambda z: jnp.asarray(c) @ z, x,
                                           lo, hi, memory_size=3))(
                                               jnp.zeros(12))
  x = np.asarray(r.params)
  assert not np.any(np.isnan(x))
  np.testing.assert_array_equal(x, np.where(c > 0, lo, hi))
  assert bool(r.converged) and float(r.projected_grad_norm) == 0.0
  # The first search starts at the end of the projected path, the vertex:
  # one iteration, two evaluations (as SciPy's L-BFGS-B).
  assert int(r.num_iter) == 1 and int(r.num_fun_evals) == 2


def test_push_pair_skips_small_curvature(x64):
  mem = core.init_memory(jnp.zeros(3), 4, jnp.float64)
  push = jax.jit(core.push_pair)
  s = jnp.array([1.0, 0.0, 0.0])
  for y in (jnp.zeros(3), jnp.array([-1.0, 0.0, 0.0]),
            jnp.array([1e-17, 5.0, 0.0])):  # s^T y <= eps ||y||^2
    skipped = push(mem, s, y)
    assert int(skipped.count) == 0 and not np.any(np.asarray(skipped.s))
    assert float(skipped.gamma) == 1.0
  added = push(mem, s, jnp.array([2.0, 1.0, 0.0]))
  assert int(added.count) == 1
  np.testing.assert_allclose(float(added.rho[0]), 0.5)
  np.testing.assert_allclose(float(added.gamma), 2.0 / 5.0)
  # Newest first: a second pair moves the first to slot 1; keep=False and
  # reset leave the buffers alone.
  second = push(added, 2 * s, jnp.array([1.0, 0.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(second.s[:2]), [2 * s, s])
  np.testing.assert_allclose(np.asarray(second.rho), [0.5, 0.5, 0, 0])
  assert int(second.count) == 2 and float(second.gamma) == 2.0
  same = push(added, 2 * s, jnp.array([1.0, 0.0, 0.0]), False)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(added)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  reset = core.reset_memory(second, where=jnp.asarray(True))
  assert int(reset.count) == 0 and not np.any(np.asarray(reset.rho))
  np.testing.assert_array_equal(np.asarray(reset.s), np.asarray(second.s))
  # The two-loop recursion with one pair stays finite and exact on s.
  hq = jax.jit(core.apply_inverse_hessian)(added, jnp.array([2.0, 1.0, 0.0]))
  np.testing.assert_allclose(np.asarray(hq), np.asarray(s), atol=1e-15)


# ------------------------------------------------------------ bad input


def _f(p):
  return sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))


_X0 = {"layer": {"w": np.ones((5, 4), np.float32),
                 "b": np.ones(3, np.float32)},
       "v": np.ones(6, np.float32)}


@pytest.mark.parametrize("kwargs,match", [
    (dict(lower=1.0, upper=0.0), r"`layer/b`.*lower.*upper"),
    (dict(lower={"layer": 0.0, "v": np.array([0, 0, 2.0, 0, 0, 0])},
          upper=1.0), r"`v`.*lower.*upper"),
    (dict(lower={"layer": 0.0}), r"lower.*prefix"),
    (dict(upper={"layer": 0.0, "v": 0.0, "extra": 1.0}), r"upper.*prefix"),
    (dict(lower=[0.0, 0.0, 0.0]), r"lower.*prefix"),
    (dict(lower={"layer": {"w": np.zeros(5), "b": 0.0}, "v": 0.0}),
     r"`layer/w`.*\(5,\).*\(5, 4\)"),
    (dict(upper={"layer": 1.0, "v": np.ones(7)}), r"`v`"),
])
def test_bad_bounds_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    posconstr.minimize(_f, _X0, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(maxiter=-1), dict(memory_size=0), dict(max_linesearch_steps=0),
    dict(tol=-1e-3), dict(atol=-1.0), dict(tol=float("nan")),
])
def test_bad_options_raise(kwargs):
  with pytest.raises(ValueError, match="minimize"):
    posconstr.minimize(_f, _X0, lower=0.0, **kwargs)
