"""Norm constraints with Keras semantics: ``MaxNorm``, ``UnitNorm``, ``MinMaxNorm``.

Norms are Euclidean, taken over ``axis`` (``axis=0`` for a Flax ``Dense``
kernel of shape ``(in, out)`` bounds each output unit's incoming weights, as
``keras.constraints`` does); ``axis=None`` takes the whole leaf and a tuple of
axes takes them jointly. Each slice is rescaled radially. Unlike Keras, which
multiplies by ``n / (1e-7 + n)``, points already in the set come back
unchanged bit for bit, and the zero slice, whose direction is undefined, is
sent to the constant direction ``(1, ..., 1) / sqrt(n)`` when it must grow.

Norm bounds hold up to rounding: ``violation`` accepts a relative error of
``2 n eps`` of the leaf's dtype, the worst case of the n-term sum of squares.
"""

from __future__ import annotations

import jax.numpy as jnp

from posconstr import _constraint as base


class _RadialNorm(base.Constraint):
  """min_value <= ||x||_axis <= max_value, reached by radial rescaling."""

  min_value: float
  max_value: float
  rate: float
  axis: base.Axis

  def _key(self):
    return (self.min_value, self.max_value, self.rate, self.axis)

  def check_leaf(self, shape, dtype, path="x"):
    base.check_float_dtype(dtype, repr(self), path)
    base.normalize_axes(self.axis, len(shape), repr(self), path)

  def _axes(self, x):
    return base.normalize_axes(self.axis, x.ndim, repr(self), "x")

  @property
  def scales_radially(self) -> bool:
    """True when ``project(x)`` is ``x * radial_scale(x)`` for every ``x``
    (no minimum norm, so the zero slice needs no special direction)."""
    return self.min_value == 0

  def _scale(self, xs, axes):
    """Per-slice (keepdims) scale factor, target norm and ``norm > 0``."""
    norm = base.safe_norm(xs, axes)
    inside = (norm >= self.min_value) & (norm <= self.max_value)
    clipped = jnp.clip(norm, self.min_value, self.max_value)
    target = self.rate * clipped + (1.0 - self.rate) * norm
    positive = ~(norm <= 0)  # A NaN slice stays NaN.
    scale = jnp.where(inside, 1.0, target / jnp.where(positive, norm, 1.0))
    return scale, target, positive

  def radial_scale(self, x):
    """The per-slice factor ``s`` (keepdims) with ``project(x) = x * s``."""
    x = jnp.asarray(x)
    xs = x.astype(base.accumulation_dtype(x.dtype))
    return self._scale(xs, self._axes(x))[0]

  def project(self, x):
    x = jnp.asarray(x)
    if x.size == 0:
      return x
    return self.project_unrounded(x).astype(x.dtype)

  def project_unrounded(self, x):
    """``project(x)`` before rounding to ``x``'s dtype (float32 for half
    precision leaves), so that landing can round each coordinate to suit."""
    x = jnp.asarray(x)
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    xs = x.astype(acc)
    scale, target, positive = self._scale(xs, axes)
    y = xs * scale
    if self.min_value > 0:
      # The zero slice has no direction: pick the constant one.
      n = base.slice_size(x.shape, axes)
      uniform = jnp.broadcast_to(target / jnp.sqrt(jnp.asarray(n, acc)), y.shape)
      y = jnp.where(positive, y, uniform)
    return y

  def reduction_axes(self, x):
    """The axes of each slice of ``x``."""
    return self._axes(jnp.asarray(x))

  def landing_norm_bounds(self, x):
    """``(lo, hi)``: the slice norms ``violation`` accepts for ``x``, less
    a margin for the rounding of a sum in another order."""
    x = jnp.asarray(x)
    n = base.slice_size(x.shape, self._axes(x))
    rtol = base.rounding_tolerance(x.dtype, n) - base.rounding_tolerance(
        base.accumulation_dtype(x.dtype), n) / 2
    return self.min_value * (1 - rtol), self.max_value * (1 + rtol)

  def _sides(self, x):
    """Per-slice masks (keepdims): norm at the max side, at the min side."""
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    norm = base.safe_norm(x.astype(acc), axes)
    rtol = base.rounding_tolerance(x.dtype, base.slice_size(x.shape, axes))
    at_max = norm >= self.max_value * (1 - rtol)
    at_min = (norm <= self.min_value * (1 + rtol)) if self.min_value > 0 else (
        jnp.zeros_like(at_max))
    return axes, at_max, at_min

  def active(self, x):
    x = jnp.asarray(x)
    _, at_max, at_min = self._sides(x)
    return jnp.broadcast_to(at_max | at_min, x.shape)

  def pushing_out(self, x, grad):
    """Slices on a norm bound whose descent direction crosses it."""
    x = jnp.asarray(x)
    axes, at_max, at_min = self._sides(x)
    acc = base.accumulation_dtype(x.dtype)
    radial = jnp.sum(x.astype(acc) * jnp.asarray(grad).astype(acc), axis=axes,
                     keepdims=True)
    out = (at_max & (radial < 0)) | (at_min & (radial > 0))
    return jnp.broadcast_to(out, x.shape)

  def violation(self, x):
    x = jnp.asarray(x)
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    if x.size == 0:
      return jnp.zeros((), acc)
    norm = base.safe_norm(x.astype(acc), axes, keepdims=False)
    rtol = base.rounding_tolerance(x.dtype, base.slice_size(x.shape, axes))
    excess = jnp.maximum(norm - self.max_value * (1 + rtol),
                         self.min_value * (1 - rtol) - norm)
    return base.max_or_zero(excess)


