"""Elementwise sets: ``NonNegative`` and ``Box`` (products of intervals)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from posconstr.sets import _constraint as base
from posconstr.sets import _landing


def _as_bound(name: str, value, owner: str):
  """Validates a bound: None, a real scalar, or an array of reals."""
  if value is None:
    return None
  if not base.is_concrete(value):
    return value  # Traced (e.g. under optax.inject_hyperparams): no checks.
  if isinstance(value, bool):
    raise TypeError(f"{owner}: `{name}` must be a number or an array, got "
                    f"{value!r}.")
  try:
    arr = np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic inputs
    raise TypeError(f"{owner}: `{name}` must be a number or an array, got "
                    f"{type(value).__name__}.") from e
  if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number)
                                 or arr.dtype.name == "bfloat16"):
    raise TypeError(f"{owner}: `{name}` must be a number or an array of "
                    f"numbers, got {value!r}.")
  if np.issubdtype(arr.dtype, np.complexfloating):
    raise TypeError(f"{owner}: `{name}` must be real, got {value!r}.")
  if arr.ndim == 0:
    value = float(arr)
    if np.isnan(value):
      raise ValueError(f"{owner}: `{name}` must not be NaN.")
    return value
  arr = np.array(arr, dtype=np.promote_types(arr.dtype, np.float32))
  if np.isnan(arr).any():
    raise ValueError(f"{owner}: `{name}` contains NaN at index "
                     f"{tuple(int(i) for i in np.argwhere(np.isnan(arr))[0])}.")
  arr.setflags(write=False)
  return arr


def _why_empty(lo, hi) -> Optional[str]:
  """Why concrete bounds in a dtype hold no finite value of it: ``"lower"``
  (rounded inwards to +inf: past the dtype's range), ``"upper"`` (to -inf),
  ``"between"`` (lower > upper); None when some value lies in them (or the
  bounds are traced)."""
  lo_known = lo is not None and base.is_concrete(lo)
  hi_known = hi is not None and base.is_concrete(hi)
  if lo_known and np.any(np.asarray(lo) == np.inf):
    return "lower"
  if hi_known and np.any(np.asarray(hi) == -np.inf):
    return "upper"
  if lo_known and hi_known and np.any(np.asarray(lo) > np.asarray(hi)):
    return "between"
  return None


class _Interval(base.Constraint):
  """lower <= x <= upper, coordinate by coordinate (either bound may be None).

  Subclasses provide ``lower`` and ``upper``.
  """

  elementwise = True
  lower: Any
  upper: Any

  def bounds_in(self, dtype) -> Tuple[Optional[jax.Array], Optional[jax.Array]]:
    """The bounds cast to ``dtype``, rounded towards the inside of the set."""
    concrete = base.is_concrete(self.lower) and base.is_concrete(self.upper)
    eager = jax.ensure_compile_time_eval
    with eager() if concrete else contextlib.nullcontext():
      lo = (None if self.lower is None else
            base.cast_bound(self.lower, dtype, round_up=True))
      hi = (None if self.upper is None else
            base.cast_bound(self.upper, dtype, round_up=False))
    return lo, hi

  def _bounds(self, dtype):
    """``bounds_in``, NaN where traced bounds are invalid (lower > upper).

    Concrete bounds come as NumPy values, computed once per dtype: scalars
    are literals in a traced program rather than one constant per leaf.
    """
    if base.is_concrete(self.lower) and base.is_concrete(self.upper):
      cache: dict = vars(self).setdefault("_numpy_bounds", {})
      key = np.dtype(dtype)
      if key not in cache:
        cache[key] = tuple(
            None if b is None else _scalar_or_array(base.cast_bound_numpy(
                b, key, round_up=up))
            for b, up in ((self.lower, True), (self.upper, False)))
      return cache[key]
    lo, hi = self.bounds_in(dtype)
    if lo is None or hi is None or (base.is_concrete(lo)
                                    and base.is_concrete(hi)):
      return lo, hi
    ok = lo <= hi
    return base.poison(ok, lo), base.poison(ok, hi)

  def _input(self, x, method, name="x"):
    return base.float_input(x, f"{self!r}.{method}", name)

  def check_leaf(self, shape, dtype, path="x"):
    owner = repr(self)
    base.check_float_dtype(dtype, owner, path)
    shape = tuple(shape)
    for name, bound in (("lower", self.lower), ("upper", self.upper)):
      bshape = np.shape(bound)
      try:
        ok = np.broadcast_shapes(bshape, shape) == shape
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(
            f"{owner}: `{name}` of shape {bshape} does not broadcast to "
            f"parameter `{path}` of shape {shape}.")
    lo, hi = self._bounds(dtype) if base.is_concrete(self.lower) and (
        base.is_concrete(self.upper)) else self.bounds_in(dtype)
    why = _why_empty(lo, hi)
    if why in ("lower", "upper"):
      name = "eps" if why == "lower" and isinstance(self, NonNegative) else why
      side = "at or above" if why == "lower" else "at or below"
      raise ValueError(
          f"{owner}: no finite {np.dtype(dtype).name} value lies {side} "
          f"`{name}` (parameter `{path}`); use a wider dtype or a bound "
          "within its range.")
    if why == "between":
      raise ValueError(
          f"{owner}: no {np.dtype(dtype).name} value lies between `lower` "
          f"and `upper` (parameter `{path}`); widen the box or use a wider "
          "dtype.")

  def _check_broadcast(self, shape):
    for bound in (self.lower, self.upper):
      try:
        ok = np.broadcast_shapes(np.shape(bound), shape) == tuple(shape)
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(
            f"{self!r}: bounds of shapes {np.shape(self.lower)}, "
            f"{np.shape(self.upper)} do not broadcast to {tuple(shape)}.")

  def _nonempty_bounds(self, dtype, method):
    """``_bounds``; a ValueError where concrete bounds hold no finite value
    of ``dtype`` (a clip would return a point outside the set)."""
    lo, hi = self._bounds(dtype)
    if _why_empty(lo, hi):
      raise ValueError(f"{self!r}.{method}: no finite {np.dtype(dtype).name} "
                       "value lies in the set; use a wider dtype.")
    return lo, hi

  def project(self, x):
    x = self._input(x, "project")
    self._check_broadcast(x.shape)
    return _landing.clip(x, *self._nonempty_bounds(x.dtype, "project"))

  def landing_update(self, param, update):
    param = self._input(param, "landing_update", "param")
    update = jnp.asarray(update)
    self._check_broadcast(param.shape)
    return _landing.interval_landing(
        param, update, *self._nonempty_bounds(param.dtype, "landing_update"))

  def _masks(self, x):
    """``(x <= lower, x >= upper)``, None for an unbounded side."""
    lo, hi = self._bounds(x.dtype)
    at_lower = None if lo is None else _landing.compare(lax.le, x, lo)
    at_upper = None if hi is None else _landing.compare(lax.ge, x, hi)
    return at_lower, at_upper

  def active(self, x):
    x = self._input(x, "active")
    return _either(x.shape, *self._masks(x))

  def pushing_out(self, x, grad):
    x = self._input(x, "pushing_out")
    grad = self._input(grad, "pushing_out", "grad")
    at_lower, at_upper = self._masks(x)
    zero = np.zeros((), grad.dtype)[()]
    if at_lower is not None:
      at_lower = at_lower & _landing.compare(lax.gt, grad, zero)
    if at_upper is not None:
      at_upper = at_upper & _landing.compare(lax.lt, grad, zero)
    return _either(jnp.broadcast_shapes(x.shape, grad.shape), at_lower,
                   at_upper)

  def violation(self, x):
    """The largest distance of a coordinate to the interval; ``inf`` at an
    infinite coordinate, NaN at a NaN one, and at least the smallest normal
    number wherever ``x`` is outside (a gap that flush-to-zero arithmetic
    would round to 0)."""
    x = self._input(x, "violation")
    acc = base.accumulation_dtype(x.dtype)
    lo, hi = self._bounds(x.dtype)
    xs = x.astype(acc)
    tiny = jnp.finfo(acc).tiny
    excess = jnp.zeros(x.shape, acc)
    if lo is not None:
      lo = lo.astype(acc)
      gap = jnp.broadcast_to(lo - xs, x.shape)
      excess = jnp.maximum(excess, jnp.where(
          xs < lo, jnp.maximum(gap, tiny), jnp.minimum(gap, 0)))
    if hi is not None:
      hi = hi.astype(acc)
      gap = jnp.broadcast_to(xs - hi, x.shape)
      excess = jnp.maximum(excess, jnp.where(
          xs > hi, jnp.maximum(gap, tiny), jnp.minimum(gap, 0)))
    return base.max_or_zero(jnp.where(jnp.isinf(xs), jnp.inf, excess))


def _scalar_or_array(bound: np.ndarray):
  """A 0-d bound as a NumPy scalar (a literal when traced); arrays as they
  are."""
  return bound[()] if bound.ndim == 0 else bound


def _either(shape, a, b):
  """``a | b`` for masks that may be None (no bound on that side)."""
  if a is None and b is None:
    return jnp.zeros(shape, bool)
  masks = [m for m in (a, b) if m is not None]
  out = masks[0] if len(masks) == 1 else masks[0] | masks[1]
  return jnp.broadcast_to(out, shape)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class NonNegative(_Interval):
  r"""The non-negative orthant, shifted: :math:`\{x : x_i \ge \epsilon\}`.

  The projection is :math:`\max(x, \epsilon)` elementwise. ``eps`` is rounded
  up to the leaf's dtype, so the projection is feasible in every dtype (a
  subnormal ``eps`` becomes the smallest normal number, which flush-to-zero
  arithmetic does not read as 0). ``+inf`` is not in the set: its
  ``violation`` is ``inf``.

  Args:
    eps: the lower bound, ``>= 0``. It may be traced
      (``optax.inject_hyperparams``); a traced negative ``eps`` is NaN, and
      so is every result that uses it.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import NonNegative
    >>> NonNegative().project(jnp.array([-1.0, 0.5]))
    Array([0. , 0.5], dtype=float32)
    >>> float(NonNegative(eps=0.1).violation(jnp.array([0.0, 1.0])))
    0.1...
  """

  eps: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "eps", base.hyperparameter(
        "eps", self.eps, "NonNegative", lambda v: v >= 0, ">= 0"))

  @property
  def lower(self):
    return self.eps

  @property
  def upper(self):
    return None


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Box(_Interval):
  r"""A box :math:`\{x : l_i \le x_i \le u_i\}`; the projection is a clip.

  Bounds are scalars or arrays that broadcast to the leaf's shape; ``None``
  leaves that side unbounded. They are rounded inwards to the leaf's dtype
  (subnormal ones to 0 or the smallest normal number).

  Bounds may be traced (``optax.inject_hyperparams``). Where traced bounds
  have ``lower > upper`` the set is empty: ``project``, ``violation`` and
  the landing step give NaN there (``bounds_in`` returns them as they are).

  Args:
    lower: the lower bound, or ``None``.
    upper: the upper bound, or ``None``.

  Raises:
    ValueError: if concrete bounds have ``lower > upper`` anywhere, or a
      bound is NaN.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import Box
    >>> Box(0.0, 1.0).project(jnp.array([-1.0, 0.5, 2.0]))
    Array([0. , 0.5, 1. ], dtype=float32)
  """

  lower: Any = None
  upper: Any = None

  def __post_init__(self):
    lower = _as_bound("lower", self.lower, "Box")
    upper = _as_bound("upper", self.upper, "Box")
    if (lower is not None and upper is not None and base.is_concrete(lower)
        and base.is_concrete(upper)):
      lo, hi = np.asarray(lower), np.asarray(upper)
      try:
        bad = np.broadcast_to(lo > hi, np.broadcast_shapes(lo.shape, hi.shape))
      except ValueError:
        raise ValueError(
            f"Box: `lower` of shape {lo.shape} and `upper` of shape "
            f"{hi.shape} do not broadcast together.") from None
      if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        lv = np.broadcast_to(lo, bad.shape)[index].item()
        uv = np.broadcast_to(hi, bad.shape)[index].item()
        where = f" at index {index}" if index else ""
        raise ValueError(
            f"Box: `lower` must be <= `upper`, got lower={lv!r} > "
            f"upper={uv!r}{where}.")
    object.__setattr__(self, "lower", lower)
    object.__setattr__(self, "upper", upper)
