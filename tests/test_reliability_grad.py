"""Issue 13 §2: every projection, landing step and parameterization is
differentiable, against closed forms and central finite differences.

Before the fix, ``nextafter`` (the one-ulp landing nudge, the overflow
guard of ``inverse``) had no derivative rule: hypergradients through
``project_nonneg(0.1)``, ``project_box(0.1, 1)``, the norm-shell landing,
``projected(..., NonNegative(0.1))`` and ``jax.grad(Softplus().inverse)``
raised ``NotImplementedError``. The nudge now has the derivative of the
identity (straight-through), so the hypergradient is that of ``P(p + u)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr as pc
from posconstr.sets import _landing

P = jnp.array([0.5, 2.0, -0.3, 0.8])
G = jnp.array([1.0, 3.0, -2.0, 0.5])
LR = 0.3


def _unit(v):
  return v / np.linalg.norm(v)


def _d_radial(v, dv, radius):
  """d/dt of radius * v / |v| along dv (v not scaled when radius is None)."""
  n = np.linalg.norm(v)
  return radius * (dv / n - v * np.dot(v, dv) / n**3)


def _analytic(name):
  """d P(P0 - lr G) / d lr at LR, in float64: -G through the map's Jacobian."""
  p, g = np.asarray(P, np.float64), np.asarray(G, np.float64)
  v, dv = p - LR * g, -g
  if name in ("nonneg(0.1)", "projected(nonneg(0.1))"):
    return np.where(v > 0.1, dv, 0.0)
  if name == "nonneg":
    return np.where(v > 0, dv, 0.0)
  if name in ("box(0.1, 1)", "projected(box)"):
    return np.where((v > 0.1) & (v < 1), dv, 0.0)
  if name == "maxnorm(1)":
    return _d_radial(v, dv, 1.0)
  if name == "unitnorm":
    return _d_radial(v, dv, 1.0)
  if name == "minmax(3, 4)":
    return _d_radial(v, dv, 3.0)
  if name == "simplex":  # support S: x_S = v_S - theta, theta = mean shift
    x = np.asarray(pc.Simplex(axis=None).project(jnp.asarray(v, jnp.float32)))
    s = x > 0
    out = np.where(s, dv - dv[s].mean(), 0.0)
    return out
  raise KeyError(name)


TRANSFORMS = {
    "nonneg(0.1)": lambda lr: optax.chain(optax.sgd(lr),
                                          pc.project_nonneg(0.1)),
    "nonneg": lambda lr: optax.chain(optax.sgd(lr), pc.project_nonneg()),
    "box(0.1, 1)": lambda lr: optax.chain(optax.sgd(lr),
                                          pc.project_box(0.1, 1)),
    "maxnorm(1)": lambda lr: optax.chain(
        optax.sgd(lr), pc.project(pc.MaxNorm(1.0, axis=None))),
    "unitnorm": lambda lr: optax.chain(
        optax.sgd(lr), pc.project(pc.UnitNorm(axis=None))),
    "minmax(3, 4)": lambda lr: optax.chain(
        optax.sgd(lr), pc.project(pc.MinMaxNorm(3.0, 4.0, axis=None))),
    "simplex": lambda lr: optax.chain(
        optax.sgd(lr), pc.project(pc.Simplex(axis=None))),
    "projected(nonneg(0.1))": lambda lr: pc.projected(optax.sgd(lr),
                                                      pc.NonNegative(0.1)),
    "projected(box)": lambda lr: pc.projected(optax.sgd(lr), pc.Box(0.1, 1.0)),
}


def _new_params(name, lr):
  tx = TRANSFORMS[name](lr)
  params = {"w": P}
  updates, _ = tx.update({"w": G}, tx.init(params), params)
  return optax.apply_updates(params, updates)["w"]


@pytest.fixture(scope="module")
def hypergradients():
  @jax.jit
  def run():
    return {name: (jax.jacfwd(lambda lr: _new_params(name, lr))(LR),
                   jax.jacrev(lambda lr: _new_params(name, lr))(LR),
                   [_new_params(name, LR + h) for h in (-1e-3, 1e-3)])
            for name in TRANSFORMS}
  return jax.tree.map(np.asarray, run())


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_hypergradient_of_one_projected_step(hypergradients, name):
  forward, reverse, (below, above) = hypergradients[name]
  expected = _analytic(name)
  np.testing.assert_allclose(forward, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reverse, expected, rtol=1e-5, atol=1e-6)
  fd = (above.astype(np.float64) - below) / 2e-3  # No kink within 1e-3.
  np.testing.assert_allclose(fd, expected, rtol=2e-2, atol=2e-3)


