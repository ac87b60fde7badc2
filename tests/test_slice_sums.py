"""Slice sums of elementwise terms (``posconstr.sets._slice_sums``) and the
simplex projection built on them, against NumPy, on the CPU's blocked path.

The block sizes are lowered with ``monkeypatch`` so that small arrays take
every path (several blocks, leftover rows, one block); one test runs the
real thresholds on a leaf of more than 2^20 weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posconstr import Simplex
from posconstr.sets import _slice_sums


def _terms(x, y, theta):
  def terms(xb, yb):
    above = xb > theta
    return above.astype(jnp.int32), jnp.where(above, yb, 0), xb * yb
  return terms


def _reference(x, y, theta, axes):
  above = x > theta
  return (above.sum(axes, keepdims=True), np.where(above, y, 0).sum(
      axes, keepdims=True), (x * y).sum(axes, keepdims=True))


@pytest.fixture
def small_blocks(monkeypatch):
  monkeypatch.setattr(_slice_sums, "_MIN_ELEMENTS", 0)
  monkeypatch.setattr(_slice_sums, "_BLOCK_ROWS", 3)


def test_slice_sums_are_plain_sums_with_several_cpu_devices(small_blocks,
                                                             monkeypatch):
  # The arrays may be sharded then: no blocks (their dynamic slices would
  # gather a sharded leading axis), no variadic reduction.
  monkeypatch.setattr(jax, "devices", lambda *args: [None, None])
  x = jnp.ones((10, 4))
  fn = jax.jit(lambda x: _slice_sums.slice_sums(
      lambda b: ((b > 0).astype(jnp.int32), b), [x], (0,)))
  assert [int(s) for s in fn(x)[0].ravel()] == [10] * 4
  hlo = fn.lower(x).compile().as_text()
  assert " while(" not in hlo and "reduce(" in hlo


@pytest.mark.parametrize("platform,loops", [("cpu", 2), ("cuda", 1),
                                            ("tpu", 1)])
def test_only_the_cpu_program_has_the_loop_over_blocks(platform, loops):
  # Lowered for each platform without its device: Michelot's while loop
  # everywhere, the loop over blocks of rows on CPU only.
  leaf = jax.ShapeDtypeStruct((1100, 1000), jnp.float32)
  exported = jax.export.export(jax.jit(Simplex(axis=0).project),
                               platforms=[platform])(leaf)
  assert exported.mlir_module().count("stablehlo.while") == loops


def test_slice_sums_refuse_mixed_shapes_and_narrow_floats(small_blocks):
  with pytest.raises(ValueError, match="one shape"):
    _slice_sums.slice_sums(lambda a, b: (a + b,), [jnp.ones((4, 3)),
                                                  jnp.ones((1, 3))], (0,))
  with pytest.raises(TypeError, match="at least 32 bits"):
    _slice_sums.slice_sums(lambda a: (a,), [jnp.ones((4, 3), jnp.bfloat16)],
                           (0,))


@pytest.mark.parametrize("shape,axes,loops", [
    ((10, 4), (0,), True),          # 3 blocks of 3 rows + 1 leftover row
    ((9, 4), (0,), True),           # no leftover: the first block starts
    ((2, 4), (0,), False),          # fewer rows than a block: no loop
    ((4, 3, 5), (0, 1), True),      # two leading axes, as one of 12 rows
    ((5, 2, 3), (0, 1), True),      # ... of 10 rows: a leftover row
    ((4, 3, 5), (0, 2), False),     # the last axis: one fused reduction
    ((4, 3, 5), (1,), False),
    ((4, 3, 5), (0, 1, 2), False),
])
def test_slice_sums_match_numpy_on_every_path(small_blocks, x64, shape, axes,
                                              loops):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=shape), rng.normal(size=shape)
  theta = rng.normal(size=[1 if a in axes else n
                           for a, n in enumerate(shape)]) * 0.5
  fn = jax.jit(lambda x, y, theta: _slice_sums.slice_sums(
      _terms(x, y, theta), [x, y], axes))
  sums = fn(x, y, theta)
  for got, want in zip(sums, _reference(x, y, theta, axes), strict=True):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
  assert sums[0].dtype == jnp.int32  # Not widened under x64.
  hlo = fn.lower(x, y, theta).compile().as_text()
  assert (" while(" in hlo) == loops


def test_slice_sums_under_vmap_and_simplex_gradients(small_blocks, x64):
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(3, 10, 4)), rng.normal(size=(3, 10, 4))
  theta = np.zeros((1, 4))
  batched = jax.vmap(lambda x, y: _slice_sums.slice_sums(
      _terms(x, y, theta), [x, y], (0,))[1])(x, y)
  np.testing.assert_allclose(
      np.asarray(batched)[:, 0], np.where(x > 0, y, 0).sum(1), rtol=1e-12)
  # Reverse mode through the simplex, whose threshold uses blocked sums:
  # d/dv sum(P(v) * c) = c - mean of c over each column's support, there.
  v, c = x[0], rng.normal(size=(10, 4))
  simplex = Simplex(axis=0)
  g = jax.grad(lambda v: jnp.sum(simplex.project(v) * c))(v)
  support = np.asarray(simplex.project(v)) > 0
  mean = np.where(support, c, 0).sum(0) / support.sum(0)
  np.testing.assert_allclose(np.asarray(g), np.where(support, c - mean, 0),
                             rtol=1e-12)


def _sort_simplex(v, scale):
  """Columns of ``v`` onto the simplex of sum ``scale``: the sort-based
  method (Held et al. 1974), independent of the library's Newton passes."""
  u = -np.sort(-v, axis=0)
  ks = np.arange(1, v.shape[0] + 1)[:, None]
  thetas = (np.cumsum(u, axis=0) - scale) / ks
  rho = np.sum(u > thetas, axis=0)  # Support size per column.
  theta = np.take_along_axis(thetas, rho[None] - 1, axis=0)
  return np.maximum(v - theta, 0)


