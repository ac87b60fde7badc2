"""One bounded L-BFGS step behind ``minimize`` and ``lbfgsb``: the defects
found by trying both as a new user would, each against a closed form, NumPy
or SciPy.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize as so
from _reference import lbfgsb_line_search_step
from _reference import standardized_diabetes

import posconstr
from posconstr import Status


def _quadratic_2d():
  """f = 0.5 x'Ax - b'x, b = A (-1, 2): on x >= 0 the optimum is (0, 1.1)."""
  A = jnp.array([[1.0, 0.9], [0.9, 1.0]])
  b = A @ jnp.array([-1.0, 2.0])
  return lambda x: 0.5 * x @ A @ x - b @ x


def _loop(opt, f, x, steps, counter=None):
  """``steps`` jitted updates with ``value_and_grad_from_state``."""
  step = jax.jit(lbfgsb_line_search_step(opt, f))
  state = opt.init(x)
  for _ in range(steps):
    x, state = step(x, state)
  return x, state


def _counted(f, calls):
  """``f`` that appends to ``calls`` each time it is really evaluated."""
  def wrapped(x):
    jax.debug.callback(lambda: calls.append(1))
    return f(x)
  return wrapped


# ------------------------------------------------------------ the transform


def test_infeasible_start_reaches_the_optimum_with_a_fresh_cache(x64):
  f = _quadratic_2d()
  x, state = _loop(posconstr.lbfgsb(lower=0.0), f, jnp.array([-1.0, 2.0]), 10)
  np.testing.assert_allclose(np.asarray(x), [0.0, 1.1], atol=1e-12)
  np.testing.assert_allclose(float(f(x)), -0.605, rtol=1e-12)
  assert float(state.value) == float(f(x))  # the cache is of this point
  assert int(state.status) == Status.CONVERGED


def test_infeasible_params_are_only_projected_then_the_iteration_goes_on(
    x64):
  """An update on params outside the bounds evaluates nothing and lands on
  their projection, with no value or convergence claimed for it; the next
  update starts there. Also after convergence, and with a NaN value."""
  f = _quadratic_2d()
  calls = []
  opt = posconstr.lbfgsb(lower=0.0)
  counted = _counted(f, calls)

  @jax.jit
  def update(p, state, value):
    u, state = opt.update(jax.grad(f)(p), state, p, value=value,
                          grad=jax.grad(f)(p), value_fn=counted)
    return optax.apply_updates(p, u), state

  p, state = update(jnp.array([-1.0, 2.0]), opt.init(jnp.zeros(2)),
                    jnp.nan)  # A NaN value at infeasible params is unused.
  jax.effects_barrier()
  assert calls == [] and int(state.info.num_fun_evals) == 0
  np.testing.assert_array_equal(np.asarray(p), [0.0, 2.0])
  assert float(state.value) == np.inf  # value_and_grad_from_state evaluates
  assert float(state.info.projected_grad_norm) == np.inf
  for _ in range(10):
    p, state = update(p, state, f(p))
  np.testing.assert_allclose(np.asarray(p), [0.0, 1.1], atol=1e-12)
  assert int(state.status) == Status.CONVERGED
  # Moved out of the bounds after convergence: projected, then solved again.
  p, state = update(jnp.array([-3.0, 0.5]), state, jnp.nan)
  np.testing.assert_array_equal(np.asarray(p), [0.0, 0.5])
  assert float(state.info.projected_grad_norm) == np.inf
  for _ in range(10):
    p, state = update(p, state, f(p))
  np.testing.assert_allclose(np.asarray(p), [0.0, 1.1], atol=1e-12)
  assert int(state.status) == Status.CONVERGED


def test_diabetes_warm_start_from_the_unconstrained_fit(x64):
  X, y = standardized_diabetes()
  A, b = jnp.asarray(X), jnp.asarray(y)
  def f(x):
    return 0.5 * jnp.sum((A @ x - b) ** 2)
  x_ref, _ = so.nnls(X, y)
  f_ref = 0.5 * np.sum((X @ x_ref - y) ** 2)
  x0 = jnp.asarray(np.linalg.lstsq(X, y, rcond=None)[0])  # infeasible
  x, state = _loop(posconstr.lbfgsb(lower=0.0, tol=1e-12), f, x0, 200)
  assert np.all(np.asarray(x) >= 0)
  assert (float(f(x)) - f_ref) / f_ref <= 1e-10


@pytest.mark.parametrize("make", [
    lambda: jnp.full(5, 2.0),  # weakly typed float64
    lambda: jnp.full(5, 2.0, jnp.bfloat16)], ids=["weak_f64", "bf16"])
def test_value_dtype_matches_the_params(x64, make):
  params = make()
  opt = posconstr.lbfgsb(lower=0.0)
  state = opt.init(params)
  assert state.value.dtype == params.dtype
  def f(p):
    return jnp.sum((p - 1) ** 2)
  x, state = _loop(opt, f, params, 3)  # value_and_grad_from_state's cond
  assert x.dtype == params.dtype and state.value.dtype == params.dtype
  np.testing.assert_allclose(np.asarray(x, np.float64), 1.0, atol=1e-2)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_converged_state_makes_no_evaluations_and_zero_updates(x64):
  """Non-negative logistic regression: once converged, 450 more steps cost
  nothing (before: 11 evaluations per step, 1544 for 500 steps)."""
  rng = np.random.default_rng(0)
  X = jnp.asarray(rng.normal(size=(100, 6)))
  y = jnp.asarray(rng.random(100) < 0.5, jnp.float64)
  def loss(w):
    return jnp.mean(jnp.logaddexp(0.0, X @ w) - y * (X @ w))
  calls = []
  f = _counted(loss, calls)
  opt = posconstr.lbfgsb(lower=0.0)
  x50, state50 = _loop(opt, f, jnp.ones(6), 50)
  jax.effects_barrier()
  evals_50 = len(calls)
  assert int(state50.status) == Status.CONVERGED
  step = jax.jit(lbfgsb_line_search_step(opt, f))
  x, state = x50, state50
  for _ in range(450):
    new, state = step(x, state)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(x))
    x = new
  jax.effects_barrier()
  assert len(calls) == evals_50, (len(calls), evals_50)
  # The solution is the KKT point scipy finds.
  ref = so.minimize(lambda w: float(loss(jnp.asarray(w))), np.ones(6),
                    jac=lambda w: np.asarray(jax.grad(loss)(jnp.asarray(w))),
                    method="L-BFGS-B", bounds=[(0, None)] * 6,
                    options=dict(ftol=0, gtol=1e-12))
  np.testing.assert_allclose(np.asarray(x), ref.x, atol=1e-6)


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_bounded_rosenbrock_transform_stops_instead_of_cycling(x64):
  def f(x):
    return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
  opt = posconstr.lbfgsb(lower=0.0, upper=0.8)
  step = jax.jit(lbfgsb_line_search_step(opt, f))
  x, state = jnp.full(5, 0.5), opt.init(jnp.full(5, 0.5))
  values = []
  for _ in range(150):
    x, state = step(x, state)
    values.append(float(f(x)))
  assert int(state.status) == Status.CONVERGED
  tail = np.array(values[-50:])
  assert np.all(tail == tail[-1])  # frozen, not cycling
  ref = so.minimize(lambda z: float(f(jnp.asarray(z))), np.full(5, 0.5),
                    jac=lambda z: np.asarray(jax.grad(f)(jnp.asarray(z))),
                    method="L-BFGS-B", bounds=[(0, 0.8)] * 5,
                    options=dict(ftol=0, gtol=1e-12))
  assert values[-1] <= ref.fun * (1 + 1e-9)


def test_nan_value_is_visible_in_status_and_updates():
  def f(x):
    return jnp.sum(x ** 2) * jnp.nan
  opt = posconstr.lbfgsb(lower=0.0)
  x = jnp.ones(3)
  value, grad = jax.value_and_grad(f)(x)
  updates, state = opt.update(grad, opt.init(x), x, value=value, grad=grad,
                              value_fn=f)
  assert int(state.status) == Status.NONFINITE
  assert np.isnan(np.asarray(updates)).all()


def test_fixed_learning_rate_reports_the_projected_gradient(x64):
  f = _quadratic_2d()
  opt = posconstr.lbfgsb(0.5, lower=0.0)
  x = jnp.array([0.5, 0.5])
  state = opt.init(x)
  g = jax.grad(f)(x)
  _, state = opt.update(g, state, x)
  pg = np.max(np.abs(np.asarray(x) - np.clip(np.asarray(x - g), 0, None)))
  assert pg > 0.1
  np.testing.assert_allclose(float(state.info.projected_grad_norm), pg)


def test_fixed_step_converges_with_a_traced_learning_rate(x64):
  f = _quadratic_2d()
  opt = optax.inject_hyperparams(posconstr.lbfgsb, static_args=(
      "memory_size",))(learning_rate=0.5, lower=0.0)
  x = jnp.array([0.5, 0.5])
  state = opt.init(x)

  @jax.jit
  def step(x, state):
    updates, state = opt.update(jax.grad(f)(x), state, x)
    return optax.apply_updates(x, updates), state

  for _ in range(60):
    x, state = step(x, state)
  np.testing.assert_allclose(np.asarray(x), [0.0, 1.1], atol=1e-6)


def test_traced_memory_size_is_refused_naming_static_args():
  opt = optax.inject_hyperparams(posconstr.lbfgsb)(
      learning_rate=0.1, memory_size=5, lower=0.0)
  x = jnp.ones(2)
  state = opt.init(x)
  with pytest.raises(TypeError, match="static_args"):
    jax.jit(opt.update)(x, state, x)


# ------------------------------------------------------------ minimize


@pytest.mark.slow  # ~4 s; test_compile_once counts compilations too.
def test_traced_tolerances_work_and_do_not_recompile(x64):
  def f(x):
    return jnp.sum((x - jnp.arange(4.0)) ** 2)
  solve = jax.jit(lambda tol, atol: posconstr.minimize(
      f, jnp.zeros(4), lower=1.0, tol=tol, atol=atol))
  r = solve(1e-8, 0.0)
  np.testing.assert_allclose(np.asarray(r.params), [1, 1, 2, 3], atol=1e-12)
  tols = jnp.array([1e-2, 1e-12])
  batched = jax.vmap(lambda t: posconstr.minimize(
      f, jnp.zeros(4) + 5, lower=1.0, tol=t, maxiter=jnp.int32(50)))(tols)
  assert np.asarray(batched.converged).all()


def test_infinite_gradient_at_the_start(x64):
  """-sum(sqrt(x)) + 0.5 |x|^2 on x >= 0: g = -inf at 0; x* = 2^(-2/3)."""
  def f(x):
    return -jnp.sum(jnp.sqrt(x)) + 0.5 * jnp.sum(x ** 2)
  r = posconstr.minimize(f, jnp.zeros(3), lower=0.0)
  assert int(r.status) == Status.CONVERGED and int(r.num_iter) > 0
  np.testing.assert_allclose(np.asarray(r.params), 2.0 ** (-2 / 3), rtol=1e-7)


def test_infinite_gradient_pointing_out_at_a_bound_is_held_there(x64):
  """sqrt(x) + (y - 1)^2 from x = 0: g_x = +inf points out of x >= 0, and
  the other coordinates take their usual steps (it used to stall)."""
  r = posconstr.minimize(lambda v: jnp.sqrt(v[0]) + (v[1] - 1) ** 2,
                         jnp.array([0.0, 3.0]), 0.0, 5.0)
  assert int(r.status) == Status.CONVERGED
  np.testing.assert_allclose(np.asarray(r.params), [0.0, 1.0], atol=1e-9)
  # Separable: per coordinate, sqrt(x) + (x - c)^2 / 2 on [0, 10], minimized
  # by a bounded scalar search (and compared with x = 0).
  c = np.array([1.0, -2.0, 4.0])
  r = posconstr.minimize(
      lambda x, c: jnp.sum(jnp.sqrt(x)) + 0.5 * jnp.sum((x - c) ** 2),
      jnp.array([1.0, 3.0, 3.0]), 0.0, 10.0, args=(jnp.asarray(c),))
  assert int(r.status) == Status.CONVERGED
  for xi, ci in zip(np.asarray(r.params), c):
    def f(x, ci=ci):
      return np.sqrt(max(x, 0.0)) + 0.5 * (x - ci) ** 2
    best = so.minimize_scalar(f, bounds=(0, 10), method="bounded",
                              options={"xatol": 1e-12})
    want = best.x if best.fun < f(0.0) else 0.0
    np.testing.assert_allclose(xi, want, atol=1e-6)


def test_bound_is_rounded_in_the_dtype_of_the_iterates():
  # x64 off: the numpy float64 x0 iterates in float32, so 0.1 must be
  # rounded down in float32 (to 0.099999994), as project_box does.
  r = posconstr.minimize(lambda x: -jnp.sum(x), np.zeros(3), upper=0.1)
  x = np.asarray(r.params)
  assert x.dtype == np.float32
  assert np.all(x.astype(np.float64) <= 0.1), x.astype(np.float64)
  box = posconstr.Box(None, 0.1).project(jnp.full(3, 1.0))
  np.testing.assert_array_equal(x, np.asarray(box))


def test_traced_empty_box_is_infeasible_never_converged(x64):
  solve = jax.jit(lambda lo, hi: posconstr.minimize(
      lambda x: jnp.sum(x ** 2), jnp.zeros(2), lower=lo, upper=hi))
  r = solve(1.0, 0.0)
  assert int(r.status) == Status.INFEASIBLE and not bool(r.converged)
  assert np.isnan(np.asarray(r.params)).all()
  ok = solve(0.5, 1.0)
  assert bool(ok.converged)
  np.testing.assert_array_equal(np.asarray(ok.params), [0.5, 0.5])


@pytest.mark.parametrize("bound", [100.0, 1e6])
def test_linear_objective_goes_to_the_breakpoint_at_once(x64, bound):
  """SciPy: 2 evaluations; the search used to grow one unit per step."""
  r = posconstr.minimize(lambda x: -jnp.sum(x), jnp.zeros(3), upper=bound)
  np.testing.assert_array_equal(np.asarray(r.params), bound)
  assert bool(r.converged) and int(r.num_fun_evals) <= 2


def test_rosenbrock_from_far_away_is_not_converged_at_a_poor_point(x64):
  """n = 7 from x0 = 1000: the gradient there is 4e11, so the relative test
  alone called f = 4169 converged after 25 evaluations."""
  def f(x):
    return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
  r = posconstr.minimize(f, jnp.full(7, 1000.0), upper=1000.0)
  assert float(r.value) <= 1e-8, (float(r.value), int(r.status))


def test_projected_gradient_is_measured_from_the_gradient(x64):
  """|g| = 4e-17 is below half an ulp of x = -1: x - P(x - g) rounds to 0."""
  def f(x):
    return 1e-17 * jnp.sum((x - 1) ** 2)
  start = posconstr.minimize(f, -jnp.ones(1), upper=10.0, maxiter=0)
  np.testing.assert_allclose(float(start.projected_grad_norm), 4e-17)
  assert not bool(start.converged)
  r = posconstr.minimize(f, -jnp.ones(1), upper=10.0)
  assert bool(r.converged)
  np.testing.assert_allclose(np.asarray(r.params), 1.0, atol=1e-7)


def test_status_codes_and_their_flags(x64):
  def f(x):
    return jnp.sum((x - 2) ** 2) + jnp.sum(x[:-1] * x[1:])
  capped = posconstr.minimize(f, jnp.zeros(6), lower=0.0, maxiter=1)
  assert int(capped.status) == Status.MAX_ITERATIONS
  assert not bool(capped.converged) and not bool(capped.stalled)
  nan = posconstr.minimize(lambda x: jnp.sum(x) * jnp.nan, jnp.zeros(2))
  assert int(nan.status) == Status.NONFINITE
  assert [s.name for s in Status] == [
      "RUNNING", "CONVERGED", "MAX_ITERATIONS", "LINESEARCH_FAILED",
      "STALLED", "NONFINITE", "INFEASIBLE"]


def test_repeated_calls_compile_once(x64):
  """Same ``fun``, new data in ``args``: one trace of ``fun``'s solve and
  one compilation (an eager loop used to compile every call and run out of
  code memory after 360)."""
  traces = []

  def lsq(x, A, b):
    traces.append(1)  # runs only while tracing
    return 0.5 * jnp.sum((A @ x - b) ** 2)

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  rng = np.random.default_rng(0)
  for i in range(6):
    A, b = rng.normal(size=(20, 5)), rng.normal(size=20)
    if i == 1:
      traces_after_first, compiles_after_first = len(traces), len(compiles)
    r = posconstr.minimize(lsq, jnp.zeros(5), lower=0.0,
                           args=(jnp.asarray(A), jnp.asarray(b)),
                           tol=1e-9 * (i + 1))
    x_ref, _ = so.nnls(A, b)
    np.testing.assert_allclose(np.asarray(r.params), x_ref, atol=1e-6)
  assert len(traces) == traces_after_first
  assert len(compiles) == compiles_after_first
