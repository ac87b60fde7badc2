"""The pieces of a bound-constrained L-BFGS step, on pytrees, leaf by leaf.

The method is the two-metric projected quasi-Newton method (Bertsekas,
"Projected Newton methods for optimization problems with simple
constraints", SIAM J. Control Optim. 20(2), 1982; Gafni & Bertsekas 1984;
Kim, Sra & Dhillon, "Tackling box-constrained optimization via a new
projected quasi-Newton approach", SIAM J. Sci. Comput. 2010), with the
L-BFGS inverse Hessian (Nocedal 1980), applied in the compact form of
Byrd, Nocedal & Schnabel (1994), as the metric on the free variables:

* the epsilon-active set ``A``: coordinates within ``eps_k`` of a bound whose
  gradient points out of the box, with ``eps_k = min(eps, ||x - P(x -
  gamma g)||_inf)`` (``gamma`` the L-BFGS scaling ``s^T y / y^T y``, so the
  width is in units of ``x`` whatever the scale of ``f``);
* direction ``d_F = -[H g_F]_F`` on the free set (``H`` the L-BFGS inverse
  Hessian of the pairs restricted to the free set, by small dense products
  with no loop over the pairs, so ``g^T d < 0``) and ``d_A = -gamma g_A``
  (diagonal metric) on the active set;
* a backtracking Armijo search along the projected path
  ``x(a) = P(x + a d)``: every trial point is inside the bounds, bit-exact,
  so the function is never evaluated outside them. Where the Armijo test
  asks for a decrease below f's rounding, an approximate Wolfe test (Hager &
  Zhang 2005) on the gradient decides instead;
* curvature pairs with ``s^T y <= eps_mach ||y||^2`` are skipped.

No leaf is ever concatenated with another: inner products are sums of
per-leaf dot products accumulated in the widest dtype present.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


# ------------------------------------------------------------ tree algebra


def tree_vdot(a, b) -> jax.Array:
  """Sum over leaves of ``<a, b>``, each leaf in its own dtype."""
  parts = [jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return sum(p.astype(dtype) for p in parts)


def tree_max_abs(a) -> jax.Array:
  parts = [jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
           for x in jax.tree.leaves(a)]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return jnp.max(jnp.stack([p.astype(dtype) for p in parts]))


def tree_axpy(alpha, x, y):
  """``alpha * x + y`` leaf by leaf, in each leaf's dtype."""
  return jax.tree.map(lambda a, b: (alpha * a).astype(b.dtype) + b, x, y)


def tree_scale(alpha, x):
  return jax.tree.map(lambda a: (alpha * a).astype(a.dtype), x)


def tree_where(cond, a, b):
  return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


# ------------------------------------------------------------ bounds


def clip(x, lower, upper):
  """``P(x)``: the box projection, leaf by leaf (bounds already in dtype)."""
  return jax.tree.map(jnp.clip, x, lower, upper)


def projected_gradient_norm(x, g, lower, upper) -> jax.Array:
  """``||x - P(x - g)||_inf``: zero exactly at a KKT point."""
  step = clip(jax.tree.map(jnp.subtract, x, g), lower, upper)
  return tree_max_abs(jax.tree.map(jnp.subtract, x, step))


def active_outward(x, g, lower, upper, eps):
  """The epsilon-active set: near a bound with the gradient pointing out."""
  return jax.tree.map(
      lambda xi, gi, lo, hi: ((xi <= lo + eps) & (gi > 0))
      | ((xi >= hi - eps) & (gi < 0)), x, g, lower, upper)


# ------------------------------------------------------------ memory


class Memory(NamedTuple):
  """Circular buffer of the last ``m`` curvature pairs."""

  s: Any  # pytree, each leaf with a leading axis of size m
  y: Any
  rho: jax.Array  # (m,), 1 / s^T y, 0 for empty slots
  head: jax.Array  # index of the next slot to write
  count: jax.Array  # number of valid pairs
  gamma: jax.Array  # H0 = gamma I, from the newest pair


def init_memory(params, memory_size: int, dtype) -> Memory:
  zeros = jax.tree.map(
      lambda x: jnp.zeros((memory_size,) + jnp.shape(x), jnp.result_type(x)),
      params)
  return Memory(zeros, zeros, jnp.zeros((memory_size,), dtype),
                jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                jnp.ones((), dtype))


def reset_memory(memory: Memory) -> Memory:
  return memory._replace(rho=jnp.zeros_like(memory.rho),
                         count=jnp.zeros_like(memory.count),
                         gamma=jnp.ones_like(memory.gamma))


