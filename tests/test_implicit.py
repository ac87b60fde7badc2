"""Implicit derivatives of ``posconstr.minimize``'s solution.

References: the NNLS closed form on the free set, ``dx_F/db = (A_F^T
A_F)^{-1} A_F^T`` (zeros on the active set, computed from SciPy's active
set with NumPy), central finite differences of tightly converged solves,
the envelope theorem for the optimal value, and jaxopt's ``LBFGSB`` with
implicit differentiation as a peer where it is installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize as so

import posconstr
from posconstr.solvers import _implicit


def _lsq(x, A, b):
  return 0.5 * jnp.sum((A @ x - b) ** 2)


def _nnls_problem(seed=0, m=30, n=8):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(m, n)), rng.normal(size=m)


def _nnls_solution(A, b, tol=1e-12):
  return posconstr.minimize(_lsq, jnp.zeros(A.shape[1]), lower=0.0,
                            args=(A, b), tol=tol).params


def _closed_form_db(A, b):
  x, _ = so.nnls(A, b)
  free = x > 0
  J = np.zeros((A.shape[1], A.shape[0]))
  AF = A[:, free]
  J[free] = np.linalg.solve(AF.T @ AF, AF.T)
  return J, free


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_nnls_jacobian_matches_the_closed_form(x64):
  A, b = _nnls_problem()
  J_ref, free = _closed_form_db(A, b)
  assert 0 < free.sum() < len(free)  # both sets non-empty
  A_, b_ = jnp.asarray(A), jnp.asarray(b)
  J_rev = jax.jacrev(_nnls_solution, argnums=1)(A_, b_)
  J_fwd = jax.jacfwd(_nnls_solution, argnums=1)(A_, b_)
  np.testing.assert_allclose(np.asarray(J_rev), J_ref, atol=1e-10)
  np.testing.assert_allclose(np.asarray(J_fwd), J_ref, atol=1e-10)
  assert np.all(np.asarray(J_rev)[~free] == 0)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_jvp_and_vjp_are_adjoint(x64):
  A, b = _nnls_problem(seed=1)
  A_, b_ = jnp.asarray(A), jnp.asarray(b)
  rng = np.random.default_rng(2)
  dA, db = jnp.asarray(rng.normal(size=A.shape)), jnp.asarray(
      rng.normal(size=b.shape))
  u = jnp.asarray(rng.normal(size=A.shape[1]))
  _, jv = jax.jvp(_nnls_solution, (A_, b_), (dA, db))
  _, pullback = jax.vjp(_nnls_solution, A_, b_)
  uA, ub = pullback(u)
  np.testing.assert_allclose(float(u @ jv),
                             float(jnp.sum(uA * dA) + ub @ db), rtol=1e-10)


def _central_difference(fun, theta, h):
  theta = np.asarray(theta, np.float64)
  grad = np.zeros_like(theta)
  for i in range(theta.size):
    e = np.zeros_like(theta)
    e.flat[i] = h
    grad.flat[i] = (fun(theta + e) - fun(theta - e)) / (2 * h)
  return grad


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_bounded_logistic_regression_matches_finite_differences(x64):
  """d(sum of weights)/d(L2 strength, data) for 0 <= w <= 0.5."""
  rng = np.random.default_rng(3)
  X = jnp.asarray(rng.normal(size=(80, 5)))
  y = jnp.asarray(rng.random(80) < 0.6, jnp.float64)

  def loss(w, X, lam):
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + lam * jnp.sum(w ** 2)

  def outcome(lam, X):
    w = posconstr.minimize(loss, jnp.full(5, 0.1), lower=0.0, upper=0.5,
                           args=(X, lam), tol=1e-13).params
    return jnp.sum(w * jnp.arange(1.0, 6.0))

  lam = 0.01
  g_lam, g_X = jax.grad(outcome, argnums=(0, 1))(lam, X)
  fd_lam = _central_difference(lambda t: float(outcome(t[0], X)), [lam], 1e-5)
  np.testing.assert_allclose(float(g_lam), fd_lam[0], rtol=1e-5)
  # Rows 0-2 of X only (the rest is the same computation).
  fd_X = _central_difference(
      lambda t: float(outcome(lam, X.at[:3].set(jnp.asarray(t)))),
      np.asarray(X)[:3], 1e-5)
  np.testing.assert_allclose(np.asarray(g_X)[:3], fd_X, atol=1e-7)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_bounded_rosenbrock_matches_finite_differences(x64):
  """The parameters (a, b) of a*(1-x)^2 + b*(y-x^2)^2 summed, on a box
  that makes some coordinates active."""
  def rosen(x, a, b):
    return jnp.sum(a * (1 - x[:-1]) ** 2 + b * (x[1:] - x[:-1] ** 2) ** 2)

  lo, hi = jnp.array([0.0, 0.0, 0.3, 0.0]), jnp.array([0.8, 2.0, 2.0, 0.5])

  def solution(theta):
    return posconstr.minimize(rosen, jnp.full(4, 0.4), lo, hi,
                              args=(theta[0], theta[1]), tol=1e-13).params

  theta = jnp.array([1.0, 10.0])
  x = np.asarray(solution(theta))
  assert np.sum((x == np.asarray(lo)) | (x == np.asarray(hi))) >= 1
  J = np.asarray(jax.jacrev(solution)(theta))
  J_fd = np.stack([_central_difference(
      lambda t: float(solution(jnp.asarray(t))[i]), theta, 1e-6)
                   for i in range(4)])
  np.testing.assert_allclose(J, J_fd, atol=1e-6)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_active_bounds_carry_their_coordinates(x64):
  """d x / d upper = 1 where the upper bound is active, 0 where not."""
  def f(x, c):
    return jnp.sum((x - c) ** 2)
  c = jnp.array([2.0, 0.0, 5.0])

  def solution(upper, lower):
    return posconstr.minimize(f, jnp.zeros(3), lower, upper, args=(c,)).params

  upper, lower = jnp.array([1.0, 3.0, 4.0]), jnp.array([-1.0, 0.5, 0.0])
  J_up = np.asarray(jax.jacrev(solution, argnums=0)(upper, lower))
  J_lo = np.asarray(jax.jacrev(solution, argnums=1)(upper, lower))
  np.testing.assert_array_equal(J_up, np.diag([1.0, 0.0, 1.0]))
  np.testing.assert_array_equal(J_lo, np.diag([0.0, 1.0, 0.0]))
  # A scalar bound shared by every coordinate: the sum over those it holds.
  g = jax.grad(lambda u: jnp.sum(posconstr.minimize(
      f, jnp.zeros(3), upper=u, args=(c,)).params))(1.0)
  assert float(g) == 2.0


def test_degenerate_point_has_a_finite_one_sided_derivative(x64):
  """x* = 0 exactly on the bound with zero gradient: the coordinate stays
  on its bound (derivative 0 in b), as documented; never NaN."""
  A = jnp.eye(3)
  b = jnp.array([1.0, 0.0, -1.0])  # x* = (1, 0, 0); x_2 degenerate

  J = np.asarray(jax.jacrev(_nnls_solution, argnums=1)(A, b))
  assert np.isfinite(J).all()
  np.testing.assert_array_equal(J, np.diag([1.0, 0.0, 0.0]))


def test_singular_free_block_gives_a_finite_derivative(x64):
  """A linear objective in a free coordinate has no curvature there: the
  reduced system is singular, conjugate gradients stop, nothing is NaN."""
  def f(x, c):
    return c[0] * x[0] + (x[1] - c[1]) ** 2 + 0.0 * x[2]
  J = jax.jacrev(lambda c: posconstr.minimize(
      f, jnp.full(3, 0.5), 0.0, 1.0, args=(c,)).params)(jnp.array([1.0, 0.3]))
  assert np.isfinite(np.asarray(J)).all()
  np.testing.assert_allclose(np.asarray(J)[1], [0.0, 1.0], atol=1e-12)


def test_optimal_value_follows_the_envelope_theorem(x64):
  A, b = _nnls_problem(seed=4)
  A_, b_ = jnp.asarray(A), jnp.asarray(b)
  def value(b):
    return posconstr.minimize(_lsq, jnp.zeros(A.shape[1]), lower=0.0,
                                         args=(A_, b), tol=1e-12).value
  x, _ = so.nnls(A, b)
  np.testing.assert_allclose(np.asarray(jax.grad(value)(b_)), b - A @ x,
                             atol=1e-10)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_vmapped_gradients_match_per_problem(x64):
  As, bs = zip(*[_nnls_problem(seed=s, m=12, n=4) for s in range(5)])
  As, bs = jnp.asarray(np.stack(As)), jnp.asarray(np.stack(bs))
  def loss(A, b):
    return jnp.sum(_nnls_solution(A, b) ** 2)
  batched = jax.vmap(jax.grad(loss, argnums=1))(As, bs)
  for i in range(5):
    J, _ = _closed_form_db(np.asarray(As[i]), np.asarray(bs[i]))
    x, _ = so.nnls(np.asarray(As[i]), np.asarray(bs[i]))
    np.testing.assert_allclose(np.asarray(batched[i]), 2 * J.T @ x,
                               atol=1e-9)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_float32_and_mixed_dtype_pytree():
  """float32 data (loose tolerance), and a tree of a float32 and a float64
  leaf: each derivative in its leaf's dtype."""
  A, b = _nnls_problem(seed=5, m=20, n=4)
  J_ref, _ = _closed_form_db(A, b)
  J = jax.jacrev(lambda b: posconstr.minimize(
      _lsq, jnp.zeros(4, jnp.float32), lower=0.0,
      args=(jnp.asarray(A, jnp.float32), b), tol=1e-6).params)(
          jnp.asarray(b, jnp.float32))
  assert J.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(J), J_ref, atol=2e-4)
  with jax.enable_x64(True):
    def f(x, c):
      return (jnp.sum((x["s"] - c) ** 2)
              + jnp.sum((x["d"] - 2 * c).astype(jnp.float32) ** 2))

    x0 = {"s": jnp.zeros(2, jnp.float32), "d": jnp.zeros(2, jnp.float64)}
    g = jax.grad(lambda c: sum(jnp.sum(v) for v in jax.tree.leaves(
        posconstr.minimize(f, x0, lower=0.0, args=(c,)).params)))(
            jnp.array([1.0, -1.0], jnp.float32))
    np.testing.assert_allclose(np.asarray(g), [3.0, 0.0], atol=1e-5)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
