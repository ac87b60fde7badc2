"""Slice sums of elementwise terms (``posconstr.sets._slice_sums``) and the
simplex projection built on them, against NumPy, on the CPU's blocked path.

The block sizes are lowered with ``monkeypatch`` so that small arrays take
every path (several blocks, leftover rows, one block); one test runs the
real thresholds on a leaf of more than 2^20 weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr
from posconstr import MaxNorm
from posconstr import Simplex
from posconstr import UnitNorm
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
  monkeypatch.setattr(_slice_sums, "_UNROLL", 1)
  monkeypatch.setattr(_slice_sums, "_LONE_BLOCK_ROWS", 4)
  monkeypatch.setattr(_slice_sums, "_LONE_NATIVE_MAX_ROW", 1)


def test_slice_sums_are_plain_sums_with_several_cpu_devices(small_blocks,
                                                             monkeypatch):
  # The arrays may be sharded then: no blocks (their dynamic slices would
  # gather a sharded leading axis), and plain sums (a maximum among the
  # terms would make them one variadic reduction).
  monkeypatch.setattr(jax, "devices", lambda *args: [None, None])
  x = jnp.ones((10, 4))
  fn = jax.jit(lambda x: _slice_sums.slice_sums(
      lambda b: ((b > 0).astype(jnp.int32), b), [x], (0,)))
  assert [int(s) for s in fn(x)[0].ravel()] == [10] * 4
  hlo = fn.lower(x).compile().as_text()
  assert " while(" not in hlo and "reduce(" in hlo


@pytest.mark.parametrize("platform,loops", [("cpu", 3), ("cuda", 1),
                                            ("tpu", 1)])
def test_only_the_cpu_program_has_the_loop_over_blocks(platform, loops):
  # Lowered for each platform without its device: Michelot's while loop
  # everywhere, the loops over blocks of rows (for the maximum and the
  # start, and in each Newton pass) on CPU only.
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


@pytest.mark.parametrize("rows", [21, 16, 5, 3])
@pytest.mark.parametrize("op", ["sum", "max"])
def test_unrolled_blocks_and_a_lone_term_match_numpy(small_blocks, x64,
                                                     monkeypatch, rows, op):
  # Several terms, in a loop of two blocks of 3 rows per iteration: 21 rows
  # are a first block and 3 iterations, 16 a leftover row, 2 iterations and
  # a block after them, 5 a leftover and one block (no loop left), 3 one
  # block. A lone term, with no loop: blocks of 4 rows as two halves, and
  # the leftover rows (1, 0, 1 and all 3).
  monkeypatch.setattr(_slice_sums, "_UNROLL", 2)
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(rows, 2, 4)), rng.normal(size=(rows, 2, 4))
  theta = np.full((1, 2, 4), 0.1)
  many = jax.jit(lambda x, y: _slice_sums.slice_sums(
      lambda xb, yb: (*_terms(x, y, theta)(xb, yb), yb), [x, y], (0,),
      ops=("sum", "sum", "sum", op)))
  last = y.sum(0, keepdims=True) if op == "sum" else y.max(0, keepdims=True)
  for got, want in zip(many(x, y), (*_reference(x, y, theta, (0,)), last),
                       strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
  lone = jax.jit(lambda x: _slice_sums.slice_sums(lambda b: (b * b,), [x],
                                                  (0,), ops=(op,)))
  (got,) = lone(x)
  want = ((x * x).sum(0, keepdims=True) if op == "sum"
          else (x * x).max(0, keepdims=True))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
  if rows > 5:
    assert " while(" in many.lower(x, y).compile().as_text()
  assert " while(" not in lone.lower(x).compile().as_text()


def test_a_lone_term_on_short_rows_is_one_plain_sum(small_blocks,
                                                    monkeypatch):
  # Up to rows of _LONE_NATIVE_MAX_ROW elements, YNNPACK's sum is as fast;
  # past them, the halves of each block of rows are summed side by side.
  monkeypatch.setattr(_slice_sums, "_LONE_NATIVE_MAX_ROW", 8)
  fn = jax.jit(lambda x: _slice_sums.slice_sums(lambda b: (b * b,), [x],
                                                (0,)))
  # Past them: 2 blocks of 2 + 2 rows (and a leftover row), one reduction.
  halves = "(f32[2,9]{1,0}, f32[2,9]{1,0}) reduce("
  assert halves in fn.lower(jnp.ones((9, 9))).as_text("hlo")
  assert ") reduce(" not in fn.lower(jnp.ones((9, 2, 4))).as_text("hlo")


def test_sum_of_squares_values_and_derivatives(small_blocks, x64):
  rng = np.random.default_rng(5)
  x, dx = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
  fn = lambda x: _slice_sums.sum_of_squares(x, (0,))  # noqa: E731
  # Blocks of 4 rows as two halves of 2, side by side in one reduction.
  assert "(f64[2,4]{1,0}, f64[2,4]{1,0}) reduce(" in jax.jit(fn).lower(
      x).as_text("hlo")
  value, tangent = jax.jvp(fn, (x,), (dx,))
  np.testing.assert_allclose(np.asarray(value), (x * x).sum(0, keepdims=True),
                             rtol=1e-12)
  np.testing.assert_allclose(np.asarray(tangent),
                             (2 * x * dx).sum(0, keepdims=True), rtol=1e-12)
  # Reverse mode and a second derivative: grad of sum(w * s) is 2 w x.
  w = rng.normal(size=(1, 4))
  np.testing.assert_allclose(
      np.asarray(jax.grad(lambda x: jnp.sum(fn(x) * w))(x)), 2 * w * x,
      rtol=1e-12)
  hess = jax.hessian(lambda x: jnp.sum(fn(x) * w))(x)
  np.testing.assert_allclose(
      np.asarray(hess).reshape(40, 40),
      np.diag(np.broadcast_to(2 * w, x.shape).ravel()), rtol=1e-12)


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


def test_simplex_from_the_mean_start_far_from_the_origin():
  # Every coordinate within `scale` of its column's maximum: Newton starts
  # from the mean less its rounding bound, which must stay left of the
  # root also where |v| >> scale (float32, 100: the sums lose 4 digits).
  from posconstr.sets import _simplex  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(7)
  v = (100 + rng.normal(size=(1100, 1000)) * 1e-3).astype(np.float32)
  _, start = _simplex._top_and_start(jnp.asarray(v), jnp.float32(1), (0,))
  assert (np.asarray(start) > -1).all()  # The mean, in every column.
  v[:, 0] = np.nan  # A NaN column stays NaN, the others are unaffected.
  v[5, 1] = np.inf
  y = np.asarray(jax.jit(Simplex(axis=0).project)(v))
  assert np.isnan(y[:, :2]).all()
  want = _sort_simplex(v[:, 2:].astype(np.float64), 1.0)
  np.testing.assert_allclose(y[:, 2:], want, rtol=0,
                             atol=8 * np.spacing(np.float32(101)))
  assert float(Simplex(axis=0).violation(y[:, 2:])) == 0


@pytest.mark.parametrize("rows", [100, 1100])
def test_a_nan_makes_its_whole_simplex_slice_nan_at_any_size(rows):
  # Below and past 2^20 weights (XLA:CPU's maximum alone can skip a NaN).
  v = np.random.default_rng(9).normal(size=(rows, 1000)).astype(np.float32)
  v[rows // 2, 7] = np.nan
  y = np.asarray(jax.jit(Simplex(axis=0).project)(v))
  assert np.isnan(y[:, 7]).all()
  assert not np.isnan(np.delete(y, 7, axis=1)).any()


@pytest.mark.parametrize("step,most", [("sign", 2), ("normal", 6)])
def test_simplex_one_small_step_off_saves_two_newton_passes(monkeypatch,
                                                            step, most):
  # Weights on the simplex, then one small step: the mean start saves the
  # pass from -scale, the settled support the pass that would confirm it.
  # Steps of one size (Adam's on fixed gradients, as in the benchmarks)
  # take 2 passes here (3 on 5000x5000 kernels), 4 from -scale; steps of
  # varied sizes 6, against 8.
  from posconstr.sets import _simplex  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(8)
  simplex = Simplex(axis=0)
  p = np.asarray(simplex.project(rng.normal(size=(1100, 1000)) / 33))
  noise = rng.normal(size=p.shape)
  v = p + 1e-4 * (np.sign(noise) if step == "sign" else noise)
  passes = []

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: passes.append(1))
    return _slice_sums.slice_sums(*args, **kwargs)

  monkeypatch.setattr(_simplex, "slice_sums", counted)
  y = jax.block_until_ready(jax.jit(simplex.project)(v))
  assert 0 < len(passes) <= most
  np.testing.assert_allclose(np.asarray(y), _sort_simplex(v, 1.0), rtol=0,
                             atol=1e-6)


def test_norm_sets_on_a_wide_leaf_past_the_blocking_threshold(x64):
  # 100 x 12000 > 2^20 weights, rows longer than _LONE_NATIVE_MAX_ROW: the
  # sums of squares run in 6 blocks of rows as two halves, and a leftover
  # of 4 rows, on CPU.
  rng = np.random.default_rng(6)
  v = rng.normal(size=(100, 12000)) * 0.15
  assert v.size >= _slice_sums._MIN_ELEMENTS
  assert v.shape[1] > _slice_sums._LONE_NATIVE_MAX_ROW
  norm = np.sqrt((v * v).sum(0, keepdims=True))
  assert norm.min() < 1.5 < norm.max()  # Both sides of MaxNorm(1.5).
  maxnorm, unitnorm = MaxNorm(1.5, axis=0), UnitNorm(axis=0)
  project = jax.jit(maxnorm.project)
  halves = "(f64[6,12000]{1,0}, f64[6,12000]{1,0}) reduce("
  assert halves in project.lower(v).as_text("hlo")
  np.testing.assert_allclose(np.asarray(project(v)),
                             v * np.minimum(1, 1.5 / norm), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(jax.jit(unitnorm.project)(v)),
                             v / norm, rtol=1e-12)
  # The derivative, against the closed form: outside, d(1.5 v / |v|).
  dv = rng.normal(size=v.shape)
  _, dy = jax.jit(lambda v, dv: jax.jvp(maxnorm.project, (v,), (dv,)))(v, dv)
  outside = 1.5 / norm * (dv - v * (v * dv).sum(0, keepdims=True) / norm**2)
  np.testing.assert_allclose(np.asarray(dy),
                             np.where(norm > 1.5, outside, dv), rtol=1e-9,
                             atol=1e-12)
  # The Optax transform lands in the set, and violation agrees.
  tx = posconstr.project(UnitNorm(axis=0))
  params = {"w": jnp.asarray(v / norm, jnp.float32)}
  step = {"w": jnp.asarray(dv * 1e-3, jnp.float32)}
  updates, _ = jax.jit(tx.update)(step, tx.init(params), params)
  landed = optax.apply_updates(params, updates)["w"]
  assert float(unitnorm.violation(landed)) == 0
  want = (v / norm + dv * 1e-3)
  want /= np.sqrt((want * want).sum(0, keepdims=True))
  np.testing.assert_allclose(np.asarray(landed), want, rtol=1e-5, atol=1e-7)
  # After apply_updates, the projection works in place: no copy of the leaf
  # (a loop over its rows would make XLA copy it first).
  def train_step(params, updates):
    return posconstr.project_params(optax.apply_updates(params, updates),
                                    unitnorm)
  compiled = jax.jit(train_step, donate_argnums=0).lower(params,
                                                         step).compile()
  # (Scratch: the blocks' partial sums, 1/8 of the leaf.)
  assert compiled.memory_analysis().temp_size_in_bytes < v.size * 4 / 4
