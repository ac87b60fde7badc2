r"""The active-set iteration behind :func:`posconstr.box_qp` and ``nnls``.

Solves, for every column ``j`` of ``q`` (``n x k``) at once,

.. math::

  \min_x \tfrac12 x^\top G x + q_j^\top x
  \quad \text{s.t.} \quad l_j \le x \le u_j,

``G`` symmetric positive (semi)definite and shared by the columns. Each
coordinate is *free*, at its *lower* or at its *upper* bound; for a given
partition the candidate :math:`\hat x` sits on the bounds of the fixed
coordinates and solves
:math:`G_{FF} \hat x_F = -(q + G \hat x_{\text{fixed}})_F`
exactly (``_qp_linalg``). With :math:`y = G \hat x + q` the partition
is optimal iff :math:`l_F \le \hat x_F \le u_F`, :math:`y \ge 0` at lower and
:math:`y \le 0` at upper bounds (within rounding tolerances).

* **Block principal pivoting** (Kim & Park, "Fast nonnegative matrix
  factorization: an active-set-like method and comparisons", SIAM J. Sci.
  Comput. 33(6), 2011; Portugal, Judice & Vicente, Math. Comp. 63(208),
  1994), extended to two-sided bounds: every infeasible coordinate changes
  side at once (a free one goes to the bound it crossed, a fixed one with
  the wrong multiplier sign becomes free). This is the primal-dual active
  set method of Bergounioux, Ito & Kunisch (SIAM J. Control Optim. 37(4),
  1999) and finds the partition in a handful of iterations on
  well-conditioned problems. The count of infeasible coordinates is
  watched: if it has not reached a new minimum for ``PBAR + 1`` iterations,
* **a monotone safeguard** takes over for that column: projected Newton
  steps (Bertsekas, SIAM J. Control Optim. 20(2), 1982) from the best
  feasible point seen, each the exact minimizer on the face of its
  non-binding coordinates followed by an Armijo search along the projected
  path. It decreases the objective at every step, so it cannot cycle; the
  first exact face minimizer that satisfies the KKT test ends the column.
  (Kim & Park fall back to Murty's single-pivot rule instead; on
  ill-conditioned problems that takes tens of iterations, and it needs
  a positive definite ``G`` to terminate.)

The first iteration is from the all-free partition (the unconstrained
solution; with many columns, one shared factorization of ``G``); with a
warm start ``x0`` the partition is read off ``x0`` instead.

All columns iterate in lock-step inside ``lax.while_loop``; a column that
has converged is frozen. Each column stops after ``maxiter`` iterations.
With many columns the last quarter is gathered into a narrower buffer, so
that the few slow columns do not cost a full-width iteration each; where
the full width would take too much memory, the columns go through a
fixed-width buffer as a work queue (``_stream``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from posconstr.solvers import _qp_linalg as linalg

FREE, LOWER, UPPER = 0, 1, 2
PBAR = 3  # Kim & Park's p-bar: non-improving exchanges before the safeguard.
ARMIJO = 1e-4
MAX_HALVINGS = 30
TOL_FACTOR = 8  # Feasibility tolerances, in units of rounding error.
SHARED_FIRST_MIN_COLS = 64
COMPACT_MIN_COLS = 1024  # With this many columns, the last quarter is
# gathered into a buffer of k/4 columns. Columns whose masked matrices would
# take more than FULL_WIDTH_BYTES go through a work queue instead, of
# STREAM_MAX_WIDTH columns (or fewer, to keep the matrices to STREAM_BYTES).
FULL_WIDTH_BYTES = 2**26
STREAM_MAX_WIDTH = 512
STREAM_BYTES = 2**23


class State(NamedTuple):
  """Per-column iteration state (the column is the last axis)."""
  status: jax.Array  # (n, k) int8: FREE, LOWER or UPPER
  x_hat: jax.Array  # (n, k) the last partition's solution
  x_inc: jax.Array  # (n, k) the best feasible point (the safeguard's iterate)
  g_inc: jax.Array  # (n, k) its gradient
  f_inc: jax.Array  # (k,) its objective
  best: jax.Array  # (k,) int32 fewest infeasible coordinates so far
  p: jax.Array  # (k,) int32 non-improving exchanges left
  pn: jax.Array  # (k,) bool: in the safeguard
  done: jax.Array  # (k,) bool
  conv: jax.Array  # (k,) bool
  iters: jax.Array  # (k,) int32


def _value_and_grad(G, q, x):
  g = G @ x + q
  return jnp.sum(x * (0.5 * (g + q)), axis=0), g


def _line_search(G, q, lo, hi, x0, g0, f0, d, need):
  """Armijo backtracking along ``clip(x0 + a d)``, ``a = 1/2, 1/4, ...``.

  (``a = 1`` has been tried by the caller.) Returns the accepted point, its
  gradient and value (``x0``... where nothing was needed or accepted) and
  the columns where no step was accepted.
  """

  def cond(s):
    return jnp.any(s[4]) & (s[5] < MAX_HALVINGS)

  def body(s):
    x, g, f, alpha, left, j = s
    alpha = jnp.where(left, 0.5 * alpha, alpha)
    xt = jnp.clip(x0 + alpha[None] * d, lo, hi)
    ft, gt = _value_and_grad(G, q, xt)
    ok = left & (ft <= f0 + ARMIJO * jnp.sum(g0 * (xt - x0), axis=0))
    return (jnp.where(ok, xt, x), jnp.where(ok, gt, g), jnp.where(ok, ft, f),
            alpha, left & ~ok, j + 1)

  init = (x0, g0, f0, jnp.ones_like(f0), need, jnp.zeros((), jnp.int32))
  x, g, f, _, left, _ = jax.lax.while_loop(cond, body, init)
  return x, g, f, left


def _face(x, g, lo, hi, movable):
  """The partition a feasible ``x`` suggests: fixed where on a bound with the
  gradient pushing outwards (or a fixed variable), free elsewhere."""
  at_lo = (x <= lo) & ((g > 0) | ~movable)
  at_hi = (x >= hi) & (g < 0) & movable
  return jnp.where(at_lo, LOWER, jnp.where(at_hi, UPPER, FREE))


def _iterate(G, rowsum, prob, st: State, first: bool, maxiter: int,
             cold: bool, zero_fixed: bool) -> State:
  """One solve and partition update for every column that is not done.

  ``first``: every coordinate is free (one shared factorization). ``cold``:
  no warm start, so a column's first iteration was from the all-free
  partition; its next partition is the face of ``clip(x_hat)`` (with the
  gradient there) rather than the exchange of the primal-infeasible
  coordinates, which saves an iteration on many problems. ``zero_fixed``:
  every fixed value is 0 (NNLS), so the product with it is skipped.
  """
  q, lo, hi = prob
  k = q.shape[1]
  eps = jnp.finfo(q.dtype).eps
  active = ~st.done
  free = st.status == FREE
  at_lo, at_hi = st.status == LOWER, st.status == UPPER
  zero = jnp.zeros((), q.dtype)
  xfix = jnp.where(at_lo, lo, jnp.where(at_hi, hi, zero))
  if first:
    x_hat = linalg.full_solve(G, -q)
  else:
    z = linalg.masked_solve(G, free, -q if zero_fixed else -(q + G @ xfix))
    x_hat = jnp.where(free, z, xfix)
  finite = jnp.all(jnp.isfinite(x_hat), axis=0)
  x_hat = jnp.where(finite, x_hat, st.x_inc)
  xc = jnp.clip(x_hat, lo, hi)
  both = G @ jnp.concatenate([x_hat, xc], axis=1)
  y, gc = both[:, :k] + q, both[:, k:] + q
  fc = jnp.sum(xc * (0.5 * (gc + q)), axis=0)

  # KKT test of the partition, with tolerances of the size of the rounding
  # errors in x_hat and in y = G x_hat + q.
  scale = jnp.max(jnp.abs(x_hat), axis=0)
  tx = TOL_FACTOR * eps * scale
  ty = TOL_FACTOR * eps * (rowsum[:, None] * scale + jnp.abs(q))
  movable = lo < hi
  below = free & (x_hat < lo - tx)
  above = free & (x_hat > hi + tx)
  viol = (below | above | (at_lo & movable & (y < -ty))
          | (at_hi & movable & (y > ty)))
  ninf = jnp.sum(viol, axis=0, dtype=jnp.int32)
  kkt = (ninf == 0) & finite

  # Block pivoting columns: keep the best feasible point seen.
  bpp = active & ~st.pn
  better = bpp & finite & (fc < st.f_inc)
  x_inc = jnp.where(better, xc, st.x_inc)
  g_inc = jnp.where(better, gc, st.g_inc)
  f_inc = jnp.where(better, fc, st.f_inc)

  # Safeguard columns: x_hat minimizes the face of x_inc; search along it.
  search = active & st.pn & ~kkt & finite
  ok1 = fc <= st.f_inc + ARMIJO * jnp.sum(st.g_inc * (xc - st.x_inc), axis=0)
  x_ls, g_ls, f_ls, failed = _line_search(
      G, q, lo, hi, st.x_inc, st.g_inc, st.f_inc, x_hat - st.x_inc,
      search & ~ok1)
  take1 = search & ok1
  x_inc = jnp.where(take1, xc, jnp.where(search, x_ls, x_inc))
  g_inc = jnp.where(take1, gc, jnp.where(search, g_ls, g_inc))
  f_inc = jnp.where(take1, fc, jnp.where(search, f_ls, f_inc))
  stalled = search & failed

  improve = ninf < st.best
  best = jnp.where(bpp & improve, ninf, st.best)
  p = jnp.where(bpp, jnp.where(improve, PBAR, st.p - 1), st.p)
  switch = bpp & ~improve & (st.p <= 0) & ~kkt
  pn = st.pn | switch
  flipped = jnp.where(below, LOWER, jnp.where(above, UPPER, jnp.where(
      viol, FREE, st.status)))
  if cold:
    flipped = jnp.where(st.iters == 0, _face(xc, gc, lo, hi, movable), flipped)
  face = _face(x_inc, g_inc, lo, hi, movable)
  stop = kkt | ~finite | stalled | (st.iters + 1 >= maxiter)
  status = jnp.where(active & ~stop, jnp.where(pn, face, flipped), st.status)
  return State(status.astype(jnp.int8), jnp.where(active, x_hat, st.x_hat),
               x_inc, g_inc, f_inc, best, p, pn, st.done | (active & stop),
               st.conv | (active & kkt), st.iters + active.astype(jnp.int32))


def buffer_width(n: int, k: int) -> int:
  """Columns iterated at once: all of them, or a work queue's buffer."""
  per_column = 8 * n * n // (2 if linalg.unrolled(n, k) else 1)
  if k * per_column <= FULL_WIDTH_BYTES:
    return k
  return min(k, STREAM_MAX_WIDTH, max(64, STREAM_BYTES // per_column))


def _take(tree, idx):
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=-1), tree)


