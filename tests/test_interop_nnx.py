"""posconstr.nnx interop (issue 13): NNX-filter rules, ``NonNegLinear`` with
``nnx.Linear``'s arguments, the eager call, paths, reparameterizing twice.

References: softplus in float64 NumPy, and plain ``nnx.Linear`` layers
holding the applied weights.
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


def softplus(z):
  return np.logaddexp(0.0, np.asarray(z, np.float64))


MLP = _models.NnxMLP


class PositiveParam(nnx.Param):
  """A Param type that marks the weights to keep positive."""


class Tagged(nnx.Module):

  def __init__(self, rngs):
    self.w = PositiveParam(jax.random.normal(rngs.params(), (3, 2)))
    self.v = nnx.Param(jax.random.normal(rngs.params(), (3, 2)))

  def __call__(self, x):
    return x @ self.w[...] + x @ self.v[...]


def _flat(tree):
  paths, leaves, _ = _paths.leaves_with_paths(tree)
  return {p: np.asarray(v, np.float64) for p, v in zip(paths, leaves)}


def _x(n=8):
  return jax.random.normal(jax.random.key(1), (n, 3), jnp.float32)


# ------------------------------------------------------------- filter rules


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_rules_keyed_by_nnx_filters():
  by_glob = posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)),
                                         {"*kernel": posconstr.Softplus()})
  by_path = posconstr.nnx.reparameterize(
      MLP(nnx.Rngs(0)), {nnx.PathContains("kernel"): posconstr.Softplus()})
  a, b = _flat(nnx.state(by_glob)), _flat(nnx.state(by_path, nnx.Param))
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_array_equal(a[path], b[path])
  np.testing.assert_array_equal(by_glob(_x()), by_path(_x()))
  # A Variable type: only the PositiveParam is reparameterized; glob and
  # filter keys mix, first match wins.
  drawn = _flat(nnx.state(Tagged(nnx.Rngs(0))))
  model = posconstr.nnx.reparameterize(
      Tagged(nnx.Rngs(0)), {"v": None, PositiveParam: posconstr.Exp()})
  latents = _flat(nnx.state(model))
  np.testing.assert_allclose(np.exp(latents["module/w"]), np.abs(drawn["w"]),
                             rtol=1e-6)
  np.testing.assert_array_equal(latents["module/v"], drawn["v"])
  x = np.asarray(_x(), np.float64)
  np.testing.assert_allclose(
      model(_x()), x @ np.exp(latents["module/w"]) + x @ drawn["v"],
      rtol=1e-5, atol=1e-5)
  # Static and hashable: nnx.jit and split/merge keep the rules.
  graphdef, state = nnx.split(model)
  assert nnx.merge(graphdef, state).rules == model.rules
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, _x()),
                             model(_x()), rtol=1e-6)


def test_bad_filter_rules():
  with pytest.raises(ValueError, match=r"\[PathContains\('nope'.*\] match "
                     r"no parameter path.*'l1/bias'"):
    posconstr.nnx.reparameterize(
        MLP(nnx.Rngs(0)), {nnx.PathContains("nope"): posconstr.Softplus()})
  with pytest.raises(TypeError, match=r"rule keys must be glob patterns \(str"
                     r"\) or NNX filters.*got 3 of type int"):
    posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)), {3: posconstr.Softplus()})
  with pytest.raises(TypeError, match=r"rules\[PathContains.*must be a "
                     r"parameterization"):
    posconstr.nnx.reparameterize(
        MLP(nnx.Rngs(0)), {nnx.PathContains("kernel"): posconstr.Box(0, 1)})


# ------------------------------------------------------------- NonNegLinear


def test_nonneg_linear_with_partitioning_metadata_precision_dot_general():
  # Before: `fold` received the VariableMetadata of with_partitioning, and
  # precision / dot_general / kernel_metadata were not accepted.
  calls = []

  def dot_general(a, b, dims, precision=None, **kw):
    calls.append(precision)
    return jax.lax.dot_general(a, b, dims, precision=precision, **kw)

  init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                               (None, "model"))
  with jax.set_mesh(jax.make_mesh((1,), ("model",))):
    layer = posconstr.nnx.NonNegLinear(
        3, 4, kernel_init=init, rngs=nnx.Rngs(0), precision="highest",
        dot_general=dot_general, kernel_metadata={"tag": "w"},
        bias_metadata={"tag": "b"})
    plain = nnx.Linear(3, 4, kernel_init=init, rngs=nnx.Rngs(0))
    assert layer.kernel.get_metadata("out_sharding") == (None, "model")
    assert layer.kernel[...].sharding.spec == plain.kernel[...].sharding.spec
    assert layer.kernel.get_metadata("tag") == "w"
    assert layer.bias.get_metadata("tag") == "b"
    latent = np.asarray(layer.kernel[...])
    np.testing.assert_allclose(softplus(latent), np.abs(plain.kernel[...]),
                               rtol=1e-5, atol=1e-7)
    layer.bias[...] = jnp.full((4,), 0.25)
    plain.kernel[...] = jnp.asarray(softplus(latent), jnp.float32)
    plain.bias[...] = jnp.full((4,), 0.25)
    out = layer(_x())
  assert calls == [jax.lax.Precision.HIGHEST] or calls == ["highest"]
  np.testing.assert_allclose(out, plain(_x()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- eager call


def test_eager_call_restores_the_latents_and_matches_the_functional_path():
  model = posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)),
                                       {"*kernel": posconstr.Softplus()})
  before = _flat(nnx.state(model))
  x = _x()
  eager = np.asarray(model(x))
  jitted = np.asarray(nnx.jit(lambda m, x: m(x))(model, x))
  # A closed-over module under jax.jit cannot mutate its Params (another
  # trace): the call runs on a functional copy.
  closed = np.asarray(jax.jit(lambda x: model(x))(x))
  latents = _flat(nnx.state(model))
  h = np.maximum(np.asarray(x, np.float64) @ softplus(
      latents["module/l1/kernel"]) + latents["module/l1/bias"], 0)
  want = h @ softplus(latents["module/l2/kernel"]) + latents["module/l2/bias"]
  for got in (eager, jitted, closed):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  for path in before:
    np.testing.assert_array_equal(latents[path], before[path])


def test_latents_are_restored_when_the_call_raises():

  class Fails(nnx.Module):

    def __init__(self, rngs):
      self.l1 = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, x):
      self.l1(x)
      raise RuntimeError("inside")

  model = posconstr.nnx.reparameterize(Fails(nnx.Rngs(0)),
                                       {"*kernel": posconstr.Softplus()})
  before = _flat(nnx.state(model))
  with pytest.raises(RuntimeError, match="inside"):
    model(jnp.ones((1, 2)))
  after = _flat(nnx.state(model))
  for path in before:
    np.testing.assert_array_equal(after[path], before[path])


# --------------------------------------------------------------------- paths


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_optimizer_state_applied_state_and_constrain_share_paths():
  model = posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)),
                                       {"*kernel": posconstr.Softplus()})
  tx = optax.chain(optax.adam(0.5), posconstr.constrain(
      {"module/*/bias": posconstr.Box(-0.01, 0.01)}))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  state_paths = sorted(_flat(nnx.state(model, nnx.Param)))
  assert state_paths == sorted(_flat(model.applied_state()))
  assert state_paths == sorted(_flat(optimizer.opt_state[0][0].mu))
  grads = nnx.grad(lambda m: jnp.sum(m(_x())))(model)
  optimizer.update(model, grads)
  for layer in (model.module.l1, model.module.l2):
    assert float(jnp.max(jnp.abs(layer.bias[...]))) <= 0.01
  twin = MLP(nnx.Rngs(5))
  nnx.update(twin, model.applied_state()["module"])
  np.testing.assert_allclose(twin(_x()), model(_x()), rtol=1e-6)


# ---------------------------------------------------------- twice is refused


def test_reparameterizing_a_latent_twice_is_refused():
  # Before: silently g(g(z)).
  rules = {"*kernel": posconstr.Softplus()}
  wrapped = posconstr.nnx.reparameterize(MLP(nnx.Rngs(0)), rules)
  with pytest.raises(ValueError, match=r"Param `module/l1/kernel` already "
                     r"holds a latent.*Reparameterized at `module`.*g\(g\(z\)"):
    posconstr.nnx.reparameterize(wrapped, rules)
  with pytest.raises(ValueError, match=r"already holds a latent"):
    posconstr.nnx.reparameterize(wrapped, posconstr.Softplus())

  class WithNonNeg(nnx.Module):

    def __init__(self, rngs):
      self.inner = posconstr.nnx.NonNegLinear(3, 2, rngs=rngs)
      self.out = nnx.Linear(2, 1, rngs=rngs)

  with pytest.raises(ValueError, match=r"Param `inner/kernel` already holds "
                     r"a latent \(of a posconstr.nnx.NonNegLinear at `inner`"):
    posconstr.nnx.reparameterize(WithNonNeg(nnx.Rngs(0)), rules)
  # Other Params of the same model are fine.
  ok = posconstr.nnx.reparameterize(WithNonNeg(nnx.Rngs(0)),
                                    {"out/kernel": posconstr.Softplus()})
  assert isinstance(ok, posconstr.nnx.Reparameterized)
  again = posconstr.nnx.reparameterize(
      wrapped, {"module/*/kernel": None, "*": posconstr.Exp()},
      from_applied=False)
  assert isinstance(again.module, posconstr.nnx.Reparameterized)