def push_pair(memory: Memory, s, y) -> Memory:
  """Adds ``(s, y)`` unless its curvature ``s^T y`` is too small."""
  sy = tree_vdot(s, y)
  yy = tree_vdot(y, y)
  eps = jnp.finfo(memory.rho.dtype).eps
  good = (sy > eps * yy) & jnp.isfinite(sy) & (yy > 0)
  m = memory.rho.shape[0]
  k = memory.head
  # A masked select rather than ``at[k].set``: the update then needs no copy
  # of the buffers to keep the old ones for the ``good`` test (and, under
  # vmap, for finished lanes); the copies cost ~20% of a batched solve.
  slot = (jnp.arange(m) == k) & good

  def write(buf, new):
    return jax.tree.map(
        lambda b, n: jnp.where(slot.reshape((m,) + (1,) * jnp.ndim(n)),
                               jnp.asarray(n, b.dtype)[None], b), buf, new)

  def keep(new, old):
    return jnp.where(good, new, old).astype(old.dtype)

  return Memory(write(memory.s, s), write(memory.y, y),
                jnp.where(slot, (1 / jnp.where(good, sy, 1)).astype(
                    memory.rho.dtype), memory.rho),
                keep((k + 1) % m, k), keep(jnp.minimum(memory.count + 1, m),
                                           memory.count),
                keep(sy / jnp.where(good, yy, 1), memory.gamma))


def pair_grams(memory: Memory, free):
  """``S_F^T Y_F`` and ``Y_F^T Y_F`` (``m x m``) over the free coordinates.

  One pass over the buffers per leaf, summed over leaves in the widest
  dtype (``free`` None: all coordinates).
  """
  m = memory.rho.shape[0]
  frees = (jax.tree.leaves(free) if free is not None
           else [None] * len(jax.tree.leaves(memory.s)))
  parts = []
  for s, y, f in zip(jax.tree.leaves(memory.s), jax.tree.leaves(memory.y),
                     frees):
    s, y = s.reshape(m, -1), y.reshape(m, -1)
    if f is not None:
      y = jnp.where(jnp.reshape(f, -1), y, jnp.zeros((), y.dtype))
    parts.append((s @ y.T, y @ y.T))
  dtype = jnp.result_type(memory.rho, *[p[0] for p in parts])
  return (sum(p[0].astype(dtype) for p in parts),
          sum(p[1].astype(dtype) for p in parts))


def triangular_inverse(r):
  """``R^{-1}`` for ``R`` triangular up to a permutation, without a solve.

  With ``R = diag(r) (I + N)``, ``N`` strictly triangular (nilpotent,
  ``N^m = 0``): ``(I + N)^{-1} = (I - N)(I + N^2)(I + N^4)...``, about
  ``log2 m`` small products, unrolled (batched LAPACK solves of tiny
  matrices are slow on CPU, and vmap turns them into loops; a ``fori_loop``
  here cost ~20% of a small solve, XLA:CPU running each trip op by op).
  """
  m = r.shape[0]
  diag = jnp.diagonal(r)
  eye = jnp.eye(m, dtype=r.dtype)
  power = eye - r / diag[:, None]  # -N
  inv = eye + power
  for _ in range((m - 1).bit_length() - 1):
    power = power @ power
    inv = inv + inv @ power
  return inv / diag[None, :]


