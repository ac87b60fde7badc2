"""posconstr.linen.ICNN and posconstr.nnx.ICNN: convex by construction.

The property itself is checked numerically, Jensen's inequality along random
segments (near the data and far off), on freshly initialized and on trained
networks; every check is also run on a network that breaks the constraint,
to show that it can fail. The initialization is compared with the closed
forms of Hoedt & Klambauer's code, linen with NNX on copied params.
"""

import functools
import math

import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import posconstr
from posconstr import initializers
from posconstr.linen import ICNN
from posconstr.nnx import ICNN as NnxICNN

IN = 3
T = jnp.linspace(0.05, 0.95, 7)[None, :, None]  # Points inside each segment.
TOL = 1e-5  # Relative to 1 + |f(a)| + |f(b)|: float32 rounding.



def init_params(model, key, x):
  """``model``'s params, initialized under ``jit``: one compilation instead
  of one per eager operation of the initializers (seconds on CPU)."""
  return jax.jit(model.init)(key, x)["params"]

def segments(seed, n=128, dim=IN):
  """Endpoints: n pairs near the origin and n pairs far off (std 30)."""
  rng = np.random.default_rng(seed)
  scale = np.repeat([1.0, 30.0], n)[:, None]
  a = rng.normal(size=(2 * n, dim)) * scale
  b = rng.normal(size=(2 * n, dim)) * scale
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def convexity_gap(f, a, b):
  """max over segments, t, outputs of (f(mid) - chord) / (1 + |fa| + |fb|)."""
  return float(jnp.max(_gap_terms(f, a, b)))


@functools.lru_cache(maxsize=None)
def _linen_gap(model):
  return jax.jit(lambda params, a, b: jnp.max(_gap_terms(
      lambda x: model.apply({"params": params}, x), a, b)))


def _gap_terms(f, a, b):
  mid = f(T * a[:, None] + (1 - T) * b[:, None])
  fa, fb = f(a)[:, None], f(b)[:, None]
  return (mid - (T * fa + (1 - T) * fb)) / (1 + jnp.abs(fa) + jnp.abs(fb))


def linen_gap(model, params, a, b):
  """``convexity_gap`` of a linen model, compiled once per model."""
  return float(_linen_gap(model)(params, a, b))


# One case in the default run; the other parameterizations behind `slow`.
@pytest.mark.parametrize("positivity,skip", [
    (posconstr.Softplus(), True),
    pytest.param(posconstr.Exp(), False, marks=pytest.mark.slow),
    pytest.param(posconstr.ReLU(), True, marks=pytest.mark.slow),
    pytest.param("project", False, marks=pytest.mark.slow)])
def test_convex_after_init(positivity, skip):
  model = ICNN((16, 16, 2), positivity=positivity, skip=skip)
  params = init_params(model, jax.random.key(0), jnp.ones((1, IN)))
  a, b = segments(1)
  assert linen_gap(model, params, a, b) <= TOL
  applied = model.apply({"params": params}, method="applied_kernels")
  assert all(bool((applied[f"z_{k}"] >= 0).all()) for k in (1, 2))


@pytest.mark.slow
def test_the_check_has_teeth():
  """The same network with one negative z weight is not convex."""
  model = ICNN((16, 16, 1), positivity="project")
  params = init_params(model, jax.random.key(0), jnp.ones((1, IN)))
  params["z_2"]["kernel"] = params["z_2"]["kernel"].at[3, 0].set(-5.0)
  a, b = segments(1)
  assert linen_gap(model, params, a, b) > 1e-2


def _fit(model, tx, params, steps=40):
  """Adam on a concave target, which pushes the z weights negative."""
  x = jax.random.normal(jax.random.key(5), (64, IN)) * 2
  y = -jnp.sum(x**2, axis=-1, keepdims=True)
  return _models.fit_linen_mse(model, tx, params, x, y, steps)


