"""Constraint sets against independent NumPy/SciPy references.

Covers the reference values of every projection, dtypes, jit, vmap and grad.
Hashing, ``violation`` and validation are in ``test_sets_validation.py``, the
Hypothesis properties in ``test_sets_properties.py``. Compiled calls are
grouped (one per set where possible) to keep the file fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import bisection_simplex
from scipy import optimize

from posconstr import Box
from posconstr import MaxNorm
from posconstr import MinMaxNorm
from posconstr import NonNegative
from posconstr import Simplex
from posconstr import UnitNorm

F64 = np.float64


def _f64(a):
  a = np.asarray(a)
  return (a.astype(np.float32) if a.dtype.name == "bfloat16" else a).astype(F64)


def _axes(axis, ndim):
  if axis is None:
    return tuple(range(ndim))
  items = axis if isinstance(axis, tuple) else (axis,)
  return tuple(sorted(a % ndim for a in items))


def _slices(x, axis):
  """(rows, undo): the slices along ``axis`` as rows of a 2-D array."""
  axes = _axes(axis, x.ndim)
  perm = [a for a in range(x.ndim) if a not in axes] + list(axes)
  moved = np.transpose(x, perm)
  rows = moved.reshape(-1, int(np.prod([x.shape[a] for a in axes])))
  return rows, lambda r: np.transpose(r.reshape(moved.shape), np.argsort(perm))


def ref_simplex(x, scale, axis):
  rows, undo = _slices(_f64(x), axis)
  return undo(np.stack([bisection_simplex(r, scale) for r in rows]))


def ref_radial(x, lo, hi, rate, axis):
  """Keras: the norm n goes to rate*clip(n, lo, hi) + (1-rate)*n, radially.

  A zero slice goes to the constant direction (posconstr's documented choice).
  """
  x = _f64(x)
  axes = _axes(axis, x.ndim)
  n = np.sqrt(np.sum(x * x, axis=axes, keepdims=True))
  target = rate * np.clip(n, lo, hi) + (1 - rate) * n
  k = np.prod([x.shape[a] for a in axes])
  safe = np.where(n > 0, n, 1)
  return np.where(n > 0, x * (target / safe), target / np.sqrt(k))


def _inward(bound, dtype, up):
  """``bound`` in ``dtype``, rounded up (lower bounds) or down (upper)."""
  wide = np.asarray(bound, F64)
  narrow = wide.astype(dtype)
  wrong = narrow < wide if up else narrow > wide
  step = np.array(np.inf if up else -np.inf, narrow.dtype)
  return np.where(wrong, np.nextafter(narrow, step), narrow)


@functools.partial(jax.jit, static_argnums=0)
def _pv(c, *xs):
  """(P(x), violation(P(x))) for each x, in one compiled call."""
  return tuple((p, c.violation(p)) for p in map(c.project, xs))


# ------------------------------------------------------------ elementwise sets


@pytest.mark.parametrize("eps", [0.0, 0.25, 3.0])
def test_nonnegative_is_maximum(eps):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4)).astype(np.float32) * 3
  y = NonNegative(eps).project(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.maximum(x, np.float32(eps)))


@pytest.mark.parametrize("lower,upper", [
    (-0.5, 1.5), (None, 0.25), (-0.25, None), (None, None), (1.0, 1.0),
    (np.linspace(-2, 0, 4), 1.0),
    (-1.0, np.linspace(-0.5, 2, 4)),
    (np.full((3, 1), -0.5), np.linspace(0, 2, 4)),
])
def test_box_is_clip(lower, upper):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4)) * 2
  y = Box(lower, upper).project(jnp.asarray(x, jnp.float32))
  lo = _inward(-np.inf if lower is None else lower, np.float32, up=True)
  hi = _inward(np.inf if upper is None else upper, np.float32, up=False)
  expected = np.clip(x.astype(np.float32), lo, hi)
  np.testing.assert_array_equal(np.asarray(y), expected)


def test_bounds_are_rounded_inwards_in_float32():
  # float32(0.7) < 0.7 and float32(1.1) > 1.1: both must be rounded inwards.
  c = Box(0.7, 1.1)
  y = _f64(c.project(jnp.array([-5.0, 0.7, 1.1, 5.0], jnp.float32)))
  assert (y >= 0.7).all() and (y <= 1.1).all()
  np.testing.assert_allclose(y, [0.7, 0.7, 1.1, 1.1], rtol=1e-7)
  y = _f64(NonNegative(0.7).project(jnp.array([-1.0, 0.0, 0.5, 2.0])))
  assert (y >= 0.7).all() and y.min() - 0.7 < 1e-7


@pytest.mark.parametrize("c", [NonNegative(eps=0.1), Box(0.1, 0.3),
                               Box(np.array([0.1, -0.3, 0.7]), 0.9)], ids=repr)
def test_half_precision_lands_exactly_in_the_set(c):
  x = np.linspace(-1, 1, 12).reshape(4, 3)
  xs = [jnp.asarray(x, d) for d in (jnp.bfloat16, jnp.float16, jnp.float32)]
  for xd, (y, v) in zip(xs, _pv(c, *xs)):
    assert y.dtype == xd.dtype and float(v) == 0.0
    yf = _f64(y)  # exact: every value of these dtypes is a float64
    assert (yf >= np.asarray(c.lower, F64)).all()
    if c.upper is not None:
      assert (yf <= np.asarray(c.upper, F64)).all()
    assert (yf == _f64(xd)).any()  # not every point moved
    lo = _inward(np.broadcast_to(c.lower, x.shape), np.dtype(xd.dtype), True)
    hi = _inward(np.inf if c.upper is None else c.upper, np.dtype(xd.dtype),
                 False)
    np.testing.assert_array_equal(yf, _f64(np.clip(np.asarray(xd), lo, hi)))


# ------------------------------------------------------------------- simplex


@pytest.mark.parametrize("shape,axis,scale", [
    ((5, 4), 1, 2.5), ((3, 4, 5), (0, 2), 1.0), ((3, 4, 5), (2, -3), 4.0),
    ((3, 4, 5), 1, 0.3), ((2, 1, 3), None, 7.0),
])
def test_simplex_matches_bisection(shape, axis, scale):
  rng = np.random.default_rng(2)
  x = rng.normal(size=shape) * 2
  with jax.enable_x64(True):
    ((y, v),) = _pv(Simplex(scale=scale, axis=axis), jnp.asarray(x))
  assert y.dtype == jnp.float64 and float(v) == 0
  np.testing.assert_allclose(np.asarray(y), ref_simplex(x, scale, axis),
                             rtol=0, atol=1e-12 * scale)


def test_simplex_float32_eager_and_large_offsets():
  rng = np.random.default_rng(3)
  # Shift invariance: P(v + c) = P(v); float32 with |v| >> scale.
  c = Simplex(axis=-1)
  v = rng.normal(size=(3, 4)) * 3
  expected = ref_simplex(v, 1.0, -1)
  np.testing.assert_allclose(_f64(c.project(jnp.asarray(v, jnp.float32))),
                             expected, atol=2e-6)
  for offset in (1e3, 1e5):
    y = c.project(jnp.asarray(v + offset, jnp.float32))
    assert float(c.violation(y)) == 0.0
    np.testing.assert_allclose(_f64(y), expected, atol=0.02)


def test_simplex_matches_scipy_qp_and_kkt():
  scale, n = 2.0, 5
  vs = np.random.default_rng(0).normal(size=(n, 4)) * 2  # columns: axis=0
  with jax.enable_x64(True):
    ((ys, _),) = _pv(Simplex(scale, axis=0), jnp.asarray(vs))
  for v, y in zip(vs.T, np.asarray(ys).T):
    res = optimize.minimize(
        lambda y: 0.5 * np.sum((y - v) ** 2), np.full(n, scale / n),
        jac=lambda y: y - v, method="SLSQP", bounds=[(0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda y: y.sum() - scale,
                      "jac": lambda y: np.ones(n)}],
        options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    np.testing.assert_allclose(y, res.x, atol=1e-6)
    # KKT: y = max(v - theta, 0) for one theta.
    support = y > 0
    theta = v[support] - y[support]
    np.testing.assert_allclose(theta, theta[0], atol=1e-12)
    assert (v[~support] <= theta[0] + 1e-12).all()


def test_simplex_threshold_search_on_its_hard_cases_and_without_a_sort():
  # Michelot's Newton passes drop coordinates from the support; these inputs
  # need several passes (a concave spread: log 1..60 takes 6), have ties at
  # the threshold, or one slice converged long before the others.
  n = 60
  spread = np.log(np.arange(1, n + 1, dtype=F64))
  cases = {
      "spread": np.stack([spread, -spread, spread[::-1] * 3], 1),
      "ties": np.repeat([[1.0], [1.0], [1.0], [0.5], [0.0]], 3, 1),
      "one_far": np.concatenate([np.zeros((n - 1, 3)), [[50, 1e-9, -50]]]),
  }
  project = jax.jit(Simplex(2.0, axis=0).project)
  with jax.enable_x64(True):
    for name, v in cases.items():
      y = np.asarray(project(jnp.asarray(v)))
      np.testing.assert_allclose(y, ref_simplex(v, 2.0, 0), atol=1e-12,
                                 err_msg=name)
  hlo = jax.jit(Simplex(axis=0).project).lower(
      jnp.zeros((50, 7))).compile().as_text()
  assert " sort(" not in hlo and " transpose(" not in hlo


# --------------------------------------------------------------------- norms


NORM_CASES = [
    (MaxNorm(1.5, axis=0), 0.0, 1.5, 1.0),
    (MaxNorm(0.7, axis=(0, 2)), 0.0, 0.7, 1.0),
    (MaxNorm(2.0, axis=None), 0.0, 2.0, 1.0),
    (UnitNorm(axis=1), 1.0, 1.0, 1.0),
    (MinMaxNorm(1.0, 2.0, axis=-1), 1.0, 2.0, 1.0),
    (MinMaxNorm(1.0, 2.0, rate=0.3, axis=(1, 0)), 1.0, 2.0, 0.3),
    (MinMaxNorm(0.0, 1.0, rate=0.0, axis=1), 0.0, 1.0, 0.0),
]


@pytest.mark.parametrize("c,lo,hi,rate", NORM_CASES, ids=repr)
def test_norm_sets_match_keras_formula(c, lo, hi, rate):
  rng = np.random.default_rng(4)
  # Slices of norms spread over [0.05, 5]: some below, inside and above.
  x = rng.normal(size=(4, 3, 5))
  x *= np.exp(rng.uniform(-3, 1.6, size=(4, 3, 5)))
  x[:, 0, 0] = 0  # and zero slices for every axis choice but None
  with jax.enable_x64(True):
    ((y, _),) = _pv(c, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), ref_radial(x, lo, hi, rate, c.axis),
                             rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize("c", [
    MaxNorm(1.0, axis=0), UnitNorm(axis=0),
    MinMaxNorm(2.0, 3.0, rate=0.5, axis=0)], ids=repr)
def test_norm_sets_eager_float32_with_a_zero_slice(c):
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 4)) * 2
  x[:, 1] = 0
  y = np.asarray(c.project(jnp.asarray(x, jnp.float32)))
  expected = ref_radial(x, c.min_value, c.max_value, c.rate, c.axis)
  np.testing.assert_allclose(y, expected, rtol=2e-6)
  if c.axis == 0:  # zero slice: 0 if allowed, else the constant direction
    np.testing.assert_allclose(y[:, 1], c.rate * c.min_value / np.sqrt(3),
                               rtol=1e-6)


def test_minmaxnorm_rate_below_one_is_not_a_projection():
  c = MinMaxNorm(1.0, 2.0, rate=0.5, axis=0)
  x = np.zeros((3, 4), np.float32)
  x[:2, 0] = [3.0, 4.0]  # norm 5 -> 0.5 * 2 + 0.5 * 5 = 3.5
  x[0, 1:] = 1.5  # norms 1.5: inside, unchanged
  y = c.project(jnp.asarray(x))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(y)[:, 0]), 3.5,
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(y)[:, 1:], x[:, 1:])
  np.testing.assert_allclose(float(c.violation(y)), 1.5, rtol=1e-5)


# --------------------------------------- dtypes, inside points, jit and vmap

# (set, a point of the set made from x, exactly representable; reference)
SETS = [
    (NonNegative(eps=0.1), lambda x: np.abs(x) + 0.125,
     lambda x: np.maximum(x, 0.1)),
    (Box(np.linspace(-1, 0, 4), 0.3), lambda x: np.clip(x, 0, 0.25),
     lambda x: np.clip(x, np.linspace(-1, 0, 4), 0.3)),
    (Simplex(2.0, axis=(0, 1)), lambda x: np.eye(3, 4) * [[1.0], [0.5], [0.5]],
     lambda x: ref_simplex(x, 2.0, (0, 1))),
    (MaxNorm(1.0, axis=0), lambda x: x / np.linalg.norm(x, axis=0) * 0.9,
     lambda x: ref_radial(x, 0.0, 1.0, 1.0, 0)),
    (UnitNorm(axis=-1), lambda x: -np.eye(3, 4),
     lambda x: ref_radial(x, 1.0, 1.0, 1.0, -1)),
    (MinMaxNorm(0.5, 1.5, rate=0.4),
     lambda x: x / np.linalg.norm(x, axis=0) * 1.25,
     lambda x: ref_radial(x, 0.5, 1.5, 0.4, 0)),
]


@functools.partial(jax.jit, static_argnums=0)
def _vmapped(c, xs):
  return jax.vmap(lambda x: (c.project(x), c.violation(c.project(x))))(xs)


@pytest.mark.parametrize("c,inside,ref", SETS,
                         ids=[f"{i}-{type(case[0]).__name__}"
                              for i, case in enumerate(SETS)])
def test_dtypes_inside_points_and_vmap(c, inside, ref):
  rng = np.random.default_rng(6)
  x = rng.normal(size=(3, 4)) * 2
  w = inside(x)
  xs = [jnp.asarray(x, d) for d in (jnp.float16, jnp.bfloat16, jnp.float32)]
  xs += [jnp.asarray(w, d) for d in (jnp.bfloat16, jnp.float32)]
  out = _pv(c, *xs)
  projection = getattr(c, "rate", 1.0) == 1.0  # else Keras' relaxed step
  for i, (xd, (y, v)) in enumerate(zip(xs, out)):
    assert y.dtype == xd.dtype and y.shape == xd.shape
    assert v.shape == () and np.isfinite(_f64(y)).all()
    if projection or i >= 3:
      assert float(v) == 0.0, (xd.dtype, float(v))
    if i >= 3:  # points of the set come back bit for bit
      np.testing.assert_array_equal(_f64(y), _f64(xd))
  # Each dtype: the reference projection of the rounded input, to precision.
  for xd, (y, _) in zip(xs[:3], out):
    eps = 4 * float(jnp.finfo(xd.dtype).eps)
    np.testing.assert_allclose(_f64(y), ref(_f64(xd)), rtol=eps, atol=eps)
  # vmap over a batch equals the per-example projections.
  yv, vv = jax.device_get(_vmapped(c, jnp.stack([xs[2], xs[4]])))
  for k, i in enumerate((2, 4)):
    np.testing.assert_allclose(np.asarray(yv[k]), np.asarray(out[i][0]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(vv[k]), float(out[i][1]), atol=1e-7)


# ---------------------------------------------------------------------- grad

GRAD_POINTS = [
    # (set, a point at 0 or on the boundary, a point strictly inside or None)
    (NonNegative(), np.zeros((3, 4)), np.full((3, 4), 0.5)),
    (Box(-0.5, 0.3), np.full((3, 4), 0.3), np.full((3, 4), 0.1)),
    (Simplex(axis=0), np.full((3, 4), 1 / 3), None),
    (MaxNorm(1.0, axis=0), np.full((3, 4), 3 ** -0.5), np.full((3, 4), 0.5)),
    (UnitNorm(axis=0), np.zeros((3, 4)), None),
    (MinMaxNorm(0.5, 1.5, rate=0.4, axis=None), np.full((3, 4), 0.25),
     np.full((3, 4), 0.3)),
]


@functools.partial(jax.jit, static_argnums=0)
def _grads(c, w, xs):
  """Gradients of sum(w * P(x)), for each x of a batch."""
  return jax.vmap(jax.grad(lambda x: jnp.sum(w * c.project(x))))(xs)


@pytest.mark.parametrize("c,x0,inside", GRAD_POINTS,
                         ids=[f"{i}-{type(case[0]).__name__}"
                              for i, case in enumerate(GRAD_POINTS)])
def test_grad_is_finite_at_zero_and_on_the_boundary(c, x0, inside):
  rng = np.random.default_rng(7)
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  points = [x0, np.zeros((3, 4)), x0 if inside is None else inside]
  g = np.asarray(_grads(c, w, jnp.asarray(np.stack(points), jnp.float32)))
  assert np.isfinite(g).all()
  if inside is not None:  # P is the identity there.
    np.testing.assert_array_equal(g[2], np.asarray(w))


@pytest.mark.parametrize("c", [MaxNorm(1.0, axis=0), UnitNorm(axis=None)],
                         ids=repr)
def test_grad_of_violation_is_finite_at_zero(c):
  g = jax.jit(jax.grad(c.violation))(jnp.zeros((3, 4)))
  assert np.isfinite(np.asarray(g)).all()


def test_grads_match_finite_differences():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(3, 4)) * 2
  w = rng.normal(size=(3, 4))
  for c, ref in [
      (MaxNorm(1.0, axis=0), lambda v: ref_radial(v, 0, 1, 1, 0)),
      (Simplex(axis=1), lambda v: ref_simplex(v, 1.0, 1)),
  ]:
    with jax.enable_x64(True):
      g = _grads(c, jnp.asarray(w), jnp.asarray(x)[None])[0]
    def f(v):
      return np.sum(w * ref(v))
    fd = [(f(x + 1e-6 * e) - f(x - 1e-6 * e)) / 2e-6
          for e in np.eye(12).reshape(12, 3, 4)]
    np.testing.assert_allclose(np.asarray(g), np.reshape(fd, (3, 4)), rtol=1e-5,
                               atol=1e-7)
