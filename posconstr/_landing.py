"""Updates that make ``optax.apply_updates`` land exactly on a projected point.

A projection inside Optax must return an *update* ``d`` rather than the new
parameters, and ``apply_updates`` then computes ``p + d`` in floating point.
The obvious ``d = P(p + u) - p`` does not always land on ``P(p + u)``:
``(t - p) + p`` can round away from ``t`` (e.g. ``p = 1``, ``t = 1e-8`` in
float32 gives 0, outside ``x >= 1e-8``). So, per coordinate:

* where the projection leaves ``p + u`` unchanged, return ``u`` itself:
  ``apply_updates`` recomputes the very same ``p + u``;
* where it moved the point, return ``t - p`` (exact whenever the target is 0);
* for elementwise sets with non-zero bounds, if ``p + (t - p)`` misses ``t``,
  step ``t - p`` by one ulp towards ``t`` and keep it when it lands on ``t``
  or inside the bounds.

The result is bit-for-bit the same as projecting after the step by hand,
except when no float ``d`` makes ``p + d`` equal ``t`` (then the landing point
is the nearest representable one that is still feasible). Norm sets, whose
landing grid can be much coarser than their tolerance, are in
``posconstr._norm_landing``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from posconstr import _constraint as base
from posconstr import _norm_landing


def _statically_zero(bound) -> bool:
  return bound is None or (base.is_concrete(bound)
                           and not np.any(np.asarray(bound)))


def _in_bounds(x, lo, hi):
  ok = jnp.ones(x.shape, bool)
  if lo is not None:
    ok = ok & (x >= lo)
  if hi is not None:
    ok = ok & (x <= hi)
  return ok


def _nudged(param, target, delta, lo, hi):
  """One-ulp correction of ``delta`` so that ``param + delta`` hits the set."""
  landed = (param + delta).astype(param.dtype)
  missed = landed != target
  toward = jnp.where(landed < target, jnp.inf, -jnp.inf).astype(delta.dtype)
  nudged = jax.lax.nextafter(delta, toward)
  landed2 = (param + nudged).astype(param.dtype)
  better = (landed2 == target) | _in_bounds(landed2, lo, hi)
  return jnp.where(missed & better, nudged, delta)


def landing_update(param, update, constraint):
  """The update that makes ``param + update`` land on the projection.

  Args:
    param: one parameter leaf.
    update: the incoming update for it.
    constraint: the set to land in.

  Returns:
    ``d`` such that ``optax.apply_updates`` gives ``P(param + update)``.
  """
  param = jnp.asarray(param)
  update = jnp.asarray(update)
  if hasattr(constraint, "radial_scale") and param.size:
    return _norm_landing.landing_update(param, update, constraint)
  stepped = (param + update).astype(param.dtype)  # as optax.apply_updates
  target = constraint.project(stepped)
  if constraint.elementwise:
    delta = delta_to(param, target, *constraint.bounds_in(param.dtype))
  else:
    delta = target - param
  return jnp.where(target == stepped, update, delta)


def delta_to(param, target, lower=None, upper=None):
  """``d`` with ``param + d == target`` in ``param``'s dtype when possible.

  ``target`` must lie in ``[lower, upper]`` (bounds in ``param``'s dtype,
  or None). When no float ``d`` hits ``target`` exactly, the landing point
  is a neighbour that is still within the bounds.
  """
  delta = target - param
  if _statically_zero(lower) and _statically_zero(upper):
    # Bounds at 0 or none: t - p lands exactly on a bound at 0 and, by
    # monotone rounding, never crosses it elsewhere.
    return delta
  return _nudged(param, target, delta, lower, upper)
