r"""Bound-constrained quadratic programs: ``nnls`` and ``box_qp``.

Both reduce to

.. math::

  \min_x \tfrac12 x^\top G x + q^\top x \quad \text{s.t.} \quad
  l \le x \le u

with ``G`` symmetric positive semidefinite, one column of ``q`` per
right-hand side, solved by the active-set iteration of
``posconstr.solvers._qp_active_set`` (block principal pivoting with exact solves
on the free set, and a monotone projected-Newton safeguard). The solution is
differentiable in ``G``, ``q`` and the bounds by the implicit function theorem
on the free set (``posconstr.solvers._implicit``), with an exact dense solve for
the reduced system; ``nnls`` forms ``G = A^T A`` and ``q = -A^T b``
outside that rule, so derivatives in ``A`` and ``b`` follow by the chain
rule.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint
from posconstr.solvers import _implicit
from posconstr.solvers import _qp_active_set as active_set
from posconstr.solvers import _qp_linalg as linalg


class QPResult(NamedTuple):
  """The outcome of :func:`nnls` or :func:`box_qp`.

  Shapes: ``x`` and ``grad`` are like the solution, (n,) for one right-hand
  side or (n, k) for k of them; the other fields are scalars, or (k,) (one
  per right-hand side).

  Attributes:
    x: the solution, within the bounds bit for bit; coordinates on the
      active set are exactly equal to their bound (e.g. exactly 0 for NNLS).
    objective: ``0.5 ||A x - b||^2`` (``nnls``) or ``0.5 x^T Q x + c^T x``
      (``box_qp``).
    grad: the gradient of the objective at ``x``; on the active set it is
      the Lagrange multiplier of the bound (``>= 0`` at a lower bound,
      ``<= 0`` at an upper one).
    kkt_residual: ``||x - clip(x - grad, lower, upper)||_inf`` (0 exactly at
      a KKT point; of the order of rounding errors at a converged one).
    num_iter: linear solves on a free set (iterations) taken.
    converged: whether the optimal partition was found (the KKT conditions
      hold within rounding tolerances). If False (``maxiter`` reached, or
      the safeguard's line search failed on a singular or badly scaled
      problem), ``x`` is the best feasible point found.
  """

  x: jax.Array
  objective: jax.Array
  grad: jax.Array
  kkt_residual: jax.Array
  num_iter: jax.Array
  converged: jax.Array


# ---------------------------------------------------------------------------
# The solve, with its derivative.


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7))
def _solve(G, q, lo, hi, x0, maxiter: int, warm: bool, nonneg: bool):
  return active_set.solve_columns(G, q, lo, hi, x0 if warm else None,
                                  maxiter, zero_fixed=nonneg)


@_solve.defjvp
def _solve_jvp(maxiter, warm, nonneg, primals, tangents):
  G, q, lo, hi, x0 = primals
  dG, dq, dlo, dhi, _ = tangents
  x, conv, iters = _solve(G, q, lo, hi, x0, maxiter, warm, nonneg)
  dx = tangent(G, q, lo, hi, x, dG, dq, dlo, dhi)
  zeros = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
  return (x, conv, iters), (dx, zeros(conv), zeros(iters))


def tangent(G, q, lo, hi, x, dG, dq, dlo, dhi):
  r"""``dx`` at the solution ``x``: the implicit function theorem on the free
  set, with the exact masked Cholesky solve of :math:`G_{FF}`."""
  grad = G @ x + q
  free = _implicit.free_mask(x, lo, hi, grad)  # as solution_tangent's

  def solve(matvec, b):
    del matvec  # G is at hand: solve exactly (identity on the active set).
    return jnp.where(free, linalg.masked_solve(G, free, b), b)

  return _implicit.solution_tangent(
      lambda z, G, q: G @ z + q, x, lo, hi, (G, q), dlo, dhi, (dG, dq),
      grad=grad, solve=solve)


# ---------------------------------------------------------------------------
# Argument checks.


def _float_array(owner: str, name: str, value) -> jax.Array:
  """``value`` as a JAX array; TypeError unless its dtype is floating."""
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(f"{owner}: `{name}` must be an array of floats, got "
                    f"{type(value).__name__}.") from e
  if not jnp.issubdtype(arr.dtype, jnp.floating):
    raise TypeError(
        f"{owner}: `{name}` must have a floating-point dtype, got {arr.dtype}"
        f" (e.g. pass jnp.asarray({name}, jnp.float32)).")
  return arr


def _bound(owner: str, name: str, value, default: float, n: int, shape,
           dtype, shown) -> jax.Array:
  """A bound broadcast to ``shape`` (n, k); a length-n vector is per row."""
  if value is None:
    return jnp.full(shape, default, dtype)
  if isinstance(value, bool) or getattr(value, "dtype", None) == jnp.bool_:
    raise TypeError(f"{owner}: `{name}` must be a number or an array of "
                    f"numbers, got {value!r}.")
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(f"{owner}: `{name}` must be a number or an array of "
                    f"numbers, got {type(value).__name__}.") from e
  if not (jnp.issubdtype(arr.dtype, jnp.integer)
          or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise TypeError(f"{owner}: `{name}` must be real, got dtype {arr.dtype}.")
  if arr.ndim == 1 and arr.shape[0] == n:
    arr = arr[:, None]
  try:
    arr = jnp.broadcast_to(arr, shape)
  except ValueError:
    raise ValueError(
        f"{owner}: `{name}` of shape {tuple(np.shape(value))} does not "
        f"broadcast to the solution's shape {shown}: use a scalar, a vector "
        f"of length {n} (one bound per variable) or an array broadcastable "
        f"to {shown}.") from None
  if _constraint.is_concrete(arr) and bool(jnp.any(jnp.isnan(arr))):
    raise ValueError(f"{owner}: `{name}` contains NaN.")
  return arr.astype(dtype)


def _check_box(owner: str, lo, hi) -> None:
  if not (_constraint.is_concrete(lo) and _constraint.is_concrete(hi)):
    return
  bad = np.argwhere(np.asarray(lo > hi))
  if bad.size:
    i = tuple(int(v) for v in bad[0])
    raise ValueError(f"{owner}: need lower <= upper, got lower="
                     f"{float(lo[i])!r} > upper={float(hi[i])!r} at "
                     f"index {i}.")
  if bool(jnp.any(lo == jnp.inf)) or bool(jnp.any(hi == -jnp.inf)):
    raise ValueError(f"{owner}: `lower` must not be +inf nor `upper` -inf "
                     "(the problem would be infeasible).")


def _maxiter(owner: str, maxiter, n: int) -> int:
  if maxiter is None:
    return 5 * n + 100
  try:
    value = operator.index(maxiter)
  except TypeError:
    raise TypeError(f"{owner}: `maxiter` must be an int, got {maxiter!r} of "
                    f"type {type(maxiter).__name__}.") from None
  if value < 0:
    raise ValueError(f"{owner}: `maxiter` must be >= 0, got {maxiter!r}.")
  return value


def _start(owner: str, x0, shape, dtype):
  if x0 is None:
    return jnp.zeros(shape, dtype), False
  arr = _float_array(owner, "x0", x0)
  if arr.ndim == 1 and arr.shape[0] == shape[0]:
    arr = arr[:, None]
  if arr.shape != shape:
    raise ValueError(f"{owner}: `x0` must have the solution's shape, got "
                     f"{tuple(np.shape(x0))}.")
  return jnp.broadcast_to(arr, shape).astype(dtype), True


def _finish(G, q, lo, hi, x, conv, iters, vector, dtype, objective=None):
  """The result fields, in ``dtype``; 1-D ``c``/``b``: one column, squeezed."""
  grad = G @ x + q
  if objective is None:
    objective = jnp.sum(x * (0.5 * (grad + q)), axis=0)
  kkt = jnp.max(jnp.abs(x - jnp.clip(x - grad, lo, hi)), axis=0)
  x_out = x.astype(dtype)
  if x_out.dtype != x.dtype:  # Solved wider: round into the box, not out.
    x_out = jnp.clip(x_out, _constraint.cast_bound(lo, dtype, round_up=True),
                     _constraint.cast_bound(hi, dtype, round_up=False))
  out = QPResult(x_out, objective.astype(dtype), grad.astype(dtype),
                 kkt.astype(dtype), iters, conv)
  if vector:
    out = QPResult(*(v[:, 0] if v.ndim == 2 else v[0] for v in out))
  return out


def _work_dtype(dtype):
  """float16 and bfloat16 are solved in float32 (no LAPACK for them)."""
  return jnp.promote_types(dtype, jnp.float32)


def _gram(A, b):
  """``A^T A`` (a contraction over the rows) and ``A^T b`` as ``(b^T A)^T``
  (a matrix-vector product for one right-hand side, not a contraction)."""
  dims = (((0,), (0,)), ((), ()))
  return jax.lax.dot_general(A, A, dims), (b.T @ A).T


# ---------------------------------------------------------------------------
# Public functions.


def box_qp(Q, c, lower=None, upper=None, *, x0=None,
           maxiter: Optional[int] = None) -> QPResult:
  r"""Solves a convex quadratic program with bounds on the variables.

  .. math::

    \min_x \tfrac12 x^\top Q x + c^\top x \quad \text{s.t.} \quad
    \mathrm{lower} \le x \le \mathrm{upper}

  by an active-set method with exact solves on the free set: block
  principal pivoting (Kim & Park 2011; the primal-dual active set method of
  Bergounioux, Ito & Kunisch 1999) with a monotone projected-Newton
  safeguard, so that it ends in a few iterations on well-conditioned
  problems and cannot cycle on hard ones (see
  ``posconstr.solvers._qp_active_set``).
  Jittable and vmappable; the whole solve is one ``lax.while_loop``.
  Several problems sharing ``Q`` are solved together when ``c`` is a matrix
  (one problem per column), which is much faster than a loop.

  Differentiable (``jax.grad``, ``jax.jvp``, ``jax.vjp``) in ``Q``, ``c``,
  ``lower`` and ``upper`` by the implicit function theorem: active
  coordinates follow their bound; free ones solve
  :math:`Q_{FF}\, dx_F = -(dQ\, x + dc + Q_{FA}\, dx_A)_F` exactly.

  ``Q`` must be symmetric positive semidefinite (only its symmetric part is
  used). Every solve on a free set ``F`` adds the ridge
  :math:`\tau = n \epsilon \max_i Q_{ii}` (at least 1e-154 in float64) to
  :math:`Q_{FF}`, which is below rounding error on well-conditioned problems
  and keeps a singular :math:`Q_{FF}` solvable: the result is then a
  minimizer (not the minimum-norm one), finite, never NaN. If the problem
  is unbounded below (a direction of zero curvature and descent that no
  bound stops), the result is the solution of the ridge-regularized
  problem: huge (about :math:`|c| / \tau`) but finite, with ``converged``
  True and a ``kkt_residual`` of the order of ``|c|``, which tells.

  Args:
    Q: (n, n) symmetric positive semidefinite, floating dtype.
    c: (n,) or (n, k) (k problems sharing ``Q``).
    lower: None (unbounded), a scalar, a vector of length n (per variable),
      or an array broadcastable to the solution's shape; may be ``-inf``.
    upper: as ``lower``; may be ``inf``.
    x0: optional warm start (the solution's shape): the first partition is
      read off it (at a bound -> fixed there, else free). Without it the
      iteration starts from the unconstrained solution.
    maxiter: maximum number of iterations (default ``5 n + 100``; typical
      runs take 2 to 6).

  Returns:
    A :class:`QPResult` in the dtype of ``Q`` and ``c``.

  Raises:
    TypeError: a non-floating ``Q``, ``c`` or ``x0``, a non-real bound, a
      non-integer ``maxiter``.
    ValueError: wrong shapes, ``lower > upper`` (when concrete; traced
      bounds with ``lower > upper`` give NaN ``x`` and ``converged`` False
      for the problems concerned), NaN bounds, negative ``maxiter``.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import box_qp
    >>> Q = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> c = jnp.array([-4.0, 1.0])
    >>> res = box_qp(Q, c, lower=0.0, upper=1.5)
    >>> res.x.tolist(), bool(res.converged)
    ([1.5, 0.0], True)
  """
  owner = "box_qp"
  Q = _float_array(owner, "Q", Q)
  c = _float_array(owner, "c", c)
  if Q.ndim != 2 or Q.shape[0] != Q.shape[1] or Q.shape[0] == 0:
    raise ValueError(f"box_qp: `Q` must be a non-empty square matrix, got "
                     f"shape {Q.shape}.")
  n = Q.shape[0]
  if c.ndim not in (1, 2) or c.shape[0] != n:
    raise ValueError(f"box_qp: `c` must have shape ({n},) or ({n}, k) to "
                     f"match `Q` of shape {Q.shape}, got {c.shape}.")
  dtype = jnp.result_type(Q, c)
  work = _work_dtype(dtype)
  vector = c.ndim == 1
  q = (c[:, None] if vector else c).astype(work)
  Q = Q.astype(work)
  G = 0.5 * (Q + Q.T)
  shape = q.shape
  shown = c.shape
  lo = _bound(owner, "lower", lower, -np.inf, n, shape, work, shown)
  hi = _bound(owner, "upper", upper, np.inf, n, shape, work, shown)
  _check_box(owner, lo, hi)
  start, warm = _start(owner, x0, shape, work)
  iters = _maxiter(owner, maxiter, n)
  if shape[1] == 0:
    return _finish(G, q, lo, hi, jnp.zeros(shape, work), jnp.ones((0,), bool),
                   jnp.zeros((0,), jnp.int32), vector, dtype)
  x, conv, it = _solve(G, q, lo, hi, start, iters, warm, False)
  if not (_constraint.is_concrete(lo) and _constraint.is_concrete(hi)):
    # Traced bounds (jit, vmap) are checked here: an empty box has no
    # solution, so its columns are NaN and not converged.
    empty = jnp.any((lo > hi) | (lo == jnp.inf) | (hi == -jnp.inf), axis=0)
    x = jnp.where(empty, jnp.nan, x)
    conv = conv & ~empty
  return _finish(G, q, lo, hi, x, conv, it, vector, dtype)


def nnls(A, b, *, x0=None, maxiter: Optional[int] = None) -> QPResult:
  r"""Non-negative least squares, for one or many right-hand sides.

  .. math::

    \min_x \tfrac12 \|A x - b\|_2^2 \quad \text{s.t.} \quad x \ge 0

  ``b`` of shape (m,) gives ``x`` of shape (n,); ``b`` of shape (m, k) gives
  ``X`` of shape (n, k), one column per right-hand side (as
  ``numpy.linalg.lstsq``). The Gram matrix ``A^T A`` and ``A^T b`` are formed
  once, and the problem is solved as :func:`box_qp` with lower bound 0: exact
  solves on the free set, so the result has the active set of
  ``scipy.optimize.nnls`` and its objective to rounding error on
  well-conditioned problems, with ``x`` exactly 0 on the active set. The
  right-hand sides share one ``A^T A``, so an unmixing problem (one
  endmember matrix, ten thousand pixels) is solved in one call. Jittable,
  vmappable (over different ``A``), and differentiable in ``A`` and ``b``
  (see :func:`box_qp`; on the free set ``F``,
  :math:`\partial x_F / \partial b = (A_F^\top A_F)^{-1} A_F^\top`).

  If ``A`` is rank deficient (e.g. ``m < n``, or a zero column), the
  minimizer need not be unique; the result is a minimizer (not necessarily
  the one scipy returns) and is never NaN; a zero column gets ``x = 0``.

  Cost: the Gram matrix, then a few (typically 2 to 5) factorizations of
  ``n x n`` masked Gram matrices per right-hand side; the first call
  compiles (about 2 s; with ``n <= 24`` and at least 32 right-hand sides
  the factorization is unrolled over ``n``, about 5 to 10 s at ``n = 20``).

  Args:
    A: (m, n), floating dtype.
    b: (m,) or (m, k).
    x0: optional warm start of the solution's shape (see :func:`box_qp`).
    maxiter: maximum number of iterations (default ``5 n + 100``).

  Returns:
    A :class:`QPResult` in the dtype of ``A`` and ``b``; ``objective`` is
    ``0.5 ||A x - b||^2``.

  Raises:
    TypeError: non-floating ``A``, ``b`` or ``x0``; non-integer ``maxiter``.
    ValueError: wrong shapes; negative ``maxiter``.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import nnls
    >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> b = jnp.array([1.0, -1.0, 1.0])
    >>> res = nnls(A, b)
    >>> [round(float(v), 4) for v in res.x], bool(res.converged)
    ([0.0, 0.0714], True)
    >>> B = jnp.stack([b, 2 * b, -b], axis=1)  # three right-hand sides
    >>> [[round(float(v), 4) for v in row] for row in nnls(A, B).x]
    [[0.0, 0.0, 0.0], [0.0714, 0.1429, 0.0]]
  """
  owner = "nnls"
  A = _float_array(owner, "A", A)
  b = _float_array(owner, "b", b)
  if A.ndim != 2 or 0 in A.shape:
    raise ValueError(f"nnls: `A` must be a non-empty (m, n) matrix, got "
                     f"shape {A.shape}.")
  m, n = A.shape
  if b.ndim not in (1, 2) or b.shape[0] != m:
    raise ValueError(f"nnls: `b` must have shape ({m},) or ({m}, k) to "
                     f"match `A` of shape {A.shape}, got {b.shape}.")
  dtype = jnp.result_type(A, b)
  work = _work_dtype(dtype)
  A = A.astype(work)
  vector = b.ndim == 1
  b2 = (b[:, None] if vector else b).astype(work)
  shape = (n, b2.shape[1])
  start, warm = _start(owner, x0, shape, work)
  iters = _maxiter(owner, maxiter, n)
  G, Atb = _gram(A, b2)
  q = -Atb
  lo = jnp.zeros(shape, work)
  hi = jnp.full(shape, jnp.inf, work)
  if shape[1] == 0:
    return _finish(G, q, lo, hi, jnp.zeros(shape, work), jnp.ones((0,), bool),
                   jnp.zeros((0,), jnp.int32), vector, dtype)
  x, conv, it = _solve(G, q, lo, hi, start, iters, warm, True)
  r = A @ x - b2
  return _finish(G, q, lo, hi, x, conv, it, vector, dtype,
                 objective=0.5 * jnp.sum(r * r, axis=0))
