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

Half-precision inputs are computed in float32 and cast back. Inputs must be
floating-point (integer, boolean and complex arrays raise ``TypeError``).
NaN latents give NaN values and NaN derivatives (they count as dead).

Hyperparameters (``beta``, ``eps``, ``lower``, ``upper``) may be traced, e.g.
by ``optax.inject_hyperparams`` or ``jax.grad``; an invalid traced value
(``beta <= 0``, ``eps < 0``, ``lower >= upper``) is NaN, and so is every
result that uses it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from posconstr.reparam import _activations
from posconstr.reparam._parameterization_base import Parameterization
from posconstr.reparam._parameterization_base import check_tol  # noqa: F401
from posconstr.reparam._parameterization_base import tiny as _tiny
from posconstr.sets import _constraint as base
from posconstr.sets import _intervals


def _check_eps(eps, owner):
  return base.hyperparameter("eps", eps, owner, lambda v: v >= 0, ">= 0")


def _set(obj, **fields):
  for name, value in fields.items():
    object.__setattr__(obj, name, value)


class _LowerBounded(Parameterization):
  """Ranges of the form ``(eps, inf)`` or ``[eps, inf)``; subclasses provide
  ``eps``."""

  eps: Any
  _open = True  # True when ``eps`` itself is not attained.

  @property
  def constraint(self):
    return _intervals.NonNegative(self.eps)

  def out_of_range(self, w):
    return w < self.eps

  def clamp(self, w):
    if not self._open:
      return jnp.maximum(w, self.eps)
    # Smallest excess over eps that still has a finite, invertible latent.
    relative = self.eps * float(jnp.finfo(w.dtype).eps)
    if base.is_concrete(self.eps):  # In float64, then rounded once.
      return jnp.maximum(w, self.eps + max(_tiny(w.dtype), relative))
    return jnp.maximum(w, self.eps + jnp.maximum(_tiny(w.dtype), relative))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
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

  beta: float = 1.0
  eps: float = 0.0

  def __post_init__(self):
    _set(self, beta=base.hyperparameter("beta", self.beta, "Softplus",
                                        lambda v: v > 0, "> 0"),
         eps=_check_eps(self.eps, "Softplus"))

  def forward_map(self, z):
    return self.eps + _activations.softplus(z, self.beta)

  def inverse_map(self, w):
    # For beta < 1, beta * (smallest normal) is subnormal and flushes to 0.
    v = jnp.maximum(self.beta * (w - self.eps), _tiny(w.dtype))
    # (w - eps), not v / beta: v overflows for w near the dtype's max, beta > 1.
    return (w - self.eps) + jnp.log(-jnp.expm1(-v)) / self.beta


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Exp(_LowerBounded):
  r"""``w = eps + exp(z)``: multiplicative geometry, log-normal friendly.

  Steps in ``z`` change ``w`` by a factor, so small and large weights move
  at the same relative speed; the derivative equals ``w - eps``, so weights
  near ``eps`` move slowly. The inverse is ``log(w - eps)``; ``w = eps``
  maps to the log of the smallest normal number.
  """

  eps: float = 0.0

  def __post_init__(self):
    _set(self, eps=_check_eps(self.eps, "Exp"))

  def forward_map(self, z):
    return self.eps + jnp.exp(z)

  def inverse_map(self, w):
    return jnp.log(w - self.eps)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Square(_LowerBounded):
  r"""``w = eps + z**2``. The inverse takes the non-negative root.

  The derivative ``2z`` vanishes at ``z = 0``: a weight initialized at
  ``eps`` has zero gradient and stays there.
  """

  eps: float = 0.0
  _open = False

  def __post_init__(self):
    _set(self, eps=_check_eps(self.eps, "Square"))

  def forward_map(self, z):
    return self.eps + z * z

  def inverse_map(self, w):
    return jnp.sqrt(w - self.eps)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Abs(_LowerBounded):
  r"""``w = eps + |z|``. The inverse is ``w - eps`` (the non-negative branch).

  The gradient keeps its size everywhere but flips sign at ``z = 0``.
  """

  eps: float = 0.0
  _open = False

  def __post_init__(self):
    _set(self, eps=_check_eps(self.eps, "Abs"))

  def forward_map(self, z):
    return self.eps + _activations.abs_(z)

  def inverse_map(self, w):
    return w - self.eps


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ReLU(_LowerBounded):
  r"""``w = max(z, 0)``. Documented for completeness; prefer ``Softplus``.

  **Dying synapses**: a latent that becomes negative gets zero gradient and
  stays at ``w = 0`` for good (``dead`` counts them). The inverse is the
  identity on ``[0, inf)``. A NaN latent gives NaN, not 0, and a NaN
  derivative.
  """

  eps = 0.0
  _open = False

  def forward_map(self, z):
    return _activations.relu(z)

  def inverse_map(self, w):
    return w


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Sigmoid(Parameterization):
  r"""``w = lower + (upper - lower) * sigmoid(z)``: a box.

  **Saturation**: for large ``|z|`` the derivative vanishes (in float32 the
  value rounds onto the upper bound at ``z > 17``), and such latents barely
  move; ``dead`` counts them. The inverse is the logit of the relative
  position; the bounds themselves (not attained) are clamped to the smallest
  normal relative position (latent about -87 in float32) and to one ulp
  below 1 (latent about +17).
  """

  lower: float = 0.0
  upper: float = 1.0

  def __post_init__(self):
    owner = "Sigmoid"
    lower = base.hyperparameter("lower", self.lower, owner, lambda v: True, "")
    upper = base.hyperparameter("upper", self.upper, owner, lambda v: True, "")
    if base.is_concrete(lower) and base.is_concrete(upper):
      if not lower < upper:
        raise ValueError(f"Sigmoid: `lower` must be < `upper`, got "
                         f"lower={lower!r}, upper={upper!r}.")
      width = np.asarray(upper, np.float64) - np.asarray(lower, np.float64)
      if not np.all(width <= np.finfo(np.float32).max):
        # forward's upper - lower would be inf, and its values NaN.
        raise ValueError(f"Sigmoid: the width `upper - lower` must be finite "
                         f"in float32 (at most 3.4e38), got lower={lower!r}, "
                         f"upper={upper!r}.")
    else:
      ok = lower < upper
      lower, upper = base.poison(ok, lower), base.poison(ok, upper)
    _set(self, lower=lower, upper=upper)

  @property
  def constraint(self):
    return _intervals.Box(self.lower, self.upper)

  def derivative_unit(self):
    return self.upper - self.lower

  def forward_map(self, z):
    return self.lower + (self.upper - self.lower) * _activations.sigmoid(z)

  def out_of_range(self, w):
    return (w < self.lower) | (w > self.upper)

  def clamp(self, w):
    return w

  def inverse_map(self, w):
    u = (w - self.lower) / (self.upper - self.lower)
    step = float(jnp.finfo(w.dtype).epsneg)
    # Near 0 the relative position keeps full relative precision: clamp only
    # to the smallest normal number there, but to one ulp below 1 at the top.
    u = jnp.clip(u, _tiny(w.dtype), 1 - step)
    return jnp.log(u) - jnp.log1p(-u)
