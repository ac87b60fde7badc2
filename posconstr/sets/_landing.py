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
from jax import lax

from posconstr.sets import _constraint as base

_BITS = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _statically_zero(bound) -> bool:
  return bound is None or (base.is_concrete(bound)
                           and not np.any(np.asarray(bound)))


def _literal(x, bound) -> bool:
  """A concrete scalar bound in ``x``'s dtype: a literal in the traced
  program, which ``lax`` broadcasts itself."""
  return isinstance(bound, np.generic) and bound.dtype == x.dtype


_JNP = {lax.max: jnp.maximum, lax.min: jnp.minimum, lax.ge: jnp.greater_equal,
        lax.le: jnp.less_equal, lax.gt: jnp.greater, lax.lt: jnp.less}


def compare(op, x, bound):
  """``op(x, bound)`` for a ``lax`` comparison, ``lax.max`` or ``lax.min``;
  ``jnp``'s broadcasting and promotion for any bound but a literal."""
  return op(x, bound) if _literal(x, bound) else _JNP[op](x, bound)


def clip(x, lo, hi):
  """``x`` clipped to ``[lo, hi]`` (either may be None); one ``clamp`` for
  literal bounds."""
  if _literal(x, lo) and _literal(x, hi):
    return lax.clamp(lo, x, hi)
  if lo is not None:
    x = compare(lax.max, x, lo)
  if hi is not None:
    x = compare(lax.min, x, hi)
  return x


def _in_bounds(x, lo, hi):
  if _literal(x, lo) and _literal(x, hi):  # One clamp, one comparison.
    return lax.eq(lax.clamp(lo, x, hi), x)
  ok = None
  if lo is not None:
    ok = compare(lax.ge, x, lo)
  if hi is not None:
    above = compare(lax.le, x, hi)
    ok = above if ok is None else ok & above
  return jnp.ones(x.shape, bool) if ok is None else ok


def applied(param, delta):
  """``param + delta`` in ``param``'s dtype, as ``optax.apply_updates``."""
  if _same(param, delta):
    return lax.add(param, delta)
  return (param + delta).astype(param.dtype)


def select(pred, on_true, on_false):
  """``jnp.where`` without its nested call when nothing needs promoting."""
  if (on_true.dtype == on_false.dtype
      and on_true.shape == on_false.shape == pred.shape):
    return lax.select(pred, on_true, on_false)
  return jnp.where(pred, on_true, on_false)


def ulp_step(x, up, zero_safe: bool = True):
  """``x`` moved one ulp towards ``+inf`` where ``up``, ``-inf`` elsewhere.

  ``jax.lax.nextafter(x, ±inf)`` for finite ``x``, as one integer addition
  on ``x``'s bits (``nextafter`` expands to about 25 operations in XLA, in
  every leaf). With ``zero_safe=False``, a zero stepped across to the other
  sign gives NaN (three operations fewer): for callers that only keep a
  step whose landing they have checked. ``±inf`` stepped outwards is NaN.
  Not differentiable (wrap it as :func:`straight_through` does).

  >>> import jax.numpy as jnp
  >>> x = jnp.array([1.0, -1.0, 0.0, 0.0])
  >>> up = jnp.array([True, True, True, False])
  >>> bool((ulp_step(x, up) == jnp.nextafter(x, jnp.where(up, jnp.inf,
  ...                                                     -jnp.inf))).all())
  True
  """
  itype = _BITS[np.dtype(x.dtype).itemsize]
  bits = lax.bitcast_convert_type(x, itype)
  up = jnp.broadcast_to(up, x.shape)
  if zero_safe:  # Give a zero the sign of its step; then it grows.
    signed_zero = lax.select(up, jnp.zeros(x.shape, itype),
                             jnp.full(x.shape, np.iinfo(itype).min, itype))
    bits = lax.select(lax.eq(x, np.zeros((), x.dtype)[()]), signed_zero, bits)
  # |x| grows when stepping up from a positive pattern or down from a
  # negative one.
  return _grown(bits, lax.ne(up, lax.lt(bits, itype(0))), x.dtype)


