"""ICNN initializers against the paper and against sampling.

References: the numbers published by Hoedt & Klambauer (NeurIPS 2023) for
fan-in 64 and rho = 0.5; the fixed-point property the paper derives them from
(checked by Monte Carlo over correlated inputs, not from the formulas); and
the standard log-normal moment identities for the sampled weights, with
tolerances from the standard error of each estimate.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posconstr
from posconstr import initializers as init

SHAPE = (64, 32)  # One small shape throughout: eager ops compile once.


def sample(initializer, key, shape, dtype=jnp.float32):
  """One compile per call instead of one per eager op."""
  return jax.jit(initializer, static_argnums=(1, 2))(key, shape, dtype)


def lognormal_params(mean, var):
  """Log-space mean and variance of a log-normal with this mean and var."""
  s2 = math.log1p(var / mean**2)
  return math.log(mean) - s2 / 2, s2


def test_icnn_moments_match_the_paper():
  m = init.icnn_moments(64, 0.5)
  assert round(m.weight_mean, 5) == 0.02868
  assert m.weight_var == pytest.approx(0.015625, rel=1e-12)
  assert round(m.bias_mean, 5) == -0.73228
  assert m.bias_var == 0.0
  noisy = init.icnn_moments(64, 0.5, bias_noise=0.3)
  assert noisy.weight_var == pytest.approx(0.7 * 0.015625)
  assert noisy.bias_var == pytest.approx(0.3 * 0.5)
  assert noisy.weight_mean == m.weight_mean and noisy.bias_mean == m.bias_mean
  assert init.icnn_moments(64, 0.5, var=4.0).bias_mean == pytest.approx(
      2 * m.bias_mean)


@pytest.mark.parametrize("n,rho,var,noise", [
    (64, 0.5, 1.0, 0.0), (1, 0.5, 1.0, 0.0), (2, 0.1, 1.0, 0.0),
    (256, 0.9, 3.0, 0.0), (64, 0.3, 1.0, 0.4)])
def test_icnn_moments_give_the_signal_propagation_fixed_point(n, rho, var,
                                                              noise):
  # Inputs: pre-activations with variance `var` and pairwise correlation rho;
  # outputs s_j = sum_i w_ij relu(x_i) + b_j with iid weights of the given
  # mean and variance. Conditional on x, s_j has mean mu * sum(h) + b_mean
  # and variance sigma^2 * sum(h^2) + b_var, independently over j, so:
  #   E[s] = E[c],  Var[s] = E[sigma^2 sum h^2] + Var[c] + b_var,
  #   Cov[s_j, s_k] = Var[c]  (c = mu sum h + b_mean).
  # The paper's claim: E[s] = 0, Var[s] = var, Corr = rho (a fixed point).
  m = init.icnn_moments(n, rho, var, bias_noise=noise)
  samples = 20_000
  rng = np.random.default_rng(n)
  x = math.sqrt(var) * (math.sqrt(1 - rho) * rng.standard_normal((samples, n))
                        + math.sqrt(rho) * rng.standard_normal((samples, 1)))
  h = np.maximum(x, 0)
  c = m.weight_mean * h.sum(1) + m.bias_mean
  total = m.weight_var * np.mean((h**2).sum(1)) + c.var() + m.bias_var
  rel = math.sqrt(2 / samples)  # Relative standard error of a variance.
  assert abs(c.mean()) < 5 * math.sqrt(var / samples)
  assert total == pytest.approx(var, rel=5 * rel)
  assert c.var() / total == pytest.approx(rho, rel=5 * rel)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_icnn_samples_match_the_moments():
  shape = (64, 200_000)
  w = np.asarray(sample(init.icnn(), jax.random.key(0), shape), np.float64)
  assert (w > 0).all() and np.isfinite(w).all()
  m, n = init.icnn_moments(64, 0.5), w.size
  mu, s2 = lognormal_params(m.weight_mean, m.weight_var)
  # Standard errors: of the mean, sqrt(var / n); of the sample variance,
  # sqrt((mu4 - var^2) / n) with mu4 the central 4th moment of the
  # log-normal (heavy-tailed here: var / mean^2 = 19, so ~12% of var).
  raw = [math.exp(k * mu + k * k * s2 / 2) for k in range(5)]
  mean = raw[1]
  mu4 = raw[4] - 4 * mean * raw[3] + 6 * mean**2 * raw[2] - 3 * mean**4
  assert (mean == pytest.approx(m.weight_mean)
          and raw[2] - mean**2 == pytest.approx(m.weight_var))
  assert abs(w.mean() - m.weight_mean) < 5 * math.sqrt(m.weight_var / n)
  assert (abs(w.var() - m.weight_var)
          < 5 * math.sqrt((mu4 - m.weight_var**2) / n))
  # log(w) is normal: its mean and variance pin the distribution tightly.
  lw = np.log(w)
  assert abs(lw.mean() - mu) < 5 * math.sqrt(s2 / n)
  assert abs(lw.var() - s2) < 5 * s2 * math.sqrt(2 / n)
  skew = np.mean((lw - lw.mean())**3) / lw.std()**3
  assert abs(skew) < 5 * math.sqrt(6 / n)


@pytest.mark.parametrize("shape,kwargs,fan_in", [
    ((3, 3, 16, 2000), {}, 144),
    ((5, 7, 3000), {"in_axis": (0, 1), "out_axis": -1}, 35),
])
def test_icnn_fan_in_of_conv_and_custom_axes(shape, kwargs, fan_in):
  w = np.asarray(sample(init.icnn(**kwargs), jax.random.key(1), shape),
                 np.float64)
  assert w.shape == shape
  m = init.icnn_moments(fan_in)
  mu, s2 = lognormal_params(m.weight_mean, m.weight_var)
  lw = np.log(w)
  assert abs(lw.mean() - mu) < 5 * math.sqrt(s2 / w.size)
  assert abs(lw.var() - s2) < 5 * s2 * math.sqrt(2 / w.size)


def test_icnn_dtype_keys_and_positivity():
  f = init.icnn(rho=0.3)
  a = f(jax.random.key(2), SHAPE)
  np.testing.assert_array_equal(a, f(jax.random.key(2), SHAPE))
  assert not np.array_equal(a, f(jax.random.key(3), SHAPE))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    w = f(jax.random.key(2), SHAPE, dtype)
    assert w.dtype == dtype and (np.asarray(w, np.float32) > 0).all()
  np.testing.assert_allclose(sample(f, jax.random.key(2), SHAPE), a, rtol=1e-5)


def test_through_returns_latents_of_the_same_draw():
  key, shape = jax.random.key(4), SHAPE
  draw = np.asarray(init.icnn()(key, shape))
  for g in (posconstr.Softplus(), posconstr.Softplus(beta=4.0), posconstr.Exp(),
            posconstr.Square(), posconstr.Abs()):
    latent = init.through(g, init.icnn())(key, shape)
    assert latent.shape == shape and latent.dtype == jnp.float32
    np.testing.assert_allclose(g.forward(latent), draw, rtol=1e-5)
  latent = init.through(posconstr.Softplus(), init.icnn())(key, shape)
  np.testing.assert_allclose(latent, np.log(np.expm1(draw.astype(np.float64))),
                             rtol=1e-5, atol=1e-5)
  half = init.through(posconstr.Softplus(), init.icnn())(key, shape,
                                                          jnp.bfloat16)
  assert (half.dtype == jnp.bfloat16
          and np.isfinite(np.asarray(half, np.float32)).all())


def test_through_folds_by_default_and_rejects_with_fold_false():
  g = posconstr.Softplus()
  normal = jax.nn.initializers.normal(1.0)
  latent = init.through(g, normal)(jax.random.key(0), SHAPE)
  np.testing.assert_allclose(g.forward(latent),
                             np.abs(normal(jax.random.key(0), SHAPE)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="outside the range"):
    init.through(g, normal, fold=False)(jax.random.key(0), SHAPE)
  with pytest.raises(TypeError, match="parameterization"):
    init.through(posconstr.NonNegative(), init.icnn())
  with pytest.raises(TypeError, match="`fold` must be a bool"):
    init.through(g, normal, fold="yes")


@pytest.mark.parametrize("g", [posconstr.Softplus(), posconstr.Exp(),
                               posconstr.Sigmoid(0.0, 2.0)], ids=repr)
def test_through_gives_the_same_latents_eagerly_and_under_jit(g):
  """A zero-mean initializer: it used to raise eagerly, but under jit left
  half the latents dead at the clamp (-87.3 for Softplus)."""
  normal = jax.nn.initializers.lecun_normal()
  key = jax.random.key(3)
  eager = init.through(g, normal)(key, SHAPE)
  jitted = sample(init.through(g, normal), key, SHAPE)
  # Equal up to rounding: XLA may fuse the jitted inverse differently.
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5,
                             atol=1e-6)
  assert float(jnp.mean(g.dead(jitted))) < 0.02
  # fold=False under jit: out-of-range draws are NaN latents, never dead ones.
  strict = np.asarray(sample(init.through(g, normal, fold=False), key, SHAPE))
  draw = np.asarray(normal(key, SHAPE))
  outside = np.asarray(g.out_of_range(jnp.asarray(draw)))
  assert outside.any()
  assert np.isnan(strict[outside]).all() and np.isfinite(strict[~outside]).all()


def test_icnn_bias_constant_and_noise():
  m = init.icnn_moments(64)
  b = init.icnn_bias(64)(jax.random.key(5), SHAPE)
  np.testing.assert_array_equal(b, np.full(SHAPE, m.bias_mean, np.float32))
  assert (init.icnn_bias(64)(jax.random.key(5), SHAPE, jnp.bfloat16).dtype
          == jnp.bfloat16)
  n = 64 * 1600
  noisy = sample(init.icnn_bias(64, bias_noise=0.3), jax.random.key(6),
                 (64, 1600))
  noisy = np.asarray(noisy, np.float64)
  var = 0.3 * (1 - 0.5)
  assert abs(noisy.mean() - m.bias_mean) < 5 * math.sqrt(var / n)
  assert noisy.var() == pytest.approx(var, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("kwargs,name", [
    ({"rho": 1.0}, "rho"), ({"rho": -1.0}, "rho"), ({"rho": 1.5}, "rho"),
    ({"rho": 0.0}, "rho"), ({"rho": -0.5}, "rho"),
    ({"rho": float("nan")}, "rho"),
    ({"var": 0.0}, "var"), ({"var": -1.0}, "var"),
    ({"var": float("nan")}, "var"),
    ({"bias_noise": 1.0}, "bias_noise"), ({"bias_noise": -0.1}, "bias_noise"),
    ({"alpha": -0.1}, "alpha")])
def test_bad_arguments_raise_naming_them(kwargs, name):
  for make in (lambda: init.icnn(**kwargs),
               lambda: init.icnn_bias(64, **kwargs),
               lambda: init.icnn_moments(64, **kwargs)):
    with pytest.raises(ValueError, match=f"`{name}`"):
      make()


def test_bad_fan_in_and_kernel_rank():
  for fan_in in (0, 2.5, "3", True):
    with pytest.raises(ValueError, match=rf"`fan_in` must be an int >= 1, "
                       rf"got {fan_in!r}"):
      init.icnn_moments(fan_in)
  assert init.icnn_moments(np.int64(8)) == init.icnn_moments(8)
  with pytest.raises(ValueError, match="rank"):
    init.icnn()(jax.random.key(0), (16,))
