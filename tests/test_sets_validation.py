"""Constraint sets: hashing, immutability, ``violation`` and validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posconstr import Box
from posconstr import MaxNorm
from posconstr import MinMaxNorm
from posconstr import NonNegative
from posconstr import Simplex
from posconstr import UnitNorm

# ------------------------------------------------------ hashing, immutability


def _pairs():
  """(make, other): make() builds equal sets; other differs in one field."""
  return [
      (lambda: NonNegative(0.5), NonNegative(0.25)),
      (lambda: Box(np.array([0.0, 1.0]), 2.0), Box(np.array([0.0, 1.5]), 2.0)),
      (lambda: Box(-1.0, None), Box(None, -1.0)),
      (lambda: Simplex(2.0, axis=(0, 1)), Simplex(2.5, axis=(0, 1))),
      (lambda: MaxNorm(1.0, axis=0), MaxNorm(1.0, axis=1)),
      (lambda: UnitNorm(axis=None), UnitNorm(axis=0)),
      (lambda: MinMaxNorm(0.5, 1.0, rate=0.5), MinMaxNorm(0.5, 1.0, rate=0.6)),
  ]


@pytest.mark.parametrize("make,other", _pairs(), ids=lambda v: repr(v)[:30])
def test_equal_hyperparameters_give_equal_sets(make, other):
  a, b = make(), make()
  assert a is not b and a == b and hash(a) == hash(b)
  assert a != other
  assert len({a, b, other}) == 2


def test_equality_is_by_type_and_value():
  assert NonNegative(0.0) != Box(0.0, None)
  assert Box(np.array([0, 1]), 2.0) == Box(np.array([0.0, 1.0]), 2)
  assert MaxNorm(1.0, axis=0) != MinMaxNorm(0.0, 1.0, axis=0)


def test_sets_are_static_jit_arguments():
  traces = []

  def f(c, x):
    traces.append(c)
    return c.project(x)

  f = jax.jit(f, static_argnums=0)
  x = jnp.array([-1.0, 0.5, 2.0])
  a = f(Box(np.array([0.0, 0.0, 0.0]), 1.0), x)
  b = f(Box(np.zeros(3), 1.0), x)  # equal: no retrace
  c = f(Box(np.zeros(3), 0.75), x)  # different: retrace
  assert len(traces) == 2
  np.testing.assert_array_equal(np.asarray(a), [0.0, 0.5, 1.0])
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  np.testing.assert_array_equal(np.asarray(c), [0.0, 0.5, 0.75])


@pytest.mark.parametrize("c,field", [
    (NonNegative(), "eps"), (Box(0.0, 1.0), "upper"), (Simplex(), "scale"),
    (MaxNorm(), "max_value"), (UnitNorm(), "axis"), (MinMaxNorm(), "rate"),
], ids=repr)
def test_sets_are_immutable(c, field):
  before = getattr(c, field)
  with pytest.raises(AttributeError, match="cannot assign"):  # frozen
    setattr(c, field, 0.5)
  with pytest.raises(AttributeError, match="cannot assign"):  # frozen
    c.new_field = 1
  assert getattr(c, field) == before


def test_box_bound_arrays_are_read_only():
  lower = np.zeros(3)
  c = Box(lower, 1.0)
  lower[0] = 5.0  # the caller's array is copied
  with pytest.raises(ValueError):
    c.lower[0] = 5.0
  np.testing.assert_array_equal(c.lower, 0.0)


# ----------------------------------------------------------------- violation

F32 = np.float32
UP = float(np.nextafter(F32(1), F32(2)))
VIOLATION_CASES = [
    # (set, [(x, exact violation, or None for "> 0")]); 0 means feasible.
    (NonNegative(), [([0.0, 2.0, -0.0], 0), ([1.0, -1e-30, 1.0], 1e-30),
                     ([-3.0, 1.0, 0.0], 3.0)]),
    (NonNegative(0.5), [([0.5, 9.0], 0), ([0.25, 1.0], 0.25)]),
    (Box(0.0, 1.0), [([0.0, 1.0], 0), ([UP, 0.5], UP - 1), ([-2.0, 3.0], 2.0)]),
    (Box(None, -1.0), [([-1.0, -5.0], 0), ([0.0, -1.0], 1.0)]),
    (Box(np.array([0.0, 1.0]), np.array([1.0, 2.0])),
     [([0.0, 2.0], 0), ([1.0, 0.5], 0.5), ([1.5, 1.5], 0.5)]),
    (Simplex(axis=0), [([0.25, 0.25, 0.5], 0), ([1.0, 0.0, -0.0], 0),
                       ([1.5, -0.5, 0.0], 0.5), ([0.25, 0.25, 0.51], None),
                       ([0.25, 0.25, 0.25], None)]),
    (Simplex(3.0, axis=None), [([[1.0, 0.5], [0.5, 1.0]], 0),
                               ([[1.0, 0.5], [0.5, 0.5]], None)]),
    (MaxNorm(1.0, axis=None), [([0.6, 0.8], 0), ([0.0, 0.0], 0),
                               ([0.6, 0.81], None), ([3.0, 4.0], 4.0)]),
    (UnitNorm(axis=None), [([1.0, 0.0], 0), ([0.0, -1.0], 0),
                           ([0.5, 0.0], 0.5), ([0.0, 0.0], 1.0)]),
    (MinMaxNorm(1.0, 2.0, axis=0), [([1.5, 0.0], 0), ([0.5, 0.0], 0.5),
                                    ([3.0, 0.0], 1.0)]),
]


@functools.partial(jax.jit, static_argnums=0)
def _violations(c, xs):
  return jax.vmap(c.violation)(xs)


@pytest.mark.parametrize("c,cases", VIOLATION_CASES, ids=repr)
def test_violation_is_zero_exactly_on_the_set(c, cases):
  xs = np.array([x for x, _ in cases], np.float32)
  eager = c.violation(jnp.asarray(xs[-1]))
  assert eager.shape == () and eager.dtype == jnp.float32
  for (x, expected), v in zip(cases, np.asarray(_violations(c, xs))):
    assert v >= 0
    if expected == 0:
      assert v == 0.0, (x, v)
    elif expected is None:
      assert v > 0, x
    else:
      np.testing.assert_allclose(v, expected, rtol=2e-6)
  np.testing.assert_allclose(float(eager), v, rtol=1e-6)


def test_violation_respects_inward_rounding():
  # 0.1 is no float32: float32(0.1) > 0.1 is feasible for eps=0.1, the
  # float32 just below is not, in float32 and in bfloat16.
  c = NonNegative(0.1)
  assert float(c.violation(jnp.float32(0.1))) == 0
  below = np.nextafter(F32(0.1), F32(0))
  assert float(c.violation(jnp.float32(below))) > 0
  assert float(c.violation(jnp.asarray(0.1, jnp.bfloat16))) == 0
  assert float(c.violation(jnp.asarray(0.0996, jnp.bfloat16))) > 0


ALL = [NonNegative(), Box(-1.0, 1.0), Simplex(axis=0), MaxNorm(1.0, axis=0),
       UnitNorm(axis=0), MinMaxNorm(0.5, 1.0, axis=0),
       MinMaxNorm(0.5, 1.0, rate=0.5, axis=0)]


@pytest.mark.parametrize("c", ALL, ids=repr)
def test_nan_gives_nan_violation_and_stays_nan(c):
  x = np.full((3, 4), 0.3, np.float32)
  x[1, 0] = np.nan
  y, v = jax.jit(lambda x: (c.project(x), c.violation(x)))(x)
  assert np.isnan(float(v))
  y = np.asarray(y)
  assert np.isnan(y[1, 0])  # never silently replaced by a number
  assert np.isfinite(y[:, 1:]).all()  # the other slices are not NaN


@pytest.mark.parametrize("c", ALL, ids=repr)
def test_empty_leaf(c):
  """Three empty slices (along axis 0) and no slices at all (shape (3, 0)).

  An empty slice has sum 0 and norm 0: outside the simplex and the shells,
  inside the other sets. With no slices there is nothing to violate."""
  x = jnp.zeros((0, 3))
  assert c.project(x).shape == (0, 3)
  empty_is_feasible = not (isinstance(c, (Simplex, UnitNorm)) or (
      isinstance(c, MinMaxNorm) and c.min_value > 0))
  if empty_is_feasible:
    assert float(c.violation(x)) == 0.0
  else:
    scale = c.scale if isinstance(c, Simplex) else c.min_value
    assert float(c.violation(x)) == pytest.approx(scale, rel=1e-6)
  assert float(c.violation(jnp.zeros((3, 0)))) == 0.0


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("make,match", [
    (lambda: Box(2.0, 1.0), r"`lower` must be <= `upper`.*lower=2\.0.*upper=1"),
    (lambda: Box(np.array([0.0, 3.0, 1.0]), np.array([1.0, 2.5, 2.0])),
     r"`lower` must be <= `upper`.*3\.0.*2\.5.*index \(1,\)"),
    (lambda: Box(np.zeros((2, 2)), np.array([[1.0, 1.0], [-1.0, 1.0]])),
     r"`lower`.*index \(1, 0\)"),
    (lambda: Box(np.zeros(3), np.ones(2)), r"`lower`.*\(3,\).*`upper`.*\(2,\)"),
    (lambda: Box(float("nan"), 1.0), r"`lower` must not be NaN"),
    (lambda: Box(0.0, np.array([1.0, np.nan])),
     r"`upper` contains NaN.*\(1,\)"),
    (lambda: NonNegative(-0.5), r"`eps` must be >= 0, got -0\.5"),
    (lambda: NonNegative(float("inf")), r"`eps` must be finite"),
    (lambda: MaxNorm(0.0), r"`max_value` must be > 0, got 0\.0"),
    (lambda: MaxNorm(-2.0), r"`max_value` must be > 0, got -2\.0"),
    (lambda: Simplex(0.0), r"`scale` must be > 0, got 0\.0"),
    (lambda: Simplex(-1.0), r"`scale` must be > 0, got -1\.0"),
    (lambda: Simplex(axis=()), r"`axis` must not be an empty tuple"),
    (lambda: MinMaxNorm(2.0, 1.0), r"min_value=2\.0 > max_value=1\.0"),
    (lambda: MinMaxNorm(-1.0, 1.0), r"`min_value` must be >= 0, got -1\.0"),
    (lambda: MinMaxNorm(0.0, 0.0), r"`max_value` must be > 0, got 0\.0"),
    (lambda: MinMaxNorm(rate=1.5), r"`rate` must be in \[0, 1\], got 1\.5"),
    (lambda: MinMaxNorm(rate=-0.1), r"`rate` must be in \[0, 1\], got -0\.1"),
    (lambda: MinMaxNorm(rate=float("nan")), r"`rate` must be finite"),
])
def test_bad_hyperparameters_raise_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("make,match", [
    (lambda: Simplex(axis="a"), r"`axis` must be an int.*'a'"),
    (lambda: MaxNorm(axis=1.0), r"`axis` must be an int"),
    (lambda: UnitNorm(axis=(0, "b")), r"`axis` must be an int"),
    (lambda: MinMaxNorm(axis=True), r"`axis` must be an int.*True"),
    (lambda: NonNegative(eps="x"), r"`eps` must be a real number.*'x'"),
    (lambda: NonNegative(eps=True), r"`eps` must be a real number.*True"),
    (lambda: NonNegative(eps=[0.1]), r"`eps` must be a real number"),
    (lambda: MaxNorm(max_value=None), r"`max_value` must be a real number"),
    (lambda: Simplex(scale=1j), r"`scale` must be a real number"),
    (lambda: MinMaxNorm(rate="1"), r"`rate` must be a real number"),
    (lambda: Box(lower=True), r"`lower` must be a number"),
    (lambda: Box(upper="x"), r"`upper` must be a number"),
    (lambda: Box(upper=np.array([1j])), r"`upper` must be real"),
])
def test_wrong_types_raise_type_error(make, match):
  with pytest.raises(TypeError, match=match):
    make()


@pytest.mark.parametrize("c,shape,match", [
    (Simplex(axis=2), (3, 4), r"axis=2 is out of range for parameter "
     r"`params/w` of rank 2"),
    (MaxNorm(axis=-3), (3, 4), r"axis=-3 .*`params/w`"),
    (UnitNorm(axis=(0, 5)), (3, 4, 2), r"axis=\(0, 5\).*`params/w`"),
    (MinMaxNorm(axis=0), (), r"axis=0 .*`params/w` of rank 0"),
    (Simplex(axis=(0, -2)), (3, 4), r"repeats an axis.*`params/w`"),
    (Simplex(axis=1), (3, 0), r"`params/w`.*empty slices"),
    (Box(np.zeros(3), 1.0), (3, 4), r"`lower` of shape \(3,\) does not "
     r"broadcast to parameter `params/w` of shape \(3, 4\)"),
    (Box(None, np.zeros((2, 4))), (3, 4), r"`upper` of shape \(2, 4\).*"
     r"`params/w`"),
    (Box(np.zeros((2, 1, 4)), None), (3, 4), r"`lower`.*`params/w`"),
    (Box(0.1001, 0.1002), (3,), r"no bfloat16 value.*`params/w`"),
], ids=lambda v: repr(v)[:30])
def test_check_leaf_raises_value_error_naming_the_path(c, shape, match):
  dtype = jnp.bfloat16 if "bfloat16" in match else jnp.float32
  with pytest.raises(ValueError, match=match):
    c.check_leaf(shape, dtype, "params/w")


@pytest.mark.parametrize("c", ALL + [NonNegative(0.1), Box(None, np.ones(4))],
                         ids=repr)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_check_leaf_rejects_non_float_leaves(c, dtype):
  with pytest.raises(TypeError, match=r"`params/count`.*only floating"):
    c.check_leaf((3, 4), dtype, "params/count")


@pytest.mark.parametrize("c,shape", [
    (Simplex(axis=-1), (3, 4)), (Simplex(axis=None), ()),
    (MaxNorm(axis=(0, 2)), (2, 3, 4)), (Box(np.zeros(4), 1.0), (3, 4)),
    (Box(np.zeros((3, 1)), np.ones(4)), (3, 4)), (NonNegative(), ()),
    (UnitNorm(axis=-2), (3, 4)),
], ids=repr)
def test_check_leaf_accepts_valid_leaves(c, shape):
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    c.check_leaf(shape, dtype, "params/w")


@pytest.mark.parametrize("constraint", [
    Box(7e4, 8e4), NonNegative(1e5), Box(0.1, 0.10001)], ids=repr)
def test_a_set_with_no_value_in_the_dtype_refuses_to_project(constraint):
  # A clip onto bounds past float16's range (or between two neighbours)
  # would return a point outside the set.
  x = jnp.ones(2, jnp.float16)
  for call in (lambda: constraint.project(x),
               lambda: constraint.landing_update(x, x)):
    with pytest.raises(ValueError, match=r"no finite float16 value lies in "
                       "the set"):
      call()
  assert float(constraint.violation(constraint.project(x.astype(
      jnp.float32)))) == 0
