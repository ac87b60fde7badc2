"""The solvers compared by ``lbfgsb`` and ``nnls_batch`` on NNLS problems.

Each JAX solver returns ``(x, iterations, evaluations, converged, stop)``;
the SciPy ones return SciPy's results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import posconstr
from benchmarks import _timing
from benchmarks._nnls_problems import pg0_of


def least_squares(A, b):
  """``0.5 ||A x - b||^2`` with the gradient ``r @ A``, written out.

  On XLA:CPU with ``A`` a runtime argument, ``A.T @ r`` materializes the
  transpose of ``A`` in every evaluation (3.6x slower than ``r @ A`` at
  5000x2000 float64, 12x at 2000x500; with ``A`` a compile-time constant the
  transpose is folded away and it looks fastest, a trap). Written out,
  ``r @ A`` is also faster than what autodiff emits for the same
  expression. SciPy's L-BFGS-B gets ``A.T @ r`` (numpy's BLAS reads the
  transpose in place).
  """
  @jax.custom_jvp
  def fun(x):
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r)

  @fun.defjvp
  def fun_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r), jnp.vdot(r @ A, dx)

  return fun


def posconstr_solve(tol: float, maxiter: int, memory_size: int):
  def solve(A, b):
    res = posconstr.minimize(least_squares(A, b),
                             jnp.zeros(A.shape[1], A.dtype), lower=0.0,
                             tol=tol, maxiter=maxiter,
                             memory_size=memory_size)
    return (res.params, res.num_iter, res.num_fun_evals, res.converged,
            res.linesearch_failed.astype(jnp.int32)
            + 2 * res.stalled.astype(jnp.int32))
  return solve


def posconstr_status(converged, stop) -> str:
  """``stop``: 1 the line search failed twice, 2 stalled (see minimize)."""
  return "converged" if converged else {
      1: "linesearch failed", 2: "stalled"}.get(int(stop), "maxiter")


def jaxopt_solve(tol: float, maxiter: int, memory_size: int):
  """jaxopt.LBFGSB, its absolute tolerance ``tol * pg0`` (same stopping
  point as the relative ``tol`` of the others)."""
  import jaxopt  # pylint: disable=g-import-not-at-top

  def fun(x, A, b):
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r)

  def solve(A, b):
    n = A.shape[1]
    abs_tol = tol * jnp.maximum(jnp.max(b @ A), 0.0)
    solver = jaxopt.LBFGSB(fun=fun, tol=abs_tol, maxiter=maxiter,
                           history_size=memory_size)
    bounds = (jnp.zeros(n, A.dtype), jnp.full(n, jnp.inf, A.dtype))
    res = solver.run(jnp.zeros(n, A.dtype), bounds, A, b)
    st = res.state
    return (res.params, st.iter_num, st.num_fun_eval, st.error <= abs_tol,
            st.failed_linesearch)
  return solve


def jaxopt_status(converged, failed) -> str:
  return "converged" if converged else (
      "linesearch failed" if failed else "maxiter")


def scipy_lbfgsb(A, b, tol: float, maxiter: int, memory_size: int):
  """``gtol = tol * pg0`` (scipy's gtol is the same absolute ``||x - P(x -
  g)||_inf``); ``ftol = 0``: stop only on gtol or when no progress is left."""
  n = A.shape[1]

  def fun_and_grad(x):
    r = A @ x - b
    return 0.5 * float(r @ r), A.T @ r

  return scipy.optimize.minimize(
      fun_and_grad, np.zeros(n), jac=True, method="L-BFGS-B",
      bounds=scipy.optimize.Bounds(np.zeros(n), np.full(n, np.inf)),
      options=dict(maxcor=memory_size, ftol=0.0, gtol=tol * pg0_of(A, b),
                   maxiter=maxiter, maxfun=20 * maxiter))


def scipy_status(res) -> str:
  msg = str(res.message)
  for key, short in (("PROJECTED GRADIENT", "converged (pgtol)"),
                     ("REDUCTION OF F", "no progress (ftol=0)"),
                     ("ABNORMAL", "abnormal line search")):
    if key in msg:
      return short
  return msg[:40]


def scipy_nnls(A, b):
  return scipy.optimize.nnls(A, b, maxiter=50 * A.shape[1])


def eval_callables(A, b):
  """Callables doing ``k`` f+grad evaluations (jitted loop; numpy), and ``k``.

  The JAX one is a ``fori_loop`` of ``k`` chained evaluations: what an
  evaluation costs inside ``minimize``'s while loop, without dispatch; for a
  batch, one vmapped evaluation of all problems. They are timed in the same
  interleaved rounds as the solvers (same machine conditions).
  """
  batched = A.ndim == 3
  Aj, bj = jnp.asarray(A), jnp.asarray(b)
  x = np.full(A.shape[:-2] + A.shape[-1:], 0.1)
  xj = jnp.asarray(x)
  vg = jax.value_and_grad(lambda x, A, b: least_squares(A, b)(x))
  vg = jax.vmap(vg) if batched else vg
  k = int(np.clip(20e-3 / (2 * A.nbytes / 1e10), 3, 1000))  # ~20 ms a call

  def chained(x, A, b):
    def body(_, carry):
      x, acc = carry
      v, g = vg(x, A, b)
      return x - 1e-12 * g, acc + v
    return jax.lax.fori_loop(0, k, body, (x, jnp.zeros(x.shape[:-1])))
  compiled, _ = _timing.compile_timed(jax.jit(chained), xj, Aj, bj)

  def numpy_evals():
    for _ in range(k):
      if batched:
        r = (A @ x[:, :, None])[..., 0] - b
        g = (r[:, None, :] @ A)[:, 0]
      else:
        g = A.T @ (A @ x - b)
    return g
  return {"jax": lambda: compiled(xj, Aj, bj), "numpy": numpy_evals}, k
