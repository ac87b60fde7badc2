"""posconstr.linen interop (issue 13): one path rule for every wrapped module,
and no variable reparameterized twice.

References: the *plain* flax module applied with softplus of the latents
(softplus in float64 NumPy), at the paths the plain module uses on its own.
"""

import flax.linen as nn
import jax
import numpy as np
import pytest

import posconstr
from posconstr.linen import NonNegDense
from posconstr.linen import Reparameterized

RULES = {"*kernel": posconstr.Softplus()}


def softplus(z):
  return np.logaddexp(0.0, np.asarray(z, np.float64)).astype(np.float32)


def _x():
  return np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)


def _seq():
  return nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])


def _paths_of(tree):
  return sorted("/".join(str(k.key) for k in p)
                for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _applied(latents):
  return jax.tree_util.tree_map_with_path(
      lambda p, v: softplus(v) if p[-1].key == "kernel" else np.asarray(v),
      latents)


def _shifted(params):
  """Latents moved so that some are well below 0 (softplus far from id)."""
  return jax.tree.map(lambda v: np.asarray(v) - 0.7, params)


def test_sequential_params_have_the_plain_modules_paths():
  # Before: nested under 'module' (module/layers_0/kernel), unlike Dense.
  x = _x()
  wrapped = Reparameterized(_seq(), kernel=None, rules=RULES)
  latents = wrapped.init(jax.random.key(0), x)["params"]
  plain = _seq().init(jax.random.key(0), x)["params"]
  assert _paths_of(latents) == _paths_of(plain) == [
      "layers_0/bias", "layers_0/kernel", "layers_2/bias", "layers_2/kernel"]
  latents = _shifted(latents)
  np.testing.assert_allclose(
      wrapped.apply({"params": latents}, x),
      _seq().apply({"params": _applied(latents)}, x), rtol=1e-5, atol=1e-6)
  # Dense: no level either.
  dense = Reparameterized(nn.Dense(3)).init(jax.random.key(0), x)["params"]
  assert _paths_of(dense) == ["bias", "kernel"]


class CompactParent(nn.Module):

  @nn.compact
  def __call__(self, x):
    # The Dense layers are constructed here, in the parent's compact scope.
    return Reparameterized(_seq(), kernel=None, rules=RULES)(x)


class SetupParent(nn.Module):

  def setup(self):
    self.body = Reparameterized(_seq(), kernel=None, rules=RULES)

  def __call__(self, x):
    return self.body(x)


@pytest.mark.parametrize("parent,prefix", [(CompactParent, "Reparameterized_0"),
                                           (SetupParent, "body")])
def test_sequential_inside_a_parent_is_reparameterized(parent, prefix):
  # Before (compact): the layers escaped to the parent as Dense_0/Dense_1
  # and were not reparameterized at all.
  x = _x()
  params = parent().init(jax.random.key(0), x)["params"]
  assert _paths_of(params) == [f"{prefix}/layers_0/bias",
                               f"{prefix}/layers_0/kernel",
                               f"{prefix}/layers_2/bias",
                               f"{prefix}/layers_2/kernel"]
  params = _shifted(params)
  np.testing.assert_allclose(
      parent().apply({"params": params}, x),
      _seq().apply({"params": _applied(params[prefix])}, x),
      rtol=1e-5, atol=1e-6)


class InnerWrapped(nn.Module):
  """A custom module that already reparameterizes its first layer."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Reparameterized(nn.Dense(3), name="inner")(x))
    return nn.Dense(2, name="head")(x)


def test_reparameterizing_a_latent_twice_is_refused():
  # Before: every case below silently computed g(g(z)).
  x = _x()
  def init(m):
    return m.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"`module` is already a "
                     r"Reparameterized \(of Dense\).*g\(g\(z\)\)"):
    init(Reparameterized(Reparameterized(nn.Dense(3))))
  with pytest.raises(ValueError, match=r"variable `kernel` already holds a "
                     r"latent of a NonNegDense.*rule 'kernel'"):
    init(Reparameterized(NonNegDense(3)))
  with pytest.raises(ValueError, match=r"variable `inner/kernel` already "
                     r"holds a latent of an inner Reparameterized.*"
                     r"rule '\*kernel'"):
    init(Reparameterized(InnerWrapped(), kernel=None, rules=RULES))
  with pytest.raises(ValueError, match=r"`layers_0/kernel` already holds a "
                     r"latent of a NonNegDense"):
    init(Reparameterized(nn.Sequential([NonNegDense(3), nn.Dense(2)]),
                         kernel=None, rules=RULES))


def test_other_variables_of_a_wrapped_latent_holder_are_fine():
  x = _x()
  # NonNegDense's bias is a plain variable: an outer wrapper may take it.
  layer = Reparameterized(NonNegDense(3), kernel=None,
                          bias=posconstr.Exp(),
                          bias_init=nn.initializers.constant(0.5))
  latents = jax.jit(layer.init)(jax.random.key(0), x)["params"]
  np.testing.assert_allclose(latents["bias"], np.log(0.5), rtol=1e-5)
  want = (x.astype(np.float64) @ softplus(latents["kernel"])
          + np.exp(np.asarray(latents["bias"], np.float64)))
  np.testing.assert_allclose(layer.apply({"params": latents}, x), want,
                             rtol=1e-5, atol=1e-6)
  # An outer rule on the head only.
  outer = Reparameterized(InnerWrapped(), kernel=None,
                          rules={"head/kernel": posconstr.Softplus()})
  params = jax.jit(outer.init)(jax.random.key(0), x)["params"]
  assert _paths_of(params) == ["head/bias", "head/kernel", "inner/bias",
                               "inner/kernel"]
  params = _shifted(params)
  h = np.maximum(x @ softplus(params["inner"]["kernel"])
                 + params["inner"]["bias"], 0)
  want = h @ softplus(params["head"]["kernel"]) + params["head"]["bias"]
  np.testing.assert_allclose(outer.apply({"params": params}, x), want,
                             rtol=1e-5, atol=1e-5)
