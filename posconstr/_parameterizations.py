"""Weight activations: constrained values as g(latent), with stable inverses.

Every parameterization maps an unconstrained latent ``z`` to a value
``w = g(z)`` in its ``.constraint`` set, so any optimizer can train ``z``.
``inverse`` gives the latent of a value (for initialization); it is stable in
float32 over the whole range and never returns NaN or an infinite latent:

* a concrete value strictly outside the closure of the range raises
  ``ValueError``;
* under ``jit`` (traced values) such values, and values on an open end of
  the range (``0`` for ``Softplus``), are first clamped to the nearest value
  whose latent is finite; the docstring of each class says which.

Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

import abc
import functools

import jax
import jax.numpy as jnp
import numpy as np

from posconstr import _activations
from posconstr import _constraint
from posconstr import _intervals


def _tiny(dtype):
  return float(jnp.finfo(dtype).tiny)


class Parameterization(abc.ABC):
  """Base class: ``forward``, ``inverse``, ``derivative``, ``constraint``."""

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is immutable.")

  def _init(self, **fields):
    for name, value in fields.items():
      object.__setattr__(self, name, value)

  def _key(self):
    return tuple(sorted(vars(self).items()))

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self).__name__, self._key()))

  def __repr__(self):
    args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
    return f"{type(self).__name__}({args})"

  @property
  @abc.abstractmethod
  def constraint(self) -> _constraint.Constraint:
    """The constraint set that the range of ``forward`` lies in."""

  @abc.abstractmethod
  def _forward(self, z):
    """``g(z)`` in a float32-or-wider dtype."""

  @abc.abstractmethod
  def _inverse(self, w):
    """``g^{-1}(w)`` for ``w`` already clamped into the invertible range."""

  @abc.abstractmethod
  def _clamp(self, w):
    """Clamps ``w`` to the nearest value with a finite latent."""

  @abc.abstractmethod
  def _out_of_range(self, w):
    """Boolean mask: values outside the closure of the range."""

  def _scale(self) -> float:
    """The derivative's natural unit (the width of a bounded range)."""
    return 1.0

  def forward(self, latent):
    """The constrained value ``g(latent)``, same shape and dtype.

    The value is rounded into ``.constraint`` (bounds rounded inwards to the
    dtype): ``eps + g(z)`` or ``lower + width * sigmoid(z)`` can round past
    a bound that is not representable (``0.1`` in float16). The correction
    is at most an ulp and keeps ``g'(z)`` as the derivative.
    """
    latent = jnp.asarray(latent)
    acc = _constraint.accumulation_dtype(latent.dtype)
    value = self._forward(latent.astype(acc)).astype(latent.dtype)
    if _bounds_exact(self, jnp.dtype(latent.dtype)):
      return value  # Rounding is monotone: it cannot cross an exact bound.
    inside = self.constraint.project(value)  # inf stays inf (Exp)
    shift = jnp.where(inside == value, jnp.zeros_like(value), inside - value)
    return value + jax.lax.stop_gradient(shift)

  def inverse(self, value):
    """The latent of ``value``: ``forward(inverse(w)) ~= w``.

    The latent is finite, and so is ``forward`` of it: a latent whose
    ``forward`` would overflow (``log(max)`` rounded up, for ``Exp``) is
    moved one ulp down. Under ``jit``, ``+inf`` is first clamped to the
    dtype's largest finite value.

    Raises:
      ValueError: if ``value`` is concrete and lies outside the closure of
        the range (e.g. negative for ``Softplus``), or is NaN or infinite.
    """
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(jnp.float32)
    acc = _constraint.accumulation_dtype(value.dtype)
    wide = value.astype(acc)
    if _constraint.is_concrete(wide):
      bad = np.asarray(self._out_of_range(wide) | ~jnp.isfinite(wide))
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
    latent = self._inverse(self._clamp(jnp.minimum(wide, top)))
    latent = latent.astype(value.dtype)
    overflows = jnp.isinf(self.forward(latent)) & ~jnp.isinf(latent)
    return jnp.where(overflows, jax.lax.nextafter(
        latent, jnp.full_like(latent, -jnp.inf)), latent)

  def fold(self, value):
    """Maps any value into the closed range; the identity on the range.

    Reflects at the lower bound and clips at the upper one:
    ``lower + |v - lower|``. A zero-mean initializer becomes its half
    distribution (a half-normal for a normal one) shifted to the bound; this
    is how wrappers turn a layer's own initializer into a valid one.
    """
    value = jnp.asarray(value)
    lower = self._lower()
    # Exactly the identity on the range (lower + |v - lower| may round).
    folded = jnp.where(value < lower, lower + (lower - value), value)
    return self.constraint.project(folded)

  @abc.abstractmethod
  def _lower(self) -> float:
    """The lower end of the range."""

  def derivative(self, latent):
    """``g'(latent)``, elementwise."""
    latent = jnp.asarray(latent)
    acc = _constraint.accumulation_dtype(latent.dtype)
    z = latent.astype(acc)
    _, slope = jax.jvp(self._forward, (z,), (jnp.ones_like(z),))
    return slope

  def dead(self, latent, tol: float = 1e-3):
    """Latents whose derivative is below ``tol`` (in units of the range).

    These barely move under gradient descent: relu's dying synapses
    (derivative exactly 0), sigmoid's saturation, or a softplus latent far
    below zero.
    """
    check_tol(tol, f"{self!r}.dead")
    return jnp.abs(self.derivative(latent)) < tol * self._scale()


