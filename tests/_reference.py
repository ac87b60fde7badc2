"""Independent references and fixtures shared by several test files."""

import functools

import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

# One leaf per floating dtype; float64 needs a local ``jax.enable_x64(True)``.
DTYPES = {"f16": jnp.float16, "bf16": jnp.bfloat16, "f32": jnp.float32,
          "f64": jnp.float64}


def mixed_dtype_tree(scale=2.0, seed=0):
  """{"f16": (4, 3) f16, "bf16": ..., "f32": ..., "f64": ...}; needs x64."""
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(scale * rng.normal(size=(4, 3)), dt)
          for name, dt in DTYPES.items()}


def assert_dtypes(tree, what):
  for name, dt in DTYPES.items():
    assert tree[name].dtype == jnp.dtype(dt), (what, name, tree[name].dtype)


def bisection_simplex(v, scale=1.0):
  """Projection of a vector onto {x >= 0, sum x = scale}, in float64.

  Bisection on the shift theta of sum(max(v - theta, 0)) = scale, which is
  decreasing in theta; independent of the library's sort-based method.
  """
  v = np.asarray(v, np.float64)
  lo, hi = v.min() - scale / v.size, v.max()
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if np.maximum(v - mid, 0).sum() > scale:
      lo = mid
    else:
      hi = mid
  return np.maximum(v - 0.5 * (lo + hi), 0)


@functools.lru_cache(maxsize=None)
def standardized_diabetes():
  """scikit-learn's diabetes data, features and target standardized."""
  X, y = datasets.load_diabetes(return_X_y=True)
  return (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()


def lbfgsb_line_search_step(tx, loss):
  """One ``lbfgsb`` step with ``value_fn`` and the value and gradient that
  ``optax.value_and_grad_from_state`` reuses from the state."""
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(params, state):
    value, grad = value_and_grad(params, state=state)
    updates, state = tx.update(grad, state, params, value=value, grad=grad,
                               value_fn=loss)
    return optax.apply_updates(params, updates), state

  return step
