"""posconstr inside Optax combinators, under jit, with Flax linen and NNX.

Bit-for-bit comparisons are made eagerly (op by op): under ``jax.jit``, XLA
rewrites parts of Adam (e.g. a division by the bias correction becomes a
multiplication by its reciprocal), so two *different* jitted programs that
both contain Adam may round differently even without any projection.
"""

import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import posconstr
from posconstr.tree import _paths


def _params():
  return _models.two_dense_params(scale=0.1)


def _grads(step, params):
  return _models.pushing_grads(step, params, seed=500)


def _leaves_equal(a, b):
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(np.array_equal(np.asarray(x), np.asarray(y))
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _min(tree):
  return min(float(jnp.min(x)) for x in jax.tree.leaves(tree))


def _run(tx, params, steps, jit=False):
  state = tx.init(params)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  history = []
  for i in range(steps):
    params, state = step(params, state, _grads(i, params))
    history.append(params)
  return history, state


# --------------------------------------------------------------------- optax


def test_masked_projection_only_touches_masked_leaves():
  params = _params()
  mask = {"Dense_0": {"kernel": True, "bias": False},
          "Dense_1": {"kernel": True, "bias": False}}
  tx = optax.chain(optax.sgd(1.0),
                   optax.masked(posconstr.project_nonneg(), mask))
  new, _ = _run(tx, params, 1)
  new, grads = new[-1], _grads(0, params)
  for layer in params:
    stepped = np.asarray(params[layer]["kernel"]) - np.asarray(
        grads[layer]["kernel"])
    np.testing.assert_array_equal(new[layer]["kernel"], np.maximum(stepped, 0))
    np.testing.assert_array_equal(
        new[layer]["bias"], params[layer]["bias"] - grads[layer]["bias"])
  assert np.any(np.asarray(new["Dense_0"]["bias"]) < 0)
  # optax.masked hides the other leaves from the inner transform, so a
  # pattern there only sees the masked paths.
  inner = posconstr.project_nonneg(mask="*/bias")
  with pytest.raises(ValueError, match=r"match no parameter path.*"
                     r"'Dense_0/kernel', 'Dense_1/kernel'\]"):
    optax.masked(inner, mask).init(params)


def test_inject_hyperparams_on_the_projection():
  params = _params()
  tx = optax.chain(optax.adam(1e-1),
                   optax.inject_hyperparams(posconstr.project_nonneg)(eps=0.1))
  static = optax.chain(optax.adam(1e-1),
                       posconstr.project_nonneg(eps=float(np.float32(0.1))))
  a, state = _run(tx, params, 3)
  b, _ = _run(static, params, 3)
  assert all(_leaves_equal(x, y) for x, y in zip(a, b))
  assert _min(a[-1]) == np.float32(0.1)
  # The bound is a traced value: change it in the state, no rebuild needed.
  state[1].hyperparams["eps"] = jnp.asarray(0.3)
  step = jax.jit(tx.update)
  u, state = step(_grads(9, a[-1]), state, a[-1])
  new = optax.apply_updates(a[-1], u)
  assert _min(new) == np.float32(0.3)
  posconstr.check_projection_last(state)


def test_inject_hyperparams_adam_chained_with_projection():
  params = _params()
  tx = optax.chain(optax.inject_hyperparams(optax.adam)(learning_rate=0.05),
                   posconstr.project_nonneg())
  plain = optax.chain(optax.adam(0.05), posconstr.project_nonneg())
  a, state = _run(tx, params, 10)
  b, _ = _run(plain, params, 10)
  for x, y in zip(a, b):
    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    assert _min(x) >= 0.0
  assert sum(int(jnp.sum(x == 0)) for x in jax.tree.leaves(a[-1])) > 5
  state[0].hyperparams["learning_rate"] = jnp.asarray(10.0)
  u, _ = tx.update(_grads(10, a[-1]), state, a[-1])
  assert _min(optax.apply_updates(a[-1], u)) == 0.0


def test_multisteps_keeps_params_feasible_after_every_step():
  params = jax.tree.map(jnp.abs, _params())
  inner = optax.chain(optax.adam(0.05), posconstr.project_nonneg())
  tx = optax.MultiSteps(inner, every_k_schedule=3)
  history, state = _run(tx, params, 9, jit=True)
  posconstr.check_projection_last(state)
  ref_tx = optax.adam(0.05)
  ref, ref_state = params, ref_tx.init(params)
  for i, p in enumerate(history):
    assert _min(p) >= 0.0, i
    if i % 3 != 2:  # Accumulating: no change.
      previous = params if i == 0 else history[i - 1]
      assert _leaves_equal(p, previous), i
    else:  # One Adam step on the mean gradient, then the projection.
      mean = jax.tree.map(lambda *g: sum(g) / 3.0,
                          *[_grads(j, params) for j in (i - 2, i - 1, i)])
      u, ref_state = ref_tx.update(mean, ref_state, ref)
      ref = jax.tree.map(lambda x: jnp.maximum(x, 0.0),
                         optax.apply_updates(ref, u))
      for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert sum(int(jnp.sum(x == 0)) for x in jax.tree.leaves(history[-1])) > 0


def test_jit_of_the_whole_update():
  params = _params()
  tx = optax.chain(optax.adam(0.05), posconstr.project_nonneg(mask="*/kernel"))
  jitted, _ = _run(tx, params, 20, jit=True)
  eager, _ = _run(tx, params, 20)
  for x, y in zip(jitted, eager):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert _min({k: v["kernel"] for k, v in x.items()}) >= 0.0
  assert _min({k: v["bias"] for k, v in jitted[-1].items()}) < 0.0


def test_jitted_projection_is_bit_identical_to_jitted_maximum():
  rng = np.random.default_rng(3)
  p = jnp.asarray(rng.normal(size=1000), jnp.float32)
  u = jnp.asarray(rng.normal(size=1000) * 2.0, jnp.float32)
  tx = posconstr.project_nonneg()

  @jax.jit
  def projected(p, u):
    return optax.apply_updates(p, tx.update(u, tx.init(p), p)[0])

  @jax.jit
  def manual(p, u):
    return jnp.maximum(optax.apply_updates(p, u), 0.0)

  a, b = projected(p, u), manual(p, u)
  np.testing.assert_array_equal(a, b)
  assert int(jnp.sum(a == 0)) > 200


# --------------------------------------------------------------- flax linen


_MLP = _models.TwoDense


def test_linen_variables_with_the_params_collection():
  variables = _MLP().init(jax.random.key(0), jnp.ones((1, 4)))
  tx = optax.chain(optax.sgd(1.0),
                   posconstr.project_nonneg(mask="params/Dense_0/kernel"))
  grads = jax.tree.map(lambda x: jnp.abs(x) + 1.0, variables)
  u, _ = tx.update(grads, tx.init(variables), variables)
  new = optax.apply_updates(variables, u)
  np.testing.assert_array_equal(new["params"]["Dense_0"]["kernel"], 0.0)
  assert _min(new["params"]["Dense_1"]) < 0.0


# ---------------------------------------------------------------------- nnx


class _NnxMLP(nnx.Module):
  """The NNX twin of ``_MLP``: attributes named as linen names submodules."""

  def __init__(self, rngs):
    self.Dense_0 = nnx.Linear(4, 4, rngs=rngs)
    self.Dense_1 = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.Dense_1(jax.nn.relu(self.Dense_0(x)))


def _nnx_loss(model, x):
  # The sum of the outputs plus of all weights: pushes every weight down.
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  weights = sum(jnp.sum(w) for w in params)
  return jnp.sum(model(x)) + weights


def test_nnx_paths_agree_for_variables_pure_state_and_linen():
  model = _NnxMLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  raw = [p for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
  assert all(p[-1] == jax.tree_util.GetAttrKey("value") for p in raw)
  with_vars = _paths.leaves_with_paths(state)[0]
  pure = _paths.leaves_with_paths(nnx.as_pure(state))[0]
  linen = _MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  expected = ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias",
              "Dense_1/kernel"]
  assert with_vars == pure == _paths.leaves_with_paths(linen)[0] == expected


def test_nnx_optimizer_keeps_kernels_nonnegative_biases_free():
  model = _NnxMLP(nnx.Rngs(0))
  linen_model = _MLP()
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  x = jnp.abs(jax.random.normal(jax.random.key(1), (4, 4))) + 0.5
  np.testing.assert_allclose(linen_model.apply({"params": params}, x),
                             model(x), rtol=1e-6)
  tx = optax.chain(optax.adam(0.05), posconstr.project_nonneg(mask="*/kernel"))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  posconstr.check_projection_last(optimizer.opt_state)
  # The same optimizer on the linen params, by hand.
  ref_state = tx.init(params)
  for _ in range(8):
    grads = nnx.grad(_nnx_loss)(model, x)
    optimizer.update(model, grads)
    g = nnx.to_pure_dict(grads)
    u, ref_state = tx.update(g, ref_state, params)
    params = optax.apply_updates(params, u)
    now = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert _leaves_equal(now, params)
  for layer in (model.Dense_0, model.Dense_1):
    assert jnp.all(layer.kernel[...] >= 0.0)
    assert jnp.any(layer.kernel[...] == 0.0)
    assert jnp.any(layer.bias[...] < 0.0)
  np.testing.assert_allclose(linen_model.apply({"params": params}, x),
                             model(x), rtol=1e-6)


def test_nnx_optimizer_refuses_a_projection_before_adam():
  model = _NnxMLP(nnx.Rngs(0))
  tx = posconstr.chain(posconstr.project_nonneg(mask="*/kernel"),
                       optax.adam(1e-2))
  with pytest.raises(ValueError, match=r"projection in link 0 is followed by "
                     r"link 1"):
    nnx.Optimizer(model, tx, wrt=nnx.Param)
  with pytest.raises(ValueError, match=r"\['\*/Kernel'\] match no parameter"):
    nnx.Optimizer(model, posconstr.project_nonneg(mask="*/Kernel"),
                  wrt=nnx.Param)


# -------------------------------------------------------------- chain order

_P = {"w": jnp.ones(3), "b": jnp.ones(2)}
_W = {"w": True, "b": False}
_proj = posconstr.project_nonneg
def _adam():
  return optax.adam(1e-2)


@pytest.mark.parametrize("tx", [
    optax.chain(_proj(), optax.adam(1e-2)),
    optax.chain(optax.scale_by_adam(), _proj(), optax.scale(-1e-2)),
    optax.chain(optax.adam(1e-2), optax.chain(_proj(), optax.scale(2.0))),
    optax.chain(optax.chain(optax.adam(1e-2), _proj()), optax.scale(2.0)),
    optax.masked(optax.chain(_proj(), _adam()), _W),
    optax.chain(optax.masked(_proj(), {"w": True, "b": False}), optax.sgd(0.1)),
    optax.chain(optax.inject_hyperparams(_proj)(eps=0.1), optax.adam(1e-2)),
    optax.MultiSteps(optax.chain(_proj(), _adam()), every_k_schedule=3),
    optax.named_chain(("project", _proj()), ("adam", optax.adam(1e-2))),
    optax.multi_transform(
        {"a": optax.chain(_proj(), optax.adam(1e-2)), "b": optax.sgd(0.1)},
        {"w": "a", "b": "b"}),
    # The later link ends in a projection, but of other leaves.
    optax.chain(_proj(mask="w"), optax.chain(_adam(), _proj(mask="b"))),
    optax.chain(_adam(), _proj(mask="w"),
                posconstr.projected(_adam(), posconstr.NonNegative())),
], ids=["before-adam", "scale_by_adam-proj-scale", "nested-second",
        "nested-first", "inside-masked", "masked-then-sgd", "inject-then-adam",
        "inside-multisteps", "named_chain", "multi_transform",
        "proj-then-chain-ending-in-proj", "proj-then-projected"])
def test_check_projection_last_detects_bad_order(tx):
  state = tx.init(_P)
  with pytest.raises(ValueError, match=r"the projection in link .* is "
                     r"followed by link .*Put posconstr projections at the "
                     r"end"):
    posconstr.check_projection_last(state)


@pytest.mark.parametrize("tx", [
    optax.chain(optax.adam(1e-2), _proj()),
    optax.chain(_adam(), _proj(mask="w"), posconstr.project_box(-1, 1)),
    optax.chain(_adam(), optax.masked(_proj(), _W)),
    optax.chain(optax.adam(1e-2), optax.inject_hyperparams(_proj)(eps=0.1)),
    optax.MultiSteps(optax.chain(_adam(), _proj()), every_k_schedule=3),
    optax.named_chain(("adam", optax.adam(1e-2)), ("project", _proj())),
    # Different labels act on different leaves: no order between them.
    optax.multi_transform(
        {"a": optax.chain(optax.adam(1e-2), _proj()), "b": optax.sgd(0.1)},
        {"w": "a", "b": "b"}),
    optax.adam(1e-2),
    optax.chain(_adam(), _proj(mask="w"),
                optax.chain(_proj(mask="b"), optax.masked(_proj(), _W))),
], ids=["adam-proj", "adam-proj-proj", "masked-last", "inject-last",
        "multisteps", "named_chain", "multi_transform", "no-projection",
        "adam-proj-chain-of-projs"])
def test_check_projection_last_accepts_good_order(tx):
  posconstr.check_projection_last(tx.init(_P))


def test_posconstr_chain_refuses_bad_order_at_init_and_runs_good_order():
  bad = posconstr.chain(optax.scale_by_adam(), _proj(), optax.scale(-0.1))
  with pytest.raises(ValueError, match=r"link 1 is followed by link 2 "
                     r"\(EmptyState\)"):
    bad.init(_P)
  good = posconstr.chain(optax.adam(2.0), _proj())
  ref = optax.chain(optax.adam(2.0), _proj())
  g = jax.tree.map(jnp.ones_like, _P)
  u, s = good.update(g, good.init(_P), _P)
  v, r = ref.update(g, ref.init(_P), _P)
  assert _leaves_equal(u, v) and _leaves_equal(s, r)
  np.testing.assert_array_equal(optax.apply_updates(_P, u)["w"], 0.0)


def test_projection_not_last_leaves_params_infeasible():
  # Documented behaviour: optax.chain itself does not check the order.
  tx = optax.chain(_proj(), optax.sgd(0.5))
  p = {"w": jnp.array([0.1, 2.0])}
  u, _ = tx.update({"w": jnp.ones(2)}, tx.init(p), p)
  np.testing.assert_allclose(optax.apply_updates(p, u)["w"], [-0.4, 1.5])


def test_projection_then_chain_ending_in_another_projection_is_infeasible():
  # What the check catches: sgd after project(w) moves w off the set, and
  # the nested chain's own projection covers only b.
  tx = optax.chain(_proj(mask="w"), optax.chain(optax.sgd(1.0),
                                                _proj(mask="b")))
  p = {"w": jnp.array([0.5]), "b": jnp.array([0.5])}
  u, _ = tx.update({"w": jnp.ones(1), "b": jnp.ones(1)}, tx.init(p), p)
  new = optax.apply_updates(p, u)
  assert float(new["w"][0]) < 0 and float(new["b"][0]) == 0
  with pytest.raises(ValueError, match=r"link 0 is followed by link 1 "
                     r"\(tuple\)"):
    posconstr.check_projection_last(tx.init(p))


def test_keep_params_nonnegative_is_invisible_to_the_check():
  # Documented limitation: its state is optax.EmptyState, like any link's.
  tx = optax.chain(optax.keep_params_nonnegative(), optax.adam(1e-2))
  posconstr.check_projection_last(tx.init(_P))
