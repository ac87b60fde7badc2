"""posconstr.nnx.reparameterize: Params hold latents; layers see softplus.

The reference forward passes are written out by hand in float64 NumPy, or
run on an unwrapped twin of the network whose Params hold the applied
weights.
"""

import _models
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import posconstr
from posconstr.tree import _paths

RULES = {"*kernel": posconstr.Softplus()}


def softplus(z):
  return np.logaddexp(0.0, np.asarray(z, np.float64))


MLP = _models.NnxMLP


def _flat(tree):
  """{path: float64 array} of a State / pytree (a trailing `.value` dropped)."""
  paths, leaves, _ = _paths.leaves_with_paths(tree)
  return {p: np.asarray(v, np.float64) for p, v in zip(paths, leaves)}


def _manual(latents, x, prefix="module/"):
  """relu(x @ softplus(L1) + b1) @ softplus(L2) + b2, in float64."""
  p = {k[len(prefix):]: v for k, v in latents.items()}
  h = np.maximum(np.asarray(x, np.float64) @ softplus(p["l1/kernel"])
                 + p["l1/bias"], 0)
  return h @ softplus(p["l2/kernel"]) + p["l2/bias"]


def _x(n=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, 3), jnp.float32)


def _model(seed=0):
  return posconstr.nnx.reparameterize(MLP(nnx.Rngs(seed)), RULES)


def test_state_holds_latents_and_layers_see_softplus():
  base = MLP(nnx.Rngs(0))
  drawn = _flat(nnx.state(base, nnx.Param))
  model = posconstr.nnx.reparameterize(base, RULES)
  assert model.module is base
  latents = _flat(nnx.state(model, nnx.Param))
  assert sorted(latents) == ["module/l1/bias", "module/l1/kernel",
                             "module/l2/bias", "module/l2/kernel"]
  for name in ("l1", "l2"):
    # Stored: the latent of the folded draw (|w| for softplus), not the draw.
    kernel = latents[f"module/{name}/kernel"]
    assert np.isfinite(kernel).all()
    assert not np.allclose(kernel, drawn[f"{name}/kernel"])
    np.testing.assert_allclose(softplus(kernel),
                               np.abs(drawn[f"{name}/kernel"]),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(latents[f"module/{name}/bias"],
                                  drawn[f"{name}/bias"])
  x = _x()
  np.testing.assert_allclose(model(x), _manual(latents, x), rtol=1e-5,
                             atol=1e-6)
  # applied_state has the paths of the state (and of the optimizer).
  applied = _flat(model.applied_state())
  assert applied.keys() == latents.keys()
  for path, latent in latents.items():
    ref = softplus(latent) if path.endswith("kernel") else latent
    np.testing.assert_allclose(applied[path], ref, rtol=1e-6, atol=1e-7)


def test_calls_never_write_the_params():
  model = _model()
  before = _flat(nnx.state(model, nnx.Param))
  x = _x()
  first = np.asarray(model(x))
  model(x)
  nnx.jit(lambda m, x: m(x))(model, x)
  after = _flat(nnx.state(model, nnx.Param))
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(before[path], after[path])
  # Calling again gives the same output: forward is not compounded.
  np.testing.assert_array_equal(np.asarray(model(x)), first)


def _loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def test_training_with_nnx_optimizer_updates_the_latents():
  model = _model()
  x = _x(32)
  y = jnp.sin(3 * x[:, :2]) + x[:, 2:]
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  latents0 = _flat(nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer, x, y))
  # Adam's first moment after one step is (1 - b1) * grad with respect to
  # the *latents*: d loss / d L = (d loss / d W) * sigmoid(L).
  def ref_loss(p):
    h = jax.nn.relu(x @ jax.nn.softplus(p["l1/kernel"]) + p["l1/bias"])
    out = h @ jax.nn.softplus(p["l2/kernel"]) + p["l2/bias"]
    return jnp.mean((out - y) ** 2)

  ref_grad = jax.jit(jax.grad(ref_loss))(
      {k[len("module/"):]: jnp.asarray(v, jnp.float32)
       for k, v in latents0.items()})
  adam_state = optimizer.opt_state[0]
  mu = _flat(adam_state.mu)
  assert mu.keys() == latents0.keys()
  for path, value in mu.items():
    np.testing.assert_allclose(value / 0.1, ref_grad[path[len("module/"):]],
                               rtol=1e-4, atol=1e-7)
  for _ in range(30):
    last = float(step(model, optimizer, x, y))
  assert last < 0.5 * first
  latents = _flat(nnx.state(model, nnx.Param))
  shapes = {p: v.shape for p, v in latents.items()}
  assert {p: v.shape for p, v in _flat(adam_state.mu).items()} == shapes
  assert {p: v.shape for p, v in _flat(optimizer.opt_state[0].nu).items()} \
      == shapes
  # The Params are still latents: some negative (softplus > 0 would not be),
  # the output uses softplus of them, and applied_state agrees.
  assert any((v < 0).any() for p, v in latents.items() if "kernel" in p)
  assert any(not np.array_equal(latents[p], latents0[p]) for p in latents)
  np.testing.assert_allclose(model(x), _manual(latents, x), rtol=1e-5,
                             atol=1e-5)
  applied = _flat(model.applied_state())
  np.testing.assert_allclose(applied["module/l2/kernel"],
                             softplus(latents["module/l2/kernel"]),
                             rtol=1e-6)
  assert float(_loss(model, x, y)) < 0.5 * first