# The peer's own notice that it is unmaintained, on import.
@pytest.mark.filterwarnings("ignore:JAXopt is no longer maintained")
def test_matches_jaxopt_implicit_differentiation(x64):
  import jaxopt  # pylint: disable=g-import-not-at-top  # The test extra has it.
  A, b = _nnls_problem(seed=6)
  A_, b_ = jnp.asarray(A), jnp.asarray(b)
  solver = jaxopt.LBFGSB(fun=_lsq, tol=1e-12, maxiter=2000,
                         implicit_diff=True)
  def peer(b):
    return solver.run(jnp.full(A.shape[1], 0.1),
                                bounds=(jnp.zeros(A.shape[1]),
                                        jnp.full(A.shape[1], jnp.inf)),
                                A=A_, b=b).params
  J_peer = np.asarray(jax.jacrev(peer)(b_))
  J_ref, _ = _closed_form_db(A, b)
  J = np.asarray(jax.jacrev(_nnls_solution, argnums=1)(A_, b_))
  if np.abs(J_peer - J_ref).max() <= 1e-6:  # where the peer agrees
    np.testing.assert_allclose(J, J_peer, atol=1e-6)
  np.testing.assert_allclose(J, J_ref, atol=1e-10)


def test_conjugate_gradient_keeps_leaf_dtypes_and_solves(x64):
  rng = np.random.default_rng(7)
  M = rng.normal(size=(5, 5))
  M = M @ M.T + 5 * np.eye(5)
  b = {"a": jnp.asarray(rng.normal(size=3), jnp.float32),
       "b": jnp.asarray(rng.normal(size=2), jnp.float64)}

  def matvec(v):
    flat = jnp.concatenate([v["a"].astype(jnp.float64), v["b"]])
    out = jnp.asarray(M) @ flat
    return {"a": out[:3].astype(jnp.float32), "b": out[3:]}

  v = _implicit.conjugate_gradient(matvec, b, tol=1e-12, maxiter=50)
  assert v["a"].dtype == jnp.float32 and v["b"].dtype == jnp.float64
  ref = np.linalg.solve(M, np.concatenate([np.asarray(b["a"], np.float64),
                                           np.asarray(b["b"])]))
  np.testing.assert_allclose(np.asarray(v["b"]), ref[3:], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(v["a"]), ref[:3], rtol=1e-5)


