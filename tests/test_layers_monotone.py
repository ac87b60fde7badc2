"""posconstr.linen.MonotoneMLP and posconstr.nnx.MonotoneMLP: monotone by
construction (Runje & Shankaranarayana, ICML 2023).

Derivative signs are checked with ``jax.jacfwd`` on random grids (near the
data and far off), after init and after training on a target that pulls the
other way; the same check fails on a network that breaks the constraint.
The building blocks (activation mix, signed kernels, group sizes) are
property-tested against their closed forms.
"""

import functools

import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import posconstr
from posconstr.layers import _monotone_math
from posconstr.layers import _signed_math
from posconstr.linen import MonotoneMLP
from posconstr.nnx import MonotoneMLP as NnxMonotoneMLP

SIGNS = (1, -1, 0, 1)



def init_params(model, key, x):
  """``model``'s params, initialized under ``jit``: one compilation instead
  of one per eager operation of the initializers (seconds on CPU)."""
  return jax.jit(model.init)(key, x)["params"]

def grid(seed, n=128, dim=len(SIGNS)):
  rng = np.random.default_rng(seed)
  scale = np.repeat([1.0, 20.0], n)[:, None]
  return jnp.asarray(rng.normal(size=(2 * n, dim)) * scale, jnp.float32)


@functools.lru_cache(maxsize=None)
def _jacobian(model):
  def f(params, row):
    return model.apply({"params": params}, row[None])[0, 0]

  return jax.jit(jax.vmap(jax.jacfwd(f, argnums=1), in_axes=(None, 0)))


def input_jacobian(model, params, x):
  """d output / d input at every row of ``x``: (rows, inputs); compiled
  once per model."""
  return _jacobian(model)(params, x)


def assert_signs(jac, signs=SIGNS):
  for i, t in enumerate(signs):
    if t == 1:
      assert float(jac[:, i].min()) >= 0.0, i
    elif t == -1:
      assert float(jac[:, i].max()) <= 0.0, i


@pytest.mark.parametrize("positivity", [
    posconstr.Abs(), pytest.param("project", marks=pytest.mark.slow)])
def test_derivative_signs_after_init(positivity):
  model = MonotoneMLP((16, 16, 1), SIGNS, positivity=positivity)
  x = grid(0)
  params = init_params(model, jax.random.key(0), x[:1])
  jac = input_jacobian(model, params, x)
  assert_signs(jac)
  assert float(jnp.abs(jac[:, 2]).max()) > 0.0  # The free input is used.


@pytest.mark.slow
def test_the_check_has_teeth():
  model = MonotoneMLP((16, 16, 1), SIGNS, positivity="project")
  x = grid(0)
  params = init_params(model, jax.random.key(0), x[:1])
  params["dense_0"]["kernel"] = params["dense_0"]["kernel"].at[0].set(-1.0)
  jac = input_jacobian(model, params, x)
  assert float(jac[:, 0].min()) < 0.0


def _fit(model, tx, params, steps=40):
  """Adam towards a target that decreases in input 0 and increases in 1."""
  x = grid(7, n=32)
  y = (-2.0 * x[:, 0] + 2.0 * x[:, 1] + jnp.sin(x[:, 2]))[:, None]
  return _models.fit_linen_mse(model, tx, params, x, y, steps)


@pytest.mark.parametrize("positivity", [
    pytest.param(posconstr.Abs(), marks=pytest.mark.slow), "project"])
