"""A jitted train step traces exactly once over 10 steps, for every transform.

A retrace per step (a weak type or dtype drifting in the optimizer state, a
Python scalar turning into an array, a graph node changing under
``nnx.jit``) would compile the step again and again: silently slow. Each
step below counts its traces with a Python counter incremented inside the
traced function and is also wrapped in ``chex.assert_max_traces(n=1)``.
"""

import _models
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import lbfgsb_line_search_step
from flax import nnx

import posconstr as pc

STEPS = 10


@pytest.fixture(autouse=True)
def _fresh_chex_counters():
  # chex counts traces per wrapped function's code location, across tests.
  chex.clear_trace_counter()
  yield
X = jax.random.normal(jax.random.key(0), (8, 4))
Y = jnp.abs(jax.random.normal(jax.random.key(1), (8, 3)))


def _params():
  # An explicit dtype: jnp.full((4, 3), 0.3) is weakly typed, and the first
  # step's output (strongly typed) would retrace for reasons of the test's
  # own making.
  return {"w": jnp.full((4, 3), 0.3, jnp.float32), "b": jnp.zeros(3)}


_loss = _models.regression_loss(X, Y)


TRANSFORMS = {
    "project_nonneg": lambda: optax.chain(optax.adam(0.05),
                                          pc.project_nonneg(mask="w")),
    "project_box_tree": lambda: optax.chain(
        optax.sgd(0.05, momentum=0.9),
        pc.project_box({"w": 0.0, "b": -1.0}, {"w": 1.0, "b": 1.0})),
    "constrain": lambda: optax.chain(optax.adamw(0.05), pc.constrain(
        {"w": pc.MaxNorm(0.5, axis=0), "b": pc.Box(-0.5, 0.5)})),
    "posconstr.chain+simplex": lambda: pc.chain(
        optax.adam(0.05), pc.project(pc.Simplex(axis=0), mask="w")),
    "projected(adam)": lambda: pc.projected(optax.adam(0.05), pc.NonNegative()),
    "projected(rules)": lambda: pc.projected(
        optax.sgd(0.05, momentum=0.9),
        {"w": pc.Box(0.0, 1.0), "b": pc.NonNegative()}),
    "apply_if_finite(project_nonneg)": lambda: optax.apply_if_finite(
        optax.chain(optax.adam(0.05), pc.project_nonneg()), 3),
    "inject_hyperparams(project_nonneg)": lambda: optax.chain(
        optax.adam(0.05),
        optax.inject_hyperparams(pc.project_nonneg)(eps=0.01)),
    "lbfgsb_fixed_lr": lambda: pc.lbfgsb(0.1, memory_size=2, lower=0.0),
}
W_SET = {"constrain": pc.MaxNorm(0.5, axis=0)}  # Otherwise w >= 0.


def _counted(fn, counter):
  def traced(*args):
    counter.append(1)  # Runs only while tracing.
    return fn(*args)
  return traced


def _run_steps(tx, step):
  """``STEPS`` jitted steps from ``_params()``; asserts a single trace.

  Returns the final params and state and the initial loss.
  """
  traces = []
  step = jax.jit(chex.assert_max_traces(_counted(step, traces), n=1))
  params = _params()
  state = tx.init(params)
  first = float(_loss(params))
  for _ in range(STEPS):
    params, state = step(params, state)
  assert len(traces) == 1
  return params, state, first


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_optax_step_traces_once(name):
  tx = TRANSFORMS[name]()

  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params, _, first = _run_steps(tx, step)
  assert float(_loss(params)) < first
  assert float(W_SET.get(name, pc.NonNegative()).violation(params["w"])) == 0


def test_lbfgsb_line_search_step_traces_once():
  """``value_fn`` inside the jitted step, value and grad reused from the
  state by ``optax.value_and_grad_from_state``."""
  tx = pc.lbfgsb(memory_size=2, lower=0.0)
  params, state, first = _run_steps(tx, lbfgsb_line_search_step(tx, _loss))
  assert float(_loss(params)) < 0.5 * first
  assert int(state.count) == STEPS


def test_inject_hyperparams_eps_changes_without_retrace():
  """A bound that is a hyperparameter (traced) may change between steps."""
  tx = optax.chain(optax.sgd(1.0),
                   optax.inject_hyperparams(pc.project_nonneg)(eps=0.0))
  traces = []

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(_counted(step, traces))
  params = {"w": jnp.array([0.5, 2.0], jnp.float32)}
  grads = {"w": jnp.array([5.0, -1.0], jnp.float32)}
  state = tx.init(params)
  for i in range(STEPS):
    state[1].hyperparams["eps"] = jnp.asarray(0.1 * i, jnp.float32)
    new, state = step(params, state, grads)
    assert float(new["w"][0]) == pytest.approx(0.1 * i)  # Clipped to eps.
  assert len(traces) == 1


LINEN = pc.linen.Reparameterized(nn.Dense(3), kernel=pc.Softplus(),
                                 bias=pc.Sigmoid(-0.5, 0.5))


@pytest.mark.parametrize("module", [LINEN, pc.linen.NonNegDense(3)],
                         ids=["Reparameterized", "NonNegDense"])
def test_linen_step_traces_once(module):
  tx = optax.adam(0.05)
  traces = []

  def loss(params):
    return jnp.mean((module.apply({"params": params}, X) - Y) ** 2)

  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(chex.assert_max_traces(_counted(step, traces), n=1))
  params = module.init(jax.random.key(0), X)["params"]
  state = tx.init(params)
  first = float(loss(params))
  for _ in range(STEPS):
    params, state = step(params, state)
  assert len(traces) == 1
  assert float(loss(params)) < first


def _nnx_models():
  return {
      "reparameterize": lambda: pc.nnx.reparameterize(
          nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
          {"kernel": pc.Softplus(), "bias": pc.Sigmoid(-0.5, 0.5)}),
      "NonNegLinear": lambda: pc.nnx.NonNegLinear(4, 3, rngs=nnx.Rngs(0)),
  }


@pytest.mark.parametrize("make", list(_nnx_models().values()),
                         ids=list(_nnx_models()))
def test_nnx_step_traces_once(make):
  model = make()
  # A projection on top of the reparameterization is fine too; here a plain
  # optimizer on the latents, and one with a constrain rule on the bias.
  optimizer = nnx.Optimizer(model, optax.chain(
      optax.adam(0.05), pc.constrain({"*bias": pc.Box(-0.4, 0.4)})),
      wrt=nnx.Param)
  traces = []

  def loss(model):
    return jnp.mean((model(X) - Y) ** 2)

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  first = float(step(model, optimizer))
  for _ in range(STEPS - 1):
    last = float(step(model, optimizer))
  assert len(traces) == 1
  assert last < first
  bias = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  bias = [v for k, v in jax.tree_util.tree_flatten_with_path(bias)[0]
          if "bias" in jax.tree_util.keystr(k)]
  assert bias and all(np.abs(np.asarray(b)).max() <= 0.4 for b in bias)
