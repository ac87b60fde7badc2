"""Hypothesis properties of every constraint set, in float64.

For the convex sets (NonNegative, Box, Simplex, MaxNorm, MinMaxNorm with
``min_value=0``) the projection ``P`` is checked to be feasible, idempotent,
the identity inside, non-expansive and to satisfy the variational inequality
``<x - P(x), y - P(x)> <= 0`` for feasible ``y``. For the non-convex sets
(UnitNorm, MinMaxNorm with ``min_value > 0``) only what holds is checked, and
``P(x)`` is compared with many random feasible points. MinMaxNorm with
``rate < 1`` is Keras' relaxed step, not a projection.
"""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from posconstr import Box
from posconstr import MaxNorm
from posconstr import MinMaxNorm
from posconstr import NonNegative
from posconstr import Simplex
from posconstr import UnitNorm

SETTINGS = settings(max_examples=30, deadline=None, database=None)

CONVEX = [
    (NonNegative(0.3), (3, 4)),
    (Box(None, 0.5), (3, 4)),
    (Box(np.array([-1.0, 0.0, -2.0, 0.5]), np.array([1.0, 0.5, 2.0, 0.5])),
     (3, 4)),
    (Simplex(axis=0), (3, 4)),
    (Simplex(2.5, axis=-1), (3, 4)),
    (Simplex(0.5, axis=(0, 2)), (2, 3, 4)),
    (MaxNorm(1.5, axis=0), (3, 4)),
    (MaxNorm(axis=None), (3, 4)),
    (MinMaxNorm(0.0, 2.0, axis=(2, 1)), (2, 3, 4)),
]
NONCONVEX = [
    (UnitNorm(axis=0), (3, 4)),
    (UnitNorm(axis=None), (3, 4)),
    (MinMaxNorm(0.5, 2.0, axis=0), (3, 4)),
    (MinMaxNorm(1.0, 1.5, axis=(0, 2)), (2, 3, 4)),
]


def _ids(case):
  return repr(case[0])


def arrays(shape):
  """Float64 arrays of magnitudes from 1e-3 to 1e3, with exact zeros."""
  # No values below 1e-30: XLA flushes subnormals to zero on CPU.
  values = hnp.arrays(np.float64, shape, elements=st.floats(-10, 10).map(
      lambda v: v if abs(v) > 1e-30 else 0.0))
  return st.builds(lambda x, s: x * s, values,
                   st.sampled_from([1e-3, 0.1, 1.0, 30.0, 1e3]))


def _axes(c, ndim):
  if c.axis is None:
    return tuple(range(ndim))
  items = c.axis if isinstance(c.axis, tuple) else (c.axis,)
  return tuple(sorted(a % ndim for a in items))


def _slice_norms(c, x):
  return np.sqrt(np.sum(x * x, axis=_axes(c, x.ndim), keepdims=True))


@functools.lru_cache(maxsize=None)
def _kernel(c):
  """One compiled function per set (and dtype): project and violation."""
  return jax.jit(jax.vmap(lambda x: (c.project(x), c.violation(x))))


def _pv(c, *xs):
  """P(x) and violation(x) for three arrays x, under x64."""
  with jax.enable_x64(True):
    p, v = jax.device_get(_kernel(c)(np.stack(xs)))
  return tuple(p), tuple(v.tolist())


def _one_hot_slices(c, x):
  """Per slice, sign(x_i) at the first largest |x_i|, 0 elsewhere."""
  axes = _axes(c, x.ndim)
  rest = [a for a in range(x.ndim) if a not in axes]
  perm = rest + list(axes)
  moved = np.transpose(x, perm)
  rows = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  hot = np.zeros_like(rows)
  k = np.argmax(np.abs(rows), axis=1)
  hot[np.arange(len(rows)), k] = np.where(rows[np.arange(len(rows)), k] < 0,
                                          -1.0, 1.0)
  return np.transpose(hot.reshape(moved.shape), np.argsort(perm))


def _inside_point(c, x):
  """A point of the set (strictly inside if it has an interior), from x."""
  if isinstance(c, (NonNegative, Box)):
    lo = -np.inf if c.lower is None else np.asarray(c.lower)
    hi = np.inf if c.upper is None else np.asarray(c.upper)
    return np.clip(x, lo, hi)
  mid = 0.5 * (c.min_value + c.max_value)
  hot = _one_hot_slices(c, x) * mid  # norm exactly mid: 1, 1.25 or 0.75
  if c.min_value == c.max_value:  # the sphere
    return hot
  n = _slice_norms(c, x)
  return np.where(n > 0, x * (mid / np.where(n > 0, n, 1)), hot)


# -------------------------------------------------------------- convex sets


