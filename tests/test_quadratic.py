"""nnls and box_qp: against scipy, brute force, finite differences; bad input.

Problems are small and share a few shapes, so that the jitted solvers
compile once per (shape, dtype) for the whole file. float64 only inside
tests that take the ``x64`` fixture.
"""

import itertools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import posconstr
from posconstr import box_qp
from posconstr import nnls
from posconstr.solvers import _qp_active_set

M, N = 20, 6  # The nnls shape used throughout.
_nnls = jax.jit(nnls, static_argnames=("maxiter",))
_box = jax.jit(box_qp, static_argnames=("maxiter",))


def planted(seed, m=M, n=N, k=None, noise=0.1):
  """Gaussian A, b = A x* + noise with x* sparse and non-negative."""
  rng = np.random.default_rng(seed)
  A = rng.standard_normal((m, n))
  shape = (n,) if k is None else (n, k)
  x = np.where(rng.random(shape) < 0.5, rng.uniform(0.5, 1.5, shape), 0.0)
  b = A @ x + noise * rng.standard_normal((m,) if k is None else (m, k))
  return A, b


def objective(A, b, x):
  r = A @ x - b
  return 0.5 * float(r @ r)


def box_problem(seed, n=4):
  rng = np.random.default_rng(seed)
  R = rng.standard_normal((n + 2, n))
  Q = R.T @ R + 0.1 * np.eye(n)
  c = 3 * rng.standard_normal(n)
  lo = np.where(rng.random(n) < 0.2, -np.inf, rng.uniform(-1.5, 0.0, n))
  hi = np.where(rng.random(n) < 0.2, np.inf, lo + rng.uniform(0.0, 2.0, n))
  hi = np.where(np.isinf(lo) & np.isinf(hi), rng.uniform(0, 1), hi)
  return Q, c, lo, hi


def quad(Q, c, x):
  return 0.5 * float(x @ Q @ x) + float(c @ x)


def brute_force(Q, c, lo, hi):
  """Every face (free / at lower / at upper per coordinate) solved exactly
  with numpy; the best point that satisfies the KKT conditions."""
  n = len(c)
  best, best_x = np.inf, None
  for sides in itertools.product((0, 1, 2), repeat=n):
    sides = np.array(sides)
    fixed = np.where(sides == 1, lo, np.where(sides == 2, hi, 0.0))
    if np.any(~np.isfinite(fixed[sides > 0])):
      continue
    x = np.where(sides > 0, fixed, 0.0)
    F = sides == 0
    if F.any():
      x[F] = np.linalg.solve(Q[np.ix_(F, F)], -(c + Q @ x)[F])
    g = Q @ x + c
    tol = 1e-9 * (1 + np.abs(g).max() + np.abs(x).max())
    ok = (np.all(x >= lo - tol) & np.all(x <= hi + tol)
          & np.all(g[sides == 1] >= -tol) & np.all(g[sides == 2] <= tol))
    if ok and quad(Q, c, x) < best:
      best, best_x = quad(Q, c, x), x
  return best_x


# ---------------------------------------------------------------------------
# Against scipy.optimize.nnls.


def test_nnls_matches_scipy(x64):
  for seed in range(6):
    A, b = planted(seed)
    res = _nnls(A, b)
    x = np.asarray(res.x)
    xs, _ = scipy.optimize.nnls(A, b)
    assert res.x.dtype == jnp.float64 and bool(res.converged)
    np.testing.assert_array_equal(x > 0, xs > 0)
    assert np.all(x >= 0)  # exactly feasible; exactly 0 off the support
    fs = objective(A, b, xs)
    assert (objective(A, b, x) - fs) / fs <= 1e-10
    np.testing.assert_allclose(float(res.objective), objective(A, b, x),
                               rtol=1e-12)
    np.testing.assert_allclose(res.grad, A.T @ (A @ x - b), atol=1e-10)
    assert float(res.kkt_residual) <= 1e-10
    assert 1 <= int(res.num_iter) <= 8


