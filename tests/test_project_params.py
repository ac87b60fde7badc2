"""project_params: the pure, whole-tree projection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"Dense_0": {"kernel": jax.random.normal(k1, (5, 3)),
                      "bias": jax.random.normal(k2, (3,))},
          "step": jnp.arange(3)}


def test_matches_numpy_per_leaf_with_rules():
  params = _params()
  out = posconstr.project_params(params, {
      "*/kernel": posconstr.MaxNorm(0.5, axis=0),
      "*/bias": posconstr.Box(-0.125, 0.125)})
  kernel = np.asarray(params["Dense_0"]["kernel"])
  norms = np.linalg.norm(kernel, axis=0, keepdims=True)
  expected = kernel * np.minimum(1.0, 0.5 / norms)
  np.testing.assert_allclose(out["Dense_0"]["kernel"], expected, rtol=1e-6)
  np.testing.assert_array_equal(
      out["Dense_0"]["bias"],
      np.clip(np.asarray(params["Dense_0"]["bias"]), -0.125,
              0.125))
  assert out["step"] is params["step"]


def test_mask_form_and_jit_agree_with_the_transform():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  grads["step"] = jnp.zeros(3, int)
  tx = optax.chain(optax.sgd(0.3), posconstr.project_nonneg(mask="*/kernel"))
  updates, _ = tx.update(grads, tx.init(params), params)
  via_transform = optax.apply_updates(params, updates)
  stepped = optax.apply_updates(
      params, optax.sgd(0.3).update(grads, optax.sgd(0.3).init(params))[0])
  by_hand = jax.jit(lambda p: posconstr.project_params(
      p, posconstr.NonNegative(), mask="*/kernel"))(stepped)
  for a, b in zip(jax.tree.leaves(via_transform), jax.tree.leaves(by_hand)):
    np.testing.assert_array_equal(a, b)


def test_python_number_leaves_with_an_optax_tree_projection():
  params = {"a": jnp.array([-1.0, 2.0]), "f": -2.0}
  for projection in (optax.projections.projection_non_negative,
                     posconstr.NonNegative()):
    out = posconstr.project_params(params, projection, mask=["a", "f"])
    np.testing.assert_array_equal(out["a"], [0.0, 2.0])
    assert float(out["f"]) == 0.0


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"match no parameter path"):
    posconstr.project_params(_params(), posconstr.NonNegative(), mask="nope")
  with pytest.raises(TypeError, match=r"`constraint` must be a constraint set"):
    posconstr.project_params(_params(), posconstr.Softplus())


def test_after_apply_updates_is_where_the_box_transform_lands():
  # project(Box) lands on P(p + u) wherever some float update can (the
  # clipped point or its one-ulp neighbour lands there), else next to it,
  # inside; project_params after apply_updates is P(p + u) itself.
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(0, 1.5, 4000), jnp.float32)}
  updates = {"w": jnp.asarray(rng.normal(0, 1.0, 4000), jnp.float32)}
  box = posconstr.Box(-1.0, 1.0)
  tx = posconstr.project(box)
  landed = optax.apply_updates(params, tx.update(updates, tx.init(params),
                                                 params)[0])["w"]
  direct = jax.jit(posconstr.project_params, static_argnums=1)(
      optax.apply_updates(params, updates), box)["w"]
  p, t = np.asarray(params["w"]), np.asarray(direct)
  d = (t - p).astype(np.float32)
  toward = np.where((p + d).astype(np.float32) < t, np.inf, -np.inf)
  nudged = np.nextafter(d, toward.astype(np.float32))
  reachable = ((p + d).astype(np.float32) == t) | (
      (p + nudged).astype(np.float32) == t)
  landed = np.asarray(landed)
  np.testing.assert_array_equal(landed[reachable], t[reachable])
  assert (~reachable).any() and (np.abs(landed) <= 1).all()
  gap = np.abs(landed - t)[~reachable]
  assert (gap > 0).all() and (gap <= np.spacing(np.float32(1))).all()
