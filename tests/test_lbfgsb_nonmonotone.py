"""The non-monotone Armijo test of ``posconstr.minimize``.

References: the closed-form line search on ``f(x) = x^2`` and the definition
of Grippo, Lampariello & Lucidi (1986): a step is accepted when
``f(x_{k+1}) <= max(f(x_k), ..., f(x_{k-W+1})) + c1 <g_k, s_k>``. The window
bookkeeping inside ``minimize`` is checked against that definition on every
iteration of a solve, recorded by wrapping the line search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

import posconstr
from posconstr import _lbfgsb_search as search_lib


def _square_search(reference):
  """One search on ``x^2`` from 1 along ``d = -2.5`` (overshoots to -1.5)."""
  vg = jax.value_and_grad(lambda x: x ** 2)
  x = jnp.asarray(1.0)
  f, g = vg(x)
  inf = jnp.asarray(jnp.inf)
  return search_lib.projected_backtracking(vg, x, f, g, jnp.asarray(-2.5), -inf,
                                     inf, reference=reference)


@pytest.mark.parametrize("reference", [None, 0.5, 2.0])
def test_monotone_reference_backtracks_to_the_minimizer(x64, reference):
  # f(-1.5) = 2.25 > max(1, reference): the quadratic fit through f(0) = 1,
  # slope -5 and f(1) = 2.25 has its minimum at step 0.4, i.e. x = 0.
  r = _square_search(reference)
  assert bool(r.accepted) and int(r.num_evals) == 2
  assert abs(float(r.x)) <= 1e-15 and float(r.value) <= 1e-30


def test_window_reference_accepts_the_overshoot(x64):
  # 2.25 <= 2.5 + 1e-4 * (2 * -2.5): accepted on the first evaluation.
  r = _square_search(2.5)
  assert bool(r.accepted) and int(r.num_evals) == 1
  assert float(r.x) == -1.5 and float(r.value) == 2.25


def _recorded_solve(monkeypatch, window):
  """NNLS on digits columns, recording each search's reference and result."""
  records = []
  original = search_lib.projected_backtracking

  def recording(value_and_grad, x, value, g, d, lower, upper, **kwargs):
    result = original(value_and_grad, x, value, g, d, lower, upper, **kwargs)
    jax.debug.callback(
        lambda *a: records.append(tuple(np.asarray(v) for v in a)),
        value, kwargs["reference"], result.accepted, result.value,
        ordered=True)
    return result

  monkeypatch.setattr(search_lib, "projected_backtracking", recording)
  data = datasets.load_digits().data / 16.0
  A, b = jnp.asarray(data[:1000].T), jnp.asarray(data[1500])
  fun = lambda x: 0.5 * jnp.sum((A @ x - b) ** 2)
  r = jax.jit(lambda x0: posconstr.minimize(
      fun, x0, lower=0.0, tol=1e-9, maxiter=1000,
      nonmonotone_window=window))(jnp.zeros(1000))
  jax.effects_barrier()
  return r, records, float(fun(jnp.zeros(1000)))


@pytest.mark.parametrize("window", [1, 10])
def test_window_bookkeeping_matches_the_definition(x64, monkeypatch, window):
  r, records, f_start = _recorded_solve(monkeypatch, window)
  assert bool(r.converged) and len(records) == int(r.num_iter)
  values = [f_start]  # accepted values since the last failed search
  increases = 0
  for f_k, reference, accepted, f_next in records:
    assert f_k == values[-1]
    np.testing.assert_array_equal(reference, max(values[-window:]))
    if not accepted:  # the window restarts at the current point
      values = [values[-1]]
      continue
    noise = search_lib.NOISE_ULPS * np.finfo(np.float64).eps * abs(f_k)
    # GLL: below the window's largest value (the c1 term only tightens
    # it), up to the noise floor's approximate-Wolfe acceptance.
    assert f_next <= max(reference, f_k + noise)
    increases += f_next > f_k + noise
    values.append(f_next)
  assert float(r.value) <= f_start
  if window == 1:
    assert increases == 0
  else:  # the window was used: some accepted steps raised f
    assert increases > 0


def test_bad_window_raises():
  f = lambda x: jnp.sum(x ** 2)
  with pytest.raises(ValueError, match="nonmonotone_window=0"):
    posconstr.minimize(f, jnp.ones(2), nonmonotone_window=0)
  with pytest.raises(TypeError, match="nonmonotone_window"):
    posconstr.minimize(f, jnp.ones(2), nonmonotone_window=2.5)
