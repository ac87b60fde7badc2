"""Updates that make ``optax.apply_updates`` land exactly on a projected point.

A projection inside Optax must return an *update* ``d`` rather than the new
parameters, and ``apply_updates`` then computes ``p + d`` in floating point.
The obvious ``d = P(p + u) - p`` does not always land on ``P(p + u)``:
``(t - p) + p`` can round away from ``t`` (e.g. ``p = 1``, ``t = 1e-8`` in
float32 gives 0, outside ``x >= 1e-8``). So, per coordinate:

* where the projection leaves ``p + u`` unchanged, return ``u`` itself:
  ``apply_updates`` recomputes the very same ``p + u``;
* where it moved the point, return ``t - p`` (exact whenever the target is 0);
* if ``p + (t - p)`` misses ``t``, step ``t - p`` by one ulp towards ``t``
  and keep it when it lands on ``t`` or, for elementwise sets, on a
  feasible point (within the bounds, or left alone by the projection). The
  nudge has the derivative of the identity, so hypergradients flow through
  the landing as through ``t - p``.

The result is bit-for-bit the same as projecting after the step by hand,
except when no float ``d`` makes ``p + d`` equal ``t`` (then the landing point
is the nearest representable one that is still feasible). Norm sets, whose
landing grid can be much coarser than their tolerance, are in
``posconstr.sets._norm_landing``. Each set's ``landing_update`` method decides;
the default is :func:`default_landing_update`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint as base


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


def _nudged(param, target, delta, feasible):
  """One-ulp correction of ``delta`` so that ``param + delta`` hits the set.

  ``feasible(landed)``: a mask of the landings that are acceptable even if
  they miss ``target``. The correction has the derivative of the identity.
  """
  landed = (param + delta).astype(param.dtype)
  missed = landed != target
  toward = jnp.where(landed < target, jnp.inf, -jnp.inf).astype(delta.dtype)
  nudged = base.nextafter(delta, toward)
  landed2 = (param + nudged).astype(param.dtype)
  better = landed2 == target
  if feasible is not None:
    better = better | feasible(landed2)
  return jnp.where(missed & better, nudged, delta)


def landing_update(param, update, constraint):
  """The update that makes ``param + update`` land on the projection.

  Args:
    param: one parameter leaf.
    update: the incoming update for it.
    constraint: the set to land in.

  Returns:
    ``d`` such that ``optax.apply_updates`` gives ``P(param + update)``:
    ``constraint.landing_update(param, update)``.
  """
  return constraint.landing_update(jnp.asarray(param), jnp.asarray(update))


def default_landing_update(param, update, constraint):
  """The landing step of :meth:`Constraint.landing_update` for any set.

  For an elementwise set, a nudged landing that misses the target is kept
  when it is feasible: within ``bounds_in`` when the set declares bounds,
  else left in place by ``project``. For other sets, only an exact landing
  on the target is kept.
  """
  param = base.float_input(param, f"{constraint!r}.landing_update", "param")
  update = jnp.asarray(update)
  stepped = (param + update).astype(param.dtype)  # as optax.apply_updates
  target = constraint.project(stepped)
  if not constraint.elementwise:
    delta = _nudged(param, target, target - param, None)
  else:
    bounds = constraint.bounds_in(param.dtype)
    if bounds is not None:
      delta = delta_to(param, target, *bounds)
    else:
      delta = _nudged(param, target, target - param,
                      lambda y: constraint.project(y) == y)
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
  return _nudged(param, target, delta, lambda y: _in_bounds(y, lower, upper))
