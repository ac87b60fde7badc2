"""Initializers for constrained weights: ICNN (Hoedt & Klambauer 2023) and
``through``.

All are Flax-style: ``init(key, shape, dtype=jnp.float32) -> array``.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam

__all__ = ["ICNNMoments", "Initializer", "icnn", "icnn_bias", "icnn_moments",
           "through"]

Initializer = Callable[..., jax.Array]


class ICNNMoments(NamedTuple):
  """Distribution parameters of the ICNN initialization for one fan-in."""

  weight_mean: float
  weight_var: float
  bias_mean: float
  bias_var: float


def _check(rho, var, bias_noise, alpha):
  for name, value in (("rho", rho), ("var", var), ("bias_noise", bias_noise),
                      ("alpha", alpha)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise TypeError(f"icnn: `{name}` must be a real number, got {value!r} "
                      f"of type {type(value).__name__}.")
  # Non-negative weights correlate the units: the covariance mu^2 Var(sum h)
  # is >= 0, so only 0 < rho < 1 is a fixed point (rho = 0 gives mu = 0).
  if not 0.0 < rho < 1.0:
    raise ValueError(f"icnn: `rho` must be in (0, 1), got {rho!r}.")
  if not var > 0:
    raise ValueError(f"icnn: `var` must be > 0, got {var!r}.")
  if not 0.0 <= bias_noise < 1.0:
    raise ValueError(
        f"icnn: `bias_noise` must be in [0, 1), got {bias_noise!r}.")
  if not alpha >= 0:
    raise ValueError(f"icnn: `alpha` must be >= 0, got {alpha!r}.")


def icnn_moments(fan_in: int, rho: float = 0.5, var: float = 1.0,
                 bias_noise: float = 0.0, alpha: float = 0.0) -> ICNNMoments:
  r"""The weight and bias moments of Hoedt & Klambauer (2023).

  For non-negative weights with mean :math:`\mu` and variance
  :math:`\sigma^2` in a (leaky) ReLU network of fan-in :math:`n`, signal
  propagation has the variance fixed point ``var`` and correlation fixed
  point :math:`\rho` when

  .. math::
    \sigma^2 = \frac{2 (1 - \rho)}{(1 + \alpha^2)\, n}, \qquad
    \mu^2 = \frac{2 \pi \rho}{n \left(\pi - n + (n - 1)
            (\sqrt{1 - \rho^2} + \rho \arccos(-\rho))\right)},

  and the bias :math:`-n \sqrt{\mu^2 \cdot \mathrm{var} / (2\pi)}` recentres
  the pre-activations. With ``bias_noise = f > 0`` a fraction ``f`` of the
  variance moves from the weights to the bias.

  Hoedt & Klambauer, "Principled Weight Initialisation for Input-Convex
  Neural Networks", NeurIPS 2023 (eqs. 35 and following).

  Example:
    >>> m = icnn_moments(64, rho=0.5)
    >>> round(m.weight_mean, 5), m.weight_var, round(m.bias_mean, 5)
    (0.02868, 0.015625, -0.73228)
  """
  _check(rho, var, bias_noise, alpha)
  if (isinstance(fan_in, bool) or not isinstance(fan_in, numbers.Integral)
      or fan_in < 1):
    raise ValueError(f"icnn: `fan_in` must be an int >= 1, got {fan_in!r}.")
  n = float(fan_in)
  mixed = math.sqrt(1 - rho**2) + rho * math.acos(-rho)
  corr = n * (math.pi - n + (n - 1) * mixed) / (2 * math.pi)
  mean_sq = rho / corr
  weight_var = 2.0 / (1.0 + alpha**2) * (1.0 - rho) / n
  shift = n * math.sqrt(mean_sq * var / (2 * math.pi))
  bias_var = 0.0
  if bias_noise > 0:
    weight_var *= 1 - bias_noise
    bias_var = bias_noise * (1 - rho) * var
  return ICNNMoments(math.sqrt(mean_sq), weight_var, -shift, bias_var)


def _fan_in(shape: Sequence[int], in_axis: Union[int, Sequence[int]],
            out_axis: Union[int, Sequence[int]]) -> int:
  """Fan-in as in ``jax.nn.initializers.variance_scaling``."""
  shape = tuple(shape)
  if len(shape) < 2:
    raise ValueError(
        f"icnn: a kernel of rank >= 2 is needed, got shape {shape}.")
  ins = [in_axis] if isinstance(in_axis, int) else list(in_axis)
  outs = [out_axis] if isinstance(out_axis, int) else list(out_axis)
  for name, axes in (("in_axis", ins), ("out_axis", outs)):
    if any(not -len(shape) <= a < len(shape) for a in axes):
      raise ValueError(f"icnn: `{name}`={axes if len(axes) > 1 else axes[0]!r}"
                       f" is out of range for a kernel of shape {shape}.")
  ins = [a % len(shape) for a in ins]
  outs = [a % len(shape) for a in outs]
  receptive = int(np.prod([d for i, d in enumerate(shape)
                           if i not in ins and i not in outs]))
  return int(np.prod([shape[a] for a in ins])) * receptive


def icnn(rho: float = 0.5, var: float = 1.0, bias_noise: float = 0.0,
         alpha: float = 0.0, in_axis=-2, out_axis=-1) -> Initializer:
  """Log-normal kernel initializer for non-negative (ICNN) weights.

  Samples :math:`\\exp(\\mathcal N(m, s^2))` with the mean and variance of
  :func:`icnn_moments` for the kernel's fan-in. Use it for the *applied*
  weights (``kernel_init=`` of the layers in :mod:`posconstr.linen` and
  :mod:`posconstr.nnx`), or through any parameterization with
  :func:`through`; pair it with :func:`icnn_bias`.

  Example:
    >>> import jax
    >>> w = icnn()(jax.random.key(0), (64, 1000))
    >>> bool((w > 0).all())
    True
  """
  _check(rho, var, bias_noise, alpha)

  def init(key, shape, dtype=jnp.float32):
    m = icnn_moments(_fan_in(shape, in_axis, out_axis), rho, var, bias_noise,
                     alpha)
    log_var = math.log1p(m.weight_var / m.weight_mean**2)
    log_mean = math.log(m.weight_mean) - log_var / 2
    z = jax.random.normal(key, shape, jnp.float32)
    return jnp.exp(log_mean + math.sqrt(log_var) * z).astype(dtype)

  return init


def icnn_bias(fan_in: int, rho: float = 0.5, var: float = 1.0,
              bias_noise: float = 0.0, alpha: float = 0.0) -> Initializer:
  """The bias initializer that matches :func:`icnn` for ``fan_in`` inputs.

  Constant :math:`-n\\sqrt{\\mu^2 \\mathrm{var}/(2\\pi)}` (normal around it
  when ``bias_noise > 0``).
  """
  m = icnn_moments(fan_in, rho, var, bias_noise, alpha)

  def init(key, shape, dtype=jnp.float32):
    noise = jax.random.normal(key, shape, jnp.float32) * math.sqrt(m.bias_var)
    return (m.bias_mean + noise).astype(dtype)

  return init


def through(parameterization: _parameterizations.Parameterization,
            init: Initializer, *, fold: bool = True) -> Initializer:
  """Draws the applied weights from ``init`` and returns their latents.

  The same latents, up to rounding, eagerly and under ``jax.jit``
  (``model.init``): with
  ``fold=True`` (the default) the draws are first mapped into the range by
  ``parameterization.fold``, as the layers of :mod:`posconstr.linen` and
  :mod:`posconstr.nnx` do: the identity for draws already in the range
  (``icnn``), the half distribution for a zero-mean initializer
  (``lecun_normal`` under ``Softplus``: a half-normal). With
  ``fold=False`` a draw outside the range is an error: ``ValueError`` when
  concrete, and a NaN latent under ``jit`` (never a silently clamped, dead
  one).

  Example:
    >>> import jax, jax.numpy as jnp, posconstr
    >>> from posconstr import initializers
    >>> g = posconstr.Softplus()
    >>> latent_init = initializers.through(g, initializers.icnn())
    >>> latent = latent_init(jax.random.key(0), (64, 32))
    >>> bool((g.forward(latent) > 0).all())
    True
    >>> normal = jax.nn.initializers.lecun_normal()
    >>> eager = initializers.through(g, normal)(jax.random.key(0), (64, 32))
    >>> jitted = jax.jit(initializers.through(g, normal), static_argnums=1)(
    ...     jax.random.key(0), (64, 32))
    >>> bool(jnp.allclose(eager, jitted, rtol=1e-5))
    True
    >>> float(g.forward(eager).min()) > 0
    True
  """
  _reparam.check_parameterization_arg(parameterization, "parameterization",
                                      "initializers.through")
  if not isinstance(fold, bool):
    raise TypeError(f"initializers.through: `fold` must be a bool, got "
                    f"{fold!r}.")

  def latent_init(key, shape, dtype=jnp.float32):
    value = init(key, shape, dtype)
    if fold:
      return parameterization.inverse(parameterization.fold(value))
    latent = parameterization.inverse(value)  # Raises when concrete.
    bad = parameterization.out_of_range(jnp.asarray(value))
    return jnp.where(bad, jnp.full_like(latent, jnp.nan), latent)

  return latent_init
