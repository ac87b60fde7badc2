"""The base class of parameterizations: ``Parameterization``."""

from __future__ import annotations

import abc
import functools

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint as base
from posconstr.sets import _intervals


def tiny(dtype):
  return float(jnp.finfo(dtype).tiny)


class Parameterization(base.ValueObject, abc.ABC):
  """A map ``w = g(z)`` from unconstrained latents into a constraint set.

  **Using one.** ``forward(latent)`` is ``g``, rounded into ``.constraint``;
  ``inverse(value)`` the latent of a value; ``derivative``, ``dead`` and
  ``fold`` as documented on each method.

  **Writing one** (the extension contract). Subclass it, make it immutable
  and hashable (``@dataclasses.dataclass(frozen=True)``), and define:

  * ``constraint`` (a property): the closed set that ``g``'s range lies in.
  * ``forward_map(z)``: ``g(z)`` for a float32-or-wider ``z``, jittable and
    differentiable (``forward`` adds the dtype handling and the rounding
    into the set).
  * ``inverse_map(w)``: ``g^{-1}(w)`` for ``w`` already clamped into the
    invertible range.

  Optional, with defaults that hold for any closed range:

  * ``clamp(w)``: the nearest value with a finite latent (default:
    ``constraint.project``; override it for an open end of the range, such
    as ``Softplus``'s 0, whose latent is infinite).
  * ``out_of_range(w)``: values outside the closure of the range (default:
    those ``constraint.project`` moves).
  * ``derivative_unit()``: the unit of ``g'`` for ``dead`` (default: the
    width of a range that ``constraint.bounds_in`` bounds on both sides,
    else 1).
  * ``fold(value)``: maps any value into the range (default: reflect at the
    constraint's lower bound if it has one, its ``lower`` attribute or
    ``bounds_in``'s, then project).

  Array-valued fields need ``@dataclasses.dataclass(frozen=True, eq=False,
  repr=False)`` (hashed by identity, as :class:`posconstr.Constraint`).

  Example:
    >>> import dataclasses, jax.numpy as jnp, posconstr
    >>> @dataclasses.dataclass(frozen=True)
    ... class Cube(posconstr.Parameterization):
    ...   constraint = posconstr.Box(None, None)
    ...   def forward_map(self, z):
    ...     return z ** 3
    ...   def inverse_map(self, w):
    ...     return jnp.cbrt(w)
    >>> g = Cube()
    >>> g.forward(jnp.array([-2.0, 3.0])), g.inverse(jnp.array([8.0]))
    (Array([-8., 27.], dtype=float32), Array([2.], dtype=float32))
  """

  @property
  @abc.abstractmethod
  def constraint(self) -> base.Constraint:
    """The constraint set that the range of ``forward`` lies in."""

  @abc.abstractmethod
  def forward_map(self, z) -> jax.Array:
    """``g(z)`` in a float32-or-wider dtype."""

  @abc.abstractmethod
  def inverse_map(self, w) -> jax.Array:
    """``g^{-1}(w)`` for ``w`` already clamped into the invertible range."""

  def clamp(self, w):
    """Clamps ``w`` to the nearest value with a finite latent."""
    return self.constraint.project(w)

  def out_of_range(self, w):
    """Boolean mask: values outside the closure of the range."""
    return self.constraint.project(w) != w

  def derivative_unit(self):
    """The derivative's natural unit: the width of a range bounded on both
    sides (from the constraint's ``bounds_in``), else 1."""
    bounds = self.constraint.bounds_in(jnp.float32)
    if bounds is None or bounds[0] is None or bounds[1] is None:
      return 1.0
    width = jnp.asarray(bounds[1]) - jnp.asarray(bounds[0])
    return jnp.where(jnp.isfinite(width), width, 1.0)

  def _input(self, x, method, name):
    return base.float_input(x, f"{self!r}.{method}", name)

  def forward(self, latent):
    """The constrained value ``g(latent)``, same shape and dtype.

    The value is rounded into ``.constraint`` (bounds rounded inwards to the
    dtype): ``eps + g(z)`` or ``lower + width * sigmoid(z)`` can round past
    a bound that is not representable (``0.1`` in float16). The correction
    is at most an ulp and keeps ``g'(z)`` as the derivative.
    """
    latent = self._input(latent, "forward", "latent")
    acc = base.accumulation_dtype(latent.dtype)
    value = self.forward_map(latent.astype(acc)).astype(latent.dtype)
    if _bounds_exact(self, jnp.dtype(latent.dtype)):
      return value  # Rounding is monotone: it cannot cross an exact bound.
    inside = self.constraint.project(value)  # inf stays inf (Exp)
    shift = jnp.where(inside == value, jnp.zeros_like(value), inside - value)
    return value + jax.lax.stop_gradient(shift)

  def inverse(self, value):
    """The latent of ``value``: ``forward(inverse(w)) ~= w``.

    The latent is finite, and so is ``forward`` of it: a latent whose
    ``forward`` would overflow (``log(max)`` rounded up, for ``Exp``) is
    moved one ulp down (a move with the derivative of the identity). Under
    ``jit``, ``+inf`` is first clamped to the dtype's largest finite value.

    Raises:
      ValueError: if ``value`` is concrete and lies outside the closure of
        the range (e.g. negative for ``Softplus``), or is NaN or infinite.
    """
    value = self._input(value, "inverse", "value")
    acc = base.accumulation_dtype(value.dtype)
    wide = value.astype(acc)
    bad = self.out_of_range(wide) | ~jnp.isfinite(wide)
    if base.is_concrete(bad):
      bad = np.asarray(bad)
      if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if bad.ndim else ()
        first = np.asarray(wide)[index]
        what = ("is not finite: values must be finite and in the range"
                if not np.isfinite(first) else "is outside the range")
        raise ValueError(
            f"{self!r}.inverse: `value` {first!r} at index {index} {what} "
            f"of the parameterization ({self.constraint!r}); "
            f"{int(bad.sum())} of {bad.size} values are out of range.")
    top = float(jnp.finfo(value.dtype).max)
    latent = self.inverse_map(self.clamp(jnp.minimum(wide, top)))
    # Finite in value's dtype too (Softplus(beta=1e-3)'s latent of 0 is
    # about -87,000, past float16's range).
    latent = jnp.clip(latent, -top, top).astype(value.dtype)
    overflows = jnp.isinf(self.forward(latent)) & ~jnp.isinf(latent)
    return jnp.where(overflows, base.nextafter(
        latent, jnp.full_like(latent, -jnp.inf)), latent)

  def fold(self, value):
    """Maps any value into the closed range; the identity on the range.

    Reflects at the lower bound and clips at the upper one:
    ``lower + |v - lower|``. A zero-mean initializer becomes its half
    distribution (a half-normal for a normal one) shifted to the bound; this
    is how wrappers turn a layer's own initializer into a valid one.
    """
    value = self._input(value, "fold", "value")
    lower = getattr(self.constraint, "lower", None)
    if lower is None:  # A user's set declares its bounds by bounds_in.
      bounds = self.constraint.bounds_in(value.dtype)
      lower = None if bounds is None else bounds[0]
    if lower is not None:
      # Exactly the identity on the range (lower + |v - lower| may round).
      value = jnp.where(value < lower, lower + (lower - value), value)
    return self.constraint.project(value)

  def derivative(self, latent):
    """``g'(latent)``, elementwise (NaN for a NaN latent)."""
    latent = self._input(latent, "derivative", "latent")
    acc = base.accumulation_dtype(latent.dtype)
    z = latent.astype(acc)
    _, slope = jax.jvp(self.forward_map, (z,), (jnp.ones_like(z),))
    return jnp.where(jnp.isnan(z), jnp.nan, slope)

  def dead(self, latent, tol: float = 1e-3):
    """Latents whose derivative is below ``tol`` (in units of the range).

    These barely move under gradient descent: relu's dying synapses
    (derivative exactly 0), sigmoid's saturation, or a softplus latent far
    below zero. NaN latents count as dead.
    """
    check_tol(tol, f"{self!r}.dead")
    latent = self._input(latent, "dead", "latent")
    slope = jnp.abs(self.derivative(latent))
    return ~(slope >= tol * self.derivative_unit())


