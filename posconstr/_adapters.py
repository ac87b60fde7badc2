"""Helpers shared by the framework adapters (linen, NNX, equinox)."""

from __future__ import annotations

import functools

import jax
import jax.core  # Explicit: `jax.core.Tracer` below.


@functools.lru_cache(maxsize=64)
def _compiled_forward(parameterization):
  return jax.jit(parameterization.forward)


def forward(parameterization, latent):
  """``parameterization.forward(latent)``, compiled once when called eagerly.

  Eagerly, ``forward`` dispatches a dozen small operations (about 0.6 ms
  for a softplus on CPU); the compiled function is one dispatch. Under a
  transformation (a traced ``latent``) it is the plain ``forward``.

  >>> import jax.numpy as jnp, posconstr
  >>> forward(posconstr.Exp(), jnp.zeros(2))
  Array([1., 1.], dtype=float32)
  """
  if isinstance(latent, jax.core.Tracer) or not isinstance(latent, jax.Array):
    return parameterization.forward(latent)
  return _compiled_forward(parameterization)(latent)


def latent_of(parameterization, value):
  """The latent of an initial *applied* value: ``inverse(fold(value))``."""
  return parameterization.inverse(parameterization.fold(value))
