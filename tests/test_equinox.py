"""posconstr with Equinox models (issue 13, sections 1 and 4).

References are independent: training loops that project by hand after
``optax.apply_updates`` (``jnp.maximum`` / ``jnp.clip``), the chain rule
``dL/dz = dL/dw * sigmoid(z)`` computed with the plain model, and NumPy
norms in float64.
"""

import io

import equinox as eqx  # pylint: disable=g-bad-import-order  # In the test extra.
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr
import posconstr.equinox as pceqx  # pylint: disable=g-bad-import-order
from posconstr import initializers

RULES = {"*weight": posconstr.Softplus()}


def _mlp(seed=0):
  return eqx.nn.MLP(3, 2, 8, 2, key=jax.random.key(seed))


def _data():
  x = jax.random.normal(jax.random.key(1), (32, 3))
  return x, jnp.sin(2 * x[:, :2]) + x[:, 2:]


def _loss(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def _params(model):
  return eqx.filter(model, eqx.is_inexact_array)


def _weights(model):
  return [layer.weight for layer in model.layers]


# ------------------------------------------------------------------ masks


def test_bool_mask_shaped_like_the_module_and_mask_functions():
  # Before: the eqx.Module mask (callable) was called as a mask function:
  # `TypeError: unsupported operand type(s) for @: 'bool' and 'MLP'`.
  model = _mlp()
  mask = eqx.tree_at(lambda m: m.layers[0].weight,
                     jax.tree.map(lambda _: False, model), True)
  low = jax.tree.map(lambda v: v - 5.0 if eqx.is_inexact_array(v) else v,
                     model)
  for m in (mask, lambda tree: mask):
    new = posconstr.project_params(low, posconstr.NonNegative(), mask=m)
    np.testing.assert_array_equal(new.layers[0].weight, 0.0)
    np.testing.assert_array_equal(new.layers[1].weight, low.layers[1].weight)
    np.testing.assert_array_equal(new.layers[0].bias, low.layers[0].bias)
    tx = optax.chain(optax.sgd(1.0), posconstr.project_nonneg(mask=m))
    params = _params(model)
    grads = jax.tree.map(lambda v: jnp.full_like(v, 5.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    stepped = eqx.apply_updates(model, updates)
    np.testing.assert_array_equal(stepped.layers[0].weight, 0.0)
    np.testing.assert_allclose(stepped.layers[2].weight,
                               model.layers[2].weight - 5.0, rtol=1e-6)


def test_mask_none_on_an_unfiltered_model():
  # Before: `TypeError: Cannot determine dtype of <custom_jvp ...>`.
  model = jax.tree.map(lambda v: v - 1.0 if eqx.is_inexact_array(v) else v,
                       _mlp())
  new = posconstr.project_params(model, posconstr.NonNegative())
  assert new.activation is model.activation
  for leaf in jax.tree.leaves(eqx.filter(new, eqx.is_inexact_array)):
    assert float(jnp.min(leaf)) == 0.0
  new(jnp.ones(3))  # still a working model
  state = posconstr.project_nonneg().init(model)
  posconstr.check_projection_last(state)


# -------------------------------------------------------- training loops


def test_filter_jit_loop_with_constrain_matches_projecting_by_hand():
  model, ref = _mlp(), _mlp()
  x, y = _data()
  tx = optax.chain(optax.adam(0.05), posconstr.constrain(
      {"*weight": posconstr.NonNegative(), "*bias": posconstr.Box(-0.1, 0.1)}))
  opt_state = tx.init(_params(model))
  ref_tx = optax.adam(0.05)
  ref_state = ref_tx.init(_params(ref))

  @eqx.filter_jit
  def step(model, opt_state):
    loss, grads = eqx.filter_value_and_grad(_loss)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, _params(model))
    return eqx.apply_updates(model, updates), opt_state, loss

  @eqx.filter_jit
  def ref_step(model, opt_state):
    grads = eqx.filter_grad(_loss)(model, x, y)
    updates, opt_state = ref_tx.update(grads, opt_state, _params(model))
    model = eqx.apply_updates(model, updates)
    for i in range(len(model.layers)):
      model = eqx.tree_at(lambda m: (m.layers[i].weight, m.layers[i].bias),
                          model, (jnp.maximum(model.layers[i].weight, 0.0),
                                  jnp.clip(model.layers[i].bias, -0.1, 0.1)))
    return model, opt_state

  for _ in range(20):
    model, opt_state, loss = step(model, opt_state)
    ref, ref_state = ref_step(ref, ref_state)
  for a, b in zip(jax.tree.leaves(_params(model)), jax.tree.leaves(
      _params(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert all(float(jnp.min(w)) >= 0.0 for w in _weights(model))
  assert any(float(jnp.min(w)) == 0.0 for w in _weights(model))
  assert all(float(jnp.max(jnp.abs(layer.bias))) <= 0.1
             for layer in model.layers)
  assert float(loss) < float(_loss(_mlp(), x, y))


def test_partition_loop_with_projected():
  model = _mlp()
  x, y = _data()
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tx = posconstr.projected(optax.adam(0.05), posconstr.NonNegative(),
                           mask="*weight")
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: _loss(eqx.combine(p, static), x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  first = None
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    first = float(loss) if first is None else first
  model = eqx.combine(params, static)
  assert all(float(jnp.min(w)) >= 0.0 for w in _weights(model))
  assert float(loss) < first


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_reparam_inside_filter_grad_is_the_chain_rule():
  latent_model = _mlp()
  x, y = _data()
  grads = eqx.filter_grad(
      lambda m: _loss(posconstr.reparam(m, RULES), x, y))(latent_model)
  applied = posconstr.reparam(latent_model, RULES)
  g_applied = eqx.filter_grad(_loss)(applied, x, y)
  for layer, g, ga in zip(latent_model.layers, grads.layers, g_applied.layers):
    sig = 1 / (1 + np.exp(-np.asarray(layer.weight, np.float64)))
    np.testing.assert_allclose(g.weight, np.asarray(ga.weight) * sig,
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g.bias, ga.bias, rtol=1e-6)


# ------------------------------------------------------------------ layout


def test_equinox_layout_needs_axis_minus_one():
  # eqx.nn.Linear.weight is (out, in): axis=-1 bounds each unit's inputs.
  layer = eqx.nn.Linear(6, 4, key=jax.random.key(0))
  big = eqx.tree_at(lambda linear: linear.weight, layer, layer.weight * 10)
  per_unit = posconstr.project_params(big, posconstr.MaxNorm(1.0, axis=-1),
                                      mask="weight")
  norms = np.linalg.norm(np.asarray(per_unit.weight, np.float64), axis=1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
  per_input = posconstr.project_params(big, posconstr.MaxNorm(1.0),
                                       mask="weight")  # Flax's (in, out)
  assert np.linalg.norm(np.asarray(per_input.weight), axis=1).max() > 1.1
  w = initializers.icnn(in_axis=-1, out_axis=-2)(jax.random.key(0),
                                                 (512, 64))
  m = initializers.icnn_moments(64)
  np.testing.assert_allclose(float(jnp.mean(w)), m.weight_mean, rtol=0.1)


# ------------------------------------------------ posconstr.equinox nodes


def test_reparameterize_stores_latents_and_unwrap_applies_g():
  mlp = _mlp()
  model = pceqx.reparameterize(mlp, RULES)
  applied = pceqx.unwrap(model)
  for layer, plain, out in zip(model.layers, mlp.layers, applied.layers):
    assert isinstance(layer.weight, pceqx.Reparameterized)
    # The latent of the folded draw: softplus(latent) = |w|, in float64.
    softplus = np.logaddexp(0, np.asarray(layer.weight.latent, np.float64))
    np.testing.assert_allclose(softplus, np.abs(plain.weight), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(out.weight, softplus, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(layer.bias, plain.bias)
    np.testing.assert_array_equal(out.bias, plain.bias)
  assert applied.activation is mlp.activation
  # Optimizers and patterns see the latents at .../weight/latent.
  paths = posconstr.constraint_report(
      _params(model), posconstr.Box(-100.0, 100.0), mask="*latent")
  assert sorted(paths) == [f"layers/{i}/weight/latent" for i in range(3)]
  with pytest.raises(ValueError, match=r"`layers/0/weight/latent` is already "
                     r"the latent of a Reparameterized node.*g\(g\(z\)\)"):
    pceqx.reparameterize(model, {"*weight*": posconstr.Softplus()})
  with pytest.raises(TypeError, match=r"`parameterization` must be a "
                     r"parameterization.*constraint set"):
    pceqx.Reparameterized(jnp.ones(2), posconstr.NonNegative())


def test_gradients_reach_the_latents_and_training_works():
  model = pceqx.reparameterize(_mlp(), RULES)
  x, y = _data()
  grads = eqx.filter_grad(lambda m: _loss(pceqx.unwrap(m), x, y))(model)
  g_applied = eqx.filter_grad(_loss)(pceqx.unwrap(model), x, y)
  for layer, g, ga in zip(model.layers, grads.layers, g_applied.layers):
    sig = 1 / (1 + np.exp(-np.asarray(layer.weight.latent, np.float64)))
    np.testing.assert_allclose(g.weight.latent, np.asarray(ga.weight) * sig,
                               rtol=1e-5, atol=1e-8)
  tx = optax.adam(0.05)
  opt_state = tx.init(_params(model))

  @eqx.filter_jit
  def step(model, opt_state):
    loss, grads = eqx.filter_value_and_grad(
        lambda m: _loss(pceqx.unwrap(m), x, y))(model)
    updates, opt_state = tx.update(grads, opt_state, _params(model))
    return eqx.apply_updates(model, updates), opt_state, loss

  first = None
  for _ in range(30):
    model, opt_state, loss = step(model, opt_state)
    first = float(loss) if first is None else first
  assert float(loss) < 0.7 * first
  assert any(float(jnp.min(layer.weight.latent)) < 0 for layer in model.layers)
  assert all(float(jnp.min(w)) >= 0 for w in _weights(pceqx.unwrap(model)))


def test_tree_at_and_serialisation_see_the_latent():
  model = pceqx.reparameterize(_mlp(0), RULES)
  edited = eqx.tree_at(lambda m: m.layers[0].weight.latent, model,
                       jnp.full_like(model.layers[0].weight.latent, -1.0))
  np.testing.assert_allclose(pceqx.unwrap(edited).layers[0].weight,
                             np.logaddexp(0, -1.0), rtol=1e-6)
  buffer = io.BytesIO()
  eqx.tree_serialise_leaves(buffer, edited)
  buffer.seek(0)
  like = pceqx.reparameterize(_mlp(1), RULES)
  restored = eqx.tree_deserialise_leaves(buffer, like)
  for a, b in zip(jax.tree.leaves(_params(restored)),
                  jax.tree.leaves(_params(edited))):
    np.testing.assert_array_equal(a, b)
  assert restored.layers[0].weight.parameterization == posconstr.Softplus()


def test_a_catch_all_rule_on_a_whole_model_with_a_float_field():
  # Dropout's p is a Python float: eqx.filter_grad gives None for it, which
  # the projections pass through as no update.
  model = eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0)),
                             eqx.nn.Dropout(0.5)])
  grads = eqx.filter_grad(lambda m: m.layers[0](jnp.ones(2)).sum())(model)
  for tx in (optax.chain(optax.sgd(1.0), posconstr.constrain(
      {"*": posconstr.NonNegative()})), posconstr.projected(
          optax.sgd(1.0), {"*": posconstr.NonNegative()})):
    updates, _ = tx.update(grads, tx.init(model), model)
    new = eqx.apply_updates(model, updates)
    w, b = model.layers[0].weight, model.layers[0].bias
    np.testing.assert_allclose(new.layers[0].weight,
                               np.maximum(np.asarray(w) - 1.0, 0.0))
    np.testing.assert_allclose(new.layers[0].bias,
                               np.maximum(np.asarray(b) - 1.0, 0.0))
    assert new.layers[1].p == 0.5
