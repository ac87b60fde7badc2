"""Exponentiated-gradient updates (EGU, EGU±): ``exponentiated_gradient`` and
``multiplicative_update``, checked against numpy closed forms, a two-part
(p, n) reference of EGU±, ``scipy.optimize.nnls`` and the continuous-time
equivalence with gradient descent on ``Square`` (Amid & Warmuth 2020)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import posconstr

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = settings(max_examples=25, deadline=None, database=None)


def run(tx, loss, w0, steps):
  """``steps`` of ``tx`` on ``loss`` from ``w0`` in one ``lax.scan``."""
  def body(carry, _):
    w, state = carry
    updates, state = tx.update(jax.grad(loss)(w), state, w)
    return (optax.apply_updates(w, updates), state), None
  return jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)[0][0]


def quadratic(seed, m=6, n=4):
  rng = np.random.default_rng(seed)
  A, b = rng.standard_normal((m, n)), rng.standard_normal(m)
  return A, b, lambda w: 0.5 * jnp.sum((A @ w - b) ** 2)


# ---------------------------------------------------------- closed forms ----

@pytest.mark.parametrize("use_x64", [False, True])
def test_one_step_is_w_times_exp_of_minus_lr_g(use_x64):
  rng = np.random.default_rng(0)
  w = rng.uniform(0.01, 10.0, 50)
  g = rng.standard_normal(50) * 3
  with jax.enable_x64(use_x64):
    dtype = jnp.float64 if use_x64 else jnp.float32
    tx = posconstr.exponentiated_gradient(0.3)
    wj = jnp.asarray(w, dtype)
    updates, _ = tx.update(jnp.asarray(g, dtype), tx.init(wj), wj)
    new = np.asarray(optax.apply_updates(wj, updates))
  assert new.dtype == dtype
  ref = np.asarray(wj, np.float64) * np.exp(-0.3 * np.asarray(g, np.float64))
  np.testing.assert_allclose(new, ref, rtol=1e-14 if use_x64 else 1e-6)


def test_link_exponentiates_any_incoming_update():
  w = jnp.array([0.5, 2.0, 3.0])
  u = jnp.array([1e-7, -0.7, 2.0])
  tx = posconstr.multiplicative_update()
  state = tx.init(w)
  assert state == posconstr.MultiplicativeState()  # Empty: nothing stored.
  assert isinstance(state, posconstr.ProjectionState)  # Must be last.
  d, _ = tx.update(u, state, w)
  # expm1: the tiny step keeps its digits (w * (exp(u) - 1) would not).
  np.testing.assert_allclose(d, np.float64(w) * np.expm1(np.float64(u)),
                             rtol=1e-6)


def test_signed_matches_a_two_positive_parts_reference():
  """EGU±: numpy keeps p and n (2x the weights); posconstr keeps nothing."""
  A, b, loss = quadratic(3, m=8, n=5)
  beta, lr = 0.5, 0.05
  w0 = np.array([0.3, -0.2, 0.0, 1.5, -1.0])
  p = (w0 + np.sqrt(w0 ** 2 + beta ** 2)) / 2  # p - n = w0, p n = beta^2 / 4
  n = p - w0
  for _ in range(200):
    g = A.T @ (A @ (p - n) - b)
    p, n = p * np.exp(-lr * g), n * np.exp(lr * g)
  with jax.enable_x64(True):
    tx = posconstr.exponentiated_gradient(lr, signed=True, scale=beta)
    w = np.asarray(run(tx, loss, jnp.asarray(w0), 200))
    assert jax.tree.leaves(tx.init(jnp.asarray(w0))) == []  # No (p, n) kept.
  np.testing.assert_allclose(w, p - n, rtol=1e-11, atol=1e-13)
  assert (w > 0).any() and (w < 0).any()  # Signed weights, some flipped.
  assert np.sign(w).tolist() != np.sign(w0).tolist()
  # Least squares without constraints, which EGU± approaches.
  np.testing.assert_allclose(w, np.linalg.lstsq(A, b, rcond=None)[0],
                             atol=0.05)


def test_signed_step_is_hyperbolic_entropy_mirror_descent():
  w = jnp.array([-30.0, -1.0, 0.0, 1e-3, 2.0, 500.0])
  g = jnp.array([0.3, -1.0, 2.0, -0.5, 0.7, 0.01])
  beta, lr = 2.0, 0.4
  tx = posconstr.exponentiated_gradient(lr, signed=True, scale=beta)
  new = optax.apply_updates(w, tx.update(g, tx.init(w), w)[0])
  w64, g64 = np.float64(w), np.float64(g)
  ref = beta * np.sinh(np.arcsinh(w64 / beta) - lr * g64)
  np.testing.assert_allclose(new, ref, rtol=2e-6, atol=1e-7)


# --------------------------------------------------------- positivity ----

DTYPES = [jnp.float16, jnp.bfloat16, jnp.float32]


def _normal_range(dtype):
  """log2 range of weights that stay normal after one largest step."""
  info = jnp.finfo(dtype)
  return math.log2(float(info.tiny)) + 1 - math.log2(4 * float(info.eps)), \
      math.log2(float(info.max)) - 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@given(data=st.data())
def test_weights_stay_positive_and_finite(dtype, data):
  lo, hi = _normal_range(dtype)
  log_w = data.draw(hnp.arrays(np.float64, 16, elements=st.floats(lo, hi)))
  fmax = float(jnp.finfo(dtype).max)
  g = data.draw(hnp.arrays(np.float64, 16, elements=st.floats(-fmax, fmax)))
  w = jnp.asarray(2.0 ** log_w, dtype)
  step = _steps[jnp.dtype(dtype).name]
  new, signed = step(w, jnp.asarray(g, dtype))
  assert new.dtype == dtype and signed.dtype == dtype
  assert bool(jnp.all(new > 0)), (w, g, new)
  assert bool(jnp.all(jnp.isfinite(new))) and bool(jnp.all(jnp.isfinite(
      signed)))


def _make_step():
  egu = posconstr.exponentiated_gradient(1.0)
  egu_pm = posconstr.exponentiated_gradient(1.0, signed=True)

  @jax.jit
  def step(w, g):
    new = optax.apply_updates(w, egu.update(g, egu.init(w), w)[0])
    return new, optax.apply_updates(w, egu_pm.update(g, egu_pm.init(w), w)[0])
  return step


_steps = {jnp.dtype(d).name: _make_step() for d in DTYPES}


@pytest.mark.parametrize("param_dtype, update_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
    (jnp.float16, jnp.bfloat16)])
def test_mixed_dtypes_clip_for_the_coarser_one(param_dtype, update_dtype):
  w = jnp.array([1.0, 3.0, 1e-3], param_dtype)
  u = jnp.array([-jnp.inf, -1e4, -30.0], update_dtype)
  d, _ = posconstr.multiplicative_update().update(u, None, w)
  assert d.dtype == update_dtype
  new = optax.apply_updates(w, d)
  assert new.dtype == param_dtype and bool(jnp.all(new > 0)), new


def test_exponent_is_clipped_and_nan_is_not_hidden():
  w = jnp.array([1.0, 1.0, 4.0, 1e38, 1.0])
  g = jnp.array([jnp.inf, -jnp.inf, 1e30, -1e30, jnp.nan])
  tx = posconstr.exponentiated_gradient(1.0)
  new = np.asarray(optax.apply_updates(w, tx.update(g, tx.init(w), w)[0]))
  limit = math.log(1 / (4 * float(jnp.finfo(jnp.float32).eps)))
  np.testing.assert_allclose(new[:3], [math.exp(-limit), math.exp(limit),
                                       4 * math.exp(-limit)], rtol=1e-6)
  assert np.isfinite(new[3]) and new[3] >= 1e38  # Capped below the max.
  assert np.isnan(new[4])


def test_zeros_are_absorbing_under_jit():
  w0 = jnp.array([0.0, 0.0, 1.0, 2.0])
  tx = posconstr.exponentiated_gradient(0.5)
  state = jax.jit(tx.init)(w0)  # Traced: no check, the update runs.
  grads = jax.random.normal(jax.random.key(0), (20, 4)) * 3

  def body(w, g):
    return optax.apply_updates(w, tx.update(g, state, w)[0]), None
  w = jax.jit(lambda w: jax.lax.scan(body, w, grads)[0])(w0)
  assert w[:2].tolist() == [0.0, 0.0]
  assert bool(jnp.all(w[2:] > 0))
  np.testing.assert_allclose(
      w[2:], w0[2:] * jnp.exp(-0.5 * grads[:, 2:].sum(0)), rtol=1e-5)


# -------------------------------------------------- mirror descent facts ----

def test_continuous_time_equals_gradient_descent_on_square():
  """Amid & Warmuth (2020): EGU at rate eta and GD on z, w = z**2, at rate
  eta / 4 follow one flow; at time 1 they differ by O(eta). Exp does not."""
  _, _, loss = quadratic(1)
  with jax.enable_x64(True):
    w0 = jnp.asarray(np.random.default_rng(1).uniform(0.5, 1.5, 4))

    def latent_gd(g, rate, steps):
      def body(z, _):
        return z - rate * jax.grad(lambda z: loss(g.forward(z)))(z), None
      return g.forward(jax.lax.scan(body, g.inverse(w0), None,
                                    length=steps)[0])

    gaps = []
    for eta in (0.02, 0.01):
      steps = round(1 / eta)
      egu = run(posconstr.exponentiated_gradient(eta), loss, w0, steps)
      square = latent_gd(posconstr.Square(), eta / 4, steps)
      gaps.append(float(jnp.max(jnp.abs(egu - square))))
    exp = latent_gd(posconstr.Exp(), eta, steps)
    exp_gap = float(jnp.max(jnp.abs(egu - exp)))
  assert gaps[1] / gaps[0] == pytest.approx(0.5, abs=0.05)  # O(eta)
  assert gaps[1] < 2e-3
  assert exp_gap > 50 * gaps[1]  # A different flow.


def test_nnls_converges_to_scipy():
  rng = np.random.default_rng(0)
  A = rng.standard_normal((30, 8))
  x_star = np.where(rng.random(8) < 0.5, rng.uniform(0.5, 1.5, 8), 0.0)
  b = A @ x_star + 0.1 * rng.standard_normal(30)
  ref = scipy.optimize.nnls(A, b)[0]
  lr = 1.0 / np.linalg.norm(A, 2) ** 2
  with jax.enable_x64(True):
    x = np.asarray(run(posconstr.exponentiated_gradient(lr),
                       lambda x: 0.5 * jnp.sum((A @ x - b) ** 2),
                       jnp.full(8, 0.5), 4000))
  assert (ref == 0).sum() >= 2
  assert (x > 0).all()  # Never exactly on the bound ...
  np.testing.assert_allclose(x, ref, atol=1e-4)  # ... but as near as NNLS.


# -------------------------------------------------------------- chains ----

def test_adam_direction_is_exponentiated():
  w0 = jnp.array([0.5, 1.0, 2.0])
  grads = [jnp.array([1.0, -2.0, 0.5]), jnp.array([0.3, 0.3, -1.0])]
  tx = optax.chain(optax.adam(0.1), posconstr.multiplicative_update())
  adam = optax.adam(0.1)
  w, state, ref, adam_state = w0, tx.init(w0), np.float64(w0), adam.init(w0)
  for g in grads:  # Adam's step u, then w * exp(u), by hand.
    u, adam_state = adam.update(g, adam_state)
    ref = ref * np.exp(np.float64(u))
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
  np.testing.assert_allclose(w, ref, rtol=1e-6)


def test_link_before_the_learning_rate_is_refused():
  params = {"w": jnp.ones(3)}
  wrong = (optax.scale_by_adam(), posconstr.multiplicative_update(),
           optax.scale(-0.1))
  with pytest.raises(ValueError, match="link 1 is followed by link 2"):
    posconstr.chain(*wrong).init(params)
  with pytest.raises(ValueError, match="link 1 is followed by link 2"):
    posconstr.check_projection_last(optax.chain(*wrong).init(params))
  # A projection after it is fine: the weights stay in [0, 2] and > 0.
  tx = posconstr.chain(optax.sgd(1.0), posconstr.multiplicative_update(),
                       posconstr.project_box(0.0, 2.0))
  grads = {"w": jnp.array([-5.0, 0.1, 30.0])}
  new = optax.apply_updates(params, tx.update(grads, tx.init(params),
                                              params)[0])["w"]
  np.testing.assert_allclose(new, [2.0, math.exp(-0.1), math.exp(-14.556)],
                             rtol=1e-3)


def test_link_after_a_projection_and_projections_to_non_positive_are_refused():
  params = {"w": jnp.array([5.0, 2.0])}
  grads = {"w": jnp.array([-10.0, 1.0])}
  after = (optax.sgd(1.0), posconstr.project_box(0.0, 10.0),
           posconstr.multiplicative_update())
  # It reads the projection's displacement (5) as a log-step: 5 e^5.
  plain = optax.chain(*after)
  new = optax.apply_updates(params, plain.update(grads, plain.init(params),
                                                 params)[0])["w"]
  np.testing.assert_allclose(new[0], 5 * math.exp(5), rtol=1e-5)
  with pytest.raises(ValueError, match="link 1 is followed by link 2"):
    posconstr.chain(*after).init(params)
  with pytest.raises(ValueError, match="link 1 is followed by link 2"):
    posconstr.check_projection_last(plain.init(params))
  # A projection after it that sends weights to <= 0, where no
  # multiplicative step can move them again.
  with pytest.raises(ValueError, match="updated multiplicatively by link 1 "
                     "and projected by link 2"):
    posconstr.chain(optax.sgd(0.1), posconstr.multiplicative_update(),
                    posconstr.project_box(-1.0, -0.5)).init(params)
  posconstr.chain(optax.sgd(0.1), posconstr.multiplicative_update(),
                  posconstr.project(posconstr.MaxNorm(1.0))).init(params)


def test_mask_leaves_other_leaves_additive():
  params = {"layer": {"kernel": jnp.array([1.0, 2.0]),
                      "bias": jnp.array([0.0, -1.0])}}
  grads = {"layer": {"kernel": jnp.array([1.0, 1.0]),
                     "bias": jnp.array([1.0, 1.0])}}
  for mask in ("*/kernel", {"layer": {"kernel": True, "bias": False}},
               lambda p: jax.tree.map(lambda x: bool(jnp.all(x > 0)), p)):
    tx = posconstr.exponentiated_gradient(0.5, mask=mask)
    new = optax.apply_updates(params, tx.update(grads, tx.init(params),
                                                params)[0])["layer"]
    np.testing.assert_allclose(new["kernel"], np.array([1, 2]) * math.exp(
        -0.5), rtol=1e-6)
    assert new["bias"].tolist() == [-0.5, -1.5]


def test_jit_vmap_schedules_and_traced_learning_rates():
  key = jax.random.key(1)
  w = jnp.exp(jax.random.normal(key, (5, 3)))
  g = jax.random.normal(jax.random.fold_in(key, 1), (5, 3))
  tx = posconstr.exponentiated_gradient(0.2)
  state = tx.init(w[0])

  def one(w, g):
    return optax.apply_updates(w, tx.update(g, state, w)[0])
  batched = jax.jit(jax.vmap(one))(w, g)
  np.testing.assert_allclose(batched, np.float64(w) * np.exp(
      -0.2 * np.float64(g)), rtol=1e-6)

  new = batched[0]
  scheduled = posconstr.exponentiated_gradient(optax.constant_schedule(0.2))
  np.testing.assert_allclose(jax.jit(lambda w, g: optax.apply_updates(
      w, scheduled.update(g, scheduled.init(w), w)[0]))(w[0], g[0]), new,
      rtol=1e-6)

  injected = optax.inject_hyperparams(posconstr.exponentiated_gradient)(
      learning_rate=0.2)
  step = jax.jit(lambda s, w, g: injected.update(g, s, w)[0])
  np.testing.assert_allclose(optax.apply_updates(
      w[0], step(injected.init(w[0]), w[0], g[0])), new, rtol=1e-6)
  bad = injected.init(w[0])
  bad.hyperparams["learning_rate"] = jnp.asarray(-0.2)
  assert bool(jnp.all(jnp.isnan(step(bad, w[0], g[0]))))


# --------------------------------------------------------- bad inputs ----

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(learning_rate=0.0), ValueError, "`learning_rate` must be > 0"),
    (dict(learning_rate=-1e-3), ValueError, r"got -0\.001"),
    (dict(learning_rate=math.inf), ValueError, "`learning_rate` must be"),
    (dict(learning_rate=math.nan), ValueError, "`learning_rate` must be"),
    (dict(learning_rate="0.1"), TypeError, "learning_rate"),
    (dict(learning_rate=0.1, scale=0.0), ValueError, "`scale` must be > 0"),
    (dict(learning_rate=0.1, signed=1), TypeError, "`signed` must be a bool"),
    (dict(learning_rate=0.1, mask=3), TypeError, "`mask` must be"),
])
def test_bad_arguments_are_named(kwargs, error, match):
  with pytest.raises(error, match=match):
    posconstr.exponentiated_gradient(**kwargs)


@pytest.mark.parametrize("value", [0.0, -0.5, math.nan, math.inf])
def test_init_refuses_weights_that_are_not_positive(value):
  params = {"dense": {"kernel": jnp.array([[1.0, 3.0], [value, 2.0]])}}
  with pytest.raises(ValueError, match=(
      rf"exponentiated_gradient: parameter `dense/kernel` has 1 of 4 "
      rf".*the first: {value!r} at index \(1, 0\)\).*signed=True")):
    posconstr.exponentiated_gradient(0.1).init(params)
  posconstr.exponentiated_gradient(0.1, signed=True).init(params)  # Any sign.


def test_empty_leaves_are_accepted():
  params = {"w": jnp.ones((0,)), "v": jnp.array([1.0, 2.0])}
  tx = posconstr.exponentiated_gradient(0.1)
  grads = {"w": jnp.ones((0,)), "v": jnp.array([1.0, -1.0])}
  new = optax.apply_updates(params, tx.update(grads, tx.init(params),
                                              params)[0])
  assert new["w"].shape == (0,)
  np.testing.assert_allclose(new["v"], [math.exp(-0.1), 2 * math.exp(0.1)],
                             rtol=1e-6)


def test_misuse_of_update_and_masks():
  tx = posconstr.multiplicative_update(mask="*/count")
  params = {"opt": {"count": jnp.arange(3)}}
  with pytest.raises(TypeError, match="`opt/count` has dtype int32"):
    tx.init(params)
  with pytest.raises(ValueError, match="match no parameter path"):
    posconstr.multiplicative_update(mask="kernel").init({"w": jnp.ones(2)})
  tx = posconstr.multiplicative_update()
  w = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(w, tx.init(w))
  with pytest.raises(ValueError, match="does not match the params"):
    tx.update({"v": jnp.ones(2)}, tx.init(w), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_dtypes_are_kept(dtype):
  w = jnp.array([0.5, 1.0, 3.0], dtype)
  g = jnp.array([1.0, -1.0, 0.25], dtype)
  tx = posconstr.exponentiated_gradient(0.5)
  updates, _ = tx.update(g, tx.init(w), w)
  new = optax.apply_updates(w, updates)
  assert updates.dtype == dtype and new.dtype == dtype
  ref = np.float64(w) * np.exp(-0.5 * np.float64(g))
  np.testing.assert_allclose(np.float64(new), ref,
                             rtol=2 * float(jnp.finfo(dtype).eps))


# ---------------------------------------------------------- benchmark ----

@pytest.mark.slow  # Compiles every method and step size: about a minute.
def test_benchmark_quick_run_writes_its_summary(tmp_path):
  out = tmp_path / "eg.json"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.exponentiated_gradient", "--quick",
       "--out", str(out)], capture_output=True, text=True, timeout=600,
      check=False, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["benchmark"] == "exponentiated_gradient"
  methods = {"egu", "project", "softplus"}
  for row in payload["nnls"]:
    assert set(row["gap"]) == methods
    assert all(math.isfinite(v) and v >= 0 for v in row["gap"].values())
  for row in payload["mlp"]:
    assert len(row["test_accuracies"]) == len(row["grid"]), row
    assert max(row["test_accuracies"]) > 0.5, row
  assert "| MLP on digits" in proc.stdout
