"""A dense layer whose kernel rows carry a sign constraint, framework-free.

Both ready-made networks are built from one dense layer, ``y = x W' + b``,
whose applied kernel ``W'`` has a sign per input row ``t_i``: ``g(W)`` for
``t_i = 1``, ``-g(W)`` for ``t_i = -1`` and ``W`` for ``t_i = 0``, where
``g`` is a non-negative parameterization (the stored ``W`` are latents) or,
with ``positivity="project"``, the identity (the stored ``W`` are the
weights, which the optimizer keeps in that sign pattern). The ICNN's
``z`` kernels are ``t = 1``, its passthrough kernels ``t = 0``. The linen and
NNX layers both call these functions, so that given the same stored
parameters they compute the same outputs.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import jax
import jax.numpy as jnp

from posconstr.layers import _layer_args

Indicator = Union[int, Tuple[int, ...]]
Initializer = Callable[..., jax.Array]


def _row_signs(signs: Tuple[int, ...], dtype) -> jax.Array:
  return jnp.asarray(signs, dtype)[:, None]


def signed_kernel(positivity, latent: jax.Array, signs: Indicator
                  ) -> jax.Array:
  """The applied kernel (rows = inputs) under the sign pattern ``signs``.

  ``signs`` is one int for every row or a tuple with one per row.
  """
  if isinstance(positivity, str) or (isinstance(signs, int) and signs == 0):
    return latent  # Projected (the kernel is the weight), or all free.
  if isinstance(signs, int):
    value = _layer_args.forward(positivity, latent)
    return value if signs > 0 else -value
  t = _row_signs(signs, latent.dtype)
  # g only sees the constrained rows: a large free latent cannot overflow
  # g and turn the unused branch's gradient into 0 * inf = NaN.
  value = _layer_args.forward(positivity,
                              jnp.where(t == 0, jnp.zeros_like(latent), latent))
  return jnp.where(t > 0, value, jnp.where(t < 0, -value, latent))


def latent_init(init: Initializer, positivity, signs: Indicator
                ) -> Initializer:
  """Latents whose applied kernel is ``init``'s draw with the right signs.

  Constrained rows get ``t * |v|`` (the half distribution of a zero-mean
  ``init``); free rows keep ``v``.
  """

  def latents(key, shape, dtype=jnp.float32):
    v = init(key, shape, dtype)
    if isinstance(signs, int) and signs == 0:
      return v
    t = (jnp.asarray(signs, v.dtype) if isinstance(signs, int)
         else _row_signs(signs, v.dtype))
    if isinstance(positivity, str):  # Projected: store the signed weight.
      stored = t * jnp.abs(v)
    else:  # The sign is applied in the forward pass.
      stored = positivity.inverse(positivity.fold(v))
    return jnp.where(t == 0, v, stored).astype(v.dtype)

  return latents


@functools.lru_cache(maxsize=256)
def _compiled(init: Initializer, positivity, signs: Indicator) -> Initializer:
  return jax.jit(latent_init(init, positivity, signs), static_argnums=(1, 2))


def compiled_latent_init(init: Initializer, positivity, signs: Indicator
                         ) -> Initializer:
  """:func:`latent_init` under ``jit``, compiled once per (init, g, signs).

  For eagerly built (NNX) layers: one compilation instead of one per eager
  operation of the initializer and the inverse (seconds on CPU for a fresh
  model), reused by later layers and models with the same arguments.
  """
  try:
    return _compiled(init, positivity, signs)
  except TypeError:  # An unhashable initializer: compile it for this call.
    return jax.jit(latent_init(init, positivity, signs), static_argnums=(1, 2))


def dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
          dtype) -> jax.Array:
  """``x @ kernel + bias`` in ``dtype`` (default: the promoted dtype)."""
  dtype = dtype or jnp.result_type(x, kernel)
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
  return y if bias is None else y + bias.astype(dtype)
