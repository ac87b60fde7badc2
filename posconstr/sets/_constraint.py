"""The base class of constraint sets, and the helpers the sets share."""

from __future__ import annotations

import abc
import dataclasses
import numbers
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.core  # Explicit: `jax.core.Tracer` below.
import jax.numpy as jnp
import numpy as np

from posconstr.sets._slice_sums import sum_of_squares

Axis = Union[int, Tuple[int, ...], None]


class ValueObject:
  """Equality, hashing and ``repr`` from a frozen dataclass's fields.

  Subclasses are ``@dataclasses.dataclass(frozen=True, eq=False,
  repr=False)``. Two objects are equal when they have the same type and
  equal fields, concrete arrays compared by value (shape, dtype and bytes)
  and traced values by identity, so that equal objects are one static
  argument to ``jax.jit`` (one compilation). Objects that are not
  dataclasses compare by identity.
  """

  def _key(self) -> tuple:
    if not dataclasses.is_dataclass(self):
      return (id(self),)
    return tuple(_value_key(getattr(self, f.name))
                 for f in dataclasses.fields(self))

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self).__name__, self._key()))

  def __repr__(self):
    if not dataclasses.is_dataclass(self):
      return object.__repr__(self)
    args = ", ".join(f"{f.name}={format_value(getattr(self, f.name))}"
                     for f in dataclasses.fields(self) if f.repr)
    return f"{type(self).__name__}({args})"


def _value_key(value):
  """A hashable stand-in for a field: arrays by value, tracers by identity."""
  if not is_concrete(value):
    return ("traced", id(value))
  if isinstance(value, (np.ndarray, jax.Array)):
    arr = np.asarray(value)
    return (arr.shape, arr.dtype.str, arr.tobytes())
  return value