def test_simplex_on_a_leaf_past_the_blocking_threshold(x64):
  # 1100 x 1000 > 2^20 weights: the real blocks, a leftover, on CPU.
  rng = np.random.default_rng(3)
  v = rng.normal(size=(1100, 1000)) * 0.02
  assert v.size >= _slice_sums._MIN_ELEMENTS
  c = Simplex(2.0, axis=0)
  project = jax.jit(c.project)
  # Michelot's loop and, inside it, the loop over blocks of rows.
  assert project.lower(v).compile().as_text().count(" while(") >= 2
  y = np.array(project(v))
  np.testing.assert_allclose(y, _sort_simplex(v, 2.0), rtol=0, atol=1e-12)
  # The derivative: on each column's support, dv minus its mean there.
  dv = rng.normal(size=v.shape)
  _, dy = jax.jit(lambda v, dv: jax.jvp(c.project, (v,), (dv,)))(v, dv)
  support = y > 0
  mean = np.where(support, dv, 0).sum(0) / support.sum(0)
  np.testing.assert_allclose(np.asarray(dy), np.where(support, dv - mean, 0),
                             rtol=0, atol=1e-12)
  # Mass enters a zero coordinate only if its gradient is below the mean
  # gradient over the support; a NaN weight is off the support.
  grad = rng.normal(size=v.shape)
  y[0, :3] = np.nan
  support = y > 0
  gmean = np.where(support, grad, 0).sum(0) / support.sum(0)
  np.testing.assert_array_equal(np.asarray(c.pushing_out(y, grad)),
                                ~support & (grad > gmean))
  # A gradient that only broadcasts: one per row.
  row = grad[:, :1]
  rmean = np.where(support, row, 0).sum(0) / support.sum(0)
  np.testing.assert_array_equal(np.asarray(c.pushing_out(y, row)),
                                ~support & (row > rmean))