def test_nnls_float32():
  for seed in range(3):
    A, b = planted(seed)
    res = _nnls(jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32))
    assert res.x.dtype == jnp.float32 and bool(res.converged)
    xs, _ = scipy.optimize.nnls(A, b)
    x = np.asarray(res.x, np.float64)
    assert np.all(x >= 0)
    np.testing.assert_array_equal(x > 0, xs > 0)
    fs = objective(A, b, xs)
    assert (objective(A, b, x) - fs) / fs <= 1e-4


def test_multiple_rhs_equal_single_columns(x64):
  A, B = planted(7, k=4)
  res = _nnls(A, B)
  assert res.x.shape == (N, 4) and res.objective.shape == (4,)
  assert res.num_iter.shape == res.converged.shape == (4,)
  for j in range(4):
    one = _nnls(A, B[:, j])
    np.testing.assert_allclose(res.x[:, j], one.x, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(np.asarray(res.x[:, j]) > 0,
                                  scipy.optimize.nnls(A, B[:, j])[0] > 0)


@pytest.mark.parametrize("mode", [
    "compact", pytest.param("queue", marks=pytest.mark.slow)])
def test_many_columns_match_scipy(x64, monkeypatch, mode):
  """Many columns: a shared first solve, the unrolled masked solves, and
  (forced at this size) the narrower last buffer or the work queue."""
  if mode == "compact":
    monkeypatch.setattr(_qp_active_set, "COMPACT_MIN_COLS", 16)
  else:
    monkeypatch.setattr(_qp_active_set, "FULL_WIDTH_BYTES", 1)
    monkeypatch.setattr(_qp_active_set, "STREAM_BYTES", 1)
  A, B = planted(8, k=100)
  k = B.shape[1]
  assert _qp_active_set.buffer_width(N, k) == (k if mode == "compact" else 64)
  res = jax.jit(lambda A, B: nnls(A, B))(A, B)
  assert bool(jnp.all(res.converged))
  for j in range(k):
    xs = scipy.optimize.nnls(A, B[:, j])[0]
    np.testing.assert_array_equal(np.asarray(res.x[:, j]) > 0, xs > 0)
    np.testing.assert_allclose(res.x[:, j], xs, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# box_qp against brute force, L-BFGS-B and posconstr.minimize.


# The x64 fixture is entered once for all examples, which is what we want.
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_box_qp_brute_force(x64, seed):
  Q, c, lo, hi = box_problem(seed)
  res = _box(Q, c, lo, hi)
  x = np.asarray(res.x)
  ref = brute_force(Q, c, lo, hi)
  assert bool(res.converged)
  assert np.all(x >= lo) and np.all(x <= hi)
  np.testing.assert_allclose(x, ref, rtol=1e-9, atol=1e-9)
  on_bound = np.abs(ref - np.where(np.abs(ref - lo) < 1e-9, lo, hi)) < 1e-9
  assert np.all((x[on_bound] == lo[on_bound]) | (x[on_bound] == hi[on_bound]))


def test_box_qp_matches_lbfgsb_and_minimize(x64):
  Q, c, lo, hi = box_problem(3)
  res = _box(Q, c, lo, hi)
  x = np.asarray(res.x)
  lb = scipy.optimize.minimize(
      lambda z: (quad(Q, c, z), Q @ z + c), np.zeros(4), jac=True,
      method="L-BFGS-B", bounds=list(zip(lo, hi)),
      options={"ftol": 0.0, "gtol": 1e-13, "maxiter": 1000})
  f = quad(Q, c, x)
  assert abs(f - lb.fun) <= 1e-10 * (1 + abs(f))
  np.testing.assert_allclose(x, lb.x, atol=1e-6)
  mini = posconstr.minimize(
      lambda z: 0.5 * z @ jnp.asarray(Q) @ z + jnp.asarray(c) @ z,
      jnp.zeros(4), lower=jnp.asarray(lo), upper=jnp.asarray(hi),
      tol=1e-12)
  assert f <= quad(Q, c, np.asarray(mini.params)) + 1e-12 * (1 + abs(f))
  assert float(res.kkt_residual) <= 1e-12


def test_box_qp_bounds_broadcast_and_matrix_c(x64):
  Q, c, lo, hi = box_problem(5)
  C = np.stack([c, -c, 2 * c], axis=1)
  res = _box(Q, C, lo, 1.0)  # a vector per variable and a scalar
  for j in range(3):
    one = _box(Q, C[:, j], lo, np.full(4, 1.0))
    np.testing.assert_allclose(res.x[:, j], one.x, rtol=1e-12, atol=1e-14)
  per_column = _box(Q, C, np.full((1, 3), -0.5), np.full((4, 3), 0.5))
  assert np.all(np.abs(np.asarray(per_column.x)) <= 0.5)


# ---------------------------------------------------------------------------
# Safeguard, iteration limits, warm start.


def hard_problem():
  """Near-collinear bump spectra on which block pivoting alone cycles."""
  rng = np.random.default_rng(269)
  w = np.linspace(0, 1, 40)
  S = np.stack([np.exp(-((w - rng.random()) / (0.15 * (0.5 + rng.random())))
                       ** 2) for _ in range(8)], 1)
  x = np.where(rng.random(8) < 0.4, rng.random(8), 0)
  return S, S @ x + 0.01 * rng.standard_normal(40)


def test_safeguard_ends_a_cycle(x64, monkeypatch):
  S, b = hard_problem()
  res = jax.jit(lambda A, b: nnls(A, b, maxiter=40))(S, b)
  xs = scipy.optimize.nnls(S, b)[0]
  assert bool(res.converged)
  np.testing.assert_array_equal(np.asarray(res.x) > 0, xs > 0)
  fs = objective(S, b, xs)
  assert (objective(S, b, np.asarray(res.x)) - fs) / fs <= 1e-10
  # Without the safeguard the exchanges cycle (the instance is a real test).
  monkeypatch.setattr(_qp_active_set, "PBAR", 10**6)
  plain = jax.jit(lambda A, b: nnls(A, b, maxiter=40))(S, b)
  assert not bool(plain.converged) and int(plain.num_iter) == 40


def test_maxiter_and_warm_start(x64):
  A, b = planted(0)
  full = _nnls(A, b)
  assert int(full.num_iter) >= 2
  early = _nnls(A, b, maxiter=1)
  assert not bool(early.converged) and int(early.num_iter) == 1
  assert np.all(np.asarray(early.x) >= 0)
  warm = _nnls(A, b, x0=full.x)
  assert bool(warm.converged) and int(warm.num_iter) == 1
  np.testing.assert_array_equal(warm.x, full.x)


# ---------------------------------------------------------------------------
# Transformations and degenerate problems.


def test_vmap_and_jit(x64):
  pairs = [planted(s) for s in range(3)]
  A = np.stack([p[0] for p in pairs])
  b = np.stack([p[1] for p in pairs])
  res = jax.jit(jax.vmap(nnls))(A, b)
  assert res.x.shape == (3, N) and res.converged.shape == (3,)
  for i in range(3):
    np.testing.assert_allclose(res.x[i], _nnls(A[i], b[i]).x, rtol=1e-12,
                               atol=1e-14)


def test_traced_empty_box_is_nan_and_not_converged(x64):
  # Concrete lower > upper is a ValueError; traced, it is flagged per problem.
  Q, c = jnp.eye(2), jnp.array([1.0, -1.0])
  r = jax.jit(lambda lo, hi: box_qp(Q, c, lo, hi))(1.0, 0.0)
  assert np.isnan(np.asarray(r.x)).all() and not bool(r.converged)
  r = jax.vmap(lambda lo: box_qp(Q, c, lo, 0.5))(jnp.array([0.0, 0.7]))
  np.testing.assert_array_equal(np.asarray(r.x[0]), [0.0, 0.5])  # clip(-c)
  assert np.isnan(np.asarray(r.x[1])).all()
  np.testing.assert_array_equal(np.asarray(r.converged), [True, False])


def test_degenerate_problems(x64):
  A, b = planted(4)
  zero = _nnls(A, np.zeros(M))
  np.testing.assert_array_equal(zero.x, np.zeros(N))
  assert bool(zero.converged) and float(zero.objective) == 0.0
  # A zero column: its coefficient is 0, the rest as without it.
  Az = A.copy()
  Az[:, 2] = 0.0
  res = _nnls(Az, b)
  assert float(res.x[2]) == 0.0 and bool(res.converged)
  ref = scipy.optimize.nnls(np.delete(Az, 2, 1), b)[0]
  np.testing.assert_allclose(np.delete(np.asarray(res.x), 2), ref, rtol=1e-9,
                             atol=1e-12)
  # Rank deficient: duplicated columns, and fewer rows than columns. The
  # minimizer is not unique; the objective is the minimum, nothing is NaN.
  for Ad, bd in ((np.concatenate([A[:, :3], A[:, :3]], 1), b),
                 (A[:4], b[:4])):
    res = _nnls(Ad, bd)
    x = np.asarray(res.x)
    assert np.all(np.isfinite(x)) and np.all(x >= 0)
    fs = objective(Ad, bd, scipy.optimize.nnls(Ad, bd)[0])
    assert objective(Ad, bd, x) <= fs + 1e-9 * (1 + fs)
    assert float(res.kkt_residual) <= 1e-8


def test_singular_and_unbounded_box_qp(x64):
  v = np.array([1.0, 2.0, -1.0, 0.5])
  Q = np.outer(v, v)  # rank one
  c = np.array([-1.0, 0.5, 0.0, 2.0])
  res = _box(Q, c, np.full(4, -1.0), np.ones(4))
  assert np.all(np.isfinite(np.asarray(res.x)))
  ref = brute_force(Q + 1e-9 * np.eye(4), c, np.full(4, -1.0), np.ones(4))
  assert quad(Q, c, np.asarray(res.x)) <= quad(Q, c, ref) + 1e-8
  # Unbounded below (c outside the range of Q, no bounds): finite, flagged
  # by a large KKT residual.
  free = _box(Q, c, np.full(4, -np.inf), np.full(4, np.inf))
  assert np.all(np.isfinite(np.asarray(free.x)))
  assert float(free.kkt_residual) > 1e-3


# ---------------------------------------------------------------------------
# Derivatives.


def test_derivative_closed_form(x64):
  A, b = planted(1)
  x = np.asarray(_nnls(A, b).x)
  F = x > 0
  want = np.zeros((N, M))
  want[F] = np.linalg.solve(A[:, F].T @ A[:, F], A[:, F].T)
  fwd = jax.jit(jax.jacfwd(lambda b: nnls(A, b).x))(b)
  np.testing.assert_allclose(fwd, want, atol=1e-12)


def check_gradient(loss, *args, atol=1e-7, eps=1e-6):
  """``jax.grad`` of ``loss(*args)`` against central differences in every
  coordinate of every argument (one vmapped call for all of them)."""
  flat, unravel = jax.flatten_util.ravel_pytree(args)
  f = lambda v: loss(*unravel(v))  # noqa: E731
  grad = jax.jit(jax.grad(f))(flat)
  steps = eps * np.eye(flat.size)
  vf = jax.jit(jax.vmap(f))
  diff = (vf(flat + steps) - vf(flat - steps)) / (2 * eps)
  np.testing.assert_allclose(grad, diff, atol=atol)


@pytest.mark.slow  # ~5 s; test_implicit checks nnls's closed-form Jacobian.
def test_derivatives_finite_differences(x64):
  A, b = planted(3)
  w = np.arange(1.0, N + 1)
  check_gradient(lambda A, b: jnp.sum(w * nnls(A, b).x), A, b)
  Q, c, lo, hi = box_problem(3)
  lo, hi = np.where(np.isinf(lo), -3.0, lo), np.where(np.isinf(hi), 3.0, hi)
  u = np.arange(1.0, 5.0)
  check_gradient(lambda *args: jnp.sum(u * box_qp(*args).x), Q, c, lo, hi)


def test_gradient_vmap_over_right_hand_sides(x64):
  A, b = planted(3)
  B = np.stack([b, -b, 2 * b], 1)
  grad = jax.jit(jax.grad(lambda v: jnp.sum(nnls(A, v).x ** 2)))
  per = jax.jit(jax.vmap(grad, in_axes=1, out_axes=1))(B)
  for j in range(3):
    np.testing.assert_allclose(per[:, j], grad(B[:, j]), atol=1e-12)


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("call, error, words", [
    (lambda: nnls(np.ones(3), np.ones(3)), ValueError, "`A`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(4)), ValueError, "`b`"),
    (lambda: nnls(np.ones((3, 2)), np.ones((3, 2, 1))), ValueError, "`b`"),
    (lambda: nnls(np.ones((3, 2), int), np.ones(3)), TypeError, "`A`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(3, int)), TypeError, "`b`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(3) + 1j), TypeError, "`b`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(3), maxiter=2.5), TypeError,
     "`maxiter`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(3), maxiter=-1), ValueError,
     "`maxiter`"),
    (lambda: nnls(np.ones((3, 2)), np.ones(3), x0=np.ones(3)), ValueError,
     "`x0`"),
    (lambda: box_qp(np.ones((2, 3)), np.ones(2)), ValueError, "`Q`"),
    (lambda: box_qp(np.eye(2), np.ones(3)), ValueError, "`c`"),
    (lambda: box_qp(np.eye(2, dtype=int), np.ones(2)), TypeError, "`Q`"),
    (lambda: box_qp(np.eye(2), np.ones(2), lower=1.0, upper=0.0), ValueError,
     "lower"),
    (lambda: box_qp(np.eye(2), np.ones(2), lower=[0.0, 2.0], upper=1.0),
     ValueError, "lower=2.0"),
    (lambda: box_qp(np.eye(2), np.ones(2), lower=np.zeros(3)), ValueError,
     "`lower`"),
    (lambda: box_qp(np.eye(2), np.ones(2), upper=np.nan), ValueError,
     "`upper`"),
    (lambda: box_qp(np.eye(2), np.ones(2), lower=np.inf), ValueError,
     "`lower`"),
    (lambda: box_qp(np.eye(2), np.ones(2), lower="0"), TypeError, "`lower`"),
])
def test_bad_input(call, error, words):
  with pytest.raises(error, match=words.replace("[", r"\[")):
    call()


@pytest.mark.parametrize("dtype,lo,hi,c", [
    (jnp.float16, 0.1, 5.0, 1.0), (jnp.bfloat16, -5.0, 1.1, -5.0)])
def test_half_precision_solutions_stay_inside_unrepresentable_bounds(
    dtype, lo, hi, c):
  # Solved in float32, then rounded into the box (0.1 and 1.1 are not
  # representable): the nearest value inside, as posconstr.Box rounds.
  r = box_qp(jnp.eye(2, dtype=dtype), jnp.full(2, c, dtype), lo, hi)
  assert r.x.dtype == dtype
  x = np.asarray(r.x, np.float64)
  assert (x >= lo).all() and (x <= hi).all()
  want = posconstr.Box(lo, hi).project(jnp.full(2, -c, dtype))
  np.testing.assert_array_equal(np.asarray(r.x), np.asarray(want))
