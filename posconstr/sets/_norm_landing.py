"""Landing in norm sets (``MaxNorm``, ``UnitNorm``, ``MinMaxNorm``).

``p + d`` can only reach a grid of spacing about ulp(|p|): from a far-out
``p`` (|p| ~ 30 in bfloat16: spacing 0.125) onto a norm of 1, rounding each
coordinate to nearest can leave the set by far more than its own rounding
tolerance (2 n eps). So each coordinate is rounded with the norm in mind:

* balls (``min_value == 0``): towards 0, so the norm can only shrink; always
  in the set;
* shells (``min_value > 0``, ``rate == 1``): nearest rounding where it
  provably lands (every slice with ``|p| <= (n - 5) min_value``, as weights
  that were on the shell one step ago are), else per slice a mix of
  towards-0 and away-from-0 rounding whose norm lies in the set, found by
  bisection. Best effort: a shell can be out of reach (``UnitNorm`` of one
  bfloat16 weight at 300 can only land on 0 or 2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from posconstr.sets import _constraint as base
from posconstr.sets import _landing
from posconstr.sets._slice_sums import sum_of_squares


def _landed(param, delta):
  return (param + delta).astype(param.dtype)  # as optax.apply_updates


def _inward_target(param, target):
  """``target`` moved towards 0 by the worst rounding of landing on it.

  Rounding ``d = t - p`` and then ``p + d`` (unit roundoff u each) lands
  within about ``u (|p| + 2 |t|)`` of ``t``; aiming twice that closer to 0
  makes ``|p + d| <= |t|`` (up to the rounding of ``t`` itself, for float32
  leaves) with a few elementwise operations, so a ball's norm can only
  shrink. Where ``|t|`` is below the margin the aim is 0, which ``-p`` hits
  exactly. The cost: landing about 3 ulps inside the ball.
  """
  eps = float(jnp.finfo(param.dtype).eps)
  size = jnp.abs(target)
  margin = eps * (jnp.abs(param.astype(target.dtype)) + 2 * size)
  return jnp.sign(target) * jnp.maximum(size - margin, 0)


def _next_landing(param, delta, landed, direction):
  """The update that lands one grid step from ``landed`` in ``direction``
  (+1 or -1 per coordinate).

  For a large move (``|delta| >= |landed|``, e.g. a far-out ``p`` sent near
  0) ``p + d`` is exact and its grid is ``delta``'s: move ``delta`` one ulp.
  For a small one, ``nextafter(landed) - p`` is exact, so it lands exactly.
  """
  up = direction > 0  # (direction 0: where the caller keeps no step.)
  by_delta = _landing.straight_through(
      delta, _landing.ulp_step(jax.lax.stop_gradient(delta), up))
  neighbour = _landing.straight_through(
      landed, _landing.ulp_step(jax.lax.stop_gradient(landed), up))
  by_landing = (neighbour - param).astype(delta.dtype)
  return jnp.where(jnp.abs(delta) >= jnp.abs(landed), by_delta, by_landing)


def _rounded_towards_zero(param, target, delta):
  """``delta`` moved so that ``|param + delta| <= |target|`` per coordinate.

  ``target`` is the unrounded (wider) projected point. A step or two of the
  landing grid fixes a nearest-rounding overshoot; where they do not,
  ``-param`` lands exactly on 0.
  """
  size = jnp.abs(target)

  def over(d):
    return jnp.abs(_landed(param, d).astype(size.dtype)) > size

  for _ in range(2):  # Rounding t - p and p + d: at most two grid steps.
    landed = _landed(param, delta)  # != 0 where over
    delta = jnp.where(over(delta), _next_landing(
        param, delta, landed, -jnp.sign(landed)), delta)
  return jnp.where(over(delta), -param, delta)


def _rounded_away_from_zero(param, target, delta):
  """``delta`` moved one landing step where ``|param + delta| < |target|``,
  when that makes ``|param + delta| >= |target|`` (best effort)."""
  size = jnp.abs(target)
  landed = _landed(param, delta)
  under = jnp.abs(landed.astype(size.dtype)) < size  # so target != 0
  nudged = _next_landing(param, delta, landed, jnp.sign(target))
  fits = jnp.abs(_landed(param, nudged).astype(size.dtype)) >= size
  return jnp.where(under & fits, nudged, delta)


def landing_update(param, update, constraint):
  """``d`` that lands ``param + update`` in the norm set (see the module).

  Slices the projection leaves alone get ``update`` back unchanged.
  """
  acc = base.accumulation_dtype(param.dtype)
  if constraint.scales_radially:
    scale = constraint.radial_scale(_landed(param, update))
    # Not (p + u) s: XLA would keep p + u in scratch memory for both the
    # norm reduction and this (p s + u s is as accurate, to the landing grid).
    target = param.astype(acc) * scale + update.astype(acc) * scale
    inward = _inward_target(param, target)
    delta = (inward - param.astype(acc)).astype(param.dtype)
    return jnp.where(scale == 1, update, delta)
  if constraint.static_rate != 1:  # The target need not be in the set.
    return _nearest_landing(param, update, constraint)
  # Nearest rounding lands every slice in the shell unless ``p`` is far out
  # (see _near_enough): one reduction of ``p`` decides, and the bisection's
  # passes over the leaf run only when some slice needs them.
  return jax.lax.cond(
      _near_enough(param, constraint),
      lambda: _nearest_landing(param, update, constraint),
      lambda: _nearest_landing(param, update, constraint, True))


def _nearest_landing(param, update, constraint, shell=False):
  """``update`` where the projection leaves ``p + u`` alone, else ``t - p``
  rounded to nearest (``shell``: rounded per slice to land in the shell).

  It forms ``p + u`` itself: passed in, inside a branch of the shell
  check's ``lax.cond``, it would be one more leaf-sized scratch buffer."""
  acc = base.accumulation_dtype(param.dtype)
  stepped = _landed(param, update)
  target = constraint.project_unrounded(stepped)
  unchanged = target == stepped.astype(acc)
  nearest = (target - param.astype(acc)).astype(param.dtype)
  if shell:
    nearest = _shell_rounding(param, target, nearest, constraint)
  return jnp.where(unchanged, update, nearest)


