"""Projection transforms against hand-written references.

The references are plain Optax followed by ``jnp.maximum`` / ``jnp.clip`` on
the new parameters, and, for the exact-landing property, a brute-force search
over the floats next to ``t - p`` for an update that ``optax.apply_updates``
turns into the projected point.
"""

import _models
import hypothesis
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import posconstr


def _mlp_params(scale=1.0, key=0):
  k0, k1, k2, k3 = jax.random.split(jax.random.key(key), 4)
  return {
      "Dense_0": {"kernel": scale * jax.random.normal(k0, (4, 4)),
                  "bias": scale * jax.random.normal(k1, (4,))},
      "Dense_1": {"kernel": scale * jax.random.normal(k2, (4, 4)),
                  "bias": scale * jax.random.normal(k3, (4,))},
  }


_grads = _models.pushing_grads


def _assert_trees_bit_equal(a, b, msg=""):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b), msg
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype, msg
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=msg)


def _train_against_reference(tx, manual_projection, params, steps=100):
  """Runs ``tx`` and ``adam + manual projection`` side by side, eagerly.

  Both run op by op (no jit), so the Adam updates are computed by the same
  kernels on both sides and any difference comes from the projection.
  Returns the final params and how many coordinates were clipped at least once.
  """
  ref = optax.adam(1e-2)
  p, s = params, tx.init(params)
  q, r = params, ref.init(params)
  clipped = 0
  for i in range(steps):
    g = _grads(i, p)
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    v, r = ref.update(g, r, q)
    stepped = optax.apply_updates(q, v)
    q = jax.tree.map(manual_projection, stepped)
    clipped += sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in
                   zip(jax.tree.leaves(stepped), jax.tree.leaves(q)))
    _assert_trees_bit_equal(p, q, f"step {i}")
  return p, clipped


def test_adam_then_project_nonneg_is_bit_identical_to_manual_maximum():
  tx = optax.chain(optax.adam(1e-2), posconstr.project_nonneg())
  params = _mlp_params(scale=0.05)
  final, clipped = _train_against_reference(
      tx, lambda x: jnp.maximum(x, 0.0), params)
  assert clipped > 100  # The projection was active, not a no-op.
  for leaf in jax.tree.leaves(final):
    assert jnp.all(leaf >= 0)
  assert sum(int(jnp.sum(x == 0)) for x in jax.tree.leaves(final)) > 20


def test_adam_then_project_box_is_bit_identical_to_manual_clip():
  # Bounds given as float32 numbers: Box rounds a bound that float32 cannot
  # hold inwards (see the next test), while jnp.clip rounds it to nearest.
  lo, hi = np.float32(-0.03), np.float32(0.07)
  tx = optax.chain(optax.adam(1e-2), posconstr.project_box(lo, hi))
  params = jax.tree.map(lambda x: jnp.clip(x, lo, hi), _mlp_params(0.05))
  final, clipped = _train_against_reference(
      tx, lambda x: jnp.clip(x, lo, hi), params)
  assert clipped > 100
  leaves = jax.tree.leaves(final)
  assert all(bool(jnp.all((x >= lo) & (x <= hi))) for x in leaves)
  assert sum(int(jnp.sum(x == lo)) for x in leaves) > 20


def test_box_rounds_unrepresentable_bounds_inwards():
  # float32(0.07) > 0.07 and float32(-0.07) < -0.07: jnp.clip with the Python
  # floats leaves points just outside the real box; Box does not.
  assert float(np.float32(0.07)) > 0.07 and float(np.float32(-0.07)) < -0.07
  p = jnp.array([0.1, -0.1], jnp.float32)
  tx = posconstr.project_box(-0.07, 0.07)
  new = optax.apply_updates(p, tx.update(jnp.zeros(2), tx.init(p), p)[0])
  clipped = np.asarray(jnp.clip(p, -0.07, 0.07))
  assert float(new[0]) <= 0.07 and float(new[1]) >= -0.07
  assert new[0] == np.nextafter(clipped[0], np.float32(0))
  assert new[1] == np.nextafter(clipped[1], np.float32(0))


def test_projection_is_not_a_no_op_without_it():
  # Guards the two tests above: plain Adam on these gradients goes negative.
  params = _mlp_params(scale=0.05)
  tx = optax.adam(1e-2)
  s = tx.init(params)
  for i in range(20):
    u, s = tx.update(_grads(i, params), s, params)
    params = optax.apply_updates(params, u)
  assert min(float(jnp.min(x)) for x in jax.tree.leaves(params)) < -0.05


