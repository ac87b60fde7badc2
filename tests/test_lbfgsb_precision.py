"""Bounded L-BFGS at the limits of precision, and its inverse-Hessian product.

References: a NumPy two-loop recursion written from Nocedal & Wright
(Alg. 7.4) on explicitly restricted pairs, ``scipy.optimize.nnls``, and
projected gradients recomputed in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import posconstr
from posconstr.solvers import _lbfgsb_core as core

# ------------------------------------------------------------ two-loop


def _numpy_two_loop(pairs, q, gamma0, free):
  """``H q`` from ``pairs`` (oldest first), restricted to ``free``."""
  pairs = [(s * free, y * free) for s, y in pairs]
  eps = np.finfo(np.float64).eps
  pairs = [(s, y) for s, y in pairs if s @ y > eps * (y @ y) and y @ y > 0]
  gamma = gamma0
  if pairs:
    s, y = pairs[-1]
    gamma = (s @ y) / (y @ y)
  alphas = []
  for s, y in reversed(pairs):
    a = (s @ q) / (s @ y)
    q = q - a * y
    alphas.append(a)
  r = gamma * q
  for (s, y), a in zip(pairs, reversed(alphas)):
    r = r + (a - (y @ r) / (s @ y)) * s
  return r


def _vmapped_product(memory, q, free=None):
  """``apply_inverse_hessian`` under vmap (its two-loop branch), 2 lanes."""
  def two(t):
    return jax.tree.map(lambda v: jnp.stack([v, v]), t)
  out = jax.vmap(core.apply_inverse_hessian)(
      two(memory), two(q), None if free is None else two(free))
  return jax.tree.map(lambda v: v[1], out)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_vmap_takes_the_two_loop_branch(monkeypatch):
  calls = []
  original = core.two_loop_inverse_hessian
  monkeypatch.setattr(core, "two_loop_inverse_hessian",
                      lambda *a: calls.append(1) or original(*a))
  memory = core.push_pair(core.init_memory(jnp.zeros(3), 2, jnp.float32),
                          jnp.ones(3), 2 * jnp.ones(3))
  q = jnp.ones((4, 3))
  want = jax.vmap(lambda v: core.compact_inverse_hessian(memory, v))(q)
  core.apply_inverse_hessian(memory, q[0])
  assert not calls  # unbatched: the compact form
  got = jax.vmap(lambda v: core.apply_inverse_hessian(memory, v))(q)
  assert calls
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  # A long memory keeps the compact form (the unrolled program would grow).
  calls.clear()
  big = core.init_memory(jnp.zeros(3), core.TWO_LOOP_MAX + 1, jnp.float32)
  jax.vmap(lambda v: core.apply_inverse_hessian(big, v))(q)
  assert not calls


_PRODUCTS = {"apply": core.apply_inverse_hessian,
             "compact": core.compact_inverse_hessian,
             "two_loop": core.two_loop_inverse_hessian,
             "vmapped": _vmapped_product}


@pytest.mark.parametrize("product", sorted(_PRODUCTS))
@pytest.mark.parametrize("pushes", [3, 13])  # fewer than m, and wrapped
def test_inverse_hessian_matches_numpy_two_loop(x64, pushes, product):
  rng = np.random.default_rng(pushes)
  m, shapes = 5, {"a": (4, 3), "b": (7,)}
  n = sum(int(np.prod(v)) for v in shapes.values())

  def tree(v):  # raveled order: a, then b
    return {"a": jnp.asarray(v[:12].reshape(4, 3)), "b": jnp.asarray(v[12:])}

  memory = core.init_memory(tree(np.zeros(n)), m, jnp.float64)
  pairs = []
  for _ in range(pushes):
    s = rng.normal(size=n)
    y = s + 0.3 * rng.normal(size=n)  # s^T y > 0 on any subset, w.h.p.
    memory = core.push_pair(memory, tree(s), tree(y))
    pairs.append((s, y))
  pairs = pairs[-m:]
  assert int(memory.count) == len(pairs)
  free = rng.random(n) < 0.7
  q = np.where(free, rng.normal(size=n), 0.0)
  def ravel(t):
    return np.concatenate([np.ravel(t["a"]), np.ravel(t["b"])])
  apply = jax.jit(_PRODUCTS[product])
  got = apply(memory, tree(q), tree(free))
  want = _numpy_two_loop(pairs, q, float(memory.gamma), free)
  np.testing.assert_allclose(ravel(got), want, rtol=1e-12, atol=1e-12)
  assert np.all(ravel(got)[~free] == 0)
  # Unrestricted: the plain L-BFGS inverse Hessian.
  got = apply(memory, tree(q))
  want = _numpy_two_loop(pairs, q, float(memory.gamma), np.ones(n))
  np.testing.assert_allclose(ravel(got), want, rtol=1e-12, atol=1e-12)
  # It is the inverse of the BFGS matrix on the newest pair: H y = s.
  s, y = pairs[-1]
  got = apply(memory, tree(y))
  np.testing.assert_allclose(ravel(got), s, rtol=1e-10, atol=1e-10)


def test_program_size_does_not_grow_with_memory_or_unroll():
  """No loop over the pairs: the lowered program is the same for any m."""
  def f(p):
    return sum(jnp.sum((v - 1.0) ** 2) for v in jax.tree.leaves(p))
  x0 = {f"w{i}": jnp.zeros(3) for i in range(4)}

  def size(m):
    solve = jax.jit(lambda p: posconstr.minimize(f, p, lower=0.0,
                                                 memory_size=m))
    return len(solve.lower(x0).as_text())

  # Measured: 2 -> 20 changes the text by a few characters (shapes); the
  # Python-unrolled recursion it replaces grew about 8x.
  assert size(20) <= 1.05 * size(2)


# ------------------------------------------------------------ noise floor


def test_gradient_decides_where_f_has_no_digits_left(x64):
  """A Gaussian NNLS whose last decreases are below an ulp of f = 91.4.

  From pg ~ 5e-7 relative on, the decrease left (~5e-16) is under f's
  rounding, so the Armijo test passes or fails by the last bits of f:
  measured, the Armijo-only search failed there twice in a row and stopped
  at pg 2e-8 after 44 it / 351 fev. The approximate Wolfe test uses the
  gradient, which still has digits: 20 it / 23 fev to pg 3e-11.
  """
  rng = np.random.default_rng(0)
  A, b = rng.normal(size=(16, 200, 50))[6], rng.normal(size=(16, 200))[6]
  Aj, bj = jnp.asarray(A), jnp.asarray(b)
  r = jax.jit(lambda x: posconstr.minimize(
      lambda z: 0.5 * jnp.sum((Aj @ z - bj) ** 2), x, lower=0.0, tol=1e-10,
      maxiter=500))(jnp.zeros(50))
  assert bool(r.converged) and not bool(r.stalled)
  assert int(r.num_fun_evals) <= 1.3 * int(r.num_iter)
  x = np.asarray(r.params)
  assert np.all(x >= 0)
  def f(z):
    return 0.5 * np.sum((A @ z - b) ** 2)
  # The decrease that is left is below f's precision indeed ...
  x_ref, _ = so.nnls(A, b)
  assert f(x) - f(x_ref) <= 16 * np.finfo(np.float64).eps * f(x_ref)
  # ... and yet the projected gradient (recomputed here) went to 1e-10.
  pg = np.max(np.abs(x - np.maximum(x - A.T @ (A @ x - b), 0)))
  assert pg <= 1e-10 * np.max(A.T @ b)
  np.testing.assert_allclose(x, x_ref, rtol=0, atol=1e-10)
  np.testing.assert_array_equal(x == 0, x_ref == 0)


def test_search_measures_rounding_of_small_residual(x64):
  """Near a good fit, f's rounding is far above 16 eps |f|.

  f = 0.5 ||Ax - b||^2 ~ 1e-2 is the small remainder of terms ~ |b|^2, so
  its last bits move by ~1e-16 where 16 eps |f| ~ 3e-17: backtracking then
  draws lots on f's last bits. Measured, vmapped: with the fixed noise
  estimate the slowest lane took 29 it / 47 fev; with the rounding measured
  by the search, 28 it / 35 fev.
  """
  rng = np.random.default_rng(1)
  As = rng.standard_normal((64, 200, 50))
  x_star = np.where(rng.random((64, 50)) < 0.2,
                    rng.uniform(0.5, 1.5, (64, 50)), 0.0)
  bs = np.einsum("kij,kj->ki", As, x_star) + 1e-2 * rng.standard_normal(
      (64, 200))

  def solve(A, b):
    return posconstr.minimize(lambda z: 0.5 * jnp.sum((A @ z - b) ** 2),
                              jnp.zeros(50), lower=0.0, tol=1e-10)
  r = jax.jit(jax.vmap(solve))(jnp.asarray(As), jnp.asarray(bs))
  assert np.asarray(r.converged).all()
  assert int(jnp.max(r.num_fun_evals)) <= 1.3 * int(jnp.max(r.num_iter))
  for i in range(0, 64, 9):
    x_ref, _ = so.nnls(As[i], bs[i])
    np.testing.assert_allclose(np.asarray(r.params[i]), x_ref, rtol=0,
                               atol=1e-8)


def test_float32_tolerance_below_precision_stops_stalled():
  """tol=1e-10 in float32: stops a few iterations after the floor."""
  rng = np.random.default_rng(0)
  A = rng.normal(size=(200, 50))
  b = A @ np.where(rng.random(50) < 0.2, 1.0, 0.0) + 0.01 * rng.normal(
      size=200)
  Aj, bj = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)
  r = jax.jit(lambda x: posconstr.minimize(
      lambda z: 0.5 * jnp.sum((Aj @ z - bj) ** 2), x, lower=0.0, tol=1e-10,
      maxiter=2000, stall_iters=10))(jnp.zeros(50, jnp.float32))
  # Measured: stalled after 35 it / 59 fev, gap 1.2e-10, pg 3e-8 relative.
  assert bool(r.stalled) and not bool(r.converged)
  assert not bool(r.linesearch_failed)
  assert int(r.num_iter) <= 100, int(r.num_iter)
  x = np.asarray(r.params, np.float64)
  assert np.all(x >= 0)
  x_ref, _ = so.nnls(A, b)
  def f(z):
    return 0.5 * np.sum((A @ z - b) ** 2)
  assert (f(x) - f(x_ref)) / f(x_ref) <= 1e-5
  # As far as float32 goes: the projected gradient is small relative to
  # the first one, though above the 1e-10 asked for.
  pg = np.max(np.abs(x - np.maximum(x - A.T @ (A @ x - b), 0)))
  assert pg <= 1e-4 * np.max(A.T @ b)


def test_bad_stall_iters_raise():
  with pytest.raises(ValueError, match="stall_iters"):
    posconstr.minimize(lambda x: jnp.sum(x ** 2), jnp.ones(2), stall_iters=0)
  with pytest.raises(TypeError, match="stall_iters"):
    posconstr.minimize(lambda x: jnp.sum(x ** 2), jnp.ones(2),
                       stall_iters=2.5)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_vmapped_mixed_dtype_pytree_matches_lanes_and_scipy(x64):
  """The two-loop branch on a float32 and a float64 leaf, per-leaf boxes."""
  rng = np.random.default_rng(5)
  lanes = 3
  a32 = rng.normal(size=(lanes, 30, 6)).astype(np.float32)
  a64, b = rng.normal(size=(lanes, 30, 4)), rng.normal(size=(lanes, 30))
  lower = {"a": 0.0, "b": -0.1}
  upper = {"a": None, "b": 0.2}

  def solve(a32, a64, b):
    def f(p):
      return 0.5 * jnp.sum((a32 @ p["a"] + a64 @ p["b"] - b) ** 2)
    x0 = {"a": jnp.zeros(6, jnp.float32), "b": jnp.zeros(4)}
    return posconstr.minimize(f, x0, lower, upper, tol=1e-6)

  batched = jax.jit(jax.vmap(solve))(a32, a64, b)
  assert batched.params["a"].dtype == jnp.float32
  assert batched.params["b"].dtype == jnp.float64
  for i in range(lanes):
    single = jax.jit(solve)(a32[i], a64[i], b[i])
    # Measured: equal but for rounding (3e-8 on the float32 leaf).
    for key in ("a", "b"):
      np.testing.assert_allclose(np.asarray(batched.params[key][i]),
                                 np.asarray(single.params[key]), atol=1e-6)
    assert bool(batched.converged[i]) and bool(single.converged)
    A = np.concatenate([a32[i].astype(np.float64), a64[i]], axis=1)
    def f(z):
      return 0.5 * np.sum((A @ z - b[i]) ** 2)
    ref = so.minimize(lambda z: (f(z), A.T @ (A @ z - b[i])), np.zeros(10),
                      jac=True, method="L-BFGS-B",
                      bounds=[(0, None)] * 6 + [(-0.1, 0.2)] * 4,
                      options=dict(ftol=0.0, gtol=1e-12, maxiter=1000))
    z = np.concatenate([np.asarray(batched.params["a"][i], np.float64),
                        np.asarray(batched.params["b"][i])])
    assert np.all(z[:6] >= 0) and np.all((z[6:] >= -0.1) & (z[6:] <= 0.2))
    assert (f(z) - ref.fun) / ref.fun <= 1e-6
