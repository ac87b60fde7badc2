"""The base class of constraint sets and the helpers they share."""

from __future__ import annotations

import abc
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Axis = Union[int, Tuple[int, ...], None]


class Constraint(abc.ABC):
  """A closed set of arrays with a Euclidean projection onto it.

  Subclasses are immutable and hashable (so they can be static arguments to
  ``jax.jit``). Every set offers:

  * ``project(x)``: the nearest point of the set, same shape and dtype as
    ``x``; pure, and safe under ``jit``, ``vmap`` and ``grad``.
  * ``violation(x)``: a scalar ``>= 0`` that is exactly 0 iff ``x`` is
    feasible. NaN in ``x`` gives a NaN violation.
  * ``check_leaf(shape, dtype, path)``: raises a ``ValueError`` naming
    ``path`` when the set cannot apply to a leaf of that shape and dtype
    (axes out of range, bounds that do not broadcast, ...).
  """

  #: True when the set is a product of intervals, one per coordinate, so that
  #: the projection acts coordinate by coordinate.
  elementwise: bool = False

  @abc.abstractmethod
  def project(self, x: jax.Array) -> jax.Array:
    """Returns the Euclidean projection of ``x`` onto the set."""

  @abc.abstractmethod
  def violation(self, x: jax.Array) -> jax.Array:
    """Returns a scalar >= 0 that is 0 iff ``x`` lies in the set."""

  @abc.abstractmethod
  def active(self, x: jax.Array) -> jax.Array:
    """Boolean mask, shaped like ``x``: coordinates on the set's boundary."""

  @abc.abstractmethod
  def pushing_out(self, x: jax.Array, grad: jax.Array) -> jax.Array:
    """Boolean mask: active coordinates where the descent direction
    ``-grad`` points out of the set (a projected step would not move them)."""

  def check_leaf(self, shape: Sequence[int], dtype: Any, path: str = "x"):
    """Raises ``ValueError`` if the set cannot apply to such a leaf."""
    del shape, dtype, path

  @abc.abstractmethod
  def _key(self) -> tuple:
    """The hyperparameters, as a hashable tuple, for ``__eq__``/``__hash__``."""

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self).__name__, self._key()))

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is immutable.")

  def _init(self, **fields):
    for name, value in fields.items():
      object.__setattr__(self, name, value)


# ---------------------------------------------------------------- validation


def is_concrete(value) -> bool:
  """True unless ``value`` is (or holds) a JAX tracer."""
  return not isinstance(value, jax.core.Tracer)


def check_real(name: str, value, owner: str) -> None:
  """Raises unless ``value`` is a real scalar (or a tracer of one)."""
  if isinstance(value, bool) or not (
      isinstance(value, numbers.Real)
      or (hasattr(value, "dtype") and np.ndim(value) == 0
          and jnp.issubdtype(value.dtype, jnp.number))):
    raise TypeError(
        f"{owner}: `{name}` must be a real number, got {value!r} "
        f"of type {type(value).__name__}.")
  if is_concrete(value) and not np.isfinite(float(value)):
    raise ValueError(f"{owner}: `{name}` must be finite, got {value!r}.")


def check_axis(axis, owner: str) -> Axis:
  """Validates ``axis`` (int, tuple of ints or None) at construction."""
  if axis is None:
    return None
  if isinstance(axis, (list, tuple)):
    axis = tuple(axis)
    items = axis
  else:
    items = (axis,)
  for a in items:
    if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
      raise TypeError(
          f"{owner}: `axis` must be an int, a tuple of ints or None, got "
          f"{axis!r}.")
  if isinstance(axis, tuple):
    if not axis:
      raise ValueError(f"{owner}: `axis` must not be an empty tuple.")
    return tuple(sorted(int(a) for a in axis))  # (1, 0) is (0, 1).
  return int(axis)


