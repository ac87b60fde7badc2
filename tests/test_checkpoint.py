"""Checkpoints: optimizer states and reparameterized models round-trip through
``flax.serialization`` and orbax-checkpoint, and training resumes bit for
bit.

For every case: train N steps, save, train M more (the reference); then
restore the checkpoint into a *fresh* target (other initial values, so that
a restore that silently wrote nothing would be caught) and train M more. The
two runs must agree exactly (``np.array_equal`` on every leaf of params and
optimizer state), and the restored tree must have the original structure
(``ProjectionState``, ``ProjectedState``, ``LbfgsbState`` included).
"""

import functools

import _models
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from _reference import lbfgsb_line_search_step
from flax import nnx

import posconstr as pc

N, M = 3, 3
X = jax.random.normal(jax.random.key(0), (16, 4))
Y = jnp.abs(jax.random.normal(jax.random.key(1), (16, 3)))


def _params(seed):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w": jnp.abs(jax.random.normal(k1, (4, 3))) / 3,
          "b": 0.1 * jax.random.normal(k2, (3,))}


_loss = _models.regression_loss(X, Y)


TRANSFORMS = {
    "adam+project_nonneg": lambda: optax.chain(optax.adam(0.05),
                                               pc.project_nonneg()),
    "adam+constrain": lambda: optax.chain(optax.adam(0.05), pc.constrain(
        {"w": pc.Simplex(axis=0), "b": pc.Box(-0.5, 0.5)})),
    "projected(adam)": lambda: pc.projected(optax.adam(0.05),
                                            pc.NonNegative()),
    # Line-search mode: the state caches value and grad of the new point,
    # which value_and_grad_from_state reuses; they must survive the restore.
    "lbfgsb": lambda: pc.lbfgsb(memory_size=2, lower=0.0),
}
STATE_TYPES = {"adam+project_nonneg": pc.ProjectionState,
               "adam+constrain": pc.ProjectionState,
               "projected(adam)": pc.ProjectedState,
               "lbfgsb": pc.LbfgsbState}


def _optax_step(name):
  tx = TRANSFORMS[name]()
  if name == "lbfgsb":
    step = lbfgsb_line_search_step(tx, _loss)
  else:
    def step(params, state):
      updates, state = tx.update(jax.grad(_loss)(params), state, params)
      return optax.apply_updates(params, updates), state

  return tx, jax.jit(step)


def _run(step, carry, n):
  # Host arrays in: the first call has the same signature whatever the
  # carry came from (jax.random, flax's numpy arrays, orbax's committed
  # device arrays), so the step compiles twice per case, not once per source.
  carry = jax.tree.map(np.asarray, carry)
  for _ in range(n):
    carry = step(*carry)
  return carry


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y, equal_nan=False), (x, y)


def _contains(tree, cls):
  return any(isinstance(x, cls) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, cls)))


@functools.lru_cache(maxsize=None)
def _trajectory(name):
  """(tx, step, carry after N steps, reference carry after N + M)."""
  tx, step = _optax_step(name)
  params = _params(0)
  saved = _run(step, (params, tx.init(params)), N)
  reference = _run(step, saved, M)
  # Training did something in both phases.
  assert not np.array_equal(saved[0]["w"], reference[0]["w"])
  return tx, step, saved, reference


def _fresh_target(tx):
  """A different (params, state) of the same structure."""
  params = _params(1)
  return params, tx.init(params)


def _save_restore_flax(carry, target):
  blob = flax.serialization.to_bytes(carry)
  assert isinstance(blob, bytes) and blob
  return flax.serialization.from_bytes(target, blob)


def _save_restore_orbax(carry, target, path):
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.save(path, carry)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return checkpointer.restore(path, abstract)
  finally:
    checkpointer.close()


BACKENDS = ["flax", "orbax"]


