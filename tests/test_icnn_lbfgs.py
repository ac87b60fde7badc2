"""Input-convex networks from NonNegDense, NonNegDense vs NonNegLinear, L-BFGS.

ICNN (Amos, Xu & Kolter 2017): ``z1 = relu(W0 x + b0)``,
``z_{k+1} = relu(Wz_k z_k + Wx_k x + b_k)`` with ``Wz_k >= 0``, and a last
layer ``f = Wz_K z_K + Wx_K x + b_K`` with ``Wz_K >= 0``: convex in ``x``.
Convexity is checked numerically on random segments; the same architecture
with unconstrained ``Wz`` must violate it somewhere.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy.optimize import nnls
from sklearn.datasets import load_diabetes

from posconstr import initializers
from posconstr.linen import NonNegDense
from posconstr.nnx import NonNegLinear


def softplus(z):
  return np.logaddexp(0.0, np.asarray(z, np.float64))


# ---------------------------------------------- NonNegDense vs NonNegLinear


def test_nonneg_dense_and_nonneg_linear_agree_on_the_same_latents():
  x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  dense = NonNegDense(4)
  params = dense.init(jax.random.key(0), x)["params"]
  # Move the latents around so that both signs occur, with a non-zero bias.
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda v: np.asarray(v) + rng.normal(size=v.shape).astype(np.float32),
      params)
  linear = NonNegLinear(5, 4, rngs=nnx.Rngs(3))
  assert not np.allclose(np.asarray(linear(x)), dense.apply({"params": params},
                                                            x))
  linear.kernel[...] = jnp.asarray(params["kernel"])
  linear.bias[...] = jnp.asarray(params["bias"])
  got_linen = np.asarray(dense.apply({"params": params}, x))
  got_nnx = np.asarray(linear(x))
  assert got_linen.dtype == got_nnx.dtype == np.float32
  want = (np.asarray(x, np.float64) @ softplus(params["kernel"])
          + params["bias"])
  np.testing.assert_allclose(got_linen, got_nnx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_linen, want, rtol=1e-5, atol=1e-6)


def test_default_init_applied_weights_are_nonnegative_folded_draws():
  x = jnp.ones((1, 64))
  latent = NonNegDense(256).init(jax.random.key(0), x)["params"]["kernel"]
  linear = NonNegLinear(64, 256, rngs=nnx.Rngs(0))
  for lat in (np.asarray(latent), np.asarray(linear.kernel[...])):
    assert np.isfinite(lat).all() and (lat < 0).any()  # latents, not weights
    w = softplus(lat)
    assert (w >= 0).all()
    # |lecun_normal|: E w^2 = 1 / fan_in; some weights near 0 (not g(g(.))).
    np.testing.assert_allclose(np.mean(w**2), 1 / 64, rtol=0.05)
    assert w.min() < 1e-3


# --------------------------------------------------------------------- ICNN


class ICNN(nn.Module):
  hidden: Sequence[int] = (16, 16)
  constrained: bool = True

  @nn.compact
  def __call__(self, x):
    z = nn.relu(nn.Dense(self.hidden[0])(x))
    widths = tuple(self.hidden[1:]) + (1,)
    for i, width in enumerate(widths):
      fan_in = z.shape[-1]
      if self.constrained:
        wz = NonNegDense(width, kernel_init=initializers.icnn(),
                         bias_init=initializers.icnn_bias(fan_in))
      else:
        wz = nn.Dense(width)
      pre = wz(z) + nn.Dense(width, use_bias=False)(x)
      z = pre if i == len(widths) - 1 else nn.relu(pre)
    return z[..., 0]


T = jnp.linspace(0.05, 0.95, 10)


def _segments(seed, n=400, dim=2):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(n, dim)) * 2
  b = rng.normal(size=(n, dim)) * 2
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def _make_gap(model):
  """A jitted convexity gap for ``model``, compiled once per module."""

  @jax.jit
  def gap(params, a, b):
    """f(t a + (1-t) b) - (t f(a) + (1-t) f(b)), relative to the values."""
    def f(z):
      return model.apply({"params": params}, z)
    t = T[None, :, None]
    mid = f(t * a[:, None] + (1 - t) * b[:, None])
    fa, fb = f(a)[:, None], f(b)[:, None]
    chord = T[None] * fa + (1 - T[None]) * fb
    return (mid - chord) / (1 + jnp.abs(fa) + jnp.abs(fb))

  return gap


CONVEX = ICNN(constrained=True)
NOT_CONVEX = ICNN(constrained=False)
CONVEX_GAP = _make_gap(CONVEX)
CONVEX_INIT = jax.jit(CONVEX.init)
TOL = 1e-5  # float32 rounding, relative


def test_icnn_is_convex_at_init_for_several_seeds():
  for seed in range(3):
    params = CONVEX_INIT(jax.random.key(seed), jnp.ones((1, 2)))["params"]
    worst = float(jnp.max(CONVEX_GAP(params, *_segments(seed))))
    assert worst <= TOL, (seed, worst)


def test_unconstrained_twin_violates_convexity():
  gap = _make_gap(NOT_CONVEX)
  params = jax.jit(NOT_CONVEX.init)(jax.random.key(0),
                                    jnp.ones((1, 2)))["params"]
  g = np.asarray(gap(params, *_segments(0)))
  assert g.max() > 1e-2  # far above rounding
  # The violation is real: recheck the worst segment point by point.
  a, b = (np.asarray(v) for v in _segments(0))
  i, j = np.unravel_index(np.argmax(g), g.shape)
  t = float(T[j])
  apply = jax.jit(NOT_CONVEX.apply)
  def f(z):
    return float(apply({"params": params}, z[None])[0])
  assert f(t * a[i] + (1 - t) * b[i]) > t * f(a[i]) + (1 - t) * f(b[i]) + 1e-3


def test_icnn_stays_convex_while_fitting_a_nonconvex_target():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-2, 2, size=(256, 2)), jnp.float32)
  y = jnp.sin(2 * x[:, 0]) + x[:, 1] ** 2  # not convex in x[:, 0]
  params = CONVEX_INIT(jax.random.key(1), jnp.ones((1, 2)))["params"]
  tx = optax.adam(0.02)
  opt_state = tx.init(params)

  def loss(p):
    return jnp.mean((CONVEX.apply({"params": p}, x) - y) ** 2)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  first = None
  for i in range(60):
    params, opt_state, value = step(params, opt_state)
    first = float(value) if first is None else first
    if i in (4, 59):
      worst = float(jnp.max(CONVEX_GAP(params, *_segments(10 + i))))
      assert worst <= TOL, (i, worst)
  assert float(jax.jit(loss)(params)) < 0.5 * first
  # The z-path kernels were trained as latents and read as softplus >= 0;
  # some latents are negative, so a bare kernel would not be convex.
  kernels = [v["kernel"] for k, v in params.items()
             if k.startswith("NonNegDense")]
  assert len(kernels) == 2
  assert any((np.asarray(k) < 0).any() for k in kernels)


# ------------------------------------------------------------------ L-BFGS


def _diabetes():
  data, target = load_diabetes(return_X_y=True)
  data = (data - data.mean(0)) / data.std(0)
  target = (target - target.mean()) / target.std()
  return data, target


def test_lbfgs_on_nonneg_regression_reaches_the_nnls_optimum():
  data, target = _diabetes()
  # References: NNLS (the constrained optimum; with centred data the free
  # intercept is 0) and ordinary least squares (which uses negative weights).
  w_nnls, _ = nnls(data, target)
  nnls_loss = np.mean((data @ w_nnls - target) ** 2)
  w_ols = np.linalg.lstsq(data, target, rcond=None)[0]
  ols_loss = np.mean((data @ w_ols - target) ** 2)
  assert (w_ols < -0.05).any() and ols_loss < nnls_loss - 0.005

  x = jnp.asarray(data, jnp.float32)
  y = jnp.asarray(target, jnp.float32)
  model = NonNegDense(1)
  params = jax.jit(model.init)(jax.random.key(0), x[:1])["params"]

  def loss(p):
    return jnp.mean((model.apply({"params": p}, x)[:, 0] - y) ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  @jax.jit
  def step(p, s):
    value, grad = value_and_grad(p, state=s)
    updates, s = opt.update(grad, s, p, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(p, updates), s, value

  jloss = jax.jit(loss)
  # optax.lbfgs's initial state holds weak-typed scalars (linesearch info)
  # that come back strongly typed: without this, `step` compiles twice.
  state = jax.tree.map(lambda v: jnp.asarray(v, dtype=v.dtype),
                       opt.init(params))
  initial = float(jloss(params))
  values = []
  for _ in range(30):
    before = float(jloss(params))
    params, state, value = step(params, state)
    # The value cached in the state is the loss of the current point.
    np.testing.assert_allclose(float(value), before, rtol=1e-5)
    values.append(float(value))
  final = float(jloss(params))
  assert np.all(np.diff(values + [final]) <= 1e-6)  # monotone decrease
  assert initial > 3 * nnls_loss
  assert final <= nnls_loss * 1.01
  weights = softplus(params["kernel"][:, 0])
  assert (weights >= 0).all()
  # Where NNLS is clearly active the weights agree; the inactive ones shrink.
  big = w_nnls > 0.1
  np.testing.assert_allclose(weights[big], w_nnls[big], atol=0.05)
  assert weights[w_nnls == 0].max() < 0.02
