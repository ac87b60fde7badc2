"""Norm constraints with Keras semantics: ``MaxNorm``, ``UnitNorm`` and
``MinMaxNorm``.

Norms are Euclidean, taken over ``axis`` (``axis=0`` for a Flax ``Dense``
kernel of shape ``(in, out)`` bounds each output unit's incoming weights, as
``keras.constraints`` does); ``axis=None`` takes the whole leaf and a tuple of
axes takes them jointly. Each slice is rescaled radially. Unlike Keras, which
multiplies by ``n / (1e-7 + n)``, points already in the set come back
unchanged bit for bit, and the zero slice, whose direction is undefined, is
sent to the constant direction ``(1, ..., 1) / sqrt(n)`` when it must grow.

Norm bounds hold up to rounding: ``violation`` accepts a relative error of
``2 n eps`` of the leaf's dtype, the worst case of the n-term sum of squares.

Slices are those of the leaves Optax passes: inside ``optax.flatten`` every
parameter is one vector, so ``MaxNorm(axis=0)`` there bounds one global
norm over all parameters. Keep per-slice sets outside ``optax.flatten``.

Hyperparameters may be traced (``optax.inject_hyperparams``); an invalid
traced value (``max_value <= 0``, ``min_value > max_value``, ``rate``
outside ``[0, 1]``) is NaN, and so is every result that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from posconstr.sets import _constraint as base
from posconstr.sets import _norm_landing
from posconstr.sets._slice_sums import sum_of_squares


class _RadialNorm(base.Constraint):
  """min_value <= ||x||_axis <= max_value, reached by radial rescaling.

  Subclasses provide ``min_value``, ``max_value``, ``rate`` and ``axis``
  (dataclass fields or class constants).
  """

  min_value: Any
  max_value: Any
  rate: Any
  axis: base.Axis

  def check_leaf(self, shape, dtype, path="x"):
    base.check_float_dtype(dtype, repr(self), path)
    base.normalize_axes(self.axis, len(shape), repr(self), path)

  def _input(self, x, method, name="x"):
    return base.float_input(x, f"{self!r}.{method}", name)

  def _axes(self, x):
    return base.normalize_axes(self.axis, x.ndim, repr(self), "x")

  @property
  def _has_min(self) -> bool:
    """False only when ``min_value`` is statically 0."""
    return not (base.is_concrete(self.min_value) and self.min_value == 0)

  @property
  def scales_radially(self) -> bool:
    """True when ``project(x)`` is ``x * radial_scale(x)`` for every ``x``
    (no minimum norm, so the zero slice needs no special direction)."""
    return not self._has_min

  @property
  def static_rate(self):
    """``rate`` when concrete, else None."""
    return self.rate if base.is_concrete(self.rate) else None

  def _scale(self, xs, axes):
    """Per-slice (keepdims) scale factor, target norm and ``norm > 0``."""
    if not self._has_min and self.static_rate == 1:
      return self._ball_scale(xs, axes), None, None
    norm = base.safe_norm(xs, axes)
    inside = (norm >= self.min_value) & (norm <= self.max_value)
    clipped = jnp.clip(norm, self.min_value, self.max_value)
    target = self.rate * clipped + (1.0 - self.rate) * norm
    positive = ~(norm <= 0)  # A NaN slice stays NaN.
    scale = jnp.where(inside, 1.0, target / jnp.where(positive, norm, 1.0))
    return scale, target, positive

  def _ball_scale(self, xs, axes):
    """The scale of the general case for a ball (no minimum, ``rate=1``), bit
    for bit, in half the operations (they are repeated in every leaf):
    ``1`` inside, else ``(max_value + 0 * norm) / norm`` (``0 * norm``: an
    infinite slice gets NaN, as ``rate * clip + (1 - rate) * norm`` gives).
    The norm is divided only where it exceeds ``max_value``, so that the
    gradient is finite at the zero slice."""
    sq = sum_of_squares(xs, axes)
    inside = jnp.sqrt(sq) <= self.max_value  # False for NaN.
    norm = jnp.sqrt(jnp.where(inside, 1, sq))
    return jnp.where(inside, 1, (self.max_value + 0 * norm) / norm)

  def radial_scale(self, x):
    """The per-slice factor ``s`` (keepdims) with ``project(x) = x * s``."""
    x = self._input(x, "radial_scale")
    xs = x.astype(base.accumulation_dtype(x.dtype))
    return self._scale(xs, self._axes(x))[0]

  def project(self, x):
    x = self._input(x, "project")
    if x.size == 0:
      return x
    return self.project_unrounded(x).astype(x.dtype)

  def project_unrounded(self, x):
    """``project(x)`` before rounding to ``x``'s dtype (float32 for half
    precision leaves), so that landing can round each coordinate to suit."""
    x = self._input(x, "project_unrounded")
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    xs = x.astype(acc)
    scale, target, positive = self._scale(xs, axes)
    y = xs * scale
    if self._has_min:
      assert target is not None and positive is not None  # Given with a min.
      # The zero slice has no direction: pick the constant one.
      n = base.slice_size(x.shape, axes)
      uniform = jnp.broadcast_to(target / jnp.sqrt(jnp.asarray(n, acc)),
                                 y.shape)
      y = jnp.where(positive, y, uniform)
    return y

  def landing_update(self, param, update):
    param = self._input(param, "landing_update", "param")
    update = jnp.asarray(update)
    if param.size == 0:
      return update
    return _norm_landing.landing_update(param, update, self)

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
    at_min = (norm <= self.min_value * (1 + rtol)) if self._has_min else (
        jnp.zeros_like(at_max))
    return axes, at_max, at_min

  def active(self, x):
    x = self._input(x, "active")
    _, at_max, at_min = self._sides(x)
    return jnp.broadcast_to(at_max | at_min, x.shape)

  def pushing_out(self, x, grad):
    """Slices on a norm bound whose descent direction crosses it."""
    x = self._input(x, "pushing_out")
    grad = self._input(grad, "pushing_out", "grad")
    axes, at_max, at_min = self._sides(x)
    acc = base.accumulation_dtype(x.dtype)
    radial = jnp.sum(x.astype(acc) * grad.astype(acc), axis=axes,
                     keepdims=True)
    out = (at_max & (radial < 0)) | (at_min & (radial > 0))
    return jnp.broadcast_to(out, x.shape)

  def violation(self, x):
    """The largest excess of a slice's norm over the bounds (less the
    rounding tolerance). Empty slices have norm 0."""
    x = self._input(x, "violation")
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    norm = base.safe_norm(x.astype(acc), axes, keepdims=False)
    rtol = base.rounding_tolerance(x.dtype, base.slice_size(x.shape, axes))
    excess = jnp.maximum(norm - self.max_value * (1 + rtol),
                         self.min_value * (1 - rtol) - norm)
    return base.max_or_zero(excess)


def _positive(name, value, owner, allow_zero=False):
  if allow_zero:
    return base.hyperparameter(name, value, owner, lambda v: v >= 0, ">= 0")
  return base.hyperparameter(name, value, owner, lambda v: v > 0, "> 0")


def _set(obj, **fields):
  for name, value in fields.items():
    object.__setattr__(obj, name, value)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MaxNorm(_RadialNorm):
  r"""Slices of Euclidean norm at most ``max_value``: a convex ball.

  .. math::
    P(x) = x \cdot \min\left(1, \frac{c}{\lVert x \rVert}\right)

  Srivastava et al., "Dropout: a simple way to prevent neural networks from
  overfitting", JMLR 2014 (the max-norm constraint).

  Args:
    max_value: the radius ``c > 0`` (may be traced; NaN results if not > 0).
    axis: the axis or axes of each slice (0, Keras' default).

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import MaxNorm
    >>> MaxNorm(1.0, axis=None).project(jnp.array([3.0, 4.0]))
    Array([0.6, 0.8], dtype=float32)
  """

  max_value: float = 2.0
  axis: base.Axis = 0
  min_value = 0.0
  rate = 1.0

  def __post_init__(self):
    _set(self, max_value=_positive("max_value", self.max_value, "MaxNorm"),
         axis=base.check_axis(self.axis, "MaxNorm"))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
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

  axis: base.Axis = 0
  min_value = 1.0
  max_value = 1.0
  rate = 1.0

  def __post_init__(self):
    _set(self, axis=base.check_axis(self.axis, "UnitNorm"))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MinMaxNorm(_RadialNorm):
  r"""Slices whose norm lies in ``[min_value, max_value]``, as in Keras.

  With ``rate=1`` the map is the Euclidean projection onto the shell
  :math:`\{x : a \le \lVert x \rVert \le b\}` (convex only when ``a = 0``).
  With ``rate < 1`` it is Keras' relaxed step: the norm moves to
  :math:`r \cdot \mathrm{clip}(\lVert x \rVert, a, b)
  + (1 - r) \lVert x \rVert`,
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

  min_value: float = 0.0
  max_value: float = 1.0
  rate: float = 1.0
  axis: base.Axis = 0

  def __post_init__(self):
    owner = "MinMaxNorm"
    lo = _positive("min_value", self.min_value, owner, allow_zero=True)
    hi = _positive("max_value", self.max_value, owner)
    if base.is_concrete(lo) and base.is_concrete(hi):
      if lo > hi:
        raise ValueError(
            f"MinMaxNorm: `min_value` must be <= `max_value`, got "
            f"min_value={lo!r} > max_value={hi!r}.")
    else:
      lo, hi = base.poison(lo <= hi, lo), base.poison(lo <= hi, hi)
    rate = base.hyperparameter("rate", self.rate, owner,
                               lambda v: (v >= 0) & (v <= 1), "in [0, 1]")
    _set(self, min_value=lo, max_value=hi, rate=rate,
         axis=base.check_axis(self.axis, owner))