def _save_restore(backend, carry, target, tmp_path):
  if backend == "flax":
    return _save_restore_flax(carry, target)
  return _save_restore_orbax(carry, target, tmp_path / "ckpt")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_optimizer_state_round_trip_and_bit_identical_resume(
    name, backend, tmp_path):
  tx, step, saved, reference = _trajectory(name)
  target = _fresh_target(tx)
  assert not np.array_equal(target[0]["w"], saved[0]["w"])
  restored = _save_restore(backend, saved, target, tmp_path)
  _assert_identical(restored, saved)
  assert _contains(restored[1], STATE_TYPES[name])
  resumed = _run(step, restored, M)
  _assert_identical(resumed, reference)
  # Still in the set after the resumed steps.
  w = resumed[0]["w"]
  if name == "adam+constrain":
    assert float(pc.Simplex(axis=0).violation(w)) == 0
  else:
    assert float(pc.NonNegative().violation(w)) == 0


# ------------------------------------------------------------- flax linen

LINEN = pc.linen.Reparameterized(nn.Dense(3), kernel=pc.Softplus(),
                                 bias=pc.Sigmoid(-0.5, 0.5))


@functools.lru_cache(maxsize=None)
def _linen_trajectory():
  tx = optax.adam(0.05)

  def loss(params):
    return jnp.mean((LINEN.apply({"params": params}, X) - Y) ** 2)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  params = LINEN.init(jax.random.key(0), X)["params"]
  saved = _run(step, (params, tx.init(params)), N)
  reference = _run(step, saved, M)
  fresh = LINEN.init(jax.random.key(1), X)["params"]
  return tx, step, saved, reference, (fresh, tx.init(fresh))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linen_reparameterized_round_trip_and_resume(backend, tmp_path):
  _, step, saved, reference, target = _linen_trajectory()
  assert not np.array_equal(target[0]["kernel"], saved[0]["kernel"])
  restored = _save_restore(backend, saved, target, tmp_path)
  _assert_identical(restored, saved)
  # The checkpoint holds latents: some are negative, and the module applies
  # softplus to them (the same applied kernel as before saving).
  assert (np.asarray(restored[0]["kernel"]) < 0).any()
  applied = LINEN.apply({"params": restored[0]}, method=LINEN.applied)
  want = LINEN.apply({"params": saved[0]}, method=LINEN.applied)
  _assert_identical(applied, want)
  assert (np.asarray(applied["kernel"]) >= 0).all()
  _assert_identical(_run(step, restored, M), reference)


# --------------------------------------------------------------- flax nnx


def _nnx_pair(seed):
  layer = nnx.Linear(4, 3, rngs=nnx.Rngs(seed))
  model = pc.nnx.reparameterize(layer, {"kernel": pc.Softplus()})
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  return model, optimizer


@nnx.jit
def _nnx_step(model, optimizer):
  def loss(model):
    return jnp.mean((model(X) - Y) ** 2)

  grads = nnx.grad(loss)(model)
  optimizer.update(model, grads)


def _nnx_pure(pair):
  return nnx.to_pure_dict(nnx.state(pair))


def _nnx_train(pair, n):
  for _ in range(n):
    _nnx_step(*pair)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nnx_reparameterized_round_trip_and_resume(backend, tmp_path):
  pair = _nnx_pair(0)
  _nnx_train(pair, N)
  saved = jax.tree.map(np.asarray, _nnx_pure(pair))
  if backend == "flax":  # The pure dict through msgpack, as NNX documents.
    blob = flax.serialization.msgpack_serialize(saved)
  else:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "nnx", saved)
    checkpointer.wait_until_finished()
  _nnx_train(pair, M)
  reference = _nnx_pure(pair)

  fresh = _nnx_pair(1)
  state = nnx.state(fresh)
  if backend == "flax":
    restored = flax.serialization.msgpack_restore(blob)
  else:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _nnx_pure(fresh))
    restored = checkpointer.restore(tmp_path / "nnx", abstract)
    checkpointer.close()
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(fresh, state)
  _assert_identical(_nnx_pure(fresh), saved)
  # The Params hold latents (nnx.split sees them too); the layer sees
  # softplus of them.
  _, params, _ = nnx.split(fresh[0], nnx.Param, ...)
  kernel = np.asarray(nnx.to_pure_dict(params)["module"]["kernel"])
  assert (kernel < 0).any()
  applied = np.asarray(fresh[0].applied_state()["module"]["kernel"][...])
  np.testing.assert_array_equal(applied, np.asarray(pc.Softplus().forward(
      jnp.asarray(kernel))))
  _nnx_train(fresh, M)
  _assert_identical(_nnx_pure(fresh), reference)