def test_derivative_signs_after_training(positivity):
  model = MonotoneMLP((16, 16, 1), SIGNS, positivity=positivity)
  params = init_params(model, jax.random.key(0), grid(0)[:1])
  tx = optax.adam(0.05)
  if positivity == "project":
    tx = optax.chain(tx, model.projection())
  trained, losses = _fit(model, tx, params)
  assert losses[-1] < losses[0]
  jac = input_jacobian(model, trained, grid(1))
  assert_signs(jac)
  if positivity == "project":  # The sign pattern itself, row by row.
    first = trained["dense_0"]["kernel"]
    assert float(first[0].min()) >= 0 and float(first[1].max()) <= 0
    assert float(first[2].min()) < 0 < float(first[2].max())  # Free row.
    # The target pulls input 0 down: its weights sit on the bound.
    assert float(jnp.mean(first[0] == 0.0)) > 0.0
    # The check has teeth: a negative weight on input 0 and it fails.
    trained["dense_0"]["kernel"] = first.at[0].set(-1.0)
    jac = input_jacobian(model, trained, grid(1))
    assert float(jac[:, 0].min()) < 0.0


def _to_nnx(nnx_model, linen_params):
  state = nnx.state(nnx_model, nnx.Param)
  nnx.replace_by_pure_dict(state, linen_params)
  nnx.update(nnx_model, state)


@pytest.mark.parametrize("positivity", [
    pytest.param(posconstr.Softplus(), marks=pytest.mark.slow), "project"])
def test_linen_and_nnx_agree(positivity):
  kw = dict(positivity=positivity, activation=jax.nn.elu)
  linen_model = MonotoneMLP((8, 8, 2), SIGNS, **kw)
  x = grid(2, n=8)
  params = init_params(linen_model, jax.random.key(0), x[:1])
  nnx_model = NnxMonotoneMLP(len(SIGNS), (8, 8, 2), SIGNS, rngs=nnx.Rngs(1),
                             **kw)
  _to_nnx(nnx_model, params)
  np.testing.assert_allclose(nnx_model(x),
                             linen_model.apply({"params": params}, x),
                             rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, nnx_model.applied_kernels(),
               linen_model.apply({"params": params},
                                 method="applied_kernels"))
  assert nnx_model.constrained_paths("m") == linen_model.constrained_paths("m")


# ------------------------------------------------------ building blocks ----

# Fixed shapes: every new shape would compile the eager ops again.
_FLOATS = hnp.arrays(np.float32, 32, elements=st.floats(
    -50, 50, width=32, allow_subnormal=False))  # XLA:CPU flushes subnormals.


@settings(max_examples=20, deadline=None)
@given(_FLOATS, st.sampled_from([jax.nn.relu, jax.nn.elu, jax.nn.softplus]))
def test_activation_family_closed_forms(x, activation):
  x = np.sort(x)
  convex = np.asarray(activation(jnp.asarray(x)))
  concave = np.asarray(_monotone_math.concave(activation)(jnp.asarray(x)))
  saturated = np.asarray(_monotone_math.saturated(activation)(jnp.asarray(x)))
  np.testing.assert_allclose(concave, -np.asarray(activation(-x)), rtol=1e-6)
  for y in (convex, concave, saturated):  # All non-decreasing.
    assert np.all(np.diff(y) >= -1e-5 * (1 + np.abs(y[1:])))
  # Saturated: bounded by +-(rho(1) - rho(-inf)), whatever the input.
  bound = float(activation(1.0)) - float(activation(-100.0)) + 1e-5
  assert np.all(np.abs(saturated) <= bound)
  if activation is jax.nn.relu:
    # 1 - relu(1 - x) rounds near x = 0: equal up to an ulp of 1.
    np.testing.assert_allclose(saturated, np.clip(x, -1, 1), atol=2e-7)
    np.testing.assert_array_equal(concave, np.minimum(x, 0))


@given(st.integers(1, 300),
       st.tuples(*[st.floats(0, 10)] * 3).filter(lambda w: sum(w) > 0.1))
def test_activation_sizes(units, weights):
  sizes = _monotone_math.activation_sizes(units, weights)
  assert sum(sizes) == units and min(sizes) >= 0
  for size, w in zip(sizes[:2], weights[:2]):
    assert abs(size - units * w / sum(weights)) <= 1.0
  assert _monotone_math.activation_sizes(16, (7, 7, 2)) == (7, 7, 2)


