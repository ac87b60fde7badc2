"""The pieces of a bound-constrained L-BFGS step, on pytrees, leaf by leaf.

The method is the two-metric projected quasi-Newton method (Bertsekas,
"Projected Newton methods for optimization problems with simple
constraints", SIAM J. Control Optim. 20(2), 1982; Gafni & Bertsekas 1984;
Kim, Sra & Dhillon, "Tackling box-constrained optimization via a new
projected quasi-Newton approach", SIAM J. Sci. Comput. 2010), with the
L-BFGS two-loop recursion (Nocedal 1980) as the metric on the free
variables:

* the epsilon-active set ``A``: coordinates within ``eps_k`` of a bound whose
  gradient points out of the box, with ``eps_k = min(eps, ||x - P(x -
  gamma g)||_inf)`` (``gamma`` the L-BFGS scaling ``s^T y / y^T y``, so the
  width is in units of ``x`` whatever the scale of ``f``);
* direction ``d_F = -[H g_F]_F`` on the free set (``H`` the L-BFGS inverse
  Hessian of the pairs restricted to the free set, by a two-loop recursion
  that is a ``lax.scan``, so ``g^T d < 0``) and ``d_A = -gamma g_A``
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

  def write(buf, new):
    return jax.tree.map(lambda b, n: b.at[k].set(n.astype(b.dtype)), buf, new)

  written = Memory(write(memory.s, s), write(memory.y, y),
                   memory.rho.at[k].set((1 / jnp.where(good, sy, 1)).astype(
                       memory.rho.dtype)),
                   (k + 1) % m, jnp.minimum(memory.count + 1, m),
                   (sy / jnp.where(good, yy, 1)).astype(memory.gamma.dtype))
  return jax.tree.map(lambda new, old: jnp.where(good, new, old), written,
                      memory)


def reduced_curvature(memory: Memory, free):
  """``s_j^T y_j`` and ``y_j^T y_j`` over the free coordinates, every slot.

  One fused pass over the buffers (no masked copy of any pair).
  """
  def per_leaf(s, y, f):
    axes = tuple(range(1, s.ndim))
    return (jnp.sum(jnp.where(f, s * y, 0), axes),
            jnp.sum(jnp.where(f, y * y, 0), axes))
  parts = [per_leaf(s, y, f) for s, y, f in zip(
      jax.tree.leaves(memory.s), jax.tree.leaves(memory.y),
      jax.tree.leaves(free))]
  dtype = jnp.result_type(memory.rho, *[p[0] for p in parts])
  sy = sum(p[0].astype(dtype) for p in parts)
  yy = sum(p[1].astype(dtype) for p in parts)
  return sy, yy


def apply_inverse_hessian(memory: Memory, q, free=None):
  """``H q`` by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

  With ``free`` (a boolean tree; ``q`` must vanish off it), the pairs are
  restricted to the free coordinates and their curvature recomputed there:
  the recursion then models the reduced Hessian ``B_FF`` rather than the
  principal part of the full inverse, which is what a subspace Newton step
  needs. Both loops are ``lax.scan`` over the slots (newest first, then
  oldest first), so the compiled size does not grow with ``memory_size``.
  """
  m = memory.rho.shape[0]
  age = (memory.head - 1 - jnp.arange(m)) % m  # 0 for the newest slot
  valid = age < memory.count
  if free is None:
    rho = jnp.where(valid, memory.rho, 0)
    gamma = memory.gamma
    mask = lambda buf: buf
  else:
    sy, yy = reduced_curvature(memory, free)
    good = valid & (sy > jnp.finfo(memory.rho.dtype).eps * yy) & (yy > 0)
    rho = jnp.where(good, 1 / jnp.where(good, sy, 1), 0)
    # H0 from the newest pair with reduced curvature, else the given gamma.
    newest = jnp.argmin(jnp.where(good, age, m))
    gamma = jnp.where(jnp.any(good),
                      sy[newest] / jnp.where(good, yy, 1)[newest],
                      memory.gamma)
    mask = lambda buf: jax.tree.map(
        lambda b, f: jnp.where(f, b, jnp.zeros((), b.dtype)), buf, free)
  # Slots newest first, gathered once: the scans then read their pairs in
  # order (no per-step dynamic index, which vmap turns into gathers).
  order = (memory.head - 1 - jnp.arange(m)) % m
  pairs = jax.tree.map(lambda b: jnp.take(b, order, axis=0),
                       (memory.s, memory.y))
  rho = rho[order]

  def newest_to_oldest(q, pair):
    (s, y), rho_j = pair
    a = rho_j * tree_vdot(s, q)
    return tree_axpy(-a, mask(y), q), a

  q, alphas = jax.lax.scan(newest_to_oldest, q, (pairs, rho))
  r = tree_scale(gamma, q)

  def oldest_to_newest(r, pair):
    (s, y), rho_j, a = pair
    b = rho_j * tree_vdot(y, r)
    return tree_axpy(a - b, mask(s), r), None

  r, _ = jax.lax.scan(oldest_to_newest, r, (pairs, rho, alphas),
                      reverse=True)
  return r


def direction(memory: Memory, x, g, lower, upper, eps_active: float):
  """The two-metric projected quasi-Newton direction (see module doc)."""
  dtype = memory.gamma.dtype
  tiny = jnp.finfo(dtype).tiny
  first = memory.count == 0
  # Active-set width in units of x: the gamma-scaled projected gradient
  # (before any pair, gamma makes the step at most 1 long).
  gamma = jnp.where(first, 1 / jnp.maximum(tree_max_abs(g), tiny),
                    memory.gamma).astype(dtype)
  eps = jnp.minimum(eps_active, projected_gradient_norm(
      x, tree_scale(gamma, g), lower, upper))
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
                           initial_step=1.0) -> SearchResult:
  """Backtracking along ``P(x + a d)``; trial points stay in bounds.

  With ``s = x(a) - x``, accepts the Armijo test ``f(x(a)) <= f(x) + c1
  <g, s>``, or, once that test is below f's precision, its noise-floor
  version (the approximate Wolfe test of Hager & Zhang, SIAM J. Optim.
  16(1), 2005): the predicted decrease ``-<g, s>`` is under ``100 noise``,
  ``f(x(a)) <= f(x) + noise`` (``noise = NOISE_ULPS eps |f(x)|``) and the
  slope at the trial is still at most ``0.8 |<g, s>|`` (``<g(x(a)), s> <=
  -0.8 <g, s>``), so the step did not overshoot. The gradient stays
  informative where f has no digits left. Backtracks by safeguarded
  quadratic interpolation within ``[0.1 a, 0.5 a]``.
  """
  # Scalars in one dtype: that of the value or the widest leaf.
  dtype = jnp.result_type(value, *jax.tree.leaves(x))
  value = jnp.asarray(value)
  f0 = value.astype(dtype)
  noise = noise_level(value).astype(dtype)

  def trial(step):
    xt = clip(tree_axpy(step, d, x), lower, upper)
    ft, gt = value_and_grad(xt)
    s = jax.tree.map(jnp.subtract, xt, x)
    decrease = tree_vdot(g, s).astype(dtype)
    f = ft.astype(dtype)
    armijo = f <= f0 + c1 * decrease
    floor = ((-decrease <= 100 * noise) & (f <= f0 + noise)
             & (tree_vdot(gt, s).astype(dtype) <= -0.8 * decrease))
    ok = jnp.isfinite(f) & (decrease < 0) & (armijo | floor)
    return xt, ft, gt, decrease, ok

  def cond(carry):
    _, _, _, _, ok, n, (_, dec) = carry
    # Stop when accepted, out of steps, or the path no longer descends
    # (the step became too small to move any coordinate).
    return (~ok) & (n < max_steps) & (dec < 0)

  def body(carry):
    step, _, _, _, _, n, last = carry
    f_last, dec_last = last
    # Quadratic model through f(0), its slope ~ dec/step, and f(step).
    slope = dec_last / step
    curvature = f_last.astype(dtype) - f0 - slope * step
    fit = jnp.where(curvature > 0, -slope * step**2 / (2 * curvature),
                    0.5 * step)
    fit = jnp.where(jnp.isfinite(fit), fit, 0.5 * step)
    step = jnp.clip(fit, 0.1 * step, 0.5 * step)
    xt, ft, gt, dec, ok = trial(step)
    return step, xt, ft, gt, ok, n + 1, (ft, dec)

  step0 = jnp.asarray(initial_step, dtype)
  xt, ft, gt, dec, ok = trial(step0)
  carry = (step0, xt, ft, gt, ok, jnp.ones((), jnp.int32), (ft, dec))
  _, xt, ft, gt, ok, n, _ = jax.lax.while_loop(cond, body, carry)
  return SearchResult(xt, ft, gt, ok, n)
