r"""The math of the ready-made ICNN, shared by its linen and NNX classes.

A fully input-convex network (Amos, Xu & Kolter, "Input Convex Neural
Networks", ICML 2017) with layer widths :math:`n_0, \dots, n_L`:

.. math::
  z_0 = W^x_0 x + b_0, \qquad
  z_k = W^z_k\, \phi(z_{k-1}) + W^x_k x + b_k \quad (k = 1 \dots L),

output :math:`z_L`. With :math:`W^z_k \ge 0` and :math:`\phi` convex and
non-decreasing every output is convex in :math:`x`; the passthrough (skip)
weights :math:`W^x_k` are free and may be left out for :math:`k \ge 1`.
Parameters are named ``x_0`` (kernel, bias), ``z_k`` (kernel, bias) and
``x_k`` (kernel) for :math:`k \ge 1`, in linen and NNX alike.

**Initialization** (Hoedt & Klambauer, "Principled Weight Initialisation for
Input-Convex Neural Networks", NeurIPS 2023): the applied :math:`W^z_k` are
log-normal with the moments of :func:`posconstr.initializers.icnn_moments`
for fan-in :math:`n_{k-1}` and the biases :math:`b_k` are the matching
constant of :func:`posconstr.initializers.icnn_bias`. The latents of a
reparameterized layer are the stable inverse of those draws, which gives the
matched variants exactly: under ``Exp`` the latents are normal,
:math:`\mathcal N(\log\mu - s^2/2,\ s^2)` with
:math:`s^2 = \log(1 + \sigma^2/\mu^2)`; under ``ReLU`` they are the
log-normal draws themselves (all positive: no latent starts dead).

The ``Exp`` latents agree with the closed form in an earlier version of the
authors' code (``ExponentialPositivity.init_raw_`` in github.com/ml-jku/
convex-init, for :math:`\rho = 1/2`) in the mean and the bias; its variance
term there reads :math:`\log(10 + t) - \log 6\pi` where the moments give
:math:`\log(10\pi + t) - \log 6\pi` (:math:`t = n(2\pi + 3\sqrt3 - 6) -
3\sqrt3`), so we follow the moments. The same repository once had a
uniform-latent variant for ``ReLU`` (variance preserving when correlations
between units are ignored), which its authors describe as working less well;
it is not offered here.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from posconstr import initializers
from posconstr.layers import _layer_args
from posconstr.sets import _intervals

Initializer = Callable[..., jax.Array]


def check_rho(rho, owner: str) -> float:
  """The correlation fixed point of the initialization, in (0, 1)."""
  if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
    raise TypeError(f"{owner}: `rho` must be a real number in (0, 1), got "
                    f"{rho!r}.")
  if not 0.0 < float(rho) < 1.0:
    raise ValueError(f"{owner}: `rho` must be in (0, 1) (the correlation "
                     f"fixed point of Hoedt & Klambauer), got {rho!r}.")
  return float(rho)


def check_args(features, positivity, activation, skip, rho,
               owner: str) -> None:
  """Validates the constructor arguments shared by linen and NNX."""
  if len(_layer_args.check_features(features, owner)) < 2:
    raise ValueError(
        f"{owner}: `features` must give at least two layers (the first one "
        f"and one z layer), got {tuple(features)!r}; one layer is affine.")
  _layer_args.check_positivity(positivity, owner)
  _layer_args.check_activation(
      activation, owner, "an ICNN is convex only with a convex, "
      "non-decreasing activation.")
  _layer_args.check_bool("skip", skip, owner)
  check_rho(rho, owner)


def nonneg(init: Initializer) -> Initializer:
  """``init`` mapped into ``[0, inf)`` by ``|w|`` (the identity on it).

  The projection mode's kernels are the weights themselves: they must start
  feasible. A zero-mean initializer gives its half distribution, as the
  parameterized layers' ``fold`` does.
  """

  def feasible(key, shape, dtype=jnp.float32):
    return jnp.abs(init(key, shape, dtype))

  return feasible


def z_initializers(fan_in: int, rho: float,
                   kernel_init: Optional[Initializer],
                   bias_init: Optional[Initializer]
                   ) -> Tuple[Initializer, Initializer]:
  """Applied-weight initializers of ``z_k`` (fan-in ``n_{k-1}``).

  ``kernel_init=None``: Hoedt & Klambauer's log-normal kernel and, unless
  ``bias_init`` is given, its matching constant bias. A ``kernel_init`` of
  one's own gets a zero bias unless ``bias_init`` is given.
  """
  if kernel_init is None:
    kernel_init, default_bias = _principled(fan_in, rho)
    bias_init = default_bias if bias_init is None else bias_init
  if bias_init is None:
    bias_init = jax.nn.initializers.zeros
  return kernel_init, bias_init


@functools.lru_cache(maxsize=64)
def _principled(fan_in: int, rho: float) -> Tuple[Initializer, Initializer]:
  # The same objects for the same (fan-in, rho): compiled NNX initializers
  # are cached on them (_signed_math.compiled_latent_init).
  return initializers.icnn(rho), initializers.icnn_bias(fan_in, rho)


def constrained_paths(num_layers: int, path: str = "") -> Tuple[str, ...]:
  """The paths of the kernels that must stay >= 0: ``z_1 .. z_L``."""
  return tuple(_layer_args.joined(path, f"z_{k}", "kernel")
               for k in range(1, num_layers))


def constraint_rules(num_layers: int, path: str = "") -> Dict[str, object]:
  """``{z-kernel path: NonNegative()}`` for ``constrain`` / ``projected``."""
  return {p: _intervals.NonNegative()
          for p in constrained_paths(num_layers, path)}
