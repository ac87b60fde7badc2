"""``posconstr.minimize`` against SciPy's L-BFGS-B on 15 bound-constrained
CUTEst / Hock-Schittkowski problems (``_cutest.py``), float64.

Both solvers stop on the projected gradient alone (``target_gtol``: 1e-6
of the starting one, at least 1e-6): SciPy with ``ftol=0``, posconstr with
``tol=0, atol=gtol, ftol=inf``. Issue 12's target: at most SciPy's number of
evaluations on the median problem, none worse than 1.5x. Measured (SciPy
1.17, jax 0.10.2): median ratio 1.0, worst 1.44 (HATFLDB, 46 vs 32), 428
evaluations in all against SciPy's 450; before the Wolfe search HS38 took
140 against 32.
"""

import functools

import _cutest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The four problems that were worst before (HS38 4.4x, QUDLIN, HIMMELP1,
# HATFLDB) run in the default suite; all fifteen behind `slow`.
QUICK = ("HS38", "QUDLIN", "HIMMELP1", "HATFLDB")


@functools.lru_cache(maxsize=None)
def _compare(name):
  problem = next(p for p in _cutest.PROBLEMS if p.name == name)
  gtol = _cutest.target_gtol(problem)
  scipy_run = _cutest.scipy_evals(problem, gtol)
  ours = _cutest.posconstr_evals(problem, gtol, ftol=np.inf)
  return problem, gtol, scipy_run, ours


def _check_one(name):
  problem, gtol, (s_fev, s_f, _, s_ok), (p_fev, p_f, p_pg, p_ok) = (
      _compare(name))
  assert s_ok and p_ok
  assert p_pg <= gtol, (p_pg, gtol)  # recomputed in NumPy
  # At least as low as SciPy; the published optimum, but on HIMMELP1,
  # whose x0 leads to local minima (SciPy's at -23.9, posconstr's at -51.7;
  # the global one is -62.05).
  assert p_f <= s_f + 1e-6 * max(1.0, abs(s_f)), (p_f, s_f)
  if name != "HIMMELP1":
    assert abs(p_f - problem.f_star) <= 1e-6 * max(1.0, abs(problem.f_star))
  assert p_fev <= 1.5 * s_fev, (p_fev, s_fev)
  return p_fev / s_fev


@pytest.mark.parametrize("name", QUICK)
def test_evaluations_against_scipy(x64, name):
  _check_one(name)


@pytest.mark.slow
def test_median_problem_needs_no_more_evaluations_than_scipy(x64):
  ratios = [_check_one(p.name) for p in _cutest.PROBLEMS]
  assert np.median(ratios) <= 1.0, sorted(ratios)


def test_iterates_stay_feasible(x64):
  """Every point where f is evaluated is inside the bounds, bit for bit."""
  problem = next(p for p in _cutest.PROBLEMS if p.name == "HATFLDB")
  lower, upper = jnp.asarray(problem.lower), jnp.asarray(problem.upper)
  outside = []

  def fun(x):
    # Counted in the graph: the callback's thread would see float32.
    jax.debug.callback(lambda n: outside.append(int(n)),
                       jnp.sum(x < lower) + jnp.sum(x > upper))
    return problem.fun(x)

  _cutest.posconstr_evals(problem._replace(fun=fun),
                          _cutest.target_gtol(problem))
  jax.effects_barrier()
  assert len(outside) > 10 and sum(outside) == 0
