r"""Dense solves on the free set for the active-set QP solver (``_quadratic``).

Every right-hand side (column ``j``) has its own free set :math:`F_j`; the
solver needs :math:`z` with

.. math::

  (G_{F_jF_j} + \tau I)\, z_{F_j} = r_{F_j}, \qquad z_i = 0 \ (i \notin F_j),

i.e. a solve with the *masked* matrix that equals :math:`G + \tau I` on
:math:`F_j \times F_j` and the identity elsewhere. Shapes are fixed, so the
masked matrix is always :math:`n \times n`. Two implementations
(:func:`masked_solve` picks by the static sizes):

* :func:`masked_solve_lapack`: one LAPACK Cholesky per column (XLA:CPU runs
  a batch of small factorizations one lane at a time).
* :func:`masked_solve_unrolled`: a left-looking Cholesky written out column
  by column (``n`` static), vectorized over the columns: every step is one
  elementwise kernel over all right-hand sides. For ``n = 20`` it is 1.6x
  faster than the LAPACK loop at 512 columns and 6x at 10,000; its compile
  time grows like ``n^2`` (about 4 s at ``n = 20``), hence
  :data:`UNROLL_MAX_N`.

The first iteration has every coordinate free and shares one factorization
of ``G`` across the columns (:func:`full_solve`).

The ridge :math:`\tau = n \epsilon \max_i G_{ii}` keeps a singular
:math:`G_{FF}` (rank-deficient ``A``, a zero column) factorizable; on a
well-conditioned problem its effect (relative :math:`\tau /
\lambda_{\min}(G_{FF})`) is below the rounding error of the solve.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

UNROLL_MAX_N = 24  # masked_solve_unrolled for n <= this many unknowns
UNROLL_MIN_COLS = 32  # and at least this many right-hand sides.


def ridge(G: jax.Array) -> jax.Array:
  r""":math:`\tau = n \epsilon \max_i |G_{ii}|`, at least
  :math:`\sqrt{\text{tiny}}` (1e-154 in float64): along a direction without
  curvature the solve then gives a huge but finite step, which the bounds
  clip, where a zero ridge would give inf or NaN."""
  n = G.shape[-1]
  info = jnp.finfo(G.dtype)
  top = jnp.max(jnp.abs(jnp.diagonal(G, axis1=-2, axis2=-1)), axis=-1)
  return jnp.maximum(n * info.eps * top, jnp.sqrt(info.tiny))


def _cho_solve(L: jax.Array, b: jax.Array) -> jax.Array:
  """``(L L^T)^{-1} b`` by two triangular solves (``L`` lower)."""
  y = jax.lax.linalg.triangular_solve(L, b, left_side=True, lower=True)
  return jax.lax.linalg.triangular_solve(L, y, left_side=True, lower=True,
                                         transpose_a=True)


def full_solve(G: jax.Array, r: jax.Array) -> jax.Array:
  r"""Solves :math:`(G + \tau I) z = r` for all columns of ``r`` (n, k) at once.

  One factorization of the shared ``G``. With more columns than unknowns the
  inverse is formed and applied by matrix products (XLA:CPU's triangular
  solve with many right-hand sides is slow), with one step of iterative
  refinement. Returns NaN only if ``G`` is not positive semidefinite (the
  caller treats a non-finite solve as a failure).
  """
  n, k = r.shape
  M = G + ridge(G) * jnp.eye(n, dtype=G.dtype)
  L = jax.lax.linalg.cholesky(M, symmetrize_input=False)
  if k <= n:
    return _cho_solve(L, r)
  K = _cho_solve(L, jnp.eye(n, dtype=G.dtype))
  z = K @ r
  return z + K @ (r - M @ z)


def masked_matrices(G: jax.Array, free: jax.Array) -> jax.Array:
  """(k, n, n): ``G + tau I`` on ``F_j x F_j`` and the identity elsewhere."""
  fm = free.T
  both = fm[:, :, None] & fm[:, None, :]
  diag = jnp.where(fm, ridge(G), 1.0).astype(G.dtype)
  eye = jnp.eye(G.shape[-1], dtype=bool)
  return jnp.where(both, G, 0.0) + jnp.where(eye, diag[:, :, None], 0.0)


def masked_solve_lapack(G: jax.Array, free: jax.Array,
                        r: jax.Array) -> jax.Array:
  """Masked solves (module doc) by one LAPACK Cholesky per column."""
  L = jax.lax.linalg.cholesky(masked_matrices(G, free), symmetrize_input=False)
  rhs = jnp.where(free, r, 0.0).T[:, :, None]
  return _cho_solve(L, rhs)[:, :, 0].T


def masked_solve_unrolled(G: jax.Array, free: jax.Array,
                          r: jax.Array) -> jax.Array:
  """Masked solves (module doc), unrolled over ``n``, vectorized over columns.

  Column ``j`` of the factor is an array of rows ``j..n-1`` by ``k``
  right-hand sides. Each finished column goes through
  ``lax.optimization_barrier``: otherwise XLA fuses every earlier column's
  arithmetic into each later one and recomputes it. A pivot that
  rounding makes smaller than ``tau`` is raised to ``tau``, so the result is
  finite for any symmetric ``G``; an inactive coordinate has a zero column,
  any positive pivot and a zero solution.
  """
  n = G.shape[-1]
  tau = ridge(G)
  m = free.astype(G.dtype)
  r = r * m
  cols, w = [], []
  for j in range(n):
    c = (G[j:, j] + jnp.where(jnp.arange(j, n) == j, tau, 0.0))[:, None]
    c = c * (m[j][None] * m[j:])
    wj = r[j]
    for p in range(j):
      lp = cols[p]
      c = c - lp[j - p:] * lp[j - p][None]
      wj = wj - lp[j - p] * w[p]
    s = jnp.sqrt(jnp.maximum(c[0], tau))
    col = jnp.concatenate([s[None], c[1:] / s[None]], axis=0)
    col, wj = jax.lax.optimization_barrier((col, wj / s))
    cols.append(col)
    w.append(wj)
  x: list = [None] * n
  for j in reversed(range(n)):
    acc = w[j]
    for i in range(j + 1, n):
      acc = acc - cols[j][i - j] * x[i]
    x[j] = jax.lax.optimization_barrier(acc / cols[j][0])
  return jnp.stack(x, axis=0)


def unrolled(n: int, k: int) -> bool:
  """Whether :func:`masked_solve` unrolls for these (static) sizes."""
  return n <= UNROLL_MAX_N and k >= UNROLL_MIN_COLS


def masked_solve(G: jax.Array, free: jax.Array, r: jax.Array) -> jax.Array:
  """Masked solves (module doc): ``free``, ``r`` and the result are (n, k)."""
  if unrolled(*free.shape):
    return masked_solve_unrolled(G, free, r)
  return masked_solve_lapack(G, free, r)