class Constraint(ValueObject, abc.ABC):
  """A closed set of arrays with a Euclidean projection onto it.

  **Using a set.** ``project``, ``violation`` (0 iff feasible; NaN for
  NaN, ``inf`` for an infinite coordinate), ``active`` and ``pushing_out``
  are pure and jittable; integer, boolean and complex inputs raise
  ``TypeError``.

  **Writing a set** (the extension contract). Subclass ``Constraint``, make
  it immutable and hashable (``@dataclasses.dataclass(frozen=True)``, with
  ``eq=False, repr=False`` to compare array fields by value as the built-in
  sets do; it is a static argument to ``jax.jit``), and define:

  * ``project(x)`` (required): the Euclidean projection, jittable and
    differentiable, returning ``x``'s shape and dtype.
  * ``elementwise = True`` when the set is a product of closed intervals,
    one per coordinate (the projection acts coordinate by coordinate). Then
    the defaults of ``active``, ``pushing_out`` and the landing step are
    exact, and :func:`posconstr.projected` masks the gradients that push
    out of the set.

  Optional, with defaults that hold for any set:

  * ``violation(x)``: ``max |project(x) - x|``, exact when ``project``
    returns feasible points unchanged; override to allow for rounding.
  * ``active(x)``, ``pushing_out(x, grad)``: for an elementwise set, a
    coordinate is active when the projection pulls it back after a one-ulp
    step either way (it is on or beyond a bound), and pushes out when it
    does so after a step along ``-grad``. A set that is not elementwise
    has no coordinate-wise boundary in general: the defaults mark no
    coordinate (so :func:`posconstr.constraint_report` shows none on the
    bound or stuck) until you override them.
  * ``bounds_in(dtype)``: ``(lower, upper)`` of an elementwise set in
    ``dtype``, rounded inwards (``None`` for an unbounded side); the default
    ``None`` means unknown, and the landing step then tests feasibility
    with ``project`` instead.
  * ``landing_update(param, update)``: the Optax update that lands
    ``param + update`` on its projection (see ``posconstr.sets._landing``).
  * ``check_leaf(shape, dtype, path)``: raises for leaves the set cannot
    apply to; the default accepts any floating-point leaf.

  Example:
    A per-slice L1 ball, written against this contract:

    >>> import dataclasses, jax.numpy as jnp, optax, posconstr
    >>> @dataclasses.dataclass(frozen=True)
    ... class L1Ball(posconstr.Constraint):
    ...   radius: float = 1.0
    ...   def project(self, x):  # Per row; Duchi et al. (2008), Condat (2016)
    ...     a = jnp.abs(x)
    ...     k = jnp.arange(1, x.shape[-1] + 1)
    ...     excess = jnp.cumsum(-jnp.sort(-a, axis=-1), axis=-1) - self.radius
    ...     theta = jnp.maximum(jnp.max(excess / k, -1, keepdims=True), 0)
    ...     return jnp.sign(x) * jnp.maximum(a - theta, 0)
    >>> ball = L1Ball(1.0)
    >>> ball.project(jnp.array([[3.0, -1.0], [0.25, 0.5]]))
    Array([[ 1.  , -0.  ],
           [ 0.25,  0.5 ]], dtype=float32)
    >>> params = {"w": jnp.array([[0.5, 0.5], [0.1, 0.1]])}
    >>> grads = {"w": jnp.array([[-1.0, -1.0], [1.0, 1.0]])}
    >>> sgd = optax.sgd(1.0)
    >>> for tx in (optax.chain(sgd, posconstr.project(ball)),
    ...            optax.chain(sgd, posconstr.constrain({"w": ball})),
    ...            posconstr.projected(sgd, ball)):
    ...   updates, _ = tx.update(grads, tx.init(params), params)
    ...   new = optax.apply_updates(params, updates)
    ...   print(new["w"].tolist())  # Row 1, at -0.9 each, is shrunk.
    [[0.5, 0.5], [-0.5, -0.5]]
    [[0.5, 0.5], [-0.5, -0.5]]
    [[0.5, 0.5], [-0.5, -0.5]]
    >>> float(posconstr.constraint_report(new, {"w": ball})["w"].violation)
    0.0
  """

  #: True when the set is a product of intervals, one per coordinate, so that
  #: the projection acts coordinate by coordinate.
  elementwise = False

  @abc.abstractmethod
  def project(self, x: jax.Array) -> jax.Array:
    """Returns the Euclidean projection of ``x`` onto the set."""

  def violation(self, x: jax.Array) -> jax.Array:
    """A scalar >= 0 that is 0 iff ``x`` lies in the set (default:
    ``max |project(x) - x|``, at least the smallest normal number where
    ``project`` moves ``x``, ``inf`` at an infinite coordinate)."""
    x = float_input(x, f"{self!r}.violation")
    acc = accumulation_dtype(x.dtype)
    y = self.project(x)
    gap = jnp.abs(y.astype(acc) - x.astype(acc))
    gap = jnp.where(y != x, jnp.maximum(gap, jnp.finfo(acc).tiny), gap)
    return max_or_zero(jnp.where(jnp.isinf(x), jnp.inf, gap).astype(acc))

  def active(self, x: jax.Array) -> jax.Array:
    """Boolean mask, shaped like ``x``: coordinates on the set's boundary."""
    x = float_input(x, f"{self!r}.active")
    if not self.elementwise:
      return jnp.zeros(x.shape, bool)
    return self._blocked(x, 1) | self._blocked(x, -1)

  def pushing_out(self, x: jax.Array, grad: jax.Array) -> jax.Array:
    """Boolean mask: active coordinates where the descent direction
    ``-grad`` points out of the set (a projected step would not move them)."""
    x = float_input(x, f"{self!r}.pushing_out")
    grad = float_input(grad, f"{self!r}.pushing_out", "grad")
    if not self.elementwise:
      return jnp.zeros(jnp.broadcast_shapes(x.shape, grad.shape), bool)
    return ((grad > 0) & self._blocked(x, -1)) | (
        (grad < 0) & self._blocked(x, 1))

  def _blocked(self, x, direction):
    """Coordinates that ``project`` pulls back after a step of one ulp (at
    least the smallest normal number, which flush-to-zero arithmetic keeps)
    in ``direction`` (+1 or -1): on or beyond a bound on that side."""
    tiny = jnp.finfo(x.dtype).tiny
    if direction > 0:
      step = jnp.maximum(jax.lax.nextafter(x, jnp.full_like(x, jnp.inf)),
                         x + tiny)
      return self.project(step) < step
    step = jnp.minimum(jax.lax.nextafter(x, jnp.full_like(x, -jnp.inf)),
                       x - tiny)
    return self.project(step) > step

  def bounds_in(self, dtype) -> Optional[Tuple[Any, Any]]:
    """``(lower, upper)`` in ``dtype``, rounded inwards, for an elementwise
    set (``None`` for an unbounded side); ``None`` when unknown."""
    del dtype
    return None

  def landing_update(self, param: jax.Array, update: jax.Array) -> jax.Array:
    """``d`` such that ``optax.apply_updates`` gives ``project(param +
    update)``, bit for bit where some float ``d`` does."""
    from posconstr.sets import _landing  # pylint: disable=g-import-not-at-top
    return _landing.default_landing_update(param, update, self)

  def check_leaf(self, shape: Sequence[int], dtype: Any, path: str = "x"):
    """Raises ``TypeError``/``ValueError`` if the set cannot apply to such a
    leaf (the default: only floating-point leaves)."""
    del shape
    check_float_dtype(dtype, repr(self), path)