def check_tol(tol, owner: str) -> None:
  """``tol`` of ``dead``: a real number >= 0 (or a traced one)."""
  base.check_real("tol", tol, owner)
  if base.is_concrete(tol) and float(tol) < 0:
    raise ValueError(f"{owner}: `tol` must be >= 0, got {tol!r}.")


def _bounds_exact(parameterization, dtype) -> bool:
  """Whether ``forward``'s bounds, and a box's width, are exact in ``dtype``
  and its accumulation dtype (``Softplus()``, ``Sigmoid(-1, 2)``: yes;
  ``eps=0.1``: no), so that no rounding of the value can cross them. False
  for traced or array bounds and for sets other than intervals."""
  c = parameterization.constraint
  if not isinstance(c, (_intervals.NonNegative, _intervals.Box)):
    return False
  ends = [v for v in (c.lower, c.upper) if v is not None]
  if not all(base.is_concrete(v) and isinstance(v, float) for v in ends):
    return False
  if len(ends) == 2:
    ends.append(ends[1] - ends[0])
  return _exact(tuple(ends), dtype)


@functools.lru_cache(maxsize=None)
def _exact(ends, dtype) -> bool:
  acc = base.accumulation_dtype(dtype)
  return all(float(np.asarray(v, dtype)) == v and float(np.asarray(v, acc)) == v
             for v in ends)
