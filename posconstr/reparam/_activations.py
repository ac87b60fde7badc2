"""Softplus and sigmoid with custom JVPs, for the parameterizations.

``softplus(z, beta) = softplus(beta z) / beta`` shares one ``exp`` between
value and derivative and never forms ``beta z`` (which overflows for
``z > max / beta``); ``beta`` may be traced (then it has a derivative too).
``sigmoid``'s derivative stays accurate in both tails. ``relu`` propagates
NaN in its value and its derivative (``jnp.where(z > 0, z, 0)`` maps NaN
to 0 with derivative 0, hiding it); so does ``abs_``'s derivative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def softplus(z, beta):
  """``softplus(beta z) / beta``, for a Python float or a traced ``beta``."""
  if isinstance(beta, (int, float)):
    return _softplus_static(z, float(beta))
  return _softplus_traced(z, beta)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _softplus_static(z, beta):
  # softplus(beta z) / beta without forming beta z, which overflows for
  # z > max / beta (then forward(inverse(max)) would be inf).
  return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-beta * jnp.abs(z))) / beta


@_softplus_static.defjvp
def _softplus_jvp(beta, primals, tangents):
  # One exp serves the value and the derivative (sigmoid); the derivative is
  # the only residual kept for the backward pass.
  (z,), (t,) = primals, tangents
  e = jnp.exp(-beta * jnp.abs(z))
  y = jnp.maximum(z, 0) + jnp.log1p(e) / beta
  inv = 1 / (1 + e)
  return y, jnp.where(z >= 0, inv, e * inv) * t


@jax.custom_jvp
def _softplus_traced(z, beta):
  return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-beta * jnp.abs(z))) / beta


@_softplus_traced.defjvp
def _softplus_traced_jvp(primals, tangents):
  (z, beta), (t, t_beta) = primals, tangents
  e = jnp.exp(-beta * jnp.abs(z))
  y = jnp.maximum(z, 0) + jnp.log1p(e) / beta
  slope = jnp.where(z >= 0, 1 / (1 + e), e / (1 + e))
  # d/d beta of softplus(beta z) / beta is (z sigmoid(beta z) - y) / beta;
  # 0 at infinite z (inf - inf there), where the value does not move.
  by_beta = jnp.where(jnp.isinf(z), 0, (z * slope - y) / beta)
  return y, slope * t + by_beta * t_beta


@jax.custom_jvp
def relu(z):
  return jnp.where(z <= 0, 0, z)  # NaN is not <= 0: it stays.


@relu.defjvp
def _relu_jvp(primals, tangents):
  (z,), (t,) = primals, tangents
  slope = jnp.where(z > 0, 1, jnp.where(jnp.isnan(z), jnp.nan, 0))
  return relu(z), slope.astype(t.dtype) * t


@jax.custom_jvp
def abs_(z):
  """``|z|`` whose derivative is NaN at NaN (``jnp.abs`` gives -1 there)."""
  return jnp.abs(z)


@abs_.defjvp
def _abs_jvp(primals, tangents):
  (z,), (t,) = primals, tangents
  slope = jnp.where(z >= 0, 1, jnp.where(z < 0, -1, jnp.nan))
  return jnp.abs(z), slope.astype(t.dtype) * t


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
