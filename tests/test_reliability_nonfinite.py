"""Issue 13 §2: NaN, inf and subnormal bounds are never hidden.

Each test failed before the fix; the comment says how. References: NumPy
and the definitions (a NaN latent has no value, +inf is no real number, a
slice with no coordinates sums to 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr as pc

PARAMETERIZATIONS = [pc.Softplus(), pc.Softplus(beta=2.0, eps=0.1), pc.Exp(),
                     pc.Square(), pc.Abs(), pc.ReLU(), pc.Sigmoid(-1.0, 2.0)]
SETS = [pc.NonNegative(), pc.NonNegative(0.1), pc.Box(0.0, 1.0),
        pc.Box(None, 1.0), pc.Simplex(axis=None), pc.MaxNorm(1.0, axis=None),
        pc.UnitNorm(axis=None), pc.MinMaxNorm(0.5, 1.0, axis=None)]
TINY = float(np.finfo(np.float32).tiny)


@jax.jit
def _nan_latents(z):
  out = []
  for g in PARAMETERIZATIONS:
    grad = jax.grad(lambda z: jnp.sum(g.forward(z)))(z)
    out.append((g.forward(z), grad, g.derivative(z), g.dead(z)))
  return out


@pytest.mark.parametrize("i", range(len(PARAMETERIZATIONS)),
                         ids=[repr(g) for g in PARAMETERIZATIONS])
def test_nan_latent_gives_nan_value_gradient_and_derivative(i):
  # Before: ReLU gave 0 with gradient 0 and derivative 0 (alive).
  z = jnp.array([0.5, jnp.nan, -0.5])
  value, grad, slope, dead = map(np.asarray, _nan_latents(z)[i])
  assert np.isnan(value[1]) and np.isnan(grad[1]) and np.isnan(slope[1])
  assert np.isfinite(value[[0, 2]]).all() and np.isfinite(grad[[0, 2]]).all()
  assert dead[1]  # A NaN latent does not train.


def test_reparam_relu_keeps_nan_and_dead_fraction_shows_it():
  # Before: [1., 0.] and a dead fraction of 0.5 (NaN counted as alive).
  out = pc.reparam({"w": jnp.array([1.0, jnp.nan])}, pc.ReLU())["w"]
  assert out[0] == 1.0 and np.isnan(out[1])
  frac = pc.dead_fraction({"w": jnp.array([1.0, jnp.nan]),
                           "v": jnp.array([1.0, -1.0])}, pc.ReLU())
  assert np.isnan(frac["w"]) and float(frac["v"]) == 0.5
  frac = jax.jit(lambda t: pc.dead_fraction(t, pc.Softplus()))(
      {"w": jnp.array([1.0, jnp.nan])})
  assert np.isnan(frac["w"])


@pytest.mark.parametrize("c", SETS, ids=repr)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+inf", "-inf"])
def test_an_infinite_coordinate_is_never_feasible(c, sign):
  # Before: NonNegative and Box(None, ...) gave 0 for +inf / -inf.
  x = jnp.array([0.25, 0.25, 0.25]).at[1].set(sign * jnp.inf)
  assert float(c.violation(x)) == np.inf
  assert float(c.violation(jnp.array([0.25, jnp.nan, 0.25]))) != 0  # NaN


@pytest.mark.parametrize("shape,axis", [((0, 3), 0), ((2, 0), 1), ((0,), None)])
def test_empty_simplex_slices_violate_the_sum(shape, axis):
  # Before: 0 for any empty leaf, though an empty slice sums to 0, not scale.
  c = pc.Simplex(2.0, axis=axis)
  assert float(c.violation(jnp.zeros(shape))) == pytest.approx(2.0, rel=1e-6)
  if axis is not None:  # No slices at all: nothing to violate.
    none = (3, 0) if axis == 0 else (0, 2)
    assert float(c.violation(jnp.zeros(none))) == 0.0
  with pytest.raises(ValueError, match="empty slices"):
    c.check_leaf(shape, jnp.float32, "w")


@pytest.mark.parametrize("eps", [1e-40, 1e-45, 1e-50], ids=str)
def test_subnormal_eps_is_not_flushed_to_zero(eps):
  # Before: XLA on CPU flushes subnormals: project([0]) stayed 0 < eps and
  # violation([0]) was 0.
  c = pc.NonNegative(eps)
  x = jnp.array([0.0, -1.0, 2.0])
  y = np.asarray(c.project(x), np.float64)
  assert (y >= eps).all() and y[0] == TINY
  assert float(c.violation(x)) > 0 and float(c.violation(c.project(x))) == 0
  tx = optax.chain(optax.sgd(1.0), pc.project_nonneg(eps))
  params = {"w": jnp.array([0.5, 1.0])}
  updates, _ = tx.update({"w": jnp.array([1.0, 2.0])}, tx.init(params), params)
  new = np.asarray(optax.apply_updates(params, updates)["w"], np.float64)
  assert (new >= eps).all() and float(c.violation(new)) == 0
  # An upper bound of -eps rounds down to -tiny; one of +eps to 0.
  assert float(pc.Box(None, -eps).project(jnp.zeros(1))[0]) == -TINY
  assert float(pc.Box(None, eps).project(jnp.ones(1))[0]) == 0.0


def test_violation_gap_below_the_smallest_normal_is_not_zero():
  # x < lower with lower - x subnormal: flushed to 0 before the fix.
  c = pc.NonNegative(1.5 * TINY)
  x = jnp.array([1.25 * TINY], jnp.float32)
  assert bool(x[0] < c.bounds_in(jnp.float32)[0])
  assert float(c.violation(x)) >= TINY
  assert float(jax.jit(c.violation)(x)) >= TINY
  assert float(pc.Box(None, 1.25 * TINY).violation(
      jnp.array([1.5 * TINY]))) >= TINY