# ---------------------------------------------------------------- validation


def is_concrete(value) -> bool:
  """True unless ``value`` is (or holds) a JAX tracer."""
  return not isinstance(value, jax.core.Tracer)


def check_real(name: str, value, owner: str) -> None:
  """Raises unless ``value`` is a real scalar (or a tracer of one)."""
  if isinstance(value, bool) or not (
      isinstance(value, numbers.Real)
      or (hasattr(value, "dtype") and np.ndim(value) == 0
          and jnp.issubdtype(value.dtype, jnp.number)
          and not jnp.issubdtype(value.dtype, jnp.complexfloating))):
    raise TypeError(
        f"{owner}: `{name}` must be a real number, got {value!r} "
        f"of type {type(value).__name__}.")
  if is_concrete(value) and not np.isfinite(float(value)):
    raise ValueError(f"{owner}: `{name}` must be finite, got {value!r}.")


def hyperparameter(name: str, value, owner: str, valid, allowed: str):
  """A validated real hyperparameter.

  A concrete value becomes a Python float and raises ``ValueError`` unless
  ``valid(value)``. A traced one (``optax.inject_hyperparams``, ``jit``)
  stays traced, and an invalid one becomes NaN, so that every result that
  uses it is NaN rather than silently wrong.
  """
  check_real(name, value, owner)
  if is_concrete(value):
    value = float(value)
    if not valid(value):
      raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}.")
    return value
  value = jnp.asarray(value)
  if not jnp.issubdtype(value.dtype, jnp.floating):
    value = value.astype(jnp.float32)
  return poison(valid(value), value)


def check_optimizer_arg(inner, name: str, owner: str) -> None:
  """Raises unless ``inner`` has Optax's ``init`` and ``update``."""
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(f"{owner}: `{name}` must be an Optax optimizer (a "
                    f"GradientTransformation such as optax.adam(1e-3)), got "
                    f"{inner!r} of type {type(inner).__name__}.")


def poison(ok, value):
  """``value`` where ``ok``, NaN elsewhere (``value`` alone when ``ok`` is
  concretely true)."""
  if is_concrete(ok) and bool(np.all(ok)):
    return value
  return jnp.where(ok, value, jnp.nan)


def float_input(x, owner: str, name: str = "x") -> jax.Array:
  """``x`` as an array; ``TypeError`` unless its dtype is floating-point."""
  if isinstance(x, (int, float)) and not isinstance(x, bool):
    return jnp.asarray(float(x))
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{owner}: `{name}` must be a real floating-point array, got dtype "
        f"{np.dtype(x.dtype).name}; cast it first (e.g. "
        f"`{name}.astype(jnp.float32)`, or its real part).")
  return x


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
  """float32 for leaves narrower than 32 bits (half precision, float8), the
  leaf's own dtype otherwise. (JAX does not promote float8 with float32.)"""
  if np.dtype(dtype).itemsize < 4:
    return np.dtype(np.float32)
  return jnp.promote_types(dtype, jnp.float32)