def test_differentiating_a_value_fun_closes_over_says_to_use_args():
  c = jnp.array([0.5, 2.0])

  def solution_sum(c, through_args):
    if through_args:
      r = posconstr.minimize(lambda x, c: jnp.sum((x - c) ** 2), jnp.zeros(2),
                             0.0, 1.0, args=(c,))
    else:
      r = posconstr.minimize(lambda x: jnp.sum((x - c) ** 2), jnp.zeros(2),
                             0.0, 1.0)
    return r.params.sum()

  with pytest.raises(TypeError, match=r"`fun` closes over a value that an "
                     r"enclosing jax.grad .* pass it through `args=`"):
    jax.grad(solution_sum)(c, False)
  # x* = clip(c, 0, 1): free in c_0, held at 1 in c_1.
  np.testing.assert_allclose(jax.grad(solution_sum)(c, True), [1.0, 0.0])
  # jit over a closed-over value is fine (a constant to the solve).
  np.testing.assert_allclose(jax.jit(lambda c: solution_sum(c, False))(c),
                             1.5, rtol=1e-6)


def test_free_coordinates_of_badly_scaled_float32_problems_stay_free():
  # Every coordinate is free (scipy's nnls agrees), one of them small next
  # to the rounding of a large gradient: the derivative is the
  # least-squares one, pinv(A), in every row.
  rng = np.random.default_rng(6)
  A = rng.normal(size=(5000, 3)) * 10
  b = A @ np.array([1.0, 0.5, 5e-4]) + rng.normal(size=5000) * 0.1
  assert (so.nnls(A, b)[0] > 0).all()
  A32, b32 = jnp.asarray(A, jnp.float32), jnp.asarray(b, jnp.float32)
  J = np.asarray(jax.jacobian(lambda b: posconstr.nnls(A32, b).x)(b32))
  P = np.linalg.pinv(A)
  for row, want in zip(J, P):
    assert np.linalg.norm(row - want) <= 1e-4 * np.linalg.norm(want)
  # A box QP scaled by 1e7 with its solution inside: dx/dc = -Q^-1.
  Q = jnp.array([[2.0, 1.0], [1.0, 2.0]]) * 1e7
  c = -Q @ jnp.array([0.3, 0.6])
  J = jax.jacobian(lambda c: posconstr.box_qp(Q, c, 0.0, 1.0).x)(c)
  np.testing.assert_allclose(np.asarray(J), -np.linalg.inv(np.asarray(Q)),
                             rtol=1e-4)