def _grown(bits, grows, dtype):
  """The float whose bits, read as sign and magnitude, are ``bits`` moved
  one ulp away from 0 where ``grows``, towards 0 elsewhere."""
  one = bits.dtype.type(1)
  return lax.bitcast_convert_type(
      lax.select(grows, lax.add(bits, one), lax.sub(bits, one)), dtype)


def _same(*arrays) -> bool:
  """Same shape and dtype: ``lax`` needs no promotion or broadcasting."""
  return all(a.shape == arrays[0].shape and a.dtype == arrays[0].dtype
             for a in arrays[1:])


def straight_through(x, moved):
  """``moved`` (a few ulps from ``x``) with the derivative of the identity
  in ``x``: ``x + (moved - x)`` is exactly ``moved`` (the difference of
  nearby floats is exact), and only ``x`` carries a derivative. (Cheaper to
  trace than a ``custom_jvp``, in every leaf.)"""
  if _same(x, moved):
    return lax.add(x, lax.stop_gradient(lax.sub(moved, x)))
  return x + lax.stop_gradient(moved - x)


def _nudged(param, target, delta, feasible, landing_is_feasible=False):
  """One-ulp correction of ``delta`` so that ``param + delta`` hits the set.

  ``feasible(landed)``: a mask of the landings that are acceptable even if
  they miss ``target`` (with ``landing_is_feasible``, one that an exact
  landing on ``target`` passes too). The landings ``p + d`` grow with ``d``,
  so where ``t - p`` rounded to a ``d`` that misses, the only float that can
  hit is its neighbour towards ``t``. The correction has the derivative of
  the identity.
  """
  delta_c = lax.stop_gradient(delta)
  landed = applied(param, delta_c)
  lt, eq, ne, and_ = (
      (lax.lt, lax.eq, lax.ne, lax.bitwise_and) if _same(param, target, delta)
      else (jnp.less, jnp.equal, jnp.not_equal, jnp.logical_and))
  # Towards t: |d| grows where p + d fell short of t, on either side of p.
  # (For d = 0 the direction is moot: p + d is p whichever way d moves.)
  grows = ne(lt(landed, target), lt(target, param))
  nudged = _grown(lax.bitcast_convert_type(
      delta_c, _BITS[np.dtype(delta_c.dtype).itemsize]), grows, delta_c.dtype)
  landed2 = applied(param, nudged)
  if feasible is None:
    better = eq(landed2, target)
  elif landing_is_feasible:
    better = feasible(landed2)
  else:
    better = eq(landed2, target) | feasible(landed2)
  if better.shape != landed.shape:  # A feasibility test that broadcast.
    and_ = jnp.logical_and
  return straight_through(delta, select(and_(ne(landed, target), better),
                                        nudged, delta_c))


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
  delta = lax.sub(target, param) if _same(target, param) else target - param
  if _statically_zero(lower) and _statically_zero(upper):
    # Bounds at 0 or none: t - p lands exactly on a bound at 0 and, by
    # monotone rounding, never crosses it elsewhere.
    return delta
  # t is within the bounds, so an exact landing passes the bounds test.
  return _nudged(param, target, delta, lambda y: _in_bounds(y, lower, upper),
                 landing_is_feasible=True)


def interval_landing(param, update, lower, upper):
  """:func:`default_landing_update` for ``lower <= x <= upper``, with the
  bounds already in ``param``'s dtype (literals where they are concrete
  scalars): about twenty elementwise operations per leaf, no nested calls,
  no constants of its own; four for a single bound at 0, as
  ``optax.keep_params_nonnegative`` (``-p`` lands exactly on 0)."""
  stepped = applied(param, update)
  for bound, other, beyond in ((lower, upper, lax.lt), (upper, lower, lax.gt)):
    if other is None and _literal(param, bound) and bound == 0:
      # p + u beyond 0 (not NaN): -p, else u. As below, bit for bit: there,
      # a target that is not p + u is 0, and 0 - p lands where -p does.
      return select(beyond(stepped, bound), lax.neg(param), update)
  target = clip(stepped, lower, upper)
  delta = delta_to(param, target, lower, upper)
  return select(lax.eq(target, stepped), update, delta)
