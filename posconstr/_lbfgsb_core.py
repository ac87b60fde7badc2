"""The pieces of a bound-constrained L-BFGS step, on pytrees, leaf by leaf.

The method is the two-metric projected quasi-Newton method (Bertsekas,
"Projected Newton methods for optimization problems with simple
constraints", SIAM J. Control Optim. 20(2), 1982; Gafni & Bertsekas 1984;
Kim, Sra & Dhillon, "Tackling box-constrained optimization via a new
projected quasi-Newton approach", SIAM J. Sci. Comput. 2010), with the
L-BFGS two-loop recursion (Nocedal 1980) as the metric on the free
variables:

* the epsilon-active set ``A``: coordinates within ``eps_k`` of a bound whose
  gradient points out of the box, with ``eps_k = min(eps, ||x - P(x - g)||)``;
* direction ``d_F = -[H g_F]_F`` on the free set (``H`` the L-BFGS inverse
  Hessian, applied to the gradient with ``A`` zeroed, so ``g^T d < 0``) and
  ``d_A = -gamma g_A`` (diagonal metric) on the active set;
* a backtracking Armijo search along the projected path
  ``x(a) = P(x + a d)``: every trial point is inside the bounds, bit-exact,
  so the function is never evaluated outside them;
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


def apply_inverse_hessian(memory: Memory, q, free=None):
  """``H q`` by the two-loop recursion (Nocedal & Wright, Alg. 7.4).

  With ``free`` (a boolean tree), the pairs are restricted to the free
  coordinates and their curvature recomputed there: the recursion then
  models the reduced Hessian ``B_FF`` rather than the principal part of the
  full inverse, which is what a subspace Newton step needs.
  """
  m = memory.rho.shape[0]
  slot = lambda i: (memory.head - 1 - i) % m  # newest first
  if free is None:
    take = lambda buf, j: jax.tree.map(lambda b: b[j], buf)
  else:
    take = lambda buf, j: jax.tree.map(
        lambda b, f: jnp.where(f, b[j], 0), buf, free)
  pairs = []
  for i in range(m):
    j = slot(i)
    s_j, y_j = take(memory.s, j), take(memory.y, j)
    valid = i < memory.count
    if free is None:
      rho = jnp.where(valid, memory.rho[j], 0)
    else:
      sy = tree_vdot(s_j, y_j)
      yy = tree_vdot(y_j, y_j)
      good = valid & (sy > jnp.finfo(memory.rho.dtype).eps * yy) & (yy > 0)
      rho = jnp.where(good, 1 / jnp.where(good, sy, 1), 0)
    pairs.append((s_j, y_j, rho))
  gamma = memory.gamma
  if free is not None:  # H0 from the newest valid reduced pair
    for s_j, y_j, rho in reversed(pairs):
      yy = tree_vdot(y_j, y_j)
      gamma = jnp.where(rho > 0, 1 / (rho * jnp.where(yy > 0, yy, 1)), gamma)
  alphas = []
  for s_j, y_j, rho in pairs:
    a = rho * tree_vdot(s_j, q)
    q = tree_axpy(-a, y_j, q)
    alphas.append(a)
  r = tree_scale(gamma, q)
  for (s_j, y_j, rho), a in reversed(list(zip(pairs, alphas))):
    b = rho * tree_vdot(y_j, r)
    r = tree_axpy(a - b, s_j, r)
  return r


def direction(memory: Memory, x, g, lower, upper, eps_active: float):
  """The two-metric projected quasi-Newton direction (see module doc)."""
  pg = projected_gradient_norm(x, g, lower, upper)
  eps = jnp.minimum(eps_active, pg)
  active = active_outward(x, g, lower, upper, eps)
  free_g = jax.tree.map(lambda gi, a: jnp.where(a, 0, gi), g, active)
  # Without curvature pairs, scale the first step to move at most 1.
  gamma = jnp.where(memory.count > 0, memory.gamma,
                    1 / jnp.maximum(tree_max_abs(free_g), 1e-30))
  memory = memory._replace(gamma=gamma.astype(memory.gamma.dtype))
  free = jax.tree.map(jnp.logical_not, active)
  hq = apply_inverse_hessian(memory, free_g, free)
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


def projected_backtracking(value_and_grad, x, value, g, d, lower, upper, *,
                           max_steps: int = 20, c1: float = 1e-4,
                           initial_step=1.0) -> SearchResult:
  """Armijo backtracking along ``P(x + a d)``; trial points stay in bounds.

  Accepts ``f(x(a)) <= f(x) + c1 <g, x(a) - x>``. Backtracks by safeguarded
  quadratic interpolation within ``[0.1 a, 0.5 a]``.
  """

  def trial(step):
    xt = clip(tree_axpy(step, d, x), lower, upper)
    ft, gt = value_and_grad(xt)
    decrease = tree_vdot(g, jax.tree.map(jnp.subtract, xt, x))
    ok = jnp.isfinite(ft) & (ft <= value + c1 * decrease) & (decrease < 0)
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
    curvature = f_last - value - slope * step
    fit = jnp.where(curvature > 0, -slope * step**2 / (2 * curvature),
                    0.5 * step)
    fit = jnp.where(jnp.isfinite(fit), fit, 0.5 * step)
    step = jnp.clip(fit, 0.1 * step, 0.5 * step)
    xt, ft, gt, dec, ok = trial(step)
    return step, xt, ft, gt, ok, n + 1, (ft, dec)

  step0 = jnp.asarray(initial_step, value.dtype)
  xt, ft, gt, dec, ok = trial(step0)
  carry = (step0, xt, ft, gt, ok, jnp.ones((), jnp.int32), (ft, dec))
  _, xt, ft, gt, ok, n, _ = jax.lax.while_loop(cond, body, carry)
  return SearchResult(xt, ft, gt, ok, n)
