"""``posconstr.lbfgsb`` (the Optax transformation) and the failure it fixes.

The contrast is ``optax.lbfgs`` followed by a projection: its curvature pairs
and line search see unprojected points, so it stalls or oscillates on bound
constrained problems, and ``optax.value_and_grad_from_state`` then hands back
the value of the unprojected point. References: ``scipy.optimize.nnls`` and
closed-form optima.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize as so
from _reference import standardized_diabetes

import posconstr


@functools.lru_cache(maxsize=None)
def _diabetes():
  X, y = standardized_diabetes()
  x_ref, _ = so.nnls(X, y)
  return X, y, x_ref, 0.5 * np.sum((X @ x_ref - y) ** 2)


def _lsq(A, b):
  A, b = jnp.asarray(A), jnp.asarray(b)
  return lambda x: 0.5 * jnp.sum((A @ x - b) ** 2)


def _run(opt, f, x0, steps):
  """``steps`` line-search steps with ``value_and_grad_from_state``.

  Returns the iterates and, for each, the value and gradient cached in the
  state (what ``value_and_grad_from_state`` returns at the next call).
  """
  value_and_grad = optax.value_and_grad_from_state(f)

  @jax.jit
  def step(x, state):
    value, grad = value_and_grad(x, state=state)
    updates, state = opt.update(grad, state, x, value=value, grad=grad,
                                value_fn=f)
    return optax.apply_updates(x, updates), state

  x, state = x0, opt.init(x0)
  xs, cached = [], []
  for _ in range(steps):
    x, state = step(x, state)
    xs.append(np.asarray(x))
    cached.append((float(optax.tree.get(state, "value")),
                   np.asarray(optax.tree.get(state, "grad"))))
  return np.stack(xs), cached


# ------------------------------------------------------------ NNLS diabetes


def test_lbfgsb_loop_reaches_nnls_optimum_with_fresh_cache(x64):
  X, y, x_ref, f_ref = _diabetes()
  f = _lsq(X, y)
  # Monotone search (nonmonotone=0), and a tolerance tighter than the default
  # so that the state keeps iterating to the optimum bit by bit.
  xs, cached = _run(posconstr.lbfgsb(lower=0.0, tol=1e-13,
                                     nonmonotone=0.0),
                    f, jnp.zeros(10), 20)
  value_and_grad = jax.jit(jax.value_and_grad(f))
  for x, (value, grad) in zip(xs, cached):
    assert x.dtype == np.float64
    assert np.all(x >= 0.0), x.min()  # feasible at every step, bit for bit
    # The cache is f at the new (projected) point, not a stale value.
    v, g = value_and_grad(jnp.asarray(x))
    np.testing.assert_allclose(value, float(v), rtol=1e-14)
    np.testing.assert_allclose(grad, np.asarray(g), rtol=0, atol=1e-12)
  values = np.array([c[0] for c in cached])
  gaps = (values - f_ref) / f_ref
  # Monotone up to f's rounding: every step passed Armijo, or, once Armijo
  # asks for less than f's precision, its noise-floor version (f may rise
  # by at most 16 ulps of f there).
  noise = 16 * np.finfo(np.float64).eps * np.abs(values[:-1])
  assert np.all(np.diff(values) <= noise)
  assert np.all(np.diff(values)[gaps[1:] > 1e-12] < 0)
  assert gaps[-1] <= 1e-10, gaps[-1]
  np.testing.assert_array_equal(xs[-1] == 0, x_ref == 0)
  np.testing.assert_allclose(xs[-1], x_ref, rtol=0, atol=1e-9)


def test_clipped_optax_lbfgs_stalls_on_diabetes(x64):
  """ANCHORS: ``optax.lbfgs`` + projection does not converge on NNLS.

  Measured over steps 200-300 (float64, from 0): the relative gap oscillates
  between 8e-8 and 1.6e-2; ``lbfgsb`` reaches 1e-10 within 10 steps.
  """
  X, y, _, f_ref = _diabetes()
  f = _lsq(X, y)
  opt = optax.chain(optax.lbfgs(), posconstr.project_nonneg())
  xs, cached = _run(opt, f, jnp.zeros(10), 300)
  assert np.all(xs >= 0)  # the projection itself works ...
  gaps = np.array([(0.5 * np.sum((X @ x - y) ** 2) - f_ref) / f_ref
                   for x in xs])
  assert gaps[200:].min() > 1e-9, gaps[200:].min()  # ... the solver does not
  assert gaps[200:].max() > 1e-4
  # And the value that value_and_grad_from_state reuses is stale: it is the
  # value of the unprojected point at some steps.
  stale = [abs(c[0] - float(f(jnp.asarray(x)))) > 1e-8 * f_ref
           for x, c in zip(xs, cached)]
  assert any(stale)


# ------------------------------------------------------------ 2-D stall

# f = 0.5 (x - c)^T Q (x - c) on x >= 0, Q = [[1, .99], [.99, 1]], c = (-1, 1).
# Constrained optimum (0, 0.01), f* = 0.5 (1 - .99^2); Newton from anywhere
# goes to c, so clip(x - Q^{-1} g) = clip(c) = (0, 1), where f = 0.5.
_Q = np.array([[1.0, 0.99], [0.99, 1.0]])
_C = np.array([-1.0, 1.0])
_X_STAR = np.array([0.0, 0.01])
_F_STAR = 0.5 * (1 - 0.99 ** 2)


def _quad(x):
  d = x - jnp.asarray(_C)
  return 0.5 * d @ jnp.asarray(_Q) @ d


def test_newton_then_clip_provably_stalls():
  x = np.array([0.3, 0.2])
  for _ in range(20):
    x = np.maximum(x - np.linalg.solve(_Q, _Q @ (x - _C)), 0.0)
  np.testing.assert_allclose(x, [0.0, 1.0], atol=1e-12)
  gap = 0.5 * (x - _C) @ _Q @ (x - _C) - _F_STAR
  assert gap > 0.49
  # ... although (0, 0.01) is the KKT point: g_2 = 0, g_1 > 0 at x_1 = 0.
  g = _Q @ (_X_STAR - _C)
  np.testing.assert_allclose(g[1], 0.0, atol=1e-15)
  assert g[0] > 0.01


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_optax_lbfgs_plus_clip_stalls_where_lbfgsb_converges(x64):
  x0 = jnp.array([0.0, 1.0])  # the clip(Newton) fixed point
  clipped = optax.chain(optax.lbfgs(), posconstr.project_nonneg())
  xs, _ = _run(clipped, _quad, x0, 100)
  gaps = np.array([float(_quad(jnp.asarray(x))) - _F_STAR for x in xs])
  # Measured: 4.85e-5 from step 40 on (x ~ (0.031, 1.0)).
  assert gaps[50:].min() > 1e-5, gaps[50:].min()
  xs, cached = _run(posconstr.lbfgsb(lower=0.0), _quad, x0, 10)
  assert cached[-1][0] - _F_STAR < 1e-10
  assert xs[-1][0] == 0.0  # on the bound exactly
  np.testing.assert_allclose(xs[-1], _X_STAR, rtol=0, atol=1e-10)
  assert np.all(xs >= 0)


# ------------------------------------------------------------ fixed step


def test_fixed_learning_rate_needs_no_value_fn(x64):
  X, y, x_ref, f_ref = _diabetes()
  f = _lsq(X, y)
  opt = posconstr.lbfgsb(learning_rate=1.0, lower=0.0)

  @jax.jit
  def step(x, state):
    updates, state = opt.update(jax.grad(f)(x), state, x)
    return optax.apply_updates(x, updates), state

  x, state = jnp.zeros(10), opt.init(jnp.zeros(10))
  for _ in range(40):
    x, state = step(x, state)
    assert np.all(np.asarray(x) >= 0.0)
  assert int(state.info.num_fun_evals) == 0
  assert (float(f(x)) - f_ref) / f_ref <= 1e-10
  np.testing.assert_allclose(np.asarray(x), x_ref, rtol=0, atol=1e-8)


# ------------------------------------------------------------ bad input


def test_line_search_mode_requires_value_and_value_fn():
  def f(x):
    return jnp.sum(x ** 2)
  opt = posconstr.lbfgsb(lower=0.0)
  x = jnp.ones(3)
  state = opt.init(x)
  g = jax.grad(f)(x)
  # Traced under jit: the errors are raised while tracing, at no compile cost.
  def update(params, **kw):
    return jax.jit(
        lambda p: opt.update(g, state, p, **kw))(params)
  with pytest.raises(ValueError, match="value_fn"):
    update(x, value=f(x), grad=g)
  with pytest.raises(ValueError, match="value"):
    update(x, grad=g, value_fn=f)
  with pytest.raises(ValueError, match="parameters"):
    opt.update(g, state, None, value=f(x), grad=g, value_fn=f)
  fixed = posconstr.lbfgsb(learning_rate=0.1, lower=0.0)
  with pytest.raises(ValueError, match="parameters"):
    fixed.update(g, fixed.init(x))


@pytest.mark.parametrize("kwargs", [
    dict(memory_size=0), dict(max_linesearch_steps=0),
    dict(learning_rate=0.0), dict(learning_rate=-1.0),
])
def test_bad_options_raise(kwargs):
  with pytest.raises(ValueError, match="lbfgsb"):
    posconstr.lbfgsb(**kwargs)


def test_bad_bounds_raise_at_init():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match="lower.*upper"):
    posconstr.lbfgsb(lower=1.0, upper=0.0).init(params)
  with pytest.raises(ValueError, match="`w`"):
    posconstr.lbfgsb(lower={"w": jnp.zeros(2), "b": 0.0}).init(params)
  with pytest.raises(ValueError, match="prefix"):
    posconstr.lbfgsb(upper={"w": 1.0}).init(params)


def test_integer_leaf_is_named_at_init():
  params = {"w": jnp.zeros(3), "step": jnp.array(0)}
  for lower in (0.0, {"w": 0.0, "step": None}):
    with pytest.raises(TypeError, match=r"lbfgsb: `params` leaf 'step' has "
                       r"dtype int32; only floating-point leaves"):
      posconstr.lbfgsb(lower=lower).init(params)