def normalize_axes(axis: Axis, ndim: int, owner: str, path: str):
  """The reduction axes of ``axis`` for a leaf of rank ``ndim``."""
  if axis is None:
    return tuple(range(ndim))
  items = axis if isinstance(axis, tuple) else (axis,)
  out = []
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{owner}: axis={axis!r} is out of range for parameter `{path}` "
          f"of rank {ndim}.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{owner}: axis={axis!r} repeats an axis (at `{path}`).")
  return tuple(sorted(out))


def check_float_dtype(dtype, owner: str, path: str) -> None:
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{owner} cannot constrain parameter `{path}` of dtype "
        f"{np.dtype(dtype).name}: only floating-point leaves can be "
        "projected. Exclude it with `mask=` or a rule.")


# ---------------------------------------------------------------- numerics


def accumulation_dtype(dtype):
  """float32 for half precision leaves, the leaf's own dtype otherwise."""
  return jnp.promote_types(dtype, jnp.float32)


def rounding_tolerance(dtype, n: int) -> float:
  """Relative tolerance of an n-term sum: the worst case, 2·n·eps."""
  return 2.0 * max(int(n), 1) * float(jnp.finfo(dtype).eps)


def cast_bound(bound, dtype, *, round_up: bool) -> jax.Array:
  """Casts a bound to ``dtype``, rounding towards the inside of the set.

  A lower bound is rounded up and an upper bound down, so that
  ``x >= cast_bound(lower)`` in ``dtype`` implies ``x >= lower`` exactly.
  """
  if is_concrete(bound) and not isinstance(bound, jax.Array):
    # Round from float64 in NumPy: jnp.asarray would first round a float64
    # bound to the nearest float32 when x64 is disabled, possibly outwards.
    wide = np.asarray(bound, dtype=np.float64)
    narrow = wide.astype(dtype)
    back = narrow.astype(np.float64)
    wrong = back < wide if round_up else back > wide
    step = np.asarray(np.inf if round_up else -np.inf, dtype=narrow.dtype)
    return jnp.asarray(np.where(wrong, np.nextafter(narrow, step), narrow))
  wide = jnp.asarray(bound)
  if not jnp.issubdtype(wide.dtype, jnp.floating):
    wide = wide.astype(jnp.promote_types(dtype, jnp.float32))
  narrow = wide.astype(dtype)
  if narrow.dtype == wide.dtype:
    return narrow
  back = narrow.astype(wide.dtype)
  if round_up:
    wrong = back < wide
    direction = jnp.array(jnp.inf, dtype)
  else:
    wrong = back > wide
    direction = jnp.array(-jnp.inf, dtype)
  # One ulp inwards, exactly (adjacent floats subtract and add exactly),
  # with the derivative of the identity: a bound's rounding does not stop
  # hypergradients (nextafter itself has no derivative rule).
  fixed = jax.lax.stop_gradient(narrow)
  ulp = jax.lax.nextafter(fixed, direction * jnp.ones_like(fixed)) - fixed
  return jnp.where(wrong, narrow + ulp, narrow)


def safe_norm(x: jax.Array, axes, keepdims: bool = True) -> jax.Array:
  """Euclidean norm over ``axes`` with a finite gradient at 0."""
  sq = jnp.sum(x * x, axis=axes, keepdims=keepdims)
  positive = ~(sq <= 0)  # True for NaN too, so that NaN propagates.
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def slice_size(shape, axes) -> int:
  return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def max_or_zero(x: jax.Array) -> jax.Array:
  """``max(x)`` for a non-empty array, 0 for an empty one."""
  if x.size == 0:
    return jnp.zeros((), x.dtype)
  return jnp.maximum(jnp.max(x), 0)


def format_value(value: Optional[Any]) -> str:
  if value is None or isinstance(value, numbers.Number):
    return repr(value)
  if not is_concrete(value):
    return "<traced>"
  arr = np.asarray(value)
  if arr.ndim == 0:
    return repr(arr.item())
  return f"array(shape={arr.shape}, dtype={arr.dtype.name})"