def check_tol(tol, owner: str) -> None:
  """``tol`` of ``dead``: a real number >= 0 (or a traced one)."""
  _constraint.check_real("tol", tol, owner)
  if _constraint.is_concrete(tol) and float(tol) < 0:
    raise ValueError(f"{owner}: `tol` must be >= 0, got {tol!r}.")


@functools.lru_cache(maxsize=None)
def _bounds_exact(parameterization, dtype) -> bool:
  """Whether ``forward``'s bounds, and a box's width, are exact in ``dtype``
  and its accumulation dtype (``Softplus()``, ``Sigmoid(-1, 2)``: yes;
  ``eps=0.1``: no), so that no rounding of the value can cross them."""
  acc = _constraint.accumulation_dtype(dtype)
  ends = [parameterization._lower()]
  if isinstance(parameterization, Sigmoid):
    ends += [parameterization.upper,
             parameterization.upper - parameterization.lower]
  return all(float(np.asarray(v, dtype)) == v and float(np.asarray(v, acc)) == v
             for v in ends)


def _check_eps(eps, owner):
  _constraint.check_real("eps", eps, owner)
  if float(eps) < 0:
    raise ValueError(f"{owner}: `eps` must be >= 0, got {eps!r}.")
  return float(eps)


class _LowerBounded(Parameterization):
  """Ranges of the form ``(eps, inf)`` or ``[eps, inf)``."""

  eps: float
  _open: bool = True  # True when ``eps`` itself is not attained.

  @property
  def constraint(self):
    return _intervals.NonNegative(self.eps)

  def _out_of_range(self, w):
    return w < self.eps

  def _lower(self):
    return self.eps

  def _clamp(self, w):
    if not self._open:
      return jnp.maximum(w, self.eps)
    # Smallest excess over eps that still has a finite, invertible latent.
    floor = max(_tiny(w.dtype), self.eps * float(jnp.finfo(w.dtype).eps))
    return jnp.maximum(w, self.eps + floor)


class Softplus(_LowerBounded):
  r"""``w = eps + softplus(beta * z) / beta``: the recommended default.

  Smooth, with derivative :math:`\sigma(\beta z) \in (0, 1)`, linear for
  large weights (unlike ``Exp``) and never exactly dead (unlike ``ReLU``).
  Forward and backward share one ``exp``. The inverse
  :math:`z = (v + \log(-\mathrm{expm1}(-v)))/\beta` with
  :math:`v = \beta(w - \epsilon)` is accurate from ``1e-8`` to ``1e4`` and
  beyond in float32. ``w = eps`` (not attained) maps to the latent of
  ``eps`` plus the smallest normal number, a large negative but finite
  latent (about -87 in float32).

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import Softplus
    >>> g = Softplus()
    >>> w = jnp.array([1e-8, 1.0, 1e4])
    >>> bool(jnp.allclose(g.forward(g.inverse(w)), w, rtol=1e-5))
    True
  """

  def __init__(self, beta: float = 1.0, eps: float = 0.0):
    _constraint.check_real("beta", beta, "Softplus")
    if float(beta) <= 0:
      raise ValueError(f"Softplus: `beta` must be > 0, got {beta!r}.")
    self._init(beta=float(beta), eps=_check_eps(eps, "Softplus"))

  def _forward(self, z):
    return self.eps + _activations.softplus(z, self.beta)

  def _inverse(self, w):
    # For beta < 1, beta * (smallest normal) is subnormal and flushes to 0.
    v = jnp.maximum(self.beta * (w - self.eps), _tiny(w.dtype))
    # (w - eps), not v / beta: v overflows for w near the dtype's max, beta > 1.
    return (w - self.eps) + jnp.log(-jnp.expm1(-v)) / self.beta


