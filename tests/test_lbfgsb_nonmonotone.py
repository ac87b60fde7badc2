"""The non-monotone decrease test of ``posconstr.minimize``'s line search.

References: closed-form line searches on ``x^2`` and a tilted cosine, and
the definition of Zhang & Hager (SIAM J. Optim. 14(4), 2004): a step is
accepted when ``f(x_{k+1}) <= C_k + c1 <g_k, s_k>`` with ``C_k`` the
weighted mean of past values. The bookkeeping inside ``minimize`` is checked
against that recursion on every iteration of a solve, recorded by wrapping
the line search.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import datasets

import posconstr
from posconstr.solvers import _lbfgsb_search as search_lib


def _square_search(reference):
  """One search on ``x^2`` from 1 along ``d = -2.6`` (overshoots to -1.6)."""
  vg = jax.value_and_grad(lambda x: x ** 2)
  x = jnp.asarray(1.0)
  f, g = vg(x)
  inf = jnp.asarray(jnp.inf)
  return search_lib.projected_search(vg, x, f, g, jnp.asarray(-2.6), -inf,
                                     inf, reference=reference)


@pytest.mark.parametrize("reference", [None, 0.5, 2.0, 3.0])
def test_overshoot_is_bracketed_to_the_minimizer(x64, reference):
  # f(-1.6) = 2.56: too long for the monotone test; a reference of 3 lets it
  # pass the decrease test, but its slope (+8.32 against -5.2 at 0) is past
  # the curvature test's bound of 1.5 x 5.2 either way. The cubic through
  # f(0) = 1, slope -5.2, f(1) = 2.56 and slope 8.32 is the quadratic
  # itself: its minimum (x = 0) is the second and last evaluation.
  r = _square_search(reference)
  assert bool(r.accepted) and int(r.num_evals) == 2
  assert abs(float(r.x)) <= 1e-15 and float(r.value) <= 1e-30


def test_window_reference_accepts_a_rise_with_a_flat_slope(x64):
  # f(x) = -cos(2 pi x) - x / 5 from x = 0.1 along d = -1.1: the trial
  # x = -1 is the bottom of the next well to the left, higher than f(0.1),
  # with a flat slope there. The monotone test rejects it (and the search
  # zooms into the well at 0); a window reference above it accepts it.
  def f(x):
    return -jnp.cos(2 * jnp.pi * x) - x / 5
  vg = jax.value_and_grad(f)
  x, d = jnp.asarray(0.1), jnp.asarray(-1.1)
  value, g = vg(x)
  f_t, g_t = vg(x + d)
  assert abs(float(g_t * d)) <= 0.9 * abs(float(g * d))  # curvature holds
  assert float(f_t) > float(value)  # but f rises
  inf = jnp.asarray(jnp.inf)
  strict = search_lib.projected_search(vg, x, value, g, d, -inf, inf)
  relaxed = search_lib.projected_search(vg, x, value, g, d, -inf, inf,
                                        reference=value + 1.0)
  assert bool(strict.accepted) and float(strict.value) < float(value)
  assert bool(relaxed.accepted) and int(relaxed.num_evals) == 1
  assert float(relaxed.x) == float(x + d)


def _recorded_solve(monkeypatch, eta):
  """NNLS on digits columns, recording each search's reference and result."""
  records = []
  original = search_lib.projected_search

  def bits(v):  # float64 as two int32s: the callback's thread has no x64
    return jax.lax.bitcast_convert_type(jnp.asarray(v, jnp.float64),
                                        jnp.int32)

  def unpack(*a):
    f_k, reference, accepted, f_next = (np.asarray(v) for v in a)
    as64 = lambda v: float(v.astype(np.int32).view(np.float64)[0])  # noqa
    records.append((as64(f_k), as64(reference), bool(accepted),
                    as64(f_next)))

  def recording(value_and_grad, x, value, g, d, lower, upper, **kwargs):
    result = original(value_and_grad, x, value, g, d, lower, upper, **kwargs)
    jax.debug.callback(unpack, bits(value), bits(kwargs["reference"]),
                       result.accepted, bits(result.value), ordered=True)
    return result

  monkeypatch.setattr(search_lib, "projected_search", recording)
  data = datasets.load_digits().data / 16.0
  A, b = jnp.asarray(data[:1000].T), jnp.asarray(data[1500])
  def fun(x):
    return 0.5 * jnp.sum((A @ x - b) ** 2)
  r = jax.jit(lambda x0: posconstr.minimize(
      fun, x0, lower=0.0, tol=1e-9, maxiter=1000,
      nonmonotone=eta))(jnp.zeros(1000))
  jax.effects_barrier()
  return r, records, float(fun(jnp.zeros(1000)))


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.85])
def test_reference_matches_zhang_hager(x64, monkeypatch, eta):
  """C_0 = f_0, Q_0 = 1; Q_{k+1} = eta Q_k + 1, C_{k+1} = (eta Q_k C_k +
  f_{k+1}) / Q_{k+1}; a failed search restarts at (f_k, 1)."""
  r, records, f_start = _recorded_solve(monkeypatch, eta)
  assert bool(r.converged) and len(records) == int(r.num_iter)
  c, q, f = f_start, 1.0, f_start
  increases = 0
  for f_k, reference, accepted, f_next in records:
    assert f_k == f
    np.testing.assert_allclose(reference, c, rtol=1e-13)
    if not accepted:
      c, q = f, 1.0
      continue
    noise = search_lib.NOISE_ULPS * np.finfo(np.float64).eps * abs(f_k)
    # Below the reference (the c1 term only tightens it), up to the noise
    # floor's approximate-Wolfe acceptance.
    assert f_next <= max(reference, f_k + noise)
    increases += f_next > f_k + noise
    q_next = eta * q + 1
    c, q, f = (eta * q * c + f_next) / q_next, q_next, f_next
  assert float(r.value) <= f_start
  if eta == 0:
    assert increases == 0


def test_bad_nonmonotone_raises():
  def f(x):
    return jnp.sum(x ** 2)
  with pytest.raises(ValueError, match="`nonmonotone` must be in \\[0, 1\\]"):
    posconstr.minimize(f, jnp.ones(2), nonmonotone=1.5)
  with pytest.raises(ValueError, match="`nonmonotone` must be >= 0"):
    posconstr.minimize(f, jnp.ones(2), nonmonotone=-0.1)
  with pytest.raises(TypeError, match="nonmonotone"):
    posconstr.minimize(f, jnp.ones(2), nonmonotone="0.3")
