"""posconstr.linen.Reparameterized around Dense, DenseGeneral, Conv and Einsum.

References are computed independently: the *plain* flax module applied with
``{'params': softplus(latent)}``, softplus evaluated in float64 NumPy
(``logaddexp(0, z)``), and the distributions of initial weights checked
against SciPy's.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import posconstr
from posconstr import initializers
from posconstr.linen import Reparameterized


def softplus(z):
  """float64 reference, cast back to float32 (what the layers compute in)."""
  return np.logaddexp(0.0, np.asarray(z, np.float64)).astype(np.float32)


def _x(shape, seed=7):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# name -> (module factory, input shape)
MODULES = {
    "Dense": (lambda: nn.Dense(3), (2, 4)),
    "DenseGeneral": (lambda: nn.DenseGeneral((2, 3), axis=-1),
                     (2, 4)),
    "Conv": (lambda: nn.Conv(3, (3, 3)), (1, 5, 5, 2)),
    "Einsum": (lambda: nn.Einsum((4, 3), "ab,bc->ac"), (2, 4)),
}


def _applied_params(latents):
  """The plain module's params: kernel = softplus(latent), rest as stored."""
  out = {k: np.asarray(v) for k, v in latents.items()}
  out["kernel"] = softplus(latents["kernel"])
  return out


@pytest.mark.parametrize("name", sorted(MODULES))
def test_output_is_plain_module_with_softplus_of_latents(name):
  factory, shape = MODULES[name]
  plain = factory()
  wrapped = Reparameterized(factory())
  x = _x(shape)
  variables = wrapped.init(jax.random.key(1), x)
  latents = variables["params"]
  # Same variable names and shapes as the plain module: nothing renamed.
  plain_shapes = jax.tree.map(jnp.shape, plain.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, variables) == plain_shapes
  # Perturb the latents so that some are well below zero (softplus far from
  # the identity there) and the bias is non-zero.
  latents = jax.tree.map(lambda v: np.asarray(v) - 0.7 + 0.3 * _x(v.shape, 3),
                         latents)
  got = wrapped.apply({"params": latents}, x)
  want = plain.apply({"params": _applied_params(latents)}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The applied view agrees with the same reference.
  applied = wrapped.apply({"params": latents}, method=wrapped.applied)
  np.testing.assert_allclose(applied["kernel"], softplus(latents["kernel"]),
                             rtol=1e-6, atol=1e-7)
  if "bias" in latents:
    np.testing.assert_array_equal(applied["bias"], latents["bias"])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_init_applies_fold_of_the_modules_own_draw_once(name):
  factory, shape = MODULES[name]
  x = _x(shape)
  draw = factory().init(jax.random.key(5), x)["params"]
  latents = Reparameterized(factory()).init(jax.random.key(5), x)["params"]
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(latents))
  applied = softplus(latents["kernel"])
  # fold(v) = |v| for Softplus (eps = 0); the same key gives the same draw.
  np.testing.assert_allclose(applied, np.abs(draw["kernel"]), rtol=1e-5,
                             atol=1e-7)
  assert (np.asarray(draw["kernel"]) < 0).any()  # folding did something
  # softplus applied twice would put every weight above log(2).
  assert applied.min() < 0.1
  if "bias" in draw:  # not reparameterized: stored exactly as drawn.
    np.testing.assert_array_equal(latents["bias"], draw["bias"])


def _big_kernel(**kw):
  layer = Reparameterized(nn.Dense(256), **kw)
  init = jax.jit(layer.init)  # one compilation instead of many eager ops
  latents = init(jax.random.key(11), jnp.ones((1, 256)))["params"]
  return softplus(latents["kernel"]).ravel().astype(np.float64)


def test_init_distribution_is_half_normal_for_a_normal_initializer():
  std = 0.05
  w = _big_kernel(kernel_init=nn.initializers.normal(stddev=std))
  assert (w >= 0).all()
  np.testing.assert_allclose(w.mean(), math.sqrt(2 / math.pi) * std, rtol=0.02)
  np.testing.assert_allclose(np.sqrt(np.mean(w**2)), std, rtol=0.02)
  assert stats.kstest(w, stats.halfnorm(scale=std).cdf).pvalue > 1e-3
  # Not the distribution of softplus applied to a half-normal sample.
  assert stats.kstest(softplus(w), stats.halfnorm(scale=std).cdf).pvalue < 1e-6


def test_default_init_is_folded_lecun_normal():
  # lecun_normal: a normal truncated at +-2 sd, rescaled to variance 1/fan_in.
  # Folded, it is a normal truncated to [0, 2 sd].
  w = _big_kernel()
  assert (w >= 0).all()
  sd = math.sqrt(1 / 256) / stats.truncnorm(-2, 2).std()
  ref = stats.truncnorm(0, 2, scale=sd)
  np.testing.assert_allclose(w.mean(), ref.mean(), rtol=0.02)
  np.testing.assert_allclose(np.mean(w**2), 1 / 256, rtol=0.03)
  assert stats.kstest(w, ref.cdf).pvalue > 1e-3


