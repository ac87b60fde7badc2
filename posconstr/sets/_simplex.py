"""The probability simplex, scaled, taken slice by slice along an axis."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from posconstr.sets import _constraint as base
from posconstr.sets import _slice_sums
from posconstr.sets._slice_sums import slice_sums


def _threshold(v, top, start, scale, axes):
  """Per slice (keepdims), the ``theta`` with ``sum(max(w - theta, 0)) =
  scale`` for ``w = v - top``, where ``top`` is each slice's maximum.

  Newton's method on that convex, decreasing, piecewise-linear function,
  i.e. Michelot's algorithm (1986): from ``start``, at or left of the root
  (see :func:`_top_and_start`), each step sets ``theta`` to
  ``(sum of w over w > theta - scale) / count``, which only drops
  coordinates. Each step is one pass over ``v``, with no sort and no
  transpose; ``w`` is formed as it is read and never stored. A slice stops
  when its count stops falling (at most ``n`` steps; rounding near the root
  could otherwise make it cycle), or as soon as the smallest ``w`` it
  counted is above its new ``theta``: the next pass would count at least
  those coordinates, and stop there with the same ``theta`` (this saves
  it).
  """
  def step(carry):
    theta, count, _ = carry

    def terms(block):
      w = block - top
      above = w > theta
      return (above.astype(jnp.int32), jnp.where(above, w, 0),
              jnp.where(above, -w, -jnp.inf))

    new_count, total, minus_lowest = slice_sums(terms, [v], axes,
                                                ("sum", "sum", "max"))
    falling = new_count < count
    # A NaN slice counts 0 and gets theta -inf; its output stays NaN.
    theta = jnp.where(falling, (total - scale) / new_count.astype(v.dtype),
                      theta)
    settled = -minus_lowest > theta
    return (theta, jnp.where(falling, new_count, count),
            falling & ~settled)

  shape = top.shape
  n = base.slice_size(v.shape, axes)
  carry = (start, jnp.full(shape, n + 1, jnp.int32), jnp.ones(shape, bool))
  return lax.while_loop(lambda carry: jnp.any(carry[2]), step, carry)[0]


def _top_and_start(v, scale, axes):
  """Each slice's maximum (keepdims), and a start for :func:`_threshold`.

  ``-scale`` is at or left of the root: the maximum alone gives
  ``f(-scale) >= scale``. So is the mean ``(sum(w) - scale) / n``, since
  ``f(theta) >= sum(w - theta)``. Newton's first step from ``-scale`` lands
  on the mean when every coordinate is within ``scale`` of the maximum, as
  on weights the projection placed one small step before: starting there
  saves that pass. The mean is taken less a bound on its rounding (the
  sum's error over ``n`` is at most about ``u sum|v|``; the margin is 16x
  that and the other roundings' here, with ``n eps <= 1/64``), and only
  where it is right of ``-scale`` (so never NaN). Leaves under
  ``_MIN_ELEMENTS`` start at ``-scale``.

  A slice with a NaN gets a NaN maximum, so that all of its output is NaN,
  whatever the leaf's size (XLA:CPU's maximum alone may skip a NaN).
  """
  n = base.slice_size(v.shape, axes)
  eps = float(jnp.finfo(v.dtype).eps)
  if v.size < _slice_sums._MIN_ELEMENTS or n * eps > 1 / 64:
    top = jnp.max(v, axis=axes, keepdims=True)
    total = jnp.sum(v, axis=axes, keepdims=True)
    start = jnp.full(top.shape, -scale, v.dtype)
  else:
    # One pass for all three (on CPU, and one variadic reduction elsewhere).
    top, total, magnitude = _slice_sums.slice_sums(
        lambda b: (b, b, jnp.abs(b)), [v], axes, ops=("max", "sum", "sum"))
    mean = (total - scale) / n - top
    start = mean - 8 * eps * (magnitude + scale + jnp.abs(top))
    start = jnp.where(start > -scale, start, -scale)
  return jnp.where(jnp.isnan(total), jnp.nan, top), start


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def project_slices(v, scale, axes):
  """Projects every slice of ``v`` along ``axes`` onto the simplex of sum
  ``scale``, in ``v``'s dtype."""
  # The projection commutes with shifts; shifting by the max keeps theta and
  # the support small, so the sums stay exact to rounding when |v| >> scale.
  top, start = _top_and_start(v, scale, axes)
  return jnp.maximum((v - top) - _threshold(v, top, start, scale, axes), 0)


