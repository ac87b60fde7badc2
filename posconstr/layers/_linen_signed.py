"""The linen dense layer with sign-constrained kernel rows (_signed_math)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from posconstr.layers import _layer_args
from posconstr.layers import _signed_math


class SignedDense(nn.Module):
  """``y = x W' + b`` with ``W'`` the signed applied kernel of ``kernel``.

  ``kernel_init`` draws the *applied* weights; the param ``kernel`` stores
  their latent (or the weights themselves when ``positivity="project"``).
  """

  features: int
  signs: _signed_math.Indicator = 1
  positivity: _layer_args.Positivity = _layer_args.PROJECT
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if not isinstance(self.positivity, str) and self.signs != 0:
      # An enclosing posconstr.linen.Reparameterized must not map it again.
      from posconstr import linen  # pylint: disable=g-import-not-at-top
      linen._check_not_reparameterized(  # pylint: disable=protected-access
          self, "kernel", "a layer of posconstr.linen.ICNN/MonotoneMLP")
    latent = self.param(
        "kernel", _signed_math.latent_init(self.kernel_init, self.positivity,
                                           self.signs),
        (jnp.shape(x)[-1], self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    kernel = _signed_math.signed_kernel(self.positivity, latent, self.signs)
    return _signed_math.dense(x, kernel, bias, self.dtype)