def test_icnn_kernel_init_gives_icnn_distribution():
  init = initializers.icnn()
  x = jnp.ones((1, 64))
  wrapped = Reparameterized(nn.Dense(1024), kernel_init=init)
  latents = jax.jit(wrapped.init)(jax.random.key(2), x)["params"]
  w = softplus(latents["kernel"]).ravel().astype(np.float64)
  # Same draw as the plain layer with that initializer (positive: no fold).
  draw = jax.jit(nn.Dense(1024, kernel_init=init).init)(jax.random.key(2), x)
  np.testing.assert_allclose(w, np.ravel(draw["params"]["kernel"]), rtol=2e-5)
  # Log-normal with the mean and variance of Hoedt & Klambauer's moments.
  m = initializers.icnn_moments(64)
  s2 = math.log1p(m.weight_var / m.weight_mean**2)
  mu = math.log(m.weight_mean) - s2 / 2
  assert (w > 0).all()
  log_normal = stats.norm(mu, math.sqrt(s2))
  assert stats.kstest(np.log(w), log_normal.cdf).pvalue > 1e-3
  np.testing.assert_allclose(w.mean(), m.weight_mean, rtol=0.1)


def test_init_under_jit_matches_eager_init():
  layer = Reparameterized(nn.Conv(3, (3, 3)))
  x = _x((1, 5, 5, 2))
  eager = layer.init(jax.random.key(4), x)
  jitted = jax.jit(layer.init)(jax.random.key(4), x)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_gradient_is_chain_rule_through_softplus():
  plain, wrapped = nn.Dense(3), Reparameterized(nn.Dense(3))
  x = _x((5, 4))
  latents = wrapped.init(jax.random.key(0), x)["params"]
  def loss(out):
    return jnp.sum(jnp.sin(out))
  g_latent = jax.jit(jax.grad(
      lambda p: loss(wrapped.apply({"params": p}, x))))(latents)
  applied = {"kernel": softplus(latents["kernel"]), "bias": latents["bias"]}
  g_applied = jax.jit(jax.grad(
      lambda p: loss(plain.apply({"params": p}, x))))(applied)
  sigmoid = 1 / (1 + np.exp(-np.asarray(latents["kernel"], np.float64)))
  np.testing.assert_allclose(g_latent["kernel"], g_applied["kernel"] * sigmoid,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_latent["bias"], g_applied["bias"], rtol=1e-6)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(Reparameterized(nn.Dense(5))(x))
    return Reparameterized(nn.Dense(1), name="out")(x)