def test_feasible_coordinates_get_their_update_back_unchanged():
  # p in [eps, 2 eps]: t - p is exact (Sterbenz), so p + (t - p) == t.
  p = jnp.array([1.0, 0.125, 2.0, 0.19], jnp.float32)
  u = jnp.array([-0.25, -1.0, 1e-3, -0.5], jnp.float32)
  tx = posconstr.project_nonneg(eps=0.1)
  out, _ = tx.update(u, tx.init(p), p)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[[0, 2]], np.asarray(u)[[0, 2]])
  new = np.asarray(optax.apply_updates(p, out))
  np.testing.assert_array_equal(new[[1, 3]], np.float32([0.1, 0.1]))


def test_nan_in_updates_reaches_the_parameters():
  p = jnp.array([1.0, 1.0])
  u = jnp.array([jnp.nan, -2.0])
  tx = posconstr.project_nonneg()
  new = optax.apply_updates(p, tx.update(u, tx.init(p), p)[0])
  assert np.isnan(new[0]) and new[1] == 0.0


def test_project_with_constraint_object_matches_shorthands():
  p = _mlp_params()
  g = jax.tree.map(lambda x: 3.0 * x, _grads(0, p))
  for short, long in [
      (posconstr.project_nonneg(0.2),
       posconstr.project(posconstr.NonNegative(0.2))),
      (posconstr.project_box(-0.5, 0.25),
       posconstr.project(posconstr.Box(-0.5, 0.25)))]:
    a = short.update(g, short.init(p), p)[0]
    b = long.update(g, long.init(p), p)[0]
    _assert_trees_bit_equal(a, b)


def test_box_with_array_bounds_broadcasts_per_column_like_np_clip():
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)),
                       jnp.float32)
  lower = np.linspace(-1.0, -0.1, 4).astype(np.float32)
  upper = np.linspace(0.1, 1.0, 4).astype(np.float32)
  params = {"k": kernel}
  tx = posconstr.project_box(lower, upper)
  zero = {"k": jnp.zeros_like(kernel)}
  new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
  new = np.asarray(new["k"])
  ref = np.clip(np.asarray(kernel), lower, upper)
  assert np.all((new >= lower) & (new <= upper))
  np.testing.assert_allclose(new, ref, rtol=0, atol=1e-7)
  rep = _representable(np.asarray(kernel), ref, np.float32)
  assert rep.sum() > 10
  np.testing.assert_array_equal(new[rep], ref[rep])
  # The set itself, without the landing step, is exactly np.clip.
  np.testing.assert_array_equal(
      np.asarray(posconstr.Box(lower, upper).project(kernel)), ref)


def test_box_with_per_leaf_bound_tree():
  params = _mlp_params(scale=2.0)
  tx = posconstr.project_box(lower={"Dense_0": 0.0, "Dense_1": None},
                             upper={"Dense_0": None, "Dense_1": 0.5})
  zero = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(zero, tx.init(params), params)[0])
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(
        new["Dense_0"][name], np.maximum(params["Dense_0"][name], 0.0))
    np.testing.assert_array_equal(
        new["Dense_1"][name], np.minimum(params["Dense_1"][name], 0.5))


def test_box_bound_tree_checks_only_the_leaves_it_projects():
  # A scalar lower bound reaches every leaf, the integer counter too; the
  # mask (or the default float-only selection) leaves it alone.
  params = {"w": jnp.array([-1.0, 2.0]), "b": jnp.array([3.0]),
            "step": jnp.array(7)}
  upper = {"w": 1.0, "b": 2.0, "step": None}
  zero = jax.tree.map(jnp.zeros_like, params)
  for mask in (["w", "b"], None):
    tx = posconstr.project_box(0.0, upper, mask=mask)
    new = optax.apply_updates(params,
                              tx.update(zero, tx.init(params), params)[0])
    np.testing.assert_array_equal(new["w"], np.clip([-1.0, 2.0], 0, 1))
    np.testing.assert_array_equal(new["b"], [2.0])
    assert int(new["step"]) == 7


# ------------------------------------------------- exact landing (hypothesis)

_BIG = float(np.float32(3e38))
_SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.1, -0.1, 1e-30, -1e-30, 1e-8, -1e-8,
            3e-8, 1e30, -1e30, 2.0 ** 100, -(2.0 ** 100), 3e38, -3e38]
_values = st.one_of(
    st.sampled_from(_SPECIAL),
    st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    st.floats(-_BIG, _BIG, width=32, allow_subnormal=False))