def _check_positive(name, value, owner, allow_zero=False):
  base.check_real(name, value, owner)
  value = float(value)
  if value < 0 or (value == 0 and not allow_zero):
    relation = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{owner}: `{name}` must be {relation}, got {value!r}.")
  return value


class MaxNorm(_RadialNorm):
  r"""Slices of Euclidean norm at most ``max_value``: a convex ball.

  .. math::
    P(x) = x \cdot \min\left(1, \frac{c}{\lVert x \rVert}\right)

  Srivastava et al., "Dropout: a simple way to prevent neural networks from
  overfitting", JMLR 2014 (the max-norm constraint).

  Args:
    max_value: the radius ``c > 0``.
    axis: the axis or axes of each slice (0, Keras' default).

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import MaxNorm
    >>> MaxNorm(1.0, axis=None).project(jnp.array([3.0, 4.0]))
    Array([0.6, 0.8], dtype=float32)
  """

  def __init__(self, max_value: float = 2.0, axis: base.Axis = 0):
    max_value = _check_positive("max_value", max_value, "MaxNorm")
    self._init(min_value=0.0, max_value=max_value, rate=1.0,
               axis=base.check_axis(axis, "MaxNorm"))

  def __repr__(self):
    return f"MaxNorm(max_value={self.max_value!r}, axis={self.axis!r})"


class UnitNorm(_RadialNorm):
  r"""Slices of unit Euclidean norm: the sphere, a non-convex set.

  The projection :math:`x / \lVert x \rVert` is the nearest point; at
  :math:`x = 0` every unit vector is nearest and the constant direction is
  returned. Because the sphere is not convex, the projection is not
  non-expansive.

  Args:
    axis: the axis or axes of each slice.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import UnitNorm
    >>> UnitNorm(axis=None).project(jnp.array([3.0, 4.0]))
    Array([0.6, 0.8], dtype=float32)
  """

  def __init__(self, axis: base.Axis = 0):
    self._init(min_value=1.0, max_value=1.0, rate=1.0,
               axis=base.check_axis(axis, "UnitNorm"))

  def __repr__(self):
    return f"UnitNorm(axis={self.axis!r})"


class MinMaxNorm(_RadialNorm):
  r"""Slices whose norm lies in ``[min_value, max_value]``, as in Keras.

  With ``rate=1`` the map is the Euclidean projection onto the shell
  :math:`\{x : a \le \lVert x \rVert \le b\}` (convex only when ``a = 0``).
  With ``rate < 1`` it is Keras' relaxed step: the norm moves to
  :math:`r \cdot \mathrm{clip}(\lVert x \rVert, a, b) + (1 - r) \lVert x \rVert`,
  which approaches the set over repeated steps but is not a projection: one
  application can leave ``violation > 0``.

  Args:
    min_value: the smallest norm, ``>= 0``.
    max_value: the largest norm, ``>= min_value`` and ``> 0``.
    rate: in ``[0, 1]``, how far towards the set one step goes.
    axis: the axis or axes of each slice.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import MinMaxNorm
    >>> MinMaxNorm(1.0, 2.0, axis=None).project(jnp.array([0.3, 0.4]))
    Array([0.6, 0.8], dtype=float32)
  """

  def __init__(self, min_value: float = 0.0, max_value: float = 1.0,
               rate: float = 1.0, axis: base.Axis = 0):
    min_value = _check_positive("min_value", min_value, "MinMaxNorm",
                                allow_zero=True)
    max_value = _check_positive("max_value", max_value, "MinMaxNorm")
    if min_value > max_value:
      raise ValueError(
          f"MinMaxNorm: `min_value` must be <= `max_value`, got "
          f"min_value={min_value!r} > max_value={max_value!r}.")
    base.check_real("rate", rate, "MinMaxNorm")
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"MinMaxNorm: `rate` must be in [0, 1], got {rate!r}.")
    self._init(min_value=min_value, max_value=max_value, rate=rate,
               axis=base.check_axis(axis, "MinMaxNorm"))

  def __repr__(self):
    return (f"MinMaxNorm(min_value={self.min_value!r}, "
            f"max_value={self.max_value!r}, rate={self.rate!r}, "
            f"axis={self.axis!r})")