class _PlainMLP(nn.Module):
  """The same network with plain Dense layers named like the wrappers."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5, name="Reparameterized_0")(x))
    return nn.Dense(1, name="out")(x)


def test_paths_tabulate_and_patterns_select_the_kernels():
  x = _x((4, 3))
  params = jax.jit(_MLP().init)(jax.random.key(0), x)["params"]
  paths = ["/".join(str(k.key) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert paths == ["Reparameterized_0/bias", "Reparameterized_0/kernel",
                   "out/bias", "out/kernel"]
  table = nn.tabulate(_MLP(), jax.random.key(0), console_kwargs={
      "width": 240, "force_terminal": False})(x)
  assert "Reparameterized_0" in table and "float32[3,5]" in table
  assert "Total Parameters: 26" in table  # 3*5 + 5 + 5*1 + 1
  # "*/kernel" selects exactly the latents: reparam turns them into the
  # plain network's weights.
  applied = posconstr.reparam(params, {"*/kernel": posconstr.Softplus()})
  np.testing.assert_allclose(
      _PlainMLP().apply({"params": applied}, x),
      _MLP().apply({"params": params}, x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(applied["out"]["kernel"],
                             softplus(params["out"]["kernel"]), rtol=1e-6)
  # Reparameterized kernels + projected biases in one optimizer.
  tx = optax.chain(optax.sgd(1.0), posconstr.constrain(
      {"*/kernel": None, "*/bias": posconstr.Box(-0.1, 0.1)}))
  grads = jax.tree.map(lambda v: jnp.full_like(v, -3.0), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for layer in ("Reparameterized_0", "out"):
    np.testing.assert_allclose(new[layer]["bias"], 0.1)
    np.testing.assert_allclose(new[layer]["kernel"],
                               params[layer]["kernel"] + 3.0, rtol=1e-6)


def test_shared_wrapper_called_twice_in_setup_parent():
  class Twice(nn.Module):
    def setup(self):
      self.layer = Reparameterized(nn.Dense(4))

    def __call__(self, x):
      return self.layer(self.layer(x))

  x = _x((2, 4))
  variables = jax.jit(Twice().init)(jax.random.key(0), x)
  latents = variables["params"]["layer"]
  dense = nn.Dense(4)
  p = {"params": _applied_params(latents)}
  np.testing.assert_allclose(Twice().apply(variables, x),
                             dense.apply(p, dense.apply(p, x)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["compact", "setup"])
@pytest.mark.parametrize("calls", [2, 3])
def test_init_stores_the_same_latents_however_often_the_wrapper_is_called(
    style, calls):
  # Weight tying: flax's init first runs the module on what earlier calls
  # stored (latents), which must not be inverted a second time.
  def net(n):
    make = lambda: Reparameterized(  # noqa: E731
        nn.Dense(2), kernel=posconstr.Exp(),
        kernel_init=nn.initializers.constant(2.0),
        bias=posconstr.Sigmoid(0.0, 1.0),
        bias_init=nn.initializers.constant(0.9999))

    if style == "compact":
      class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
          layer = make()
          for _ in range(n):
            x = layer(x)
          return x
    else:
      class Net(nn.Module):
        def setup(self):
          self.layer = make()

        def __call__(self, x):
          for _ in range(n):
            x = self.layer(x)
          return x
    return Net()

  x = _x((1, 2))
  once = net(1).init(jax.random.key(0), x)["params"]
  tied = net(calls).init(jax.random.key(0), x)["params"]
  latents = next(iter(tied.values()))
  np.testing.assert_allclose(latents["kernel"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(latents["bias"], math.log(0.9999 / 0.0001),
                             rtol=1e-3)
  jax.tree.map(np.testing.assert_array_equal, tied, once)


def test_other_parameterizations_and_rules():
  x = _x((2, 4))
  layer = Reparameterized(nn.Dense(3), kernel=None,
                          rules={"*": posconstr.Exp()})
  latents = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  applied = {k: np.exp(np.asarray(v, np.float64)).astype(np.float32)
             for k, v in latents.items()}
  np.testing.assert_allclose(layer.apply({"params": latents}, x),
                             nn.Dense(3).apply({"params": applied}, x),
                             rtol=1e-5, atol=1e-6)
  assert all(np.isfinite(np.asarray(v)).all() for v in latents.values())
  box = Reparameterized(nn.Dense(3), bias=posconstr.Sigmoid(-1.0, 1.0),
                        bias_init=nn.initializers.constant(0.5))
  latents = jax.jit(box.init)(jax.random.key(0), x)["params"]
  np.testing.assert_allclose(latents["bias"], math.log(3.0), rtol=1e-5)
  np.testing.assert_allclose(box.apply({"params": latents},
                                       method=box.applied)["bias"], 0.5,
                             rtol=1e-5)


def _init(layer, shape=(2, 4)):
  return layer.init(jax.random.key(0), jnp.ones(shape))


def test_unknown_variable_names_raise():
  with pytest.raises(ValueError, match=r"\['bias'\] match no parameter path"):
    _init(Reparameterized(nn.Dense(3, use_bias=False),
                          bias=posconstr.Softplus()))
  with pytest.raises(ValueError, match=r"'nope'.*'bias', 'kernel'"):
    _init(Reparameterized(nn.Dense(3), rules={"nope": posconstr.Softplus()}))
  with pytest.raises(ValueError, match="nothing to reparameterize"):
    _init(Reparameterized(nn.Dense(3), kernel=None))


def test_constraint_set_instead_of_parameterization_is_a_type_error():
  with pytest.raises(TypeError, match=r"`kernel` must be a parameterization"
                     r".*NonNegative.*Softplus\(\)"):
    _init(Reparameterized(nn.Dense(3), kernel=posconstr.NonNegative()))
  with pytest.raises(TypeError, match=r"`bias` must be a parameterization"):
    _init(Reparameterized(nn.Dense(3), bias=posconstr.Box(0.0, 1.0)))
  with pytest.raises(TypeError, match=r"rules\['kernel'\]"):
    _init(Reparameterized(nn.Dense(3), kernel=None,
                          rules={"kernel": posconstr.NonNegative()}))


def test_initializer_for_a_module_without_that_field_is_a_type_error():
  def embed(**kw):
    return Reparameterized(
        nn.Embed(10, 3), kernel=None,
        rules={"embedding": posconstr.Softplus()}, **kw)
  ids = jnp.zeros((2,), jnp.int32)
  variables = jax.jit(embed().init)(jax.random.key(0), ids)  # fine
  assert np.isfinite(np.asarray(variables["params"]["embedding"])).all()
  with pytest.raises(TypeError, match="`kernel_init` given, but Embed"):
    embed(kernel_init=initializers.icnn()).init(jax.random.key(0), ids)
  with pytest.raises(TypeError, match="`bias_init` given, but Embed"):
    embed(bias_init=nn.initializers.zeros).init(jax.random.key(0), ids)
