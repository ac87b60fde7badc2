"""The NNX dense layer with sign-constrained kernel rows (see _signed_math)."""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from posconstr.layers import _layer_args
from posconstr.layers import _signed_math


class SignedLinear(nnx.Module):
  """``y = x W' + b``; the NNX twin of ``_linen_signed.SignedDense``."""

  def __init__(self, in_features: int, out_features: int, *,
               rngs: nnx.Rngs, signs: _signed_math.Indicator = 1,
               positivity: _layer_args.Positivity = _layer_args.PROJECT,
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros_init(),
               use_bias: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32):
    init = _signed_math.compiled_latent_init(kernel_init, positivity, signs)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features),
                                 param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,),
                                     param_dtype))
                 if use_bias else nnx.data(None))
    self.signs = signs
    self.positivity = positivity
    self.dtype = dtype

  @property
  def holds_latent(self) -> bool:
    """Whether ``kernel`` holds latents (read as ``g(latent)``)."""
    return not isinstance(self.positivity, str) and self.signs != 0

  def applied_kernel(self):
    """The kernel the layer multiplies by (signed, ``g`` applied)."""
    return _signed_math.signed_kernel(self.positivity, self.kernel[...],
                                      self.signs)

  def __call__(self, x):
    bias = self.bias[...] if self.bias is not None else None
    return _signed_math.dense(x, self.applied_kernel(), bias, self.dtype)