def test_split_merge_round_trip():
  model = _model()
  x = _x()
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state)
  assert isinstance(merged, posconstr.nnx.Reparameterized)
  want = _flat(nnx.state(model, nnx.Param))
  got = _flat(nnx.state(merged, nnx.Param))
  assert want.keys() == got.keys()
  for path in want:
    np.testing.assert_array_equal(got[path], want[path])
  np.testing.assert_array_equal(np.asarray(merged(x)), np.asarray(model(x)))
  # Through a jax transformation of the pure state, as in functional code.
  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  np.testing.assert_allclose(forward(state, x), _manual(want, x), rtol=1e-5,
                             atol=1e-6)


def test_msgpack_round_trip_restores_identical_outputs():
  model = _model(0)
  x = _x()
  blob = flax.serialization.msgpack_serialize(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  fresh = _model(123)
  assert not np.allclose(np.asarray(fresh(x)), np.asarray(model(x)))
  target = nnx.state(fresh, nnx.Param)
  nnx.replace_by_pure_dict(target, flax.serialization.msgpack_restore(blob))
  nnx.update(fresh, target)
  want = _flat(nnx.state(model, nnx.Param))
  got = _flat(nnx.state(fresh, nnx.Param))
  for path in want:
    np.testing.assert_array_equal(got[path], want[path])
  np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


class Net(nnx.Module):
  """With non-Param state: BatchNorm statistics and a Dropout RNG stream."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.l2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def _count(net):
  return int(net.drop.rngs.count[...])


def test_batch_stats_and_rng_counters_survive_the_wrapper():
  model = posconstr.nnx.reparameterize(Net(nnx.Rngs(0, dropout=1)), RULES)
  # The twin holds the applied weights in plain Params: the reference.
  twin = Net(nnx.Rngs(0, dropout=1))
  nnx.update(twin, model.applied_state()["module"])
  latents = _flat(nnx.state(model, nnx.Param))
  x = _x(32)
  assert _count(model.module) == 0
  outs = []
  for call in range(3):
    if call < 2:
      out = model(x)
    else:  # also under nnx.jit
      out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(out, twin(x), rtol=1e-5, atol=1e-6)
    assert _count(model.module) == _count(twin) == call + 1
    np.testing.assert_allclose(model.module.bn.mean[...], twin.bn.mean[...],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.module.bn.var[...], twin.bn.var[...],
                               rtol=1e-5)
    outs.append(np.asarray(out))
  # Batch statistics moved away from their initial values; the dropout mask
  # changed between calls (the counter advanced).
  assert np.abs(np.asarray(model.module.bn.mean[...])).min() > 0
  assert not np.allclose(outs[0], outs[1])
  # Manual reference for the first update of the running mean:
  # momentum 0.99, so mean = 0.01 * batch mean of the first layer.
  h = (np.asarray(x, np.float64) @ softplus(latents["module/l1/kernel"])
       + latents["module/l1/bias"])
  mean = np.zeros(8)
  for _ in range(3):
    mean = 0.99 * mean + 0.01 * h.mean(0)
  np.testing.assert_allclose(model.module.bn.mean[...], mean, rtol=1e-4,
                             atol=1e-7)
  # Eval mode reaches the wrapped module: deterministic, running averages.
  model.eval()
  twin.eval()
  np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
  np.testing.assert_allclose(model(x), twin(x), rtol=1e-5, atol=1e-6)
  # Closed over by jax.jit (a functional copy): nothing changes in eval
  # mode, so nothing is written back from inside the trace.
  np.testing.assert_allclose(jax.jit(lambda x: model(x))(x), twin(x),
                             rtol=1e-5, atol=1e-6)
  after = _flat(nnx.state(model, nnx.Param))
  for path in latents:
    np.testing.assert_array_equal(after[path], latents[path])


def test_from_applied_false_keeps_values_as_latents():
  base = MLP(nnx.Rngs(0))
  drawn = _flat(nnx.state(base, nnx.Param))
  model = posconstr.nnx.reparameterize(base, RULES, from_applied=False)
  latents = _flat(nnx.state(model, nnx.Param))
  for path, value in drawn.items():
    np.testing.assert_array_equal(latents["module/" + path], value)
  x = _x()
  np.testing.assert_allclose(model(x), _manual(latents, x), rtol=1e-5,
                             atol=1e-6)


def test_bad_rules_raise():
  with pytest.raises(ValueError, match=r"'nope'.*l1/kernel"):
    posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)),
                                 {"nope": posconstr.Softplus()})
  with pytest.raises(TypeError, match="constraint set"):
    posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)), posconstr.NonNegative())
  with pytest.raises(TypeError, match=r"rules\['\*kernel'\]"):
    posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)),
                                 {"*kernel": posconstr.NonNegative()})


def test_applied_state_applies_this_wrappers_maps_only():
  class Two(nnx.Module):
    def __init__(self, rngs):
      self.a = posconstr.nnx.reparameterize(
          nnx.Linear(4, 4, rngs=rngs), {"kernel": posconstr.Exp()})
      self.b = nnx.Linear(4, 2, rngs=rngs)

  model = posconstr.nnx.reparameterize(Two(nnx.Rngs(0)),
                                       {"b/kernel": posconstr.Softplus()})
  latents = _flat(nnx.state(model, nnx.Param))
  applied = _flat(model.applied_state())
  np.testing.assert_allclose(applied["module/b/kernel"],
                             softplus(latents["module/b/kernel"]), rtol=1e-6)
  # The inner wrapper's latent stays one (a twin's inner wrapper reads it);
  # the inner wrapper applies its own map.
  np.testing.assert_array_equal(applied["module/a/module/kernel"],
                                latents["module/a/module/kernel"])
  np.testing.assert_allclose(
      _flat(model.module.a.applied_state())["module/kernel"],
      np.exp(latents["module/a/module/kernel"]), rtol=1e-6)
