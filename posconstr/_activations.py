"""Softplus and sigmoid with custom JVPs, for the parameterizations.

``softplus(z, beta) = softplus(beta z) / beta`` shares one ``exp`` between
value and derivative and never forms ``beta z`` (which overflows for
``z > max / beta``); ``sigmoid``'s derivative stays accurate in both tails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softplus(z, beta):
  # softplus(beta z) / beta without forming beta z, which overflows for
  # z > max / beta (then forward(inverse(max)) would be inf).
  return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-beta * jnp.abs(z))) / beta


@softplus.defjvp
def _softplus_jvp(beta, primals, tangents):
  # One exp serves the value and the derivative (sigmoid); the derivative is
  # the only residual kept for the backward pass.
  (z,), (t,) = primals, tangents
  e = jnp.exp(-beta * jnp.abs(z))
  y = jnp.maximum(z, 0) + jnp.log1p(e) / beta
  inv = 1 / (1 + e)
  return y, jnp.where(z >= 0, inv, e * inv) * t


@jax.custom_jvp
def sigmoid(x):
  return jax.nn.sigmoid(x)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
  # sigmoid(x) * sigmoid(-x) is accurate in both tails; jax.nn.sigmoid's
  # sigmoid * (1 - sigmoid) is exactly 0 for x > 17 in float32 (1 - sigmoid
  # rounds to 0) while it is ~1e-8 for x < -17: an upper-saturated latent
  # would get no gradient at all, a lower-saturated one would.
  (x,), (t,) = primals, tangents
  y = jax.nn.sigmoid(x)
  return y, y * jax.nn.sigmoid(-x) * t
