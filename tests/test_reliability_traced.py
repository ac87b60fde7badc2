"""Issue 13 §2: traced hyperparameters (``jax.jit``,
``optax.inject_hyperparams``) work, and invalid traced values are NaN.

Before the fix, traced ``Simplex(scale)``, ``MaxNorm``/``MinMaxNorm``
values, ``Softplus(beta, eps)`` and ``Sigmoid(lower, upper)`` raised a bare
``ConcretizationTypeError``; a traced ``lower > upper`` clipped everything
to ``upper`` and a traced negative ``eps`` was used as it was. The
reference for each traced result is the same object built from Python
floats.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr as pc

X = jnp.array([[-1.0, 0.3, 2.0], [0.5, -0.2, 4.0]])
SETS = {  # name: (make from one hyperparameter, valid value, invalid value)
    "Simplex(scale)": (lambda t: pc.Simplex(t, axis=1), 2.0, -1.0),
    "MaxNorm(max_value)": (lambda t: pc.MaxNorm(t, axis=1), 1.5, 0.0),
    "MinMaxNorm(min_value)": (
        lambda t: pc.MinMaxNorm(t, 2.0, axis=1), 0.5, 3.0),
    "MinMaxNorm(max_value)": (
        lambda t: pc.MinMaxNorm(0.5, t, axis=1), 2.0, 0.25),
    "MinMaxNorm(rate)": (
        lambda t: pc.MinMaxNorm(0.5, 2.0, t, axis=1), 0.5, 1.5),
    "NonNegative(eps)": (lambda t: pc.NonNegative(t), 0.1, -0.1),
    "Box(lower)": (lambda t: pc.Box(t, 1.0), -0.5, 1.5),
    "Box(upper)": (lambda t: pc.Box(-0.5, t), 1.0, -1.0),
}
PARAMETERIZATIONS = {
    "Softplus(beta)": (lambda t: pc.Softplus(beta=t), 2.0, 0.0),
    "Softplus(eps)": (lambda t: pc.Softplus(eps=t), 0.1, -0.1),
    "Exp(eps)": (lambda t: pc.Exp(eps=t), 0.1, -0.1),
    "Sigmoid(lower)": (lambda t: pc.Sigmoid(lower=t, upper=2.0), -1.0, 2.0),
    "Sigmoid(upper)": (lambda t: pc.Sigmoid(lower=-1.0, upper=t), 2.0, -3.0),
}


def _set_results(c):
  return (c.project(X), c.violation(X), c.active(X), c.pushing_out(X, -X))


@pytest.mark.parametrize("name", list(SETS))
def test_traced_set_hyperparameter_matches_the_concrete_one(name):
  make, good, _ = SETS[name]
  traced = jax.jit(lambda t: _set_results(make(t)))(good)
  concrete = _set_results(make(good))
  for a, b in zip(traced, concrete):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("name", list(SETS))
def test_invalid_traced_set_hyperparameter_is_nan(name):
  make, _, bad = SETS[name]
  with pytest.raises(ValueError, match="must be"):
    make(bad)  # Concrete: an error naming the argument.
  y, v, _, _ = jax.jit(lambda t: _set_results(make(t)))(bad)
  assert np.isnan(np.asarray(y)).all()
  # The rate is the step's, not the set's: the violation does not use it.
  assert np.isnan(float(v)) != name.endswith("(rate)")


def test_traced_box_with_lower_above_upper_is_nan_only_there():
  lower, upper = jnp.array([0.0, 2.0, 0.0]), jnp.array([1.0, 1.0, 1.0])
  x = jnp.array([0.5, 0.5, 3.0])
  y = jax.jit(lambda lo, hi: pc.Box(lo, hi).project(x))(lower, upper)
  np.testing.assert_array_equal(np.asarray(y), [0.5, np.nan, 1.0])
  # bounds_in itself is unchanged (bounded L-BFGS reads it to report
  # INFEASIBLE).
  lo, hi = jax.jit(lambda lo, hi: pc.Box(lo, hi).bounds_in(jnp.float32))(
      lower, upper)
  np.testing.assert_array_equal(np.asarray(lo), lower)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_traced_parameterization_hyperparameter(name):
  make, good, bad = PARAMETERIZATIONS[name]
  z = jnp.array([-3.0, 0.0, 2.0])

  def run(t):
    g = make(t)
    w = g.forward(z)
    return w, g.inverse(w), g.derivative(z), g.fold(jnp.array([-5.0, 0.5]))

  for a, b in zip(jax.jit(run)(good), run(good)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)
  with pytest.raises(ValueError, match="must be"):
    make(bad)
  w, latent, _, _ = jax.jit(run)(bad)
  assert np.isnan(np.asarray(w)).all() and np.isnan(np.asarray(latent)).all()


def test_inject_hyperparams_changes_the_set_between_steps():
  def make(learning_rate, scale, max_value):
    return optax.chain(optax.sgd(learning_rate), pc.constrain({
        "w": pc.Simplex(scale, axis=0), "v": pc.MaxNorm(max_value, axis=None)}))

  tx = optax.inject_hyperparams(make)(learning_rate=0.1, scale=2.0,
                                      max_value=1.0)
  params = {"w": jnp.ones((3, 2)), "v": jnp.ones(4)}
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]),
           "v": jnp.ones(4)}

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state)
  np.testing.assert_allclose(jnp.sum(params["w"], 0), [2.0, 2.0], rtol=1e-6)
  assert float(jnp.linalg.norm(params["v"])) <= 1.0 + 1e-6
  state.hyperparams["scale"] = jnp.asarray(3.0)
  state.hyperparams["max_value"] = jnp.asarray(0.5)
  params, state = step(params, state)
  np.testing.assert_allclose(jnp.sum(params["w"], 0), [3.0, 3.0], rtol=1e-6)
  assert float(jnp.linalg.norm(params["v"])) == pytest.approx(0.5, rel=1e-6)
  state.hyperparams["scale"] = jnp.asarray(-1.0)  # invalid: NaN, not silent
  params, state = step(params, state)
  assert np.isnan(np.asarray(params["w"])).all()


def test_inject_hyperparams_projected_and_reparam():
  tx = optax.inject_hyperparams(
      lambda learning_rate, eps: pc.projected(optax.sgd(learning_rate),
                                              pc.NonNegative(eps)))(
                                                  learning_rate=1.0, eps=0.25)
  params = {"w": jnp.array([1.0, 0.5])}
  updates, _ = jax.jit(tx.update)({"w": jnp.array([2.0, -1.0])},
                                  tx.init(params), params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"],
                                [0.25, 1.5])

  def loss(beta, latent):
    return jnp.sum(pc.reparam({"w": latent}, pc.Softplus(beta=beta))["w"])

  z = jnp.array([0.0, 1.0])
  grad = jax.jit(jax.grad(loss))(2.0, z)
  fd = (loss(2.001, z) - loss(1.999, z)) / 0.002
  assert float(grad) == pytest.approx(float(fd), rel=1e-2)
