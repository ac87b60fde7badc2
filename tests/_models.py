"""Models, parameters and gradients shared by several test files.

Plain functions and classes (pytest advises against importing ``conftest``);
the fixtures built on them live in ``conftest.py``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class TwoDense(nn.Module):
  """Linen ``Dense_0 -> relu -> Dense_1``, 4 -> 4 -> 4."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(4)(x))  # Dense_0
    return nn.Dense(4)(hidden)  # Dense_1


class NnxMLP(nnx.Module):
  """NNX ``l1 -> relu -> l2``, 3 -> 8 -> 2."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def two_dense_params(scale: float = 1.0, seed: int = 0):
  """Normal draws as float32 params.

  The tree is ``{Dense_0, Dense_1}: {kernel (4, 4), bias (4,)}``.
  """
  rng = np.random.default_rng(seed)
  def f32(*s):
    return jnp.asarray(rng.normal(size=s) * scale, jnp.float32)
  return {"Dense_0": {"kernel": f32(4, 4), "bias": f32(4)},
          "Dense_1": {"kernel": f32(4, 4), "bias": f32(4)}}


def pushing_grads(step: int, params, seed: int = 1000):
  """Mostly positive gradients (mean 0.5): descent pushes weights negative,
  into a lower bound at 0; a new draw per ``step``."""
  rng = np.random.default_rng(seed + step)
  return jax.tree.map(
      lambda x: jnp.asarray(0.5 + rng.normal(size=x.shape), x.dtype), params)


def regression_loss(x, y):
  """``p -> mean((x @ p["w"] + p["b"] - y)^2)``."""
  return lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def fit_linen_mse(model, tx, params, x, y, steps: int):
  """``steps`` jitted steps of ``tx`` on the mean squared error of a linen
  ``model``; the final params and the loss before each step."""

  @jax.jit
  def step(params, state):
    loss, g = jax.value_and_grad(lambda p: jnp.mean(
        (model.apply({"params": p}, x) - y)**2))(params)
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, losses