def _where(mask, a, b):
  return jax.tree.map(lambda u, v: jnp.where(mask, u, v), a, b)


def _result(st: State, lo, hi):
  """``(x, converged, iterations)`` of finished columns."""
  x = jnp.where(st.conv, jnp.clip(st.x_hat, lo, hi), st.x_inc)
  return x, st.conv, st.iters


def _stream(prob, st: State, width: int, step):
  """Iterates the unfinished columns of ``st`` through a buffer of ``width``.

  A work queue: whenever a column in the buffer finishes, its result is
  written out and the next unfinished column (in its state ``st``) takes
  the slot, so the work is the total number of column-iterations (no column
  waits for the slowest one) and one compiled loop body serves any number
  of columns. Returns the results of all columns, as :func:`_result`.
  """
  k = st.done.shape[0]
  order = jnp.argsort(st.done, stable=True).astype(jnp.int32)
  left = jnp.sum(~st.done, dtype=jnp.int32)
  live = jnp.arange(width, dtype=jnp.int32) < left
  cols = order[:width]
  buf = _take(st, cols)
  buf = buf._replace(done=buf.done | ~live)

  def cond(c):
    return jnp.any(~c[0].done)

  def body(c):
    buf, sub_prob, cols, live, ptr, out = c
    buf = step(sub_prob, buf)
    fin = buf.done & live
    target = jnp.where(fin, cols, k)  # k: out of range, dropped
    out = jax.tree.map(lambda a, r: a.at[..., target].set(r, mode="drop"),
                       out, _result(buf, sub_prob[1], sub_prob[2]))
    pos = ptr + jnp.cumsum(fin, dtype=jnp.int32) - 1
    fresh = fin & (pos < left)
    new_cols = jnp.where(fresh, order[jnp.clip(pos, 0, k - 1)], cols)
    buf = _where(fresh, _take(st, new_cols), buf)
    sub_prob = _where(fresh, _take(prob, new_cols), sub_prob)
    live = jnp.where(fin, fresh, live)
    return (buf, sub_prob, new_cols, live,
            ptr + jnp.sum(fin, dtype=jnp.int32), out)

  init = (buf, _take(prob, cols), cols, live, jnp.minimum(left, width),
          _result(st, prob[1], prob[2]))
  return jax.lax.while_loop(cond, body, init)[-1]


