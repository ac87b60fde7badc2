"""``revive_dead``: stalled latents come back, pinned ones stay, checked
against closed-form latents (``log(expm1(w))``, ``logit``), a numpy
reference of the stalled test, and plain Adam on the same problems."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import posconstr

SETTINGS = settings(max_examples=30, deadline=None, database=None)
SOFTPLUS = posconstr.Softplus()


def trajectory(tx, loss, z0, steps):
  """Latents, counters and revivals after each of ``steps`` (one scan)."""
  def body(carry, _):
    z, state = carry
    updates, state = tx.update(jax.grad(loss)(z), state, z)
    z = optax.apply_updates(z, updates)
    return (z, state), (z, getattr(state, "stalled_steps", None),
                        getattr(state, "revivals", None))
  _, out = jax.jit(lambda z: jax.lax.scan(body, (z, tx.init(z)), None,
                                          length=steps))(z0)
  return jax.tree.map(np.asarray, out)


def jitted(tx):
  """``(init, update)`` of ``tx``, compiled once each."""
  return jax.jit(tx.init), jax.jit(tx.update)


# ------------------------------------------------------ the closed forms ----

def test_stalled_softplus_latent_is_revived_and_reaches_the_optimum():
  # L = sum (softplus(z) - c)^2 / 2. c = 2: the optimum is w = 2, z =
  # log(expm1(2)); c = -1 lies below the range: w = 0 is best, the latent
  # is pinned (the loss wants it smaller) and must be left alone.
  c = jnp.array([2.0, -1.0])

  def loss(z):
    return 0.5 * jnp.sum((SOFTPLUS.forward(z) - c) ** 2)

  z0 = jnp.array([-30.0, -30.0])  # w = 9e-14: dead
  lr, patience, steps = 0.05, 10, 400

  plain, _, _ = trajectory(optax.adam(lr), loss, z0, steps)
  # Plain Adam: dL/dz = 1e-13 * (w - 2), far below Adam's eps = 1e-8.
  assert np.logaddexp(0.0, plain[-1, 0]) < 1e-10

  tx = posconstr.revive_dead(optax.adam(lr), SOFTPLUS, patience=patience)
  z, counts, revivals = trajectory(tx, loss, z0, steps)
  np.testing.assert_array_equal(counts[:patience - 1, 0],
                                np.arange(1, patience))
  assert counts[patience - 1, 0] == 0 and revivals[patience - 1] == 1
  # Revived to the latent of the floor 0.01, the weight moved by <= 0.01.
  np.testing.assert_allclose(z[patience - 1, 0], np.log(np.expm1(0.01)),
                             rtol=1e-6)
  np.testing.assert_allclose(z[-1, 0], np.log(np.expm1(2.0)), atol=2e-3)
  # The pinned latent: never counted, never revived.
  assert not counts[:, 1].any() and revivals[-1] == 1
  assert z[-1, 1] <= -30.0
  # Adam's kept state: after the revival no step exceeds its usual bound
  # (1 - b1) / sqrt(1 - b2) ~ 3.16 lr.
  moves = np.abs(np.diff(z[patience - 1:, 0]))
  assert moves.max() <= 3.17 * lr


def test_counter_counts_consecutive_stalled_steps_and_resets():
  # sgd(0): the latent moves only when revived; the gradient is chosen.
  init, update = jitted(
      posconstr.revive_dead(optax.sgd(0.0), SOFTPLUS, patience=4))
  z = jnp.array([-20.0])
  state = init(z)
  seen = []
  for grad in [-1.0, -1.0, -1.0, 1.0, -1.0, 0.0, -1.0, -1.0, -1.0]:
    updates, state = update(jnp.array([grad]), state, z)
    seen.append(int(state.stalled_steps[0]))
    assert float(updates[0]) == 0.0
  # + (pinned) and 0 (unknown sign, probe=False) reset the counter.
  assert seen == [1, 2, 3, 0, 1, 0, 1, 2, 3]
  updates, state = update(jnp.array([-1.0]), state, z)
  assert int(state.stalled_steps[0]) == 0 and int(state.revivals) == 1
  np.testing.assert_allclose(z + updates, np.log(np.expm1(0.01)), rtol=1e-6)


def test_sigmoid_is_revived_at_both_ends_by_a_fraction_of_its_width():
  g = posconstr.Sigmoid(-2.0, 3.0)  # width 5: floor 0.01 -> 0.05
  init, update = jitted(posconstr.revive_dead(optax.sgd(0.0), g, patience=2))
  z = jnp.array([-20.0, 20.0, -20.0, 20.0, 0.0])
  # dL/dz = g' dL/dw with g' > 0. Lower end: dL/dw < 0 wants it up;
  # upper end: dL/dw > 0 wants it down. The last two are pinned; the
  # middle one is alive.
  grads = jnp.array([-1e-9, 1e-9, 1e-9, -1e-9, -1.0])
  state = init(z)
  for _ in range(2):
    updates, state = update(grads, state, z)
  new = np.asarray(jax.jit(g.forward)(z + updates), np.float64)
  np.testing.assert_allclose(new[:2], [-1.95, 2.95], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(z + updates)[:2],
                             [scipy.special.logit(0.01),
                              scipy.special.logit(0.99)], rtol=1e-5)
  np.testing.assert_array_equal(updates[2:], 0.0)
  assert int(state.revivals) == 2


PARAMETERIZATIONS = {"softplus": SOFTPLUS, "exp": posconstr.Exp(),
                     "sigmoid": posconstr.Sigmoid(-2.0, 3.0),
                     "relu": posconstr.ReLU()}


def _one_step(name):
  """A compiled first step (patience 1): updates, revivals, new weights."""
  g = PARAMETERIZATIONS[name]
  tx = posconstr.revive_dead(optax.sgd(0.0), g, patience=1,
                             probe=name == "relu")

  @jax.jit
  def update(grad, z):
    updates, state = tx.update(grad, tx.init(z), z)
    return updates, state.revivals, g.forward(z + updates)
  return update


ONE_STEP = {name: _one_step(name) for name in PARAMETERIZATIONS}


@SETTINGS
@given(st.lists(st.integers(-160, 160), min_size=12, max_size=12),
       st.lists(st.sampled_from([-1.0, -1e-6, 0.0, 1e-6, 1.0]),
                min_size=12, max_size=12),
       st.sampled_from(["softplus", "exp", "sigmoid", "relu"]))
def test_revives_exactly_the_numpy_reference(quarters, signs, name):
  # Latents on a grid of 0.25: no latent lies within rounding of the
  # thresholds (dead: g' = 1e-3 at z = -6.907; near: w = 0.01 at -4.6).
  z = np.asarray(quarters, np.float64) / 4
  grad = np.asarray(signs)
  w, slope, lower, upper, unit = {
      "softplus": (np.logaddexp(0, z), scipy.special.expit(z), 0.0, None,
                   1.0),
      "exp": (np.exp(z), np.exp(z), 0.0, None, 1.0),
      "sigmoid": (-2 + 5 * scipy.special.expit(z),
                  5 * scipy.special.expit(z) * scipy.special.expit(-z),
                  -2.0, 3.0, 5.0),
      "relu": (np.maximum(z, 0), (z > 0) * 1.0, 0.0, None, 1.0),
  }[name]
  at_lower = upper is None or (w - lower <= upper - w)
  gap = np.where(at_lower, w - lower, np.inf if upper is None else upper - w)
  dead, near = slope < 1e-3 * unit, gap < 0.01 * unit
  sign_w = np.sign(grad) * np.sign(slope)  # the sign of dL/dw
  wants_out = np.where(at_lower, sign_w < 0, sign_w > 0)
  probe = name == "relu"
  expected = dead & near & (wants_out | (probe & (sign_w == 0)))

  zj = jnp.asarray(z, jnp.float32)
  updates, revivals, landed = ONE_STEP[name](jnp.asarray(grad, jnp.float32),
                                             zj)
  revived = np.asarray(updates) != 0
  np.testing.assert_array_equal(revived, expected)
  assert int(revivals) == expected.sum()
  moved = np.asarray(landed, np.float64)[revived]
  target = np.where(at_lower, lower + 0.01 * unit,
                    np.nan if upper is None else upper - 0.01 * unit)
  # Exact up to the rounding of z + step: an ulp of z, times g' <= unit.
  atol = 2.0 ** -22 * np.abs(z).max() * unit
  np.testing.assert_allclose(moved, np.broadcast_to(target, z.shape)[revived],
                             rtol=1e-5, atol=atol)
  assert np.all(np.abs(moved - w[revived]) <= 0.01 * unit * (1 + 1e-5) + atol)


# ------------------------------------------------------------------ ReLU ----

def test_relu_needs_probe_and_probing_brings_back_a_wanted_weight():
  relu = posconstr.ReLU()
  with pytest.raises(ValueError, match=r"ReLU\(\).*exactly 0.*probe=True"):
    posconstr.revive_dead(optax.adam(0.1), relu)

  def loss(z):
    return 0.5 * jnp.sum((relu.forward(z) - 1.0) ** 2)

  z0 = jnp.array([-1.0])
  plain, _, _ = trajectory(optax.adam(0.1), loss, z0, 200)
  assert np.all(plain == -1.0)  # no gradient at all: never moves
  tx = posconstr.revive_dead(optax.adam(0.1), relu, patience=5, probe=True)
  z, _, revivals = trajectory(tx, loss, z0, 200)
  np.testing.assert_allclose(z[4], 0.01, rtol=1e-6)
  np.testing.assert_allclose(z[-1], 1.0, atol=1e-2)  # w = z = 1 optimum
  assert revivals[-1] == 1


def test_relu_probe_of_a_weight_the_loss_wants_at_zero_dies_again():
  relu = posconstr.ReLU()

  def loss(z):
    return jnp.sum(relu.forward(z))  # wants w = 0

  tx = posconstr.revive_dead(optax.adam(0.01), relu, patience=5, probe=True)
  z, _, revivals = trajectory(tx, loss, jnp.array([-1.0]), 60)
  w = np.maximum(z[:, 0], 0.0)
  assert w.max() <= 0.01 * (1 + 1e-6)  # never more than the floor
  assert w[-1] == 0.0 or revivals[-1] >= 3
  assert revivals[-1] >= 3  # revived, died, revived, ...


# ------------------------------------------------ leaves, dtypes, state ----

def _tree():
  return {"w": jnp.array([[-30.0, 1.0], [-30.0, 2.0]]),
          "s": jnp.array([20.0, 0.0]),
          "b": jnp.array([-30.0, 5.0])}


def _rules():
  return {"w": SOFTPLUS, "s": posconstr.Sigmoid(0.0, 1.0), "b": None}


def test_state_shapes_and_unselected_leaves_pass_through():
  params = _tree()
  tx = posconstr.revive_dead(optax.sgd(0.0), _rules(), patience=1)
  state = jax.jit(tx.init)(params)
  assert state.stalled_steps["b"] == optax.MaskedNode()
  for path in ("w", "s"):
    assert state.stalled_steps[path].shape == params[path].shape
    assert state.stalled_steps[path].dtype == jnp.int32
  assert state.revivals.shape == () and state.revivals.dtype == jnp.int32
  grads = {"w": -jnp.ones((2, 2)), "s": jnp.ones(2), "b": -jnp.ones(2)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_array_equal(updates["b"], 0.0)  # not selected
  assert int(state.revivals) == 3  # two w at -30, s at its upper end
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: jnp.zeros(p.shape, jnp.int8), state,
      transform_non_params=lambda v: v)
  assert mapped.stalled_steps["w"].dtype == jnp.int8


def test_traced_hyperparameters_match_concrete_ones_under_jit():
  params = _tree()
  grads = {"w": -jnp.ones((2, 2)), "s": jnp.ones(2), "b": jnp.ones(2)}

  def run(patience, floor, tol):
    tx = posconstr.revive_dead(optax.adam(0.1), _rules(), patience=patience,
                               floor=floor, tol=tol)
    state, p = tx.init(params), params
    for _ in range(2):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p, state

  concrete = jax.jit(lambda: run(2, 0.05, 1e-3))()
  traced = jax.jit(run)(jnp.int32(2), jnp.float32(0.05), jnp.float32(1e-3))
  jax.tree.map(np.testing.assert_array_equal, concrete, traced)
  # Revived on the second step to the latent of 0.05 (upper end of s: 0.95).
  np.testing.assert_allclose(concrete[0]["w"][:, 0], np.log(np.expm1(0.05)),
                             rtol=1e-6)
  np.testing.assert_allclose(concrete[0]["s"][0], scipy.special.logit(0.95),
                             rtol=1e-6)
  assert int(concrete[1].revivals) == 3


@pytest.mark.parametrize("dtype", [
    pytest.param(jnp.float16, marks=pytest.mark.slow), jnp.bfloat16,
    pytest.param(jnp.float32, marks=pytest.mark.slow)])
def test_dtypes_are_kept_per_leaf(dtype):
  params = {"low": jnp.full((3,), -30.0, dtype),
            "wide": jnp.full((2,), -30.0, jnp.float32)}
  init, update = jitted(
      posconstr.revive_dead(optax.sgd(0.0), SOFTPLUS, patience=1))
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
  updates, state = update(grads, init(params), params)
  new = optax.apply_updates(params, updates)
  for path in params:
    assert updates[path].dtype == new[path].dtype == params[path].dtype
    assert state.stalled_steps[path].dtype == jnp.int32
  # Two ulps of the latent log(expm1(0.01)) = -4.6 (w'/w ~ 1 there).
  rtol = 2 * 4.6 * float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(SOFTPLUS.forward(new["low"]),
                                        np.float64), 0.01, rtol=rtol)


@pytest.mark.slow
def test_float64(x64):
  z = jnp.array([-30.0], jnp.float64)
  init, update = jitted(
      posconstr.revive_dead(optax.sgd(0.0), SOFTPLUS, patience=1))
  updates, _ = update(-jnp.ones_like(z), init(z), z)
  assert updates.dtype == jnp.float64
  np.testing.assert_allclose(z + updates, np.log(np.expm1(0.01)), rtol=1e-14)


def test_nan_latents_and_gradients_are_never_revived():
  init, update = jitted(
      posconstr.revive_dead(optax.sgd(1.0), SOFTPLUS, patience=1))
  z = jnp.array([jnp.nan, -30.0, -30.0])
  updates, state = update(jnp.array([-1.0, jnp.nan, -1.0]), init(z), z)
  # Inner's steps: 1 for the NaN latent (it stays NaN), NaN for the NaN
  # gradient; only the third is revived.
  assert float(updates[0]) == 1.0 and np.isnan(updates[1])
  np.testing.assert_array_equal(state.stalled_steps, [0, 0, 0])
  assert int(state.revivals) == 1


# -------------------------------------------------------- bad arguments ----

@pytest.mark.parametrize("kwargs, error, match", [
    ({"patience": 0}, ValueError, r"`patience` must be >= 1.*got 0"),
    ({"patience": 2.5}, TypeError, r"`patience` must be an int.*2\.5"),
    ({"patience": True}, TypeError, r"`patience` must be an int"),
    ({"floor": 0.0}, ValueError, r"`floor` must be > 0, got 0\.0"),
    ({"tol": -1.0}, ValueError, r"`tol` must be > 0, got -1\.0"),
    ({"probe": "yes"}, TypeError, r"`probe` must be True or False"),
    ({"floor": 1e-4}, ValueError, r"`floor`=0\.0001 is too small.*still be "
     r"dead"),
    ({"rules": posconstr.Sigmoid(), "floor": 0.5}, ValueError,
     r"`floor` must be < 0\.5"),
    ({"rules": posconstr.NonNegative()}, TypeError, r"parameterization"),
    ({"inner": "adam"}, TypeError, r"`inner` must be an Optax optimizer"),
])
def test_bad_arguments_raise_at_construction(kwargs, error, match):
  args = {"inner": optax.adam(0.1), "rules": posconstr.Exp()}
  args.update(kwargs)
  with pytest.raises(error, match=match):
    posconstr.revive_dead(args.pop("inner"), args.pop("rules"), **args)


def test_a_range_without_a_bound_and_missing_params_raise():
  class Cube(posconstr.Parameterization):
    constraint = posconstr.Box(None, None)

    def forward_map(self, z):
      return z ** 3

    def inverse_map(self, w):
      return jnp.cbrt(w)

  with pytest.raises(ValueError, match=r"interval range with a finite bound"):
    posconstr.revive_dead(optax.adam(0.1), Cube())
  tx = posconstr.revive_dead(optax.adam(0.1), SOFTPLUS)
  z = jnp.zeros(2)
  with pytest.raises(ValueError, match=r"needs the current parameters"):
    tx.update(z, tx.init(z))