def apply_inverse_hessian(memory: Memory, q, free=None):
  """``H q`` for the L-BFGS inverse Hessian, in compact form.

  ``H = gamma I + [S  gamma Y] M [S  gamma Y]^T`` with ``M`` from the
  ``m x m`` matrices ``R`` (``s_i^T y_j``, ``i`` not newer than ``j``),
  ``D = diag(s_i^T y_i)`` and ``Y^T Y`` (Byrd, Nocedal & Schnabel, Math.
  Program. 63, 1994; Nocedal & Wright eq. 7.24): equal to the two-loop
  recursion, but a few small dense products and one ``m x m`` triangular
  inverse, with no loop over the pairs. XLA:CPU runs loop bodies op by op,
  so this takes fewer steps than two scans of ``m`` trips, and the program
  does not grow with ``memory_size``.

  With ``free`` (a boolean tree; ``q`` must vanish off it), the pairs are
  restricted to the free coordinates and their curvature recomputed there:
  the result models the reduced Hessian ``B_FF`` rather than the principal
  part of the full inverse, which is what a subspace Newton step needs.
  Pairs whose reduced curvature is too small are left out.
  """
  m = memory.rho.shape[0]
  age = (memory.head - 1 - jnp.arange(m)) % m  # 0 for the newest slot
  valid = age < memory.count
  sy, yy = pair_grams(memory, free)
  sy_d, yy_d = jnp.diagonal(sy), jnp.diagonal(yy)
  if free is None:
    good = valid
    gamma = memory.gamma
  else:
    eps = jnp.finfo(memory.rho.dtype).eps
    good = valid & (sy_d > eps * yy_d) & (yy_d > 0)
    # H0 from the newest pair with reduced curvature, else the given gamma.
    newest = jnp.argmin(jnp.where(good, age, m))
    gamma = jnp.where(jnp.any(good),
                      sy_d[newest] / jnp.where(good, yy_d, 1)[newest],
                      memory.gamma)
  dtype = sy.dtype
  gamma = gamma.astype(dtype)
  both = good[:, None] & good[None, :]
  # R is triangular in age order; left-out pairs get a unit row/column.
  r = (jnp.where(both & (age[:, None] >= age[None, :]), sy, 0)
       + jnp.diag(jnp.where(good, 0, 1).astype(dtype)))
  s_q = jnp.zeros((m,), dtype)
  y_q = jnp.zeros((m,), dtype)
  for s, y, qi in zip(jax.tree.leaves(memory.s), jax.tree.leaves(memory.y),
                      jax.tree.leaves(q)):
    s_q += (s.reshape(m, -1) @ jnp.reshape(qi, -1)).astype(dtype)
    y_q += (y.reshape(m, -1) @ jnp.reshape(qi, -1)).astype(dtype)
  s_q, y_q = jnp.where(good, s_q, 0), jnp.where(good, y_q, 0)
  r_inv = triangular_inverse(r)
  u = r_inv @ s_q
  w = r_inv.T @ (jnp.where(good, sy_d, 0) * u
                 + gamma * (jnp.where(both, yy, 0) @ u - y_q))
  frees = (jax.tree.leaves(free) if free is not None
           else [None] * len(jax.tree.leaves(q)))

  def per_leaf(s, y, qi, f):
    shape = jnp.shape(qi)
    corr = (w.astype(s.dtype) @ s.reshape(m, -1)
            - (gamma * u).astype(y.dtype) @ y.reshape(m, -1)).reshape(shape)
    if f is not None:
      corr = jnp.where(f, corr, jnp.zeros((), corr.dtype))
    return (gamma * qi).astype(qi.dtype) + corr.astype(qi.dtype)

  leaves = [per_leaf(*args) for args in zip(
      jax.tree.leaves(memory.s), jax.tree.leaves(memory.y),
      jax.tree.leaves(q), frees)]
  return jax.tree.unflatten(jax.tree.structure(q), leaves)


def direction(memory: Memory, x, g, lower, upper, eps_active: float):
  """The two-metric projected quasi-Newton direction (see module doc)."""
  dtype = memory.gamma.dtype
  tiny = jnp.finfo(dtype).tiny
  first = memory.count == 0
  # Active-set width in units of x: the gamma-scaled projected gradient
  # (before any pair, gamma makes the step at most 1 long).
  gamma = jnp.where(first, 1 / jnp.maximum(tree_max_abs(g), tiny),
                    memory.gamma).astype(dtype)
  width = projected_gradient_norm(x, tree_scale(gamma, g), lower, upper)
  # NaN-safe minimum: an infinite gradient makes gamma 0 and the width NaN;
  # the coordinate must still be held on its bound, as a projection would.
  eps = jnp.where(width < eps_active, width, eps_active)
  active = active_outward(x, g, lower, upper, eps)
  free_g = jax.tree.map(lambda gi, a: jnp.where(a, 0, gi), g, active)
  gamma = jnp.where(first, 1 / jnp.maximum(tree_max_abs(free_g), tiny),
                    gamma).astype(dtype)
  free = jax.tree.map(jnp.logical_not, active)
  hq = apply_inverse_hessian(memory._replace(gamma=gamma), free_g, free)
  return jax.tree.map(
      lambda h, gi, a: jnp.where(a, -gamma * gi, -h).astype(gi.dtype),
      hq, g, active)


# ------------------------------------------------------------ line search


class SearchResult(NamedTuple):
  x: Any
  value: jax.Array
  grad: Any
  accepted: jax.Array
  num_evals: jax.Array


# Precision of f, in ulps of |f|: a decrease smaller than this is noise.
NOISE_ULPS = 16