@settings(max_examples=15, deadline=None)
@given(hnp.arrays(np.float32, (5, 3), elements=st.floats(
    -30, 30, width=32, allow_subnormal=False)),
       st.lists(st.sampled_from([-1, 0, 1]), min_size=5, max_size=5))
def test_signed_kernel_and_its_init(latent, signs):
  signs = tuple(signs)
  t = np.asarray(signs)[:, None]
  g = posconstr.Softplus()
  applied = np.asarray(_signed_math.signed_kernel(g, jnp.asarray(latent),
                                                  signs))
  expected = np.where(t == 0, latent,
                      t * np.asarray(g.forward(jnp.asarray(latent))))
  np.testing.assert_allclose(applied, expected, rtol=1e-6)
  # The init stores latents whose applied kernel is t * |v| (v on free rows).
  def init(key, shape, dtype):
    del key, shape
    return jnp.asarray(latent, dtype)

  for positivity in (g, posconstr.Abs(), "project"):
    stored = _signed_math.latent_init(init, positivity, signs)(
        jax.random.key(0), latent.shape, jnp.float32)
    out = np.asarray(_signed_math.signed_kernel(positivity, stored, signs))
    want = np.where(t == 0, latent, t * np.abs(latent))
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- bad input ----

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(monotonicity=(1, 2)), ValueError, r"`monotonicity\[1\]` must be 1"),
    (dict(monotonicity=(1, 0.5)), ValueError, r"`monotonicity\[1\]`"),
    (dict(monotonicity=(True, 0)), ValueError, r"`monotonicity\[0\]`"),
    (dict(monotonicity="1"), TypeError, "flat sequence"),
    (dict(monotonicity=()), ValueError, "must not be empty"),
    (dict(activation_weights=(1, 1)), ValueError, "three non-negative"),
    (dict(activation_weights=(-1, 1, 1)), ValueError, "three non-negative"),
    (dict(activation_weights=(0, 0, 0)), ValueError, "positive sum"),
    (dict(activation=jax.nn.sigmoid), ValueError, "not convex"),
    (dict(features=(4, -1)), ValueError, r"features\[1\]"),
    (dict(positivity=posconstr.Sigmoid(-2.0, 1.0)), ValueError,
     "non-negative"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
  kwargs = {"features": (4, 1), "monotonicity": (1, -1), **kwargs}
  with pytest.raises(error, match=match):
    MonotoneMLP(**kwargs)
  features, monotonicity = kwargs.pop("features"), kwargs.pop("monotonicity")
  with pytest.raises(error, match=match):
    NnxMonotoneMLP(2, features, monotonicity, rngs=nnx.Rngs(0), **kwargs)


def test_monotonicity_of_the_wrong_length():
  model = MonotoneMLP((4, 1), (1, -1, 0))
  with pytest.raises(ValueError, match="3 entries but the input has 4"):
    model.init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="3 entries but the input has 2"):
    NnxMonotoneMLP(2, (4, 1), (1, -1, 0), rngs=nnx.Rngs(0))


def test_scalar_monotonicity_and_rules():
  model = MonotoneMLP((4, 1), -1, positivity="project")
  rules = model.constraint_rules()
  assert rules["dense_0/kernel"] == posconstr.Box(None, 0.0)
  assert rules["dense_1/kernel"] == posconstr.NonNegative()
  free = MonotoneMLP((4, 1), 0, positivity="project")
  assert free.constrained_paths() == ("dense_1/kernel",)
  with pytest.raises(ValueError, match="nothing to project"):
    MonotoneMLP((4, 1), 1).projection()


@pytest.mark.slow
def test_dtypes(x64):
  x = jnp.ones((2, 2), jnp.float64)
  model = MonotoneMLP((4, 1), (1, -1), param_dtype=jnp.float64)
  params = init_params(model, jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("float64")}
  assert model.apply({"params": params}, x).dtype == jnp.float64
  low = NnxMonotoneMLP(2, (4, 1), (1, -1), dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))
  assert low(x.astype(jnp.float32)).dtype == jnp.bfloat16
