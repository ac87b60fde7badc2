"""Multi-batch curvature pairs in ``posconstr.lbfgsb`` (``overlap_grads``).

Berahas, Nocedal & Takac, "A Multi-Batch L-BFGS Method for Machine
Learning" (NeurIPS 2016): the step uses the batch gradient, the pair
``s = x_{k+1} - x_k``, ``y = g_O(x_{k+1}) - g_O(x_k)`` on the overlap ``O``
of two consecutive batches, skipped when ``s^T y <= eps ||s||^2``. The
references are numpy gradients of least squares and the full-batch
iteration (overlap = the whole batch).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr

N, DIM = 64, 6
BATCH, OVERLAP = 16, 8
# One optimizer for most tests: its update compiles once. The problems'
# curvature (A^T A / N >= ~0.4) is far above the skip threshold 1e-2.
FIXED = posconstr.lbfgsb(0.1, lower=0.0)


def _data(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(N, DIM)).astype(np.float32)
  b = (a @ rng.normal(size=DIM) + 0.1 * rng.normal(size=N)).astype(
      np.float32)
  return a, b


def _grad_np(a, b, x, rows):
  """Gradient of ``mean_i 0.5 (a_i x - b_i)^2`` over ``rows`` (float64)."""
  a, b, x = (np.asarray(v, np.float64) for v in (a[rows], b[rows], x))
  return a.T @ (a @ x - b) / len(rows)


def _grad(a, b, x, rows):
  rows = jnp.asarray(rows)
  return jax.grad(lambda v: 0.5 * jnp.mean(
      (jnp.asarray(a)[rows] @ v - jnp.asarray(b)[rows]) ** 2))(x)


def _step(opt, x, state, old_tail, a, b, rows):
  """A multi-batch update on ``S = rows``: head and tail are overlaps."""
  grad = _grad(a, b, x, rows)
  updates, state = opt.update(grad, state, x, overlap_grads=(
      old_tail, _grad(a, b, x, rows[:OVERLAP])))
  return (optax.apply_updates(x, updates), state,
          _grad(a, b, x, rows[-OVERLAP:]))


_jit_step = functools.partial(jax.jit, static_argnums=0)(_step)


def _multibatch_run(opt, a, b, key, steps, jit=True):
  """``steps`` multi-batch updates; batches are windows of one permutation.

  Returns the iterates. ``S_k`` = stream[k (BATCH - OVERLAP):][:BATCH], so
  ``O_k`` is the tail of ``S_k`` and the head of ``S_{k+1}``.
  """
  stream = np.concatenate([np.asarray(jax.random.permutation(
      jax.random.fold_in(key, e), N)) for e in range(steps)])
  step = _jit_step if jit else _step
  x = jnp.ones(DIM, jnp.float32)
  state, tail, xs = opt.init(x), jnp.zeros(DIM, jnp.float32), [x]
  for k in range(steps):
    rows = stream[k * (BATCH - OVERLAP):][:BATCH]
    x, state, tail = step(opt, x, state, tail, a, b, rows)
    xs.append(x)
  return np.stack(xs)


def test_pair_is_measured_on_the_overlap():
  a, b = _data()
  opt = FIXED
  s0, s1 = np.arange(0, 16), np.arange(8, 24)  # O = 8 .. 15
  x0 = jnp.asarray(np.linspace(0.0, 1.0, DIM), jnp.float32)
  state = opt.init(x0)
  updates, state = opt.update(_grad(a, b, x0, s0), state, x0)
  x1 = optax.apply_updates(x0, updates)
  overlap = np.arange(8, 16)
  _, state = opt.update(_grad(a, b, x1, s1), state, x1, overlap_grads=(
      _grad(a, b, x0, overlap), _grad(a, b, x1, overlap)))

  memory = state.solver.memory
  assert int(memory.count) == 1
  s_ref = np.asarray(x1, np.float64) - np.asarray(x0, np.float64)
  y_ref = _grad_np(a, b, x1, overlap) - _grad_np(a, b, x0, overlap)
  np.testing.assert_allclose(jax.tree.leaves(memory.s)[0][0], s_ref,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.tree.leaves(memory.y)[0][0], y_ref,
                             rtol=1e-4, atol=1e-5)
  # Not the naive pair, which mixes the two batches.
  naive = _grad_np(a, b, x1, s1) - _grad_np(a, b, x0, s0)
  assert np.abs(naive - y_ref).max() > 1e-2


@pytest.mark.parametrize("eps, pushed", [
    (1e-2, 0), pytest.param(0.0, 1, marks=pytest.mark.slow)])
def test_pairs_of_little_curvature_are_skipped(eps, pushed):
  opt = (FIXED if eps == 1e-2 else
         posconstr.lbfgsb(0.1, lower=0.0, min_overlap_curvature=eps))
  x0 = jnp.full(DIM, 2.0)
  state = opt.init(x0)
  g = jnp.linspace(-1.0, 1.0, DIM)
  updates, state = opt.update(g, state, x0)
  x1 = optax.apply_updates(x0, updates)
  s = x1 - x0  # y = 1e-3 s: s^T y = 1e-3 ||s||^2 <= 1e-2 ||s||^2.
  _, state = opt.update(g, state, x1,
                        overlap_grads=(jnp.zeros(DIM), 1e-3 * s))
  assert int(state.solver.memory.count) == pushed


def test_full_overlap_is_the_full_batch_iteration():
  """``O = S`` = every example: the same iterates as plain fixed steps."""
  a, b = _data(1)
  rows = np.arange(N)
  opt = FIXED
  g = jax.jit(lambda x: _grad(a, b, x, rows))
  x_full = x_multi = jnp.ones(DIM, jnp.float32)
  full, multi = opt.init(x_full), opt.init(x_multi)
  previous = None
  for _ in range(15):
    u, full = opt.update(g(x_full), full, x_full)
    x_full = optax.apply_updates(x_full, u)
    grad = g(x_multi)
    u, multi = opt.update(grad, multi, x_multi,
                          overlap_grads=(previous if previous is not None
                                         else grad, grad))
    x_multi, previous = optax.apply_updates(x_multi, u), grad
    np.testing.assert_array_equal(x_multi, x_full)
  assert int(full.solver.memory.count) > 1  # The pairs were used.


def _loss_np(a, b, x):
  return 0.5 * np.mean((a @ x - b) ** 2)


def test_every_iterate_is_feasible_and_deterministic_under_jit():
  a, b = _data(2)
  key = jax.random.key(3)
  xs = _multibatch_run(FIXED, a, b, key, steps=12)
  assert np.all(xs >= 0.0)  # Bit for bit: the update lands in the bounds.
  assert np.any(xs[-1] == 0.0)  # The bound is active at the end.
  np.testing.assert_array_equal(_multibatch_run(FIXED, a, b, key, 12), xs)
  assert _loss_np(a, b, xs[-1]) < 0.5 * _loss_np(a, b, xs[0])


@pytest.mark.slow
def test_jit_matches_eager():
  a, b = _data(2)
  key = jax.random.key(3)
  np.testing.assert_allclose(
      _multibatch_run(FIXED, a, b, key, steps=5, jit=False),
      _multibatch_run(FIXED, a, b, key, steps=5), rtol=1e-5, atol=1e-6)


def test_params_off_by_rounding_keep_the_memory():
  """A landing a few ulps off is the same point; a real change restarts."""
  a, b = _data(4)
  rows = np.arange(N)
  f = lambda x: 0.5 * jnp.mean((jnp.asarray(a) @ x - b) ** 2)  # noqa
  opt = posconstr.lbfgsb(lower=0.0)
  vg = optax.value_and_grad_from_state(f)
  x = jnp.ones(DIM, jnp.float32)
  state = opt.init(x)
  for _ in range(4):
    value, grad = vg(x, state=state)
    u, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
    x = optax.apply_updates(x, u)
  count = int(state.solver.memory.count)
  assert count >= 2

  def update(params):
    value, grad = jax.value_and_grad(f)(params)
    return opt.update(grad, state, params, value=value, grad=grad,
                      value_fn=f)[1]

  ulp = jnp.asarray(np.nextafter(np.asarray(x), np.float32(np.inf)))
  assert int(update(ulp).solver.memory.count) == min(count + 1, 10)
  assert int(update(x + 1e-2).solver.memory.count) <= 1
  del rows


def test_bad_overlap_grads():
  x = jnp.ones(3)
  g = jnp.ones(3)
  searching = posconstr.lbfgsb(lower=0.0)
  with pytest.raises(ValueError, match="overlap_grads.*learning_rate"):
    searching.update(g, searching.init(x), x, value=1.0, value_fn=jnp.sum,
                     overlap_grads=(g, g))
  fixed = posconstr.lbfgsb(0.1, lower=0.0)
  with pytest.raises(TypeError, match="overlap_grads.*pair"):
    fixed.update(g, fixed.init(x), x, overlap_grads=g)
  with pytest.raises(ValueError, match="previous gradient.*structure"):
    fixed.update(g, fixed.init(x), x, overlap_grads=({"a": g}, g))
  with pytest.raises(ValueError, match="min_overlap_curvature"):
    posconstr.lbfgsb(0.1, min_overlap_curvature=-1.0)
  with pytest.raises(TypeError, match="min_overlap_curvature"):
    posconstr.lbfgsb(0.1, min_overlap_curvature="1e-2")