@pytest.mark.parametrize("case", CONVEX, ids=_ids)
def test_convex_projection_properties(case):
  c, shape = case

  @SETTINGS
  @given(arrays(shape), st.sampled_from([1e-6, 1e-2, 1.0, 30.0]),
         st.integers(0, 2**32 - 1))
  def check(x, delta, seed):
    # y near x (where non-expansiveness is tight) and z anywhere.
    rng = np.random.default_rng(seed)
    scale = 1 + np.abs(x).max()
    y = x + delta * scale * rng.normal(size=shape)
    z = scale * rng.normal(size=shape)
    (px, py, pz), (vx, _, _) = _pv(c, x, y, z)
    (ppx, _, _), (vpx, vpy, vpz) = _pv(c, px, py, pz)
    assert px.dtype == np.float64 and px.shape == x.shape
    # Feasible (also in float32), and idempotent.
    assert vpx == vpy == vpz == 0
    if not c.elementwise:  # (elementwise sets: see test_sets.py)
      p32, _ = _pv(c, *(a.astype(np.float32) for a in (x, y, z)))
      assert p32[0].dtype == np.float32
      assert _pv(c, *p32)[1] == (0, 0, 0)
    big = 1 + np.abs(x).max() + np.abs(y).max() + np.abs(z).max()
    if c.elementwise:
      np.testing.assert_array_equal(ppx, px)
    else:
      np.testing.assert_allclose(ppx, px, rtol=1e-13, atol=1e-15 * big)
    # x feasible <=> x unchanged (up to rounding for the simplex).
    if vx == 0:
      np.testing.assert_allclose(px, x, rtol=1e-13, atol=1e-14 * big)
    # Non-expansive.
    assert (np.linalg.norm(px - py)
            <= np.linalg.norm(x - y) * (1 + 1e-12) + 1e-13 * big)
    # Variational inequality: pz is feasible, so <x - px, pz - px> <= 0.
    inner = np.vdot(x - px, pz - px)
    assert inner <= 1e-12 * big * big * x.size, inner

  check()


@pytest.mark.parametrize("case", [k for k in CONVEX + NONCONVEX
                                  if not isinstance(k[0], Simplex)], ids=_ids)
def test_points_inside_are_unchanged_bit_for_bit(case):
  c, shape = case

  @settings(SETTINGS, max_examples=20)
  @given(arrays(shape))
  def check(x):
    w = _inside_point(c, x)
    (pw, _, _), (vw, _, _) = _pv(c, w, w, w)
    assert vw == 0
    np.testing.assert_array_equal(pw, w)

  check()


def test_simplex_vertices_and_centre_are_unchanged():
  vertices = np.zeros((3, 4))
  vertices[[0, 1, 2, 0], [0, 1, 2, 3]] = 1.0  # a vertex in every column
  for c, w in [(CONVEX[3][0], vertices),
               (CONVEX[4][0], np.eye(3, 4)[:, ::-1] * 2.5),
               (CONVEX[4][0], np.full((3, 4), 0.625))]:
    (pw, _, _), (vw, _, _) = _pv(c, w, w, w)
    assert vw == 0
    np.testing.assert_array_equal(pw, w)


# ---------------------------------------------------------- non-convex sets


@pytest.mark.parametrize("case", NONCONVEX, ids=_ids)
def test_nonconvex_projection_properties(case):
  c, shape = case
  axes = _axes(c, len(shape))

  @SETTINGS
  @given(arrays(shape), st.integers(0, 2**32 - 1))
  def check(x, seed):
    x32 = x.astype(np.float32)
    (px, _, _), _ = _pv(c, x, x, x)
    (ppx, _, _), (vpx, _, _) = _pv(c, px, px, px)
    assert vpx == 0
    np.testing.assert_allclose(ppx, px, rtol=1e-13)
    (p32, _, _), _ = _pv(c, x32, x32, x32)
    assert _pv(c, p32, p32, p32)[1][0] == 0
    # The projection keeps the direction of every non-zero slice.
    n = _slice_norms(c, x)
    dot = np.sum(x * px, axis=axes, keepdims=True)
    cos = dot[n > 0] / (n * _slice_norms(c, px))[n > 0]
    np.testing.assert_allclose(cos, 1.0, rtol=1e-12)
    # Nearest point: no random feasible point is closer, slice by slice.
    # Half of the directions are random, half are x's direction perturbed.
    rng = np.random.default_rng(seed)
    sigma = np.logspace(-4, 0, 256).reshape((256,) + (1,) * x.ndim)
    g = rng.normal(size=(512,) + x.shape)
    g[256:] = g[256:] * sigma + x / np.where(n > 0, n, 1)
    g /= np.sqrt(np.sum(g * g, axis=tuple(a + 1 for a in axes), keepdims=True))
    r = rng.uniform(c.min_value, c.max_value, size=(512,) + n.shape)
    r[::2] = np.clip(n, c.min_value, c.max_value)  # also the optimal radius
    feasible = g * r
    def dist(p):
      return np.sqrt(np.sum((x - p) ** 2, axis=tuple(
            a + p.ndim - x.ndim for a in axes)))
    assert (dist(px) <= dist(feasible).min(axis=0) * (1 + 1e-12)
            + 1e-12).all()

  check()


# ---------------------------------------------------- MinMaxNorm, rate < 1


@pytest.mark.parametrize("rate", [0.2, 0.7])
def test_relaxed_minmaxnorm_is_keras_and_converges(rate):
  c = MinMaxNorm(0.5, 2.0, rate=rate, axis=0)
  steps = jax.jit(lambda x: jax.lax.scan(
      lambda y, _: (c.project(y), c.violation(y)), x, None, length=300))

  @settings(SETTINGS, max_examples=20)
  @given(arrays((3, 4)))
  def check(x):
    (px, _, _), _ = _pv(c, x, x, x)
    n = _slice_norms(c, x)
    target = rate * np.clip(n, 0.5, 2.0) + (1 - rate) * n
    expected = np.where(n > 0, x * target / np.where(n > 0, n, 1),
                        rate * 0.5 / np.sqrt(3))
    np.testing.assert_allclose(px, expected, rtol=1e-13, atol=1e-300)
    with jax.enable_x64(True):
      last, history = (np.asarray(a) for a in steps(x))
    # The distance to the set never grows, and reaches 0.
    assert (np.diff(history) <= 1e-15 * (1 + history[:-1])).all()
    assert _pv(c, last, last, last)[1][0] == 0

  check()