_N = 12
_vectors = st.lists(_values, min_size=_N, max_size=_N)
_eps = st.one_of(st.sampled_from([0.0, 1e-30, 1e-8, 0.1, 1.0, 3.0, 1e20]),
                 st.floats(1e-30, 1e20, allow_subnormal=False))


def _smallest_at_least(value, dtype):
  """The smallest ``dtype`` number >= ``value`` (numpy / ml_dtypes only)."""
  x = np.asarray(value, dtype)
  inf = np.asarray(np.inf, dtype)
  while float(x) < value:
    x = np.nextafter(x, inf)
  while float(np.nextafter(x, -inf)) >= value and float(x) != 0.0:
    x = np.nextafter(x, -inf)
  return x


def _representable(p, target, dtype):
  """Whether some ``dtype`` update d has ``apply_updates(p, d) == target``.

  {d : fl(p + d) = t} is an interval of reals that contains t - p, so if it
  holds a float it holds one of the floats just below or above t - p.
  """
  exact = np.asarray(target, np.float64) - np.asarray(p, np.float64)
  centre = exact.astype(dtype)
  inf = np.full(centre.shape, np.inf, dtype)
  candidates = [centre]
  up = down = centre
  for _ in range(3):
    up, down = np.nextafter(up, inf), np.nextafter(down, -inf)
    candidates += [up, down]
  pj = jnp.asarray(p)
  hit = np.zeros(centre.shape, bool)
  for c in candidates:
    landed = np.asarray(optax.apply_updates(pj, jnp.asarray(c)))
    hit |= landed == np.asarray(target)
  return hit


def _check_landing(p, u, tx, lo, hi, dtype):
  pj, uj = jnp.asarray(p), jnp.asarray(u)
  d, _ = tx.update(uj, tx.init(pj), pj)
  assert d.dtype == pj.dtype
  new = np.asarray(optax.apply_updates(pj, d))
  stepped = np.asarray(optax.apply_updates(pj, uj))
  manual = stepped
  if lo is not None:
    manual = np.maximum(manual, _smallest_at_least(lo, dtype))
  if hi is not None:
    manual = np.minimum(manual, -_smallest_at_least(-hi, dtype))
  rep = _representable(p, manual, dtype)
  np.testing.assert_array_equal(new[rep], manual[rep])
  # Where the projection does not move p + u, the update comes back as is.
  inactive = manual == stepped
  np.testing.assert_array_equal(np.asarray(d)[inactive], u[inactive])
  return new, manual, rep


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16],
                         ids=["float32", "bfloat16"])
@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(p=_vectors, u=_vectors, eps=_eps)
def test_nonneg_eps_lands_exactly_and_stays_feasible(dtype, p, u, eps):
  p = np.asarray(p, np.float32).astype(dtype)
  u = np.asarray(u, np.float32).astype(dtype)
  tx = posconstr.project_nonneg(eps=eps)
  new, manual, rep = _check_landing(p, u, tx, eps, None, dtype)
  assert np.all(new.astype(np.float64) >= eps), (new, eps)
  if eps == 0.0:
    assert rep.all()  # t - p = -p is always exact.
    np.testing.assert_array_equal(new, manual)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16],
                         ids=["float32", "bfloat16"])
@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(p=_vectors, u=_vectors,
                  bounds=st.tuples(st.floats(-1e6, 1e6), st.floats(0.0, 1e6)))
def test_box_lands_exactly_whenever_representable(dtype, p, u, bounds):
  lo, width = bounds
  hi = lo + width
  p = np.asarray(p, np.float32).astype(dtype)
  u = np.asarray(u, np.float32).astype(dtype)
  lo_d, hi_d = _smallest_at_least(lo, dtype), -_smallest_at_least(-hi, dtype)
  hypothesis.assume(float(lo_d) <= float(hi_d))
  tx = posconstr.project_box(lo, hi)
  new, _, rep = _check_landing(p, u, tx, lo, hi, dtype)
  inside = (new.astype(np.float64) >= lo) & (new.astype(np.float64) <= hi)
  assert inside[rep].all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_landing_is_the_same_under_jit(dtype):
  # XLA may fuse the landing arithmetic with apply_updates (and keep
  # bfloat16 intermediates in float32): the result must not change.
  grid = np.float32([0.0, 1e-30, -1e-30, 1e-3, -1e-3, 0.1, -0.1, 1.0, -1.0,
                     7.0, -7.0, 1e20, -1e20, 3e38, -3e38])
  p, u = (x.ravel() for x in np.meshgrid(grid, grid))
  p, u = jnp.asarray(p, dtype), jnp.asarray(u, dtype)
  for eps in (0.0, 1e-8, 0.1, 3.0):
    tx = posconstr.project_nonneg(eps=eps)

    def step(p, u, tx=tx):
      return optax.apply_updates(p, tx.update(u, tx.init(p), p)[0])

    eager, jitted = step(p, u), jax.jit(step)(p, u)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    assert np.all(np.asarray(jitted).astype(np.float64) >= eps)