def test_convex_after_training_with_the_projection():
  model = ICNN((16, 16, 1), positivity="project")
  params = init_params(model, jax.random.key(0), jnp.ones((1, IN)))
  tx = optax.chain(optax.adam(0.05), model.projection())
  trained, losses = _fit(model, tx, params)
  assert losses[-1] < losses[0]
  kernels = [trained[f"z_{k}"]["kernel"] for k in (1, 2)]
  # Adam pushed weights out of the set and the projection held them on the
  # bound (the initial ones are > 0).
  assert min(float(k.min()) for k in kernels) == 0.0
  a, b = segments(2)
  assert linen_gap(model, trained, a, b) <= TOL
  # The check has teeth: one negative z weight and it fails.
  trained["z_2"]["kernel"] = trained["z_2"]["kernel"].at[3, 0].set(-5.0)
  assert linen_gap(model, trained, a, b) > 1e-2


@pytest.mark.slow
def test_convex_after_training_reparameterized():
  model = ICNN((16, 16, 1), positivity=posconstr.Softplus(), skip=False)
  params = init_params(model, jax.random.key(0), jnp.ones((1, IN)))
  trained, losses = _fit(model, optax.adam(0.05), params)
  assert losses[-1] < losses[0]
  a, b = segments(3)
  assert linen_gap(model, trained, a, b) <= TOL
  # The same steps on unconstrained z weights leave the set and the
  # trained network is not convex: the constraint is what keeps it so.
  free = ICNN((16, 16, 1), positivity="project", skip=False)
  params = init_params(free, jax.random.key(0), jnp.ones((1, IN)))
  trained, _ = _fit(free, optax.adam(0.05), params)
  assert float(trained["z_2"]["kernel"].min()) < 0.0
  assert linen_gap(free, trained, a, b) > 1e-3


def _to_nnx(nnx_model, linen_params):
  state = nnx.state(nnx_model, nnx.Param)
  nnx.replace_by_pure_dict(state, linen_params)
  nnx.update(nnx_model, state)


@pytest.mark.parametrize("positivity,skip", [
    pytest.param(posconstr.Softplus(), True, marks=pytest.mark.slow),
    ("project", False)])
def test_linen_and_nnx_agree(positivity, skip):
  kw = dict(positivity=positivity, skip=skip, activation=jax.nn.softplus)
  linen_model = ICNN((8, 8, 2), **kw)
  params = init_params(linen_model, jax.random.key(0), jnp.ones((1, IN)))
  nnx_model = NnxICNN(IN, (8, 8, 2), rngs=nnx.Rngs(1), **kw)
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(
      nnx.state(nnx_model, nnx.Param))) == jax.tree.map(jnp.shape, params))
  _to_nnx(nnx_model, params)
  x = jax.random.normal(jax.random.key(2), (16, IN)) * 3
  np.testing.assert_allclose(nnx_model(x),
                             linen_model.apply({"params": params}, x),
                             rtol=1e-6, atol=1e-6)
  linen_kernels = linen_model.apply({"params": params},
                                    method="applied_kernels")
  jax.tree.map(np.testing.assert_array_equal, nnx_model.applied_kernels(),
               linen_kernels)
  if positivity == "project":
    assert nnx_model.constraint_rules() == linen_model.constraint_rules()


def _exp_latent_closed_form(n):
  """Normal latents of exp-parameterized weights (Hoedt & Klambauer's code,
  ``ExponentialPositivity.init_raw_``, rho = 1/2), and the bias shift.

  The code's variance term reads log(10 + t); log(10 pi + t) is the value
  that gives their mean (and the moments of the paper), so it is used here.
  """
  t = n * (2 * math.pi + 3 * math.sqrt(3) - 6) - 3 * math.sqrt(3)
  mean = math.log(6 * math.pi) - math.log(
      n * (4 * math.pi + t) * (10 * math.pi + t)) / 2
  var = math.log(10 * math.pi + t) - math.log(6 * math.pi)
  shift = math.sqrt(3 * n / (4 * math.pi + t))
  return mean, var, shift


