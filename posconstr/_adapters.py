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


def forward_tree(tree, plan):
  """``tree`` with each leaf that ``plan`` (one entry per leaf) gives a
  parameterization replaced by its forward map."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [x if p is None else forward(p, x)
                for p, x in zip(plan, leaves)])


def latent_tree(tree, plan):
  """``tree`` with each leaf that ``plan`` gives a parameterization replaced
  by the latent of its applied value (:func:`latent_of`)."""
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [x if p is None else latent_of(p, x)
                for p, x in zip(plan, leaves)])


def latent_of(parameterization, value):
  """The latent of an initial *applied* value: ``inverse(fold(value))``."""
  return parameterization.inverse(parameterization.fold(value))