def noise_level(value) -> jax.Array:
  """``NOISE_ULPS * eps * |f|``: changes of f below this are rounding."""
  return NOISE_ULPS * jnp.finfo(value.dtype).eps * jnp.abs(value)


def projected_backtracking(value_and_grad, x, value, g, d, lower, upper, *,
                           max_steps: int = 20, c1: float = 1e-4,
                           initial_step=1.0, reference=None) -> SearchResult:
  """Backtracking along ``P(x + a d)``; trial points stay in bounds.

  With ``s = x(a) - x``, accepts the Armijo test ``f(x(a)) <= f_ref + c1
  <g, s>``, ``f_ref = max(f(x), reference)`` (``reference`` None: ``f(x)``;
  the largest of the last few values makes it the non-monotone test of
  Grippo, Lampariello & Lucidi, SIAM J. Numer. Anal. 23(4), 1986), or, once that test is below f's precision, its noise-floor
  version (the approximate Wolfe test of Hager & Zhang, SIAM J. Optim.
  16(1), 2005): the predicted decrease ``-<g, s>`` is under ``100 noise``,
  ``f(x(a)) <= f(x) + noise`` (``noise = NOISE_ULPS eps |f(x)|``) and the
  slope at the trial is still at most ``0.8 |<g, s>|`` (``<g(x(a)), s> <=
  -0.8 <g, s>``), so the step did not overshoot. The gradient stays
  informative where f has no digits left. Backtracks by safeguarded
  quadratic interpolation within ``[0.1 a, 0.5 a]``.

  ``16 eps |f|`` understates f's rounding where f is a small remainder of
  large terms (a least-squares residual near a good fit). A trial whose
  predicted change ``|<g, s>|`` is under the noise, yet moved f by more,
  has measured that rounding: the noise is raised to it for the rest of
  the search, so backtracking does not go on drawing lots on f's last bits.
  """
  # Scalars in one dtype: that of the value or the widest leaf.
  dtype = jnp.result_type(value, *jax.tree.leaves(x))
  value = jnp.asarray(value)
  f0 = value.astype(dtype)
  noise = noise_level(value).astype(dtype)
  f_ref = f0 if reference is None else jnp.maximum(
      f0, jnp.asarray(reference).astype(dtype))

  def trial(step, noise):
    xt = clip(tree_axpy(step, d, x), lower, upper)
    ft, gt = value_and_grad(xt)
    s = jax.tree.map(jnp.subtract, xt, x)
    decrease = tree_vdot(g, s).astype(dtype)
    f = ft.astype(dtype)
    armijo = f <= f_ref + c1 * decrease
    floor = ((-decrease <= 100 * noise) & (f <= f0 + noise)
             & (tree_vdot(gt, s).astype(dtype) <= -0.8 * decrease))
    ok = jnp.isfinite(f) & (decrease < 0) & (armijo | floor)
    return xt, ft, gt, decrease, ok

  def measured(noise, ft, dec):
    # The change of f where the model predicts none is rounding.
    change = jnp.abs(ft.astype(dtype) - f0)
    return jnp.where((-dec <= noise) & jnp.isfinite(change),
                     jnp.maximum(noise, change), noise)

  def cond(carry):
    _, _, _, _, ok, n, (_, dec, _) = carry
    # Stop when accepted, out of steps, or the path no longer descends
    # (the step became too small to move any coordinate).
    return (~ok) & (n < max_steps) & (dec < 0)

  def body(carry):
    step, _, _, _, _, n, last = carry
    f_last, dec_last, noise = last
    # Quadratic model through f(0), its slope ~ dec/step, and f(step).
    slope = dec_last / step
    curvature = f_last.astype(dtype) - f0 - slope * step
    fit = jnp.where(curvature > 0, -slope * step**2 / (2 * curvature),
                    0.5 * step)
    fit = jnp.where(jnp.isfinite(fit), fit, 0.5 * step)
    step = jnp.clip(fit, 0.1 * step, 0.5 * step)
    xt, ft, gt, dec, ok = trial(step, noise)
    return step, xt, ft, gt, ok, n + 1, (ft, dec, measured(noise, ft, dec))

  step0 = jnp.asarray(initial_step, dtype)
  xt, ft, gt, dec, ok = trial(step0, noise)
  carry = (step0, xt, ft, gt, ok, jnp.ones((), jnp.int32),
           (ft, dec, measured(noise, ft, dec)))
  _, xt, ft, gt, ok, n, _ = jax.lax.while_loop(cond, body, carry)
  return SearchResult(xt, ft, gt, ok, n)