@pytest.mark.parametrize("framework", [
    "linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_exp_latents_are_the_matched_normal(framework):
  n, width = 64, 4096  # 262144 draws: standard errors ~2e-3 s.
  if framework == "linen":
    model = ICNN((n, width), positivity=posconstr.Exp(), skip=False)
    params = init_params(model, jax.random.key(0), jnp.ones((1, IN)))
  else:
    model = NnxICNN(IN, (n, width), positivity=posconstr.Exp(), skip=False,
                    rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  latent = np.asarray(params["z_1"]["kernel"], np.float64).ravel()
  mean, var, shift = _exp_latent_closed_form(n)
  se = math.sqrt(var / latent.size)
  assert abs(latent.mean() - mean) < 5 * se
  assert latent.var() == pytest.approx(var, rel=5 * math.sqrt(2 / latent.size))
  np.testing.assert_allclose(params["z_1"]["bias"], -shift, rtol=1e-6)


@pytest.mark.slow
def test_relu_latents_are_the_lognormal_draws():
  """ReLU's matched latents: the applied draws themselves, none dead."""
  relu = ICNN((64, 512), positivity=posconstr.ReLU(), skip=False)
  proj = ICNN((64, 512), positivity="project", skip=False)
  key, x = jax.random.key(3), jnp.ones((1, IN))
  latent = init_params(relu, key, x)["z_1"]["kernel"]
  weights = init_params(proj, key, x)["z_1"]["kernel"]
  np.testing.assert_array_equal(latent, weights)
  assert float(latent.min()) > 0.0
  m = initializers.icnn_moments(64)
  assert float(latent.mean()) == pytest.approx(m.weight_mean, rel=0.02)


@pytest.mark.slow
def test_principled_init_keeps_the_output_scale_with_depth():
  """Hoedt & Klambauer's point: |He| z weights explode with depth."""
  x = jax.random.normal(jax.random.key(4), (256, 16))

  def scale(depth, **kw):
    model = ICNN((64,) * depth + (1,), positivity="project", skip=False, **kw)
    params = init_params(model, jax.random.key(0), x)
    return float(jnp.sqrt(jnp.mean(model.apply({"params": params}, x)**2)))

  he = dict(z_kernel_init=jax.nn.initializers.he_normal())
  assert scale(8) < 10 * scale(2)
  assert scale(8, **he) > 1000 * scale(2, **he)


@pytest.mark.slow
def test_projection_paths_inside_a_parent():
  import flax.linen as nn

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return ICNN((8, 1), positivity="project", name="energy")(
          nn.Dense(IN)(x))

  params = init_params(Model(), jax.random.key(0), jnp.ones((1, IN)))
  inner = ICNN((8, 1), positivity="project")
  assert inner.constrained_paths("energy") == ("energy/z_1/kernel",)
  grads = jax.tree.map(lambda p: -jnp.ones_like(p) * 1e3, params)
  for path in ("energy", "*"):
    tx = inner.projection(path)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["energy"]["z_1"]["kernel"].min()) == 0.0
    assert float(new["Dense_0"]["kernel"].min()) < 0.0  # Untouched.
  with pytest.raises(ValueError, match="z_1/kernel"):
    tx = inner.projection()  # The top-level paths do not exist here.
    tx.init(params)


@pytest.mark.slow
def test_nnx_training_with_the_optimizer_keeps_convexity():
  model = NnxICNN(IN, (8, 8, 1), positivity="project", rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(
      model, optax.chain(optax.adam(0.05), model.projection()), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(5), (64, IN)) * 2
  y = -jnp.sum(x**2, axis=-1, keepdims=True)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y)**2))(model)
    optimizer.update(model, grads)

  for _ in range(20):
    step(model, optimizer)
  kernels = model.applied_kernels()
  assert float(kernels["z_2"].min()) == 0.0
  a, b = segments(6)
  assert convexity_gap(lambda v: model(v), a, b) <= TOL


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(features=()), ValueError, "at least one"),
    (dict(features=(8,)), ValueError, "at least two"),
    (dict(features=(8, 0)), ValueError, r"features\[1\]"),
    (dict(features=8), TypeError, "sequence"),
    (dict(positivity="clip"), ValueError, "'project'"),
    (dict(positivity=posconstr.NonNegative()), TypeError, "parameterization"),
    (dict(positivity=posconstr.Sigmoid(-1.0, 1.0)), ValueError,
     "non-negative"),
    (dict(activation=jnp.tanh), ValueError, "not convex"),
    (dict(activation=jax.nn.gelu), ValueError, "non-decreasing"),
    (dict(activation="relu"), TypeError, "callable"),
    (dict(rho=1.5), ValueError, r"`rho` must be in \(0, 1\)"),
    (dict(skip="yes"), TypeError, "`skip` must be a bool"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
  kwargs = {"features": (8, 1), **kwargs}
  with pytest.raises(error, match=match):
    ICNN(**kwargs)
  features = kwargs.pop("features")
  with pytest.raises(error, match=match):
    NnxICNN(IN, features, rngs=nnx.Rngs(0), **kwargs)


@pytest.mark.parametrize("in_features", [0, 2.5, True])
def test_bad_in_features_is_named(in_features):
  with pytest.raises(ValueError, match=r"`in_features` must be a positive "
                     rf"int, got {in_features!r}\."):
    NnxICNN(in_features, (8, 1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="`in_features`"):
    posconstr.nnx.MonotoneMLP(in_features, (8, 1), (1,), rngs=nnx.Rngs(0))


def test_projection_of_a_reparameterized_icnn_is_an_error():
  with pytest.raises(ValueError, match="nothing to project"):
    ICNN((8, 1)).projection()
  with pytest.raises(ValueError, match="nothing to project"):
    NnxICNN(IN, (8, 1), rngs=nnx.Rngs(0)).constraint_rules()
  with pytest.raises(TypeError, match="`path` must be a str"):
    ICNN((8, 1), positivity="project").projection(path=3)


@pytest.mark.slow
def test_dtypes(x64):
  x = jnp.ones((2, IN), jnp.float64)
  model = ICNN((8, 1), param_dtype=jnp.float64)
  params = init_params(model, jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float64")}
  assert model.apply({"params": params}, x).dtype == jnp.float64
  low = NnxICNN(IN, (8, 1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert low.z_1.kernel[...].dtype == jnp.float32  # Params stay float32.
  assert low(x.astype(jnp.float32)).dtype == jnp.bfloat16


def test_nnx_reparameterize_refuses_the_latents_twice():
  model = NnxICNN(IN, (8, 1), rngs=nnx.Rngs(0))  # z_1/kernel holds latents.
  with pytest.raises(ValueError, match="z_1/kernel` already holds a latent"):
    posconstr.nnx.reparameterize(model, {"*kernel": posconstr.Softplus()})


def test_linen_reparameterized_refuses_the_latents_twice():
  x = jnp.ones((2, 3))
  model = posconstr.linen.ICNN(features=(8, 1), positivity=posconstr.Softplus())
  twice = posconstr.linen.Reparameterized(
      model, kernel=None, rules={"*/kernel": posconstr.Softplus()})
  with pytest.raises(ValueError, match="z_1/kernel` already holds a latent"):
    twice.init(jax.random.key(0), x)
  # The passthrough (x-path) kernels hold plain weights: wrapping them is fine,
  # and so is wrapping an ICNN whose z-path is projected.
  for module, rules in (
      (model, {"x_*/kernel": posconstr.Softplus()}),
      (posconstr.linen.ICNN(features=(8, 1), positivity="project"),
       {"*/kernel": posconstr.Softplus()})):
    wrapped = posconstr.linen.Reparameterized(module, kernel=None, rules=rules)
    assert wrapped.apply(wrapped.init(jax.random.key(0), x), x).shape == (2, 1)