def rounding_tolerance(dtype, n: int) -> float:
  """Relative tolerance of an n-term sum: the worst case, 2·n·eps."""
  return 2.0 * max(int(n), 1) * float(jnp.finfo(dtype).eps)


@jax.custom_jvp
def nextafter(x, toward):
  """``jax.lax.nextafter`` with a straight-through derivative: one ulp's
  move has the derivative of the identity in ``x`` (0 in ``toward``)."""
  return jax.lax.nextafter(x, toward)


@nextafter.defjvp
def _nextafter_jvp(primals, tangents):
  return nextafter(*primals), tangents[0]


def _flush_inwards(narrow, dtype, round_up: bool, xp):
  """Subnormal bounds moved inwards to 0 or the smallest normal number:
  flush-to-zero arithmetic (XLA on CPU) would read them as 0, possibly
  outside the set."""
  tiny = float(jnp.finfo(dtype).tiny)
  sub = (narrow != 0) & (abs(narrow) < tiny)
  inward = xp.where(narrow > 0, tiny if round_up else 0.0,
                    0.0 if round_up else -tiny)
  return xp.where(sub, xp.asarray(inward, dtype=narrow.dtype), narrow)


def cast_bound_numpy(bound, dtype, *, round_up: bool) -> np.ndarray:
  """:func:`cast_bound` of a concrete bound, in NumPy (no JAX array).

  Rounds from float64: ``jnp.asarray`` would first round a float64 bound to
  the nearest float32 when x64 is disabled, possibly outwards.
  """
  wide = np.asarray(bound, dtype=np.float64)
  with np.errstate(over="ignore"):  # Past the dtype's range: an infinity.
    narrow = wide.astype(dtype)
  back = narrow.astype(np.float64)
  wrong = back < wide if round_up else back > wide
  step = np.asarray(np.inf if round_up else -np.inf, dtype=narrow.dtype)
  narrow = np.where(wrong, np.nextafter(narrow, step), narrow)
  return _flush_inwards(narrow, dtype, round_up, np)


def cast_bound(bound, dtype, *, round_up: bool) -> jax.Array:
  """Casts a bound to ``dtype``, rounding towards the inside of the set.

  A lower bound is rounded up and an upper bound down, so that
  ``x >= cast_bound(lower)`` in ``dtype`` implies ``x >= lower`` exactly.
  Subnormal results move inwards to 0 or the smallest normal number (a
  constant: derivative 0). A traced bound's rounding otherwise has the
  derivative of the identity.
  """
  if is_concrete(bound) and not isinstance(bound, jax.Array):
    return jnp.asarray(cast_bound_numpy(bound, dtype, round_up=round_up))
  wide = jnp.asarray(bound)
  if not jnp.issubdtype(wide.dtype, jnp.floating):
    wide = wide.astype(jnp.promote_types(dtype, jnp.float32))
  narrow = wide.astype(dtype)
  if narrow.dtype != wide.dtype:
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
    narrow = jnp.where(wrong, narrow + ulp, narrow)
  return _flush_inwards(narrow, dtype, round_up, jnp)


def safe_norm(x: jax.Array, axes, keepdims: bool = True) -> jax.Array:
  """Euclidean norm over ``axes`` with a finite gradient at 0."""
  sq = sum_of_squares(x, tuple(axes))
  if not keepdims:
    sq = jnp.squeeze(sq, tuple(axes))
  positive = ~(sq <= 0)  # True for NaN too, so that NaN propagates.
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def slice_size(shape, axes) -> int:
  return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def max_or_zero(x: jax.Array) -> jax.Array:
  """``max(x)`` for a non-empty array, 0 for an empty one (NaN propagates)."""
  if x.size == 0:
    return jnp.zeros((), x.dtype)
  return jnp.maximum(jnp.max(x), 0)


def format_value(value: Optional[Any]) -> str:
  if value is None or isinstance(value, (numbers.Number, tuple, str)):
    return repr(value)
  if not is_concrete(value):
    return "<traced>"
  arr = np.asarray(value)
  if arr.ndim == 0:
    return repr(arr.item())
  return f"array(shape={arr.shape}, dtype={arr.dtype.name})"