def _near_enough(param, constraint):
  """Whether every slice has ``|p| <= (n - 5) * min_value``, where nearest
  rounding provably lands in the shell.

  With unit roundoff ``u``, ``p + round(t - p)`` is within
  ``u (|t - p| + |t|) <= u (|p| + 2 |t|)`` of ``t``; ``|t|`` itself (the
  n-term norm behind the scale) and ``violation``'s own norm are each within
  ``n u / 2`` relative. Their sum stays below the tolerance ``2 n eps =
  4 n u`` of ``violation`` while ``|p| <= (3 n - 5) |t|`` (float32 and
  float64; more room when the accumulation is wider than the leaf), so
  ``n - 5`` leaves a margin. Slices of at most 5 coordinates always take the
  bisection (it is cheap there).
  """
  axes = constraint.reduction_axes(param)
  n = base.slice_size(param.shape, axes)
  if n <= 5:
    return jnp.zeros((), bool)
  acc = base.accumulation_dtype(param.dtype)
  sq = sum_of_squares(param.astype(acc), axes)
  return jnp.all(sq <= ((n - 5) * constraint.min_value) ** 2)


def _shell_rounding(param, target, nearest, constraint, steps=8):
  """Per slice, a choice between each coordinate's towards-0 and
  away-from-0 landing whose norm lies in the set.

  Coordinates whose target lies at least a fraction ``theta`` of the way
  from one landing to the other go away from 0 (``theta = 1/2`` is nearest
  rounding), and ``theta`` is bisected per slice: the norm only grows as
  ``theta`` falls. It typically finds a fit when one coordinate's switch
  moves the squared norm by less than the set's width (shells thicker than
  the landing grid; for ``UnitNorm``, whose width is the rounding
  tolerance, when ``|p|`` is not much larger than the slice size times the
  norm). Otherwise the ``theta`` that came nearest is kept.
  """
  acc = target.dtype
  low = _rounded_towards_zero(param, target, nearest)
  high = _rounded_away_from_zero(param, target, nearest)
  low_sq = jnp.square(_landed(param, low).astype(acc))
  high_sq = jnp.square(_landed(param, high).astype(acc))
  low_abs, high_abs = jnp.sqrt(low_sq), jnp.sqrt(high_sq)
  gap = high_abs - low_abs
  frac = jnp.where(gap > 0, (jnp.abs(target) - low_abs)
                   / jnp.where(gap > 0, gap, 1), 0)
  axes = constraint.reduction_axes(param)
  lo, hi = constraint.landing_norm_bounds(param)
  shape = [1 if a in axes else n for a, n in enumerate(param.shape)]
  theta = best = jnp.full(shape, 0.5, acc)
  below, above = jnp.zeros(shape, acc), jnp.full(shape, 1.5, acc)
  best_miss = jnp.full(shape, jnp.inf, acc)
  for _ in range(steps):  # A few reductions per slice: no loop over leaves.
    sq = jnp.sum(jnp.where(frac >= theta, high_sq, low_sq), axis=axes,
                 keepdims=True)
    miss = jnp.maximum(sq - hi * hi, lo * lo - sq)  # <= 0 inside
    best = jnp.where(miss < best_miss, theta, best)
    best_miss = jnp.minimum(miss, best_miss)
    below = jnp.where((miss > 0) & (sq > hi * hi), theta, below)
    above = jnp.where((miss > 0) & (sq < lo * lo), theta, above)
    theta = jnp.where(miss > 0, (below + above) / 2, theta)
  return jnp.where(frac >= best, high, low)