@project_slices.defjvp
def _project_slices_jvp(axes, primals, tangents):
  # On the support S the output is v - theta with theta = (sum_S v - s)/|S|
  # (the while loop has no reverse-mode derivative; this one is linear).
  v, scale = primals
  dv, dscale = tangents
  y = project_slices(v, scale, axes)
  # Plain sums: reverse mode transposes this (slice_sums has no transpose).
  support = y > 0
  count = jnp.maximum(jnp.sum(support, axis=axes, keepdims=True), 1)
  dtheta = (jnp.sum(jnp.where(support, dv, 0), axis=axes, keepdims=True)
            - dscale) / count.astype(v.dtype)
  return y, jnp.where(support, dv - dtheta, 0)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Simplex(base.Constraint):
  r"""Non-negative slices summing to ``scale``.

  .. math::
    \Delta_s = \{x : x \ge 0,\ \textstyle\sum_{i \in \text{axis}} x_i = s\}

  The projection finds the threshold :math:`\theta` of
  :math:`x_i = \max(v_i - \theta, 0)` by Michelot's algorithm (Newton's
  method on :math:`\sum_i \max(v_i - \theta, 0) = s`; Michelot 1986, Condat
  2016): a few passes over the leaf, each :math:`O(n)`, with no sort and no
  transpose (the sort-based method of Held et al. 1974 and Duchi et al. 2008
  is :math:`O(n \log n)`). Each pass drops coordinates from the support, so
  there are at most ``n`` of them; on random and trained weights a handful.
  Every slice along ``axis`` is
  projected independently; ``axis=None`` projects the whole leaf as one
  vector and a tuple of axes treats those axes jointly. For a Flax ``Dense``
  kernel of shape ``(in, out)``, ``axis=0`` makes each output unit's incoming
  weights a convex combination.

  The sum constraint holds up to rounding: ``violation`` accepts
  :math:`|\sum x - s| \le 2 n \varepsilon s`, the worst-case error of an
  ``n``-term sum in the leaf's dtype. Non-negativity is exact.

  Slices are those of the leaves Optax passes: inside ``optax.flatten``
  every parameter is one vector. An empty slice cannot sum to ``scale``:
  ``check_leaf`` refuses such leaves and their ``violation`` is positive.

  Args:
    scale: the sum of each slice, ``> 0``. It may be traced
      (``optax.inject_hyperparams``); a traced ``scale <= 0`` is NaN, and so
      is every result.
    axis: the axis or axes along which slices sum to ``scale``.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import Simplex
    >>> x = jnp.array([0.5, 0.5, 1.0])
    >>> [round(float(v), 4) for v in Simplex().project(x)]
    [0.1667, 0.1667, 0.6667]
  """

  scale: float = 1.0
  axis: base.Axis = 0

  def __post_init__(self):
    object.__setattr__(self, "scale", base.hyperparameter(
        "scale", self.scale, "Simplex", lambda v: v > 0, "> 0"))
    object.__setattr__(self, "axis", base.check_axis(self.axis, "Simplex"))

  def check_leaf(self, shape, dtype, path="x"):
    base.check_float_dtype(dtype, repr(self), path)
    axes = base.normalize_axes(self.axis, len(shape), repr(self), path)
    if base.slice_size(shape, axes) == 0:
      raise ValueError(f"{self!r}: parameter `{path}` of shape {tuple(shape)}"
                       " has empty slices, which cannot sum to `scale`.")

  def _input(self, x, method, name="x"):
    return base.float_input(x, f"{self!r}.{method}", name)

  def _axes(self, x):
    return base.normalize_axes(self.axis, x.ndim, repr(self), "x")

  def project(self, x):
    x = self._input(x, "project")
    axes = self._axes(x)
    if x.size == 0:
      return x  # No coordinates to move (empty slices stay infeasible).
    acc = base.accumulation_dtype(x.dtype)
    scale = jnp.asarray(self.scale, acc)
    return project_slices(x.astype(acc), scale, axes).astype(x.dtype)

  def active(self, x):
    return self._input(x, "active") <= 0

  def pushing_out(self, x, grad):
    """Zero coordinates whose gradient exceeds the slice's multiplier.

    On the simplex, mass moves into coordinate ``i`` only if its gradient is
    below the common gradient ``lambda`` of the support (the KKT
    multiplier, estimated as the mean gradient over ``x > 0``).
    """
    x = self._input(x, "pushing_out")
    grad = self._input(grad, "pushing_out", "grad")
    grad = grad.astype(base.accumulation_dtype(x.dtype))
    axes = self._axes(x)
    grad = jnp.broadcast_to(grad, x.shape)  # It may only broadcast.
    count, total = slice_sums(
        lambda x, grad: ((x > 0).astype(jnp.int32), jnp.where(x > 0, grad, 0)),
        [x, grad], axes)
    multiplier = total / jnp.maximum(count, 1).astype(grad.dtype)
    return ~(x > 0) & (grad > multiplier)  # A NaN weight is off the support.

  def violation(self, x):
    x = self._input(x, "violation")
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    xs = x.astype(acc)
    n = base.slice_size(x.shape, axes)
    tol = base.rounding_tolerance(x.dtype, n) * self.scale
    # Per slice, also when the slices are empty (their sum is 0).
    sum_error = jnp.abs(jnp.sum(xs, axis=axes) - self.scale) - tol
    return jnp.maximum(base.max_or_zero(-xs), base.max_or_zero(sum_error))
