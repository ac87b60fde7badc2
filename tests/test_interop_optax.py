"""Interop with Optax: mask forms, non-array leaves, ``tree_map_params`` and
Optax's own projection functions (issue 13, section 1).

A callable pytree class stands in for an ``eqx.Module`` here (equinox's own
types are tested in ``test_equinox.py``). References: ``max(p + u, 0)`` by
hand in NumPy, and Optax's projections applied to ``p + u`` directly.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
  """A callable pytree with a function leaf, like an unfiltered eqx.Linear."""

  weight: object
  bias: object
  activation: object

  def __call__(self, x):
    return self.activation(self.weight @ x + self.bias)


def _layer():
  rng = np.random.default_rng(0)
  return Layer(jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
               jnp.asarray(rng.normal(size=3), jnp.float32), jax.nn.relu)


def _step(tx, params, updates):
  out, _ = tx.update(updates, tx.init(params), params)
  return optax.apply_updates(params, out)


def _neg(params):
  """Float arrays pushed below 0; every other leaf as it is."""
  return jax.tree.map(
      lambda x: -2.0 - jnp.abs(x) if hasattr(x, "dtype")
      and jnp.issubdtype(x.dtype, jnp.floating) else x, params)


# ------------------------------------------------------------- mask forms


def test_callable_bool_pytree_mask_is_a_tree_not_a_function():
  # Before: the mask was called as a function (`TypeError: unsupported
  # operand type(s) for @: 'bool' and 'Layer'`).
  params = _layer()
  mask = Layer(True, False, False)
  assert callable(mask)
  new = posconstr.project_params(_neg(params), posconstr.NonNegative(),
                                 mask=mask)
  np.testing.assert_array_equal(new.weight, 0.0)
  np.testing.assert_array_equal(new.bias, _neg(params).bias)
  assert new.activation is jax.nn.relu
  # The same mask through the optax link, and as what a mask function returns.
  trainable = Layer(params.weight, params.bias, None)
  for m in (mask, lambda p: mask):
    tx = posconstr.project_nonneg(mask=m)
    out = _step(tx, trainable, jax.tree.map(lambda x: -10.0 + 0 * x,
                                            trainable))
    np.testing.assert_array_equal(out.weight, 0.0)
    np.testing.assert_array_equal(out.bias, params.bias - 10.0)


def test_mask_none_leaves_non_array_leaves_alone():
  # Before: `TypeError: Cannot determine dtype of <custom_jvp ...>`.
  tree = {"layer": _layer(), "steps": 3, "scale": 0.5, "name": "mlp",
          "count": jnp.array([2, -1])}
  new = posconstr.project_params(_neg(tree), posconstr.NonNegative())
  np.testing.assert_array_equal(new["layer"].weight, 0.0)
  np.testing.assert_array_equal(new["layer"].bias, 0.0)
  assert new["layer"].activation is jax.nn.relu
  # Python numbers are not arrays: left alone (eqx.is_inexact_array).
  assert new["steps"] == 3 and new["scale"] == 0.5 and new["name"] == "mlp"
  np.testing.assert_array_equal(new["count"], [2, -1])
  # Patterns and rules only see parameters; a catch-all skips the function.
  new = posconstr.project_params(_neg(tree), posconstr.NonNegative(),
                                 mask="layer/*")
  assert new["layer"].activation is jax.nn.relu
  tx = posconstr.constrain({"layer/activation": posconstr.NonNegative()})
  with pytest.raises(ValueError, match=r"\['layer/activation'\] match no "
                     r"parameter path.*'count', 'layer/weight', 'layer/bias', "
                     r"'scale', 'steps'\]"):
    tx.init(tree)


# ------------------------------------------------------ tree_map_params


@pytest.mark.parametrize("make", [
    lambda: optax.chain(optax.adam(0.1), posconstr.project_nonneg(mask="*w")),
    lambda: optax.chain(optax.adam(0.1), posconstr.constrain(
        {"w": posconstr.NonNegative(), "b": None})),
    lambda: posconstr.projected(optax.adam(0.1), posconstr.NonNegative(),
                                mask="w"),
    lambda: optax.chain(optax.adam(0.1), posconstr.project_box(
        {"w": 0.0, "b": -1.0}, 1.0)),
    lambda: optax.chain(optax.adam(0.1), posconstr.project(
        optax.projections.projection_non_negative, mask="w")),
], ids=["project_nonneg", "constrain", "projected", "project_box-tree",
        "optax-function"])
def test_tree_map_params_accepts_the_placeholder(make):
  # Before: "pattern(s) ['*w'] match no parameter path ... the tree has no
  # leaves" from the placeholder optax passes to init.
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  tx = make()
  state = tx.init(params)
  mapped = optax.tree_utils.tree_map_params(
      tx, lambda p: jnp.zeros(p.shape, jnp.int8), state,
      transform_non_params=lambda v: v)
  mus = optax.tree_utils.tree_get_all_with_path(mapped, "mu")
  assert mus and all(leaf.dtype == jnp.int8
                     for _, mu in mus for leaf in jax.tree.leaves(mu))
  # A real init still validates the masks.
  with pytest.raises(ValueError, match="match no parameter path"):
    posconstr.project_nonneg(mask="nope").init(params)


# --------------------------------------------------- optax's projections


def _pu():
  rng = np.random.default_rng(1)
  p = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
  u = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 2,
                                         jnp.float32), p)
  return p, u


def test_projection_non_negative_is_project_nonneg_bit_for_bit():
  # Before: `project: constraint must be a constraint set ... got <function
  # projection_non_negative>`.
  p, u = _pu()
  ours = _step(posconstr.project(optax.projections.projection_non_negative),
               p, u)
  ref = _step(posconstr.project_nonneg(), p, u)
  for path in ("w", "b"):
    np.testing.assert_array_equal(ours[path], ref[path])
    np.testing.assert_array_equal(
        ours[path], np.maximum(np.asarray(p[path]) + np.asarray(u[path]), 0))


def test_optax_projection_acts_on_the_whole_selected_tree():
  p, u = _pu()
  tx = optax.chain(optax.sgd(1.0), posconstr.project(
      optax.projections.projection_simplex, mask="w"))
  new = jax.jit(lambda p, g: _step(tx, p, g))(p, jax.tree.map(lambda x: -x, u))
  stepped = {k: p[k] + u[k] for k in p}
  want = optax.projections.projection_simplex(stepped["w"])
  np.testing.assert_allclose(new["w"], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(new["w"])), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(new["b"], stepped["b"])  # not selected
  # Per-column sets differ: each column of the kernel sums to 1.
  cols = posconstr.project_params(stepped, posconstr.Simplex(axis=0),
                                  mask="w")["w"]
  np.testing.assert_allclose(jnp.sum(cols, axis=0), 1.0, rtol=1e-5)
  assert not np.allclose(cols, new["w"])
  # A whole-tree ball over two leaves: their joint norm is bounded.
  ball = posconstr.project_params(
      stepped, functools.partial(optax.projections.projection_l2_ball,
                                 scale=1.0))
  norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(ball)))
  np.testing.assert_allclose(norm, 1.0, rtol=1e-5)
  ref = optax.projections.projection_l2_ball(stepped, 1.0)
  for k in ball:
    np.testing.assert_allclose(ball[k], ref[k], rtol=1e-6)


def test_optax_box_with_partial_and_the_order_check():
  p, u = _pu()
  box = functools.partial(optax.projections.projection_box,
                          lower={"w": -0.5, "b": -0.5},
                          upper={"w": 0.5, "b": 0.5})
  tx = posconstr.chain(optax.sgd(1.0), posconstr.project(box))
  state = tx.init(p)
  posconstr.check_projection_last(state)
  out, _ = tx.update(u, state, p)
  new = optax.apply_updates(p, out)
  for k in p:
    np.testing.assert_allclose(
        new[k], np.clip(np.asarray(p[k]) - np.asarray(u[k]), -0.5, 0.5),
        rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="link 0 is followed by link 1"):
    posconstr.check_projection_last(optax.chain(
        posconstr.project(box), optax.adam(1.0)).init(p))


def test_optax_projection_errors():
  p, _ = _pu()
  with pytest.raises(TypeError, match=r"must be a constraint set.*accept "
                     r"Optax's whole-tree projections"):
    posconstr.project_params(p, lambda tree: tree)
  with pytest.raises(TypeError, match=r"`i` of dtype int32: only floating"):
    posconstr.project(optax.projections.projection_non_negative,
                      mask="i").init({"i": jnp.arange(3)})
  with pytest.raises(TypeError, match=r"must be a constraint set"):
    posconstr.project("simplex")