def test_the_landing_nudge_is_straight_through():
  """p = 1 and target eps = 1e-8: (t - p) + p rounds to 0 in float32, so
  the nudge fires; the landed value eps has derivative 1 in eps."""
  def landed(eps):
    p, u = jnp.float32(1.0), jnp.float32(-5.0)
    d = _landing.landing_update(p, u, pc.NonNegative(eps))
    return p + d

  eps = jnp.float32(1e-8)
  assert float(jnp.float32(1.0) + (eps - 1.0)) == 0.0  # the premise
  assert float(landed(eps)) >= 1e-8
  assert float(jax.grad(landed)(eps)) == 1.0
  assert float(jax.jit(jax.grad(landed))(eps)) == 1.0


PARAMETERIZATIONS = [pc.Softplus(), pc.Softplus(beta=3.0, eps=0.1), pc.Exp(),
                     pc.Exp(eps=0.7), pc.Square(eps=0.1), pc.Abs(eps=2.0),
                     pc.Sigmoid(-1.0, 3.0)]


@pytest.mark.parametrize("g", PARAMETERIZATIONS, ids=repr)
def test_grad_of_inverse_is_one_over_the_derivative(g):
  lo = float(g.constraint.lower)
  w = jnp.asarray(lo + np.array([0.05, 0.5, 1.5]), jnp.float32)
  grad = jax.vmap(jax.grad(g.inverse))(w)
  z = g.inverse(w)
  np.testing.assert_allclose(grad, 1 / g.derivative(z), rtol=1e-4)
  fd = (np.asarray(g.inverse(w + 1e-3), np.float64)
        - np.asarray(g.inverse(w - 1e-3), np.float64)) / 2e-3
  np.testing.assert_allclose(grad, fd, rtol=1e-2)


def test_grad_of_inverse_at_the_overflow_guard_is_finite():
  """``Exp().inverse(max)`` moves the latent one ulp down (its forward
  would overflow): the move is straight-through."""
  top = jnp.float32(np.finfo(np.float32).max)
  z = pc.Exp().inverse(top)
  assert np.isfinite(float(pc.Exp().forward(z)))
  grad = float(jax.grad(pc.Exp().inverse)(top))  # 1 / max: flushed to 0
  assert np.isfinite(grad) and 0 <= grad <= 1e-38
  half = jnp.float16(np.finfo(np.float16).max)
  z = pc.Exp().inverse(half)
  assert np.isfinite(float(pc.Exp().forward(z)))
  grad = float(jax.grad(
      lambda w: pc.Exp().inverse(w).astype(jnp.float32))(half))
  assert np.isfinite(grad)


@pytest.mark.parametrize("make,x,expected", [
    # d/d eps sum(max(x, eps)) = #{x < eps}
    (lambda t: pc.NonNegative(t), [-1.0, 0.05, 0.5], 2.0),
    # d/d upper sum(clip(x, 0, upper)) = #{x > upper}
    (lambda t: pc.Box(0.0, t), [-1.0, 0.05, 0.5, 2.0], 1.0),
    # d/d scale sum(simplex_scale(x)) = 1
    (lambda t: pc.Simplex(t, axis=None), [0.3, 0.2, 0.9], 1.0),
    # d/d c sum(x c / |x|) for |x| > c
    (lambda t: pc.MaxNorm(t, axis=None), [3.0, 4.0], 7.0 / 5.0),
])
def test_grad_with_respect_to_a_set_hyperparameter(make, x, expected):
  x = jnp.asarray(x)
  def f(t):
    return jnp.sum(make(t).project(x))

  t = jnp.float32(0.1 if "NonNegative" in repr(make(1.0)) else 1.0)
  assert float(jax.grad(f)(t)) == pytest.approx(expected, rel=1e-5)
  assert float(jax.jit(jax.grad(f))(t)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make,t0", [
    (lambda t: pc.Softplus(beta=t), 2.0), (lambda t: pc.Softplus(eps=t), 0.3),
    (lambda t: pc.Sigmoid(lower=t), -1.0), (lambda t: pc.Sigmoid(upper=t), 3.0),
    (lambda t: pc.Exp(eps=t), 0.2),
])
def test_grad_with_respect_to_a_parameterization_hyperparameter(make, t0):
  z = jnp.array([-3.0, -0.5, 0.0, 0.7, 4.0])
  def f(t):
    return jnp.sum(make(t).forward(z))

  grad = float(jax.grad(f)(jnp.float32(t0)))
  fd = (float(f(t0 + 1e-2)) - float(f(t0 - 1e-2))) / 2e-2
  assert grad == pytest.approx(fd, rel=2e-3)