def solve_columns(G: jax.Array, q: jax.Array, lo: jax.Array, hi: jax.Array,
                  x0: Optional[jax.Array], maxiter: int,
                  zero_fixed: bool = False):
  """Runs the iteration (module doc) on ``q``, ``lo``, ``hi`` of shape (n, k).

  Returns ``(x, converged, num_iter)``: ``x`` (n, k) within the bounds (the
  optimal partition's solution where converged, else the best feasible
  point found), and per-column (k,) flags and iteration counts.
  ``zero_fixed`` (static): ``lo`` is 0 and ``hi`` infinite (NNLS).
  """
  n, k = q.shape
  dtype = q.dtype
  rowsum = jnp.sum(jnp.abs(G), axis=1)
  if x0 is None:
    status = jnp.full((n, k), FREE, jnp.int8)
    x_inc = jnp.clip(jnp.zeros((n, k), dtype), lo, hi)
  else:
    x_inc = jnp.clip(x0, lo, hi)
    status = jnp.where(x0 <= lo, LOWER, jnp.where(x0 >= hi, UPPER, FREE))
    status = status.astype(jnp.int8)
  f_inc, g_inc = _value_and_grad(G, q, x_inc)
  izero = jnp.zeros((k,), jnp.int32)
  no = jnp.zeros((k,), bool)
  st = State(status, x_inc, x_inc, g_inc, f_inc, izero + n + 1, izero + PBAR,
             no, no | (maxiter == 0), no, izero)
  prob = (q, lo, hi)
  if x0 is None and maxiter > 0 and k >= SHARED_FIRST_MIN_COLS:
    # All coordinates start free: one factorization serves every column.
    # (With few columns the loop's masked solve does the same; one compiled
    # copy of the iteration compiles twice as fast.)
    st = _iterate(G, rowsum, prob, st, True, maxiter, True, zero_fixed)

  def step(sub_prob, s):
    return _iterate(G, rowsum, sub_prob, s, False, maxiter, x0 is None,
                    zero_fixed)

  width = buffer_width(n, k)
  if width < k:
    return _stream(prob, st, width, step)
  if k < COMPACT_MIN_COLS:
    st = jax.lax.while_loop(lambda s: jnp.any(~s.done),
                            lambda s: step(prob, s), st)
    return _result(st, lo, hi)
  # Lock-step at full width until a quarter is left, then at k/4.
  st = jax.lax.while_loop(lambda s: jnp.sum(~s.done) > k // 4,
                          lambda s: step(prob, s), st)
  idx = jnp.argsort(st.done, stable=True)[:k // 4]
  sub_prob, sub = _take(prob, idx), _take(st, idx)
  sub = jax.lax.while_loop(lambda s: jnp.any(~s.done),
                           lambda s: step(sub_prob, s), sub)
  st = jax.tree.map(lambda a, b: a.at[..., idx].set(b), st, sub)
  return _result(st, lo, hi)