class Exp(_LowerBounded):
  r"""``w = eps + exp(z)``: multiplicative geometry, log-normal friendly.

  Steps in ``z`` change ``w`` by a factor, so small and large weights move
  at the same relative speed; the derivative equals ``w - eps``, so weights
  near ``eps`` move slowly. The inverse is ``log(w - eps)``; ``w = eps``
  maps to the log of the smallest normal number.
  """

  def __init__(self, eps: float = 0.0):
    self._init(eps=_check_eps(eps, "Exp"))

  def _forward(self, z):
    return self.eps + jnp.exp(z)

  def _inverse(self, w):
    return jnp.log(w - self.eps)


class Square(_LowerBounded):
  r"""``w = eps + z**2``. The inverse takes the non-negative root.

  The derivative ``2z`` vanishes at ``z = 0``: a weight initialized at
  ``eps`` has zero gradient and stays there.
  """

  _open = False

  def __init__(self, eps: float = 0.0):
    self._init(eps=_check_eps(eps, "Square"))

  def _forward(self, z):
    return self.eps + z * z

  def _inverse(self, w):
    return jnp.sqrt(w - self.eps)


class Abs(_LowerBounded):
  r"""``w = eps + |z|``. The inverse is ``w - eps`` (the non-negative branch).

  The gradient keeps its size everywhere but flips sign at ``z = 0``.
  """

  _open = False

  def __init__(self, eps: float = 0.0):
    self._init(eps=_check_eps(eps, "Abs"))

  def _forward(self, z):
    return self.eps + jnp.abs(z)

  def _inverse(self, w):
    return w - self.eps


class ReLU(_LowerBounded):
  r"""``w = max(z, 0)``. Documented for completeness; prefer ``Softplus``.

  **Dying synapses**: a latent that becomes negative gets zero gradient and
  stays at ``w = 0`` for good (``dead`` counts them). The inverse is the
  identity on ``[0, inf)``.
  """

  _open = False

  def __init__(self):
    self._init(eps=0.0)

  def _key(self):
    return ()

  def __repr__(self):
    return "ReLU()"

  def _forward(self, z):
    return jnp.where(z > 0, z, 0)

  def _inverse(self, w):
    return w


class Sigmoid(Parameterization):
  r"""``w = lower + (upper - lower) * sigmoid(z)``: a box.

  **Saturation**: for large ``|z|`` the derivative vanishes (in float32 the
  value rounds onto the upper bound at ``z > 17``), and such latents barely
  move; ``dead`` counts them. The inverse is the logit of the relative
  position; the bounds themselves (not attained) are clamped to the smallest
  normal relative position (latent about -87 in float32) and to one ulp
  below 1 (latent about +17).
  """

  def __init__(self, lower: float = 0.0, upper: float = 1.0):
    _constraint.check_real("lower", lower, "Sigmoid")
    _constraint.check_real("upper", upper, "Sigmoid")
    if not float(lower) < float(upper):
      raise ValueError(f"Sigmoid: `lower` must be < `upper`, got "
                       f"lower={lower!r}, upper={upper!r}.")
    self._init(lower=float(lower), upper=float(upper))

  @property
  def constraint(self):
    return _intervals.Box(self.lower, self.upper)

  def _scale(self):
    return self.upper - self.lower

  def _lower(self):
    return self.lower

  def _forward(self, z):
    return self.lower + (self.upper - self.lower) * _activations.sigmoid(z)

  def _out_of_range(self, w):
    return (w < self.lower) | (w > self.upper)

  def _clamp(self, w):
    return w

  def _inverse(self, w):
    u = (w - self.lower) / (self.upper - self.lower)
    step = float(jnp.finfo(w.dtype).epsneg)
    # Near 0 the relative position keeps full relative precision: clamp only
    # to the smallest normal number there, but to one ulp below 1 at the top.
    u = jnp.clip(u, _tiny(w.dtype), 1 - step)
    return jnp.log(u) - jnp.log1p(-u)