# --------------------------------------------------------------- bad input


def test_update_without_params_is_an_error():
  tx = posconstr.project_nonneg()
  p = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"needs the current parameters"):
    tx.update(p, tx.init(p))
  with pytest.raises(ValueError, match=r"needs the current parameters"):
    tx.update(p, tx.init(p), None)


def test_updates_tree_must_match_params():
  tx = posconstr.project_nonneg()
  p = {"w": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"updates tree does not match"):
    tx.update({"w": jnp.ones(2)}, tx.init(p), p)


def test_bad_box_hyperparameters():
  with pytest.raises(ValueError, match=r"`lower` must be <= `upper`"):
    posconstr.project_box(1.0, 0.0)
  with pytest.raises(ValueError, match=r"`lower` must not be NaN"):
    posconstr.project_box(float("nan"), 1.0)
  with pytest.raises(ValueError, match=r"`upper` contains NaN at index \(1,\)"):
    posconstr.project_box(0.0, np.array([1.0, np.nan]))
  with pytest.raises(TypeError, match=r"`lower` must be real"):
    posconstr.Box(1j, 2.0)
  with pytest.raises(ValueError, match=r"`eps` must be >= 0"):
    posconstr.project_nonneg(eps=-0.1)
  with pytest.raises(TypeError, match=r"`eps` must be a real number"):
    posconstr.project_nonneg(eps="0.1")
  # Per-leaf bounds are checked at init and name the parameter.
  p = {"a": jnp.ones(2), "b": jnp.ones(2)}
  tx = posconstr.project_box(lower={"a": 0.0, "b": 2.0}, upper=1.0)
  with pytest.raises(ValueError, match=r"parameter `b`.*`lower` must be <="):
    tx.init(p)
  # A complex scalar or a string is not taken for a bound tree: it fails at
  # construction.
  with pytest.raises(TypeError, match=r"`lower` must be real"):
    posconstr.project_box(1j, 2.0)
  with pytest.raises(TypeError, match=r"`upper` must be a number"):
    posconstr.project_box(0.0, "a")


def test_box_bound_shape_that_does_not_broadcast_names_the_path():
  p = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
  tx = posconstr.project_box(np.zeros(2), None)
  with pytest.raises(ValueError,
                     match=r"`lower` of shape \(2,\) does not broadcast to "
                     r"parameter `layer/bias` of shape \(3,\)"):
    tx.init(p)
  tx = posconstr.project_box(0.0, {"layer": {"kernel": np.ones(3),
                                             "bias": np.ones(4)}})
  with pytest.raises(ValueError,
                     match=r"`upper` of shape \(4,\).*`layer/bias`"):
    tx.init(p)
  tx = posconstr.project_box({"layer": {"kernel": 0.0}}, None)
  with pytest.raises(ValueError, match=r"`lower` tree is not a prefix"):
    tx.init(p)


def test_non_constraint_passed_to_project():
  with pytest.raises(TypeError, match=r"`constraint` must be a constraint set"):
    posconstr.project(jnp.maximum)
  with pytest.raises(TypeError, match=r"got 'nonneg' of type str"):
    posconstr.project("nonneg")
  with pytest.raises(TypeError, match=r"must be a constraint set"):
    posconstr.project(posconstr.NonNegative)  # the class, not an instance


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_bound_finer_than_the_grid_lands_on_the_nearest_reachable_value(dtype):
  """From p = 1 no update reaches 1e-8: every p + d below 1 is a multiple of
  the spacing just below 1 (``finfo.epsneg``); the smallest multiple >= eps
  is where the documented landing puts it (5.96e-8 in float32)."""
  eps = 1e-8
  p = {"w": jnp.ones(1, dtype)}
  tx = optax.chain(optax.sgd(1.0), posconstr.project_nonneg(eps))
  u, _ = tx.update({"w": jnp.full(1, 5.0, dtype)}, tx.init(p), p)
  landed = float(optax.apply_updates(p, u)["w"][0])
  spacing = float(jnp.finfo(dtype).epsneg)
  assert landed == np.ceil(eps / spacing) * spacing
  assert landed >= eps
