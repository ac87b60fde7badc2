"""The pieces of a bound-constrained L-BFGS step, on pytrees, leaf by leaf.

The method is the two-metric projected quasi-Newton method (Bertsekas,
"Projected Newton methods for optimization problems with simple
constraints", SIAM J. Control Optim. 20(2), 1982; Gafni & Bertsekas 1984;
Kim, Sra & Dhillon, "Tackling box-constrained optimization via a new
projected quasi-Newton approach", SIAM J. Sci. Comput. 2010), with the
L-BFGS inverse Hessian (Nocedal 1980), applied in the compact form of
Byrd, Nocedal & Schnabel (1994), or by the two-loop recursion when vmapped,
as the metric on the free variables:

* the epsilon-active set ``A``: coordinates within ``eps_k`` of a bound whose
  gradient points out of the box, with ``eps_k = min(eps, ||x - P(x -
  gamma g)||_inf)`` (``gamma`` the L-BFGS scaling ``s^T y / y^T y``, so the
  width is in units of ``x`` whatever the scale of ``f``);
* direction ``d_F = -[H g_F]_F`` on the free set (``H`` the L-BFGS inverse
  Hessian of the pairs restricted to the free set, so ``g^T d < 0``) and
  ``d_A = -gamma g_A`` (diagonal metric) on the active set;
* a backtracking, optionally non-monotone, Armijo search along the
  projected path ``x(a) = P(x + a d)`` (``_lbfgsb_search``): every trial
  point is inside the bounds, bit-exact, so the function is never evaluated
  outside them. Where the Armijo test asks for a decrease below f's
  rounding, an approximate Wolfe test (Hager & Zhang 2005) on the gradient
  decides instead;
* curvature pairs with ``s^T y <= eps_mach ||y||^2`` are skipped.

No leaf is ever concatenated with another: inner products are sums of
per-leaf dot products accumulated in the widest dtype present.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# ------------------------------------------------------------ tree algebra


def tree_vdot(a, b) -> jax.Array:
  """Sum over leaves of ``<a, b>``, each leaf in its own dtype."""
  parts = [jnp.vdot(x, y)
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return functools.reduce(jnp.add, [p.astype(dtype) for p in parts])


def tree_max_abs(a) -> jax.Array:
  parts = [jnp.max(jnp.abs(x)) if x.size else jnp.zeros((), x.dtype)
           for x in jax.tree.leaves(a)]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return jnp.max(jnp.stack([p.astype(dtype) for p in parts]))


def tree_any_nan(a) -> jax.Array:
  parts = [jnp.any(jnp.isnan(x)) for x in jax.tree.leaves(a)]
  return jnp.any(jnp.stack(parts)) if parts else jnp.zeros((), bool)


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
  """``||x - P(x - g)||_inf``, zero exactly at a KKT point, computed from g.

  Coordinate by coordinate ``min(|g|, distance to the bound that -g points
  at)``: forming ``x - g`` first would round a gradient below half an ulp
  of ``x`` to a projected gradient of 0. NaN in ``g`` gives NaN.
  """
  def leaf(xi, gi, lo, hi):
    return jnp.where(gi > 0, jnp.minimum(gi, xi - lo),
                     jnp.where(gi < 0, jnp.minimum(-gi, hi - xi),
                               jnp.abs(gi)))
  return tree_max_abs(jax.tree.map(leaf, x, g, lower, upper))


def slope(g, s) -> jax.Array:
  """``<g, s>`` with ``inf * 0 = 0``: an infinite gradient component along
  which the step does not move contributes nothing."""
  parts = [jnp.sum(jnp.where(si == 0, jnp.zeros((), jnp.result_type(gi, si)),
                             gi * si))
           for gi, si in zip(jax.tree.leaves(g), jax.tree.leaves(s))]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return functools.reduce(jnp.add, [p.astype(dtype) for p in parts])


def active_outward(x, g, lower, upper, eps):
  """The epsilon-active set: near a bound with the gradient pointing out."""
  return jax.tree.map(
      lambda xi, gi, lo, hi: ((xi <= lo + eps) & (gi > 0))
      | ((xi >= hi - eps) & (gi < 0)), x, g, lower, upper)


# ------------------------------------------------------------ memory


class Memory(NamedTuple):
  """The last ``m`` curvature pairs, newest first (index 0)."""

  s: Any  # pytree, each leaf with a leading axis of size m
  y: Any
  rho: jax.Array  # (m,), 1 / s^T y, 0 for empty slots
  count: jax.Array  # number of valid pairs (the first ``count`` slots)
  gamma: jax.Array  # H0 = gamma I, from the newest pair


def init_memory(params, memory_size: int, dtype) -> Memory:
  zeros = jax.tree.map(
      lambda x: jnp.zeros((memory_size,) + jnp.shape(x), jnp.result_type(x)),
      params)
  return Memory(zeros, zeros, jnp.zeros((memory_size,), dtype),
                jnp.zeros((), jnp.int32), jnp.ones((), dtype))


def reset_memory(memory: Memory, where: ArrayLike = True) -> Memory:
  """Forgets every pair (where ``where``); the buffers are left in place."""
  return memory._replace(
      rho=jnp.where(where, jnp.zeros_like(memory.rho), memory.rho),
      count=jnp.where(where, jnp.zeros_like(memory.count), memory.count),
      gamma=jnp.where(where, jnp.ones_like(memory.gamma), memory.gamma))


def push_pair(memory: Memory, s, y, keep=True) -> Memory:
  """Adds ``(s, y)`` in front unless its curvature ``s^T y`` is too small.

  ``keep`` False (a traced bool) leaves the memory as it was. The buffers
  shift by one slot in one fused select between the old and the shifted
  buffers, so the oldest pair drops off the end.
  """
  sy = tree_vdot(s, y)
  yy = tree_vdot(y, y)
  eps = jnp.finfo(memory.rho.dtype).eps
  good = (sy > eps * yy) & jnp.isfinite(sy) & (yy > 0) & keep

  def shift(buf, new):
    return jax.tree.map(
        lambda b, n: jnp.where(good, jnp.concatenate(
            [jnp.asarray(n, b.dtype)[None], b[:-1]]), b), buf, new)

  rho = jnp.concatenate([(1 / jnp.where(good, sy, 1))[None].astype(
      memory.rho.dtype), memory.rho[:-1]])
  m = memory.rho.shape[0]
  return Memory(shift(memory.s, s), shift(memory.y, y),
                jnp.where(good, rho, memory.rho),
                jnp.where(good, jnp.minimum(memory.count + 1, m),
                          memory.count),
                jnp.where(good, sy / jnp.where(good, yy, 1),
                          memory.gamma).astype(memory.gamma.dtype))


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
  return (functools.reduce(jnp.add, [p[0].astype(dtype) for p in parts]),
          functools.reduce(jnp.add, [p[1].astype(dtype) for p in parts]))


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


def usable_pairs(memory: Memory, sy, yy, restricted: bool):
  """Which pairs enter ``H``, and ``H0 = gamma I``.

  ``sy``, ``yy``: each pair's ``s^T y`` and ``y^T y`` (``(m,)``, newest
  first). Unrestricted, the stored pairs and ``gamma`` (``push_pair``
  checked them). Restricted to a free set, pairs whose reduced curvature is
  too small are left out and ``gamma`` comes from the newest pair kept,
  else the stored one.
  """
  good = jnp.arange(memory.rho.shape[0]) < memory.count
  if not restricted:
    return good, memory.gamma
  eps = jnp.finfo(memory.rho.dtype).eps
  good = good & (sy > eps * yy) & (yy > 0)
  newest = jnp.argmax(good)
  return good, jnp.where(jnp.any(good),
                         sy[newest] / jnp.where(good, yy, 1)[newest],
                         memory.gamma)


def compact_inverse_hessian(memory: Memory, q, free=None):
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
  age = jnp.arange(m)  # 0 for the newest pair
  sy, yy = pair_grams(memory, free)
  sy_d, yy_d = jnp.diagonal(sy), jnp.diagonal(yy)
  good, gamma = usable_pairs(memory, sy_d, yy_d, restricted=free is not None)
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


def two_loop_inverse_hessian(memory: Memory, q, free=None):
  """``H q`` as :func:`compact_inverse_hessian`, by the two-loop recursion.

  Nocedal & Wright, Alg. 7.4, unrolled over the ``m`` pairs (newest first),
  on the pairs restricted to ``free`` with the same skip test and ``H0``.
  Some ``4 m`` small fused steps: slower than the compact form for one
  problem, but under ``vmap`` it needs no batched ``m x m`` products, which
  XLA:CPU runs lane by lane.
  """
  m = memory.rho.shape[0]
  frees = (jax.tree.leaves(free) if free is not None
           else [None] * len(jax.tree.leaves(q)))
  ss = jax.tree.leaves(memory.s)
  ys = [y if f is None else jnp.where(f[None], y, jnp.zeros((), y.dtype))
        for y, f in zip(jax.tree.leaves(memory.y), frees)]
  dtype = jnp.result_type(memory.rho, *ss)

  def pair_sums(a, b):  # (m,): sum over leaves of <a_i, b_i>
    # A product with ones rather than a sum: vmapped, XLA:CPU runs it as
    # one plain matrix-vector product, ~3% of a batched solve faster.
    return sum(((x * y).reshape(m, -1) @ jnp.ones(x[0].size, x.dtype))
               .astype(dtype) for x, y in zip(a, b))

  def dot(a, b):
    return sum(jnp.vdot(x, y).astype(dtype) for x, y in zip(a, b))

  sy, yy = pair_sums(ss, ys), pair_sums(ys, ys)
  good, gamma = usable_pairs(memory, sy, yy, restricted=free is not None)
  gamma = gamma.astype(dtype)
  rho = jnp.where(good, 1 / jnp.where(good, sy, 1), 0)

  def axpy(a, xs, r):
    return [ri + (a * x).astype(ri.dtype) for x, ri in zip(xs, r)]

  r = jax.tree.leaves(q)
  alphas = []
  for i in range(m):
    alphas.append(rho[i] * dot([s[i] for s in ss], r))
    r = axpy(-alphas[i], [y[i] for y in ys], r)
  r = [(gamma * ri).astype(ri.dtype) for ri in r]
  for i in reversed(range(m)):
    beta = rho[i] * dot([y[i] for y in ys], r)
    r = axpy(alphas[i] - beta, [s[i] for s in ss], r)
  # Adding whole s_i is adding s_i restricted to free, plus a part off free
  # that no later product reads (y is restricted): drop it once, here.
  r = [ri if f is None else jnp.where(f, ri, jnp.zeros((), ri.dtype))
       for ri, f in zip(r, frees)]
  return jax.tree.unflatten(jax.tree.structure(q), r)


# The largest memory for which a vmapped product is the unrolled two-loop.
TWO_LOOP_MAX = 32


@jax.custom_jvp
def apply_inverse_hessian(memory: Memory, q, free=None):
  """``H q``: the compact form, or under ``vmap`` the two-loop recursion.

  The two agree to rounding (tested). The compact form is a few
  ``(m, n)`` matrix products, the better shape for one problem; the
  two-loop recursion is ``2m`` dependent vector steps, which batch into
  wide vector work under ``vmap``. Vmapped with more than ``TWO_LOOP_MAX``
  pairs, the compact form again. Derivatives are those of the compact form.
  """
  return _vmap_aware_inverse_hessian(memory, q, free)


@apply_inverse_hessian.defjvp
def _apply_inverse_hessian_jvp(primals, tangents):
  # custom_vmap has no reverse mode; the compact form has.
  return jax.jvp(compact_inverse_hessian, primals, tangents)


@jax.custom_batching.custom_vmap
def _vmap_aware_inverse_hessian(memory: Memory, q, free=None):
  return compact_inverse_hessian(memory, q, free)


@_vmap_aware_inverse_hessian.def_vmap
def _two_loop_when_batched(axis_size, in_batched, memory, q, free=None):
  def batched(x, is_batched):
    return x if is_batched else jnp.broadcast_to(
        x, (axis_size,) + jnp.shape(x))

  args = jax.tree.map(batched, (memory, q, free), tuple(in_batched))
  # Unrolled, the recursion's program grows with m; beyond a few dozen
  # pairs the compile time is not worth it.
  product = (two_loop_inverse_hessian if memory.rho.shape[-1] <= TWO_LOOP_MAX
             else compact_inverse_hessian)
  out = jax.vmap(product)(*args)
  return out, jax.tree.map(lambda _: True, out)


def direction(memory: Memory, x, g, lower, upper, eps_active, *,
              empty: bool = False):
  """The two-metric projected quasi-Newton direction (see module doc).

  Where some gradient component is infinite (e.g. ``sqrt`` at 0), the
  direction is ``-sign(g)`` on those components and 0 elsewhere: a unit
  step along what dominates. An infinite component that points out of the
  box at its bound (``sqrt`` at a lower bound of 0) is held there instead,
  and the other components take the usual step. ``empty`` (static): the
  memory is known to hold no pair, so no inverse-Hessian product is built
  (a smaller program).
  """
  infinite = jax.tree.map(jnp.isinf, g)
  blocked = jax.tree.map(jnp.logical_and, infinite,
                         active_outward(x, g, lower, upper, 0))
  usable = jax.tree.map(lambda i, b: i & ~b, infinite, blocked)
  any_infinite = jnp.any(jnp.stack(
      [jnp.any(i) for i in jax.tree.leaves(usable)] or [jnp.zeros((), bool)]))
  finite_g = jax.tree.map(
      lambda gi, i: jnp.where(i, jnp.zeros((), gi.dtype), gi), g, infinite)
  dtype = memory.gamma.dtype
  tiny = jnp.finfo(dtype).tiny
  first = memory.count == 0
  # Active-set width in units of x: the gamma-scaled projected gradient
  # (before any pair, gamma makes the step at most 1 long).
  gamma = jnp.where(first, 1 / jnp.maximum(tree_max_abs(finite_g), tiny),
                    memory.gamma).astype(dtype)
  width = projected_gradient_norm(x, tree_scale(gamma, finite_g), lower, upper)
  eps = jnp.where(width < eps_active, width, eps_active)
  active = jax.tree.map(jnp.logical_or, active_outward(
      x, finite_g, lower, upper, eps), blocked)
  free_g = jax.tree.map(lambda gi, a: jnp.where(a, 0, gi), finite_g, active)
  # Before any pair the first step is 1 long in the 2-norm (as SciPy's).
  first_norm = jnp.sqrt(tree_vdot(free_g, free_g))
  gamma = jnp.where(first, 1 / jnp.maximum(first_norm.astype(dtype), tiny),
                    gamma).astype(dtype)
  free = jax.tree.map(jnp.logical_not, active)
  hq = (tree_scale(gamma, free_g) if empty else
        apply_inverse_hessian(memory._replace(gamma=gamma), free_g, free))

  def leaf(h, gi, a, i, g_raw):
    d = jnp.where(a, -gamma * gi, -h)
    return jnp.where(any_infinite, jnp.where(i, -jnp.sign(g_raw), 0),
                     d).astype(gi.dtype)

  return jax.tree.map(leaf, hq, finite_g, active, usable, g)
