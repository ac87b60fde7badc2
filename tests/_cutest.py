"""Bound-constrained test problems from CUTEst and Hock & Schittkowski.

Fifteen small problems (n = 1 to 50), written in JAX from their published
definitions, for comparing how many evaluations ``posconstr.minimize`` needs
with scipy's L-BFGS-B at the same projected-gradient target. Sources:

* W. Hock and K. Schittkowski, "Test Examples for Nonlinear Programming
  Codes", Lecture Notes in Economics and Mathematical Systems 187,
  Springer, 1981: problems 1, 3, 4, 5, 38, 45, 110 (``HSnn``).
* The CUTEst collection (N.I.M. Gould, D. Orban and Ph.L. Toint, Comput.
  Optim. Appl. 60, 2015), problems written in SIF by Ph.L. Toint and
  N. Gould:
  HATFLDA/B/C ("The OPTIMA user manual", issue 8, Numerical Optimization
  Centre, Hatfield Polytechnic, 1989), HIMMELP1 (B.N. Pshenichnyj, "The
  Linearization Method for Constrained Optimization", Springer, 1994,
  case 0: bounds only), BIGGSB1 (M. Bartholomew-Biggs and F.G. Hernandez,
  Hatfield, 1992), LOGROS (Ph.L. Toint, 1991), BQP1VAR (N. Gould, 1992)
  and QUDLIN (SIF input unknown).

``f_star`` is the optimal value the source gives (the SIF's ``SOLTN``
line or the book's ``f(x*)``). Where the SIF gives none it is derived:
LOGROS is log(1 + sum of squares) >= 0, with 0 at (1, 1); QUDLIN's bound
is shown in its docstring. Each problem was checked by running scipy's
L-BFGS-B to a tight tolerance and recovering ``f_star`` (for HIMMELP1,
from a start near the solution: see its docstring).

All functions are float64 problems: the helpers run under a local
``jax.enable_x64(True)``; this module never flips the global flag.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import posconstr

INF = np.inf


class Problem(NamedTuple):
  name: str
  fun: Callable  # jittable, float64 vector -> scalar
  x0: np.ndarray
  lower: np.ndarray  # -inf where unbounded below
  upper: np.ndarray  # +inf where unbounded above
  f_star: float
  source: str


def _problem(name, fun, x0, lower, upper, f_star, source):
  n = len(x0)
  def as_array(b):
    return np.broadcast_to(np.asarray(b, np.float64), (n,)).copy()
  return Problem(name, fun, np.asarray(x0, np.float64), as_array(lower),
                 as_array(upper), float(f_star), source)


def hs1(x):
  return 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2


def hs3(x):
  return x[1] + 1e-5 * (x[1] - x[0]) ** 2


def hs4(x):
  return (x[0] + 1.0) ** 3 / 3.0 + x[1]


def hs5(x):
  """McCormick's function."""
  return (jnp.sin(x[0] + x[1]) + (x[0] - x[1]) ** 2 - 1.5 * x[0]
          + 2.5 * x[1] + 1.0)


def hs38(x):
  """Colville's / Wood's function."""
  return (100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2
          + 90.0 * (x[3] - x[2] ** 2) ** 2 + (1.0 - x[2]) ** 2
          + 10.1 * ((x[1] - 1.0) ** 2 + (x[3] - 1.0) ** 2)
          + 19.8 * (x[1] - 1.0) * (x[3] - 1.0))


def hs45(x):
  return 2.0 - jnp.prod(x) / 120.0


def hs110(x):
  """Paviani's function."""
  return (jnp.sum(jnp.log(x - 2.0) ** 2 + jnp.log(10.0 - x) ** 2)
          - jnp.prod(x) ** 0.2)


def himmelp1(x):
  """Himmelblau's polynomial, coefficients as in CUTEst HIMMELP1.SIF.

  f* is the global minimum, at (81.1916, 69.1579). From x0 = (95, 10)
  L-BFGS methods may end at the local minimum -23.897408 at (0, 46.7004).
  """
  x1, x2 = x[0], x[1]
  b1, b2, b6 = 75.1963666677, -3.8112755343, -6.8306567613
  b3, b4, b5 = 0.1269366345, -2.0567665e-3, 1.0345e-5
  b7, b8, b9, b10 = 0.0302344793, -1.2813448e-3, 3.52599e-5, -2.266e-7
  b11, b12, b13 = 0.2564581253, -3.460403e-3, 1.35139e-5
  b14, b15, b16, b17 = -28.1064434908, -5.2375e-6, -6.3e-9, 7e-10
  b18, b19, b20 = 3.405462e-4, -1.6638e-6, -2.8673112392
  a = b7 * x1 + b8 * x1 ** 2 + b9 * x1 ** 3 + b10 * x1 ** 4
  b = b18 * x1 + b15 * x1 ** 2 + b16 * x1 ** 3
  c = b3 * x1 ** 2 + b4 * x1 ** 3 + b5 * x1 ** 4
  f = b11 * x2 ** 2 + b12 * x2 ** 3 + b13 * x2 ** 4
  g = b17 * x1 ** 3 + b19 * x1
  e = jnp.exp(0.0005 * x1 * x2)
  poly = (c + x2 * a + f + b14 / (1.0 + x2) + b * x2 ** 2 + g * x2 ** 3
          + b20 * e)
  return -(b1 + b2 * x1 + b6 * x2 + poly)


def hatfld_ab(x):
  """HATFLDA and HATFLDB: (x1 - 1)^2 + sum_{i>=2} (x_{i-1} - sqrt(x_i))^2."""
  return (x[0] - 1.0) ** 2 + jnp.sum((x[:-1] - jnp.sqrt(x[1:])) ** 2)


def hatfldc(x):
  """(x1 - 1)^2 + sum_{i=2}^{n-1} (x_{i+1} - x_i^2)^2 + (x_n - 1)^2."""
  return ((x[0] - 1.0) ** 2 + jnp.sum((x[2:] - x[1:-1] ** 2) ** 2)
          + (x[-1] - 1.0) ** 2)


def biggsb1(x):
  """(x1 - 1)^2 + sum_i (x_{i+1} - x_i)^2 + (1 - x_n)^2.

  With x_i <= 0.9 for i < n and x_n free, f* = 0.015 for every n >= 2, at
  x_i = 0.9, x_n = 0.95; only x_1 and x_{n-1} have nonzero multipliers.
  """
  return ((x[0] - 1.0) ** 2 + jnp.sum((x[1:] - x[:-1]) ** 2)
          + (1.0 - x[-1]) ** 2)


def bqp1var(x):
  return x[0] + x[0] ** 2


def logros(x):
  """Toint's logarithmic rescaling of Rosenbrock's function."""
  return jnp.log1p(1e4 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2)


_QUDLIN_M = 6


def qudlin(x):
  """sum_{i<=M} x_i x_{i+1} - 10 sum_i i x_i on [0, 10]^n (N=12, M=6).

  f* = -7200 at x = 10, globally: with d = 10 - x >= 0,
  f(x) - f* = sum_{i<=M} d_i d_{i+1} + sum_i c_i d_i, where c_i = 10 i
  minus 10 per bilinear term holding x_i (at most 2), so c_1 = 0 and
  c_i >= 10 i - 20 >= 0. The bound on x1 is degenerate (zero gradient).
  """
  i = jnp.arange(1, x.shape[0] + 1, dtype=x.dtype)
  m = _QUDLIN_M
  return jnp.sum(x[:m] * x[1:m + 1]) - 10.0 * jnp.sum(i * x)


_HS = "Hock & Schittkowski 1981, problem "
PROBLEMS = (
    _problem("HS1", hs1, [-2.0, 1.0], [-INF, -1.5], INF, 0.0, _HS + "1"),
    _problem("HS3", hs3, [10.0, 1.0], [-INF, 0.0], INF, 0.0, _HS + "3"),
    _problem("HS4", hs4, [1.125, 0.125], [1.0, 0.0], INF, 8.0 / 3.0,
             _HS + "4"),
    _problem("HS5", hs5, [0.0, 0.0], [-1.5, -3.0], [4.0, 3.0],
             -0.5 * np.sqrt(3.0) - np.pi / 3.0, _HS + "5 (McCormick)"),
    _problem("HS38", hs38, [-3.0, -1.0, -3.0, -1.0], -10.0, 10.0, 0.0,
             _HS + "38 (Colville)"),
    _problem("HS45", hs45, [2.0] * 5, 0.0, [1.0, 2.0, 3.0, 4.0, 5.0], 1.0,
             _HS + "45"),
    _problem("HS110", hs110, [9.0] * 10, 2.001, 9.999, -45.77846971,
             _HS + "110 (Paviani)"),
    _problem("HIMMELP1", himmelp1, [95.0, 10.0], 0.0, [95.0, 75.0],
             -62.053869846, "CUTEst HIMMELP1.SIF (Himmelblau, via "
             "Pshenichnyj 1994)"),
    _problem("HATFLDA", hatfld_ab, [0.1] * 4, 1e-7, INF, 0.0,
             "CUTEst HATFLDA.SIF (Hatfield OPTIMA manual)"),
    _problem("HATFLDB", hatfld_ab, [0.1] * 4, 1e-7, [INF, 0.8, INF, INF],
             5.57281e-3, "CUTEst HATFLDB.SIF (Hatfield OPTIMA manual)"),
    _problem("HATFLDC", hatfldc, [0.9] * 25, [0.0] * 24 + [-INF],
             [10.0] * 24 + [INF], 0.0,
             "CUTEst HATFLDC.SIF (Hatfield OPTIMA manual)"),
    _problem("LOGROS", logros, [-1.2, 1.0], 0.0, INF, 0.0,
             "CUTEst LOGROS.SIF (Toint 1991; f* = 0 at (1, 1))"),
    _problem("BQP1VAR", bqp1var, [0.25], 0.0, 0.5, 0.0,
             "CUTEst BQP1VAR.SIF (N. Gould 1992)"),
    _problem("QUDLIN", qudlin, [0.0] * 12, 0.0, 10.0, -7200.0,
             "CUTEst QUDLIN.SIF, N=12, M=6 (f* derived, see qudlin)"),
    _problem("BIGGSB1", biggsb1, [0.0] * 50, [0.0] * 49 + [-INF],
             [0.9] * 49 + [INF], 0.015,
             "CUTEst BIGGSB1.SIF, N=50 (Bartholomew-Biggs & Hernandez)"),
)


def projected_grad(x, g, lower, upper):
  """scipy's measure: max |x - clip(x - g, lower, upper)|, in numpy."""
  x = np.asarray(x, np.float64)
  return float(np.max(np.abs(x - np.clip(x - np.asarray(g), lower, upper))))


def _value_and_grad_np(problem):
  """A numpy (value, gradient) function; call it under x64."""
  vg = jax.jit(jax.value_and_grad(problem.fun))

  def fun(x):
    value, grad = vg(jnp.asarray(x, jnp.float64))
    return float(value), np.asarray(grad, np.float64)

  return fun


def target_gtol(problem):
  """1e-6 * max(1, pg0), pg0 the projected gradient at the projected x0."""
  with jax.enable_x64(True):
    x0 = np.clip(problem.x0, problem.lower, problem.upper)
    _, g = _value_and_grad_np(problem)(x0)
    return 1e-6 * max(1.0, projected_grad(x0, g, problem.lower,
                                          problem.upper))


def scipy_evals(problem, gtol):
  """scipy L-BFGS-B from x0: (nfev, f, final projected gradient, success)."""
  with jax.enable_x64(True):
    fun = _value_and_grad_np(problem)
    x0 = np.clip(problem.x0, problem.lower, problem.upper)
    res = scipy.optimize.minimize(
        fun, x0, jac=True, method="L-BFGS-B",
        bounds=scipy.optimize.Bounds(problem.lower, problem.upper),
        options=dict(maxcor=10, ftol=0.0, gtol=gtol, maxiter=20000,
                     maxfun=40000))
    _, g = fun(res.x)
    pg = projected_grad(res.x, g, problem.lower, problem.upper)
    return int(res.nfev), float(res.fun), pg, bool(res.success)


def posconstr_evals(problem, gtol, **options):
  """posconstr.minimize from x0: (num_fun_evals, value, pg, converged).

  The projected gradient is recomputed in numpy at the returned params.
  """
  with jax.enable_x64(True):
    lower = jnp.asarray(problem.lower, jnp.float64)
    upper = jnp.asarray(problem.upper, jnp.float64)
    solve = jax.jit(lambda x0: posconstr.minimize(
        problem.fun, x0, lower, upper, tol=0.0, atol=gtol, maxiter=20000,
        **options))
    result = solve(jnp.asarray(problem.x0, jnp.float64))
    x = np.asarray(result.params, np.float64)
    _, g = _value_and_grad_np(problem)(x)
    pg = projected_grad(x, g, problem.lower, problem.upper)
    return (int(result.num_fun_evals), float(result.value), pg,
            bool(result.converged))


def comparison() -> dict:
  """Evaluations to ``target_gtol`` of both solvers on every problem."""
  rows = []
  for p in PROBLEMS:
    gtol = target_gtol(p)
    s_fev, s_f, _, _ = scipy_evals(p, gtol)
    p_fev, p_f, _, _ = posconstr_evals(p, gtol, ftol=np.inf)
    rows.append({"problem": p.name, "n": int(p.x0.size), "scipy_fev": s_fev,
                 "posconstr_fev": p_fev, "scipy_f": s_f, "posconstr_f": p_f})
  return {"rows": rows, "scipy": scipy.__version__, "jax": jax.__version__}


def comparison_table(result: dict) -> str:
  """The README's markdown table of :func:`comparison`'s result."""
  lines = ["| problem | n | scipy fev | posconstr fev | ratio | scipy f | "
           "posconstr f |", "|---|---:|---:|---:|---:|---:|---:|"]
  ratios = []
  for r in result["rows"]:
    ratio = r["posconstr_fev"] / r["scipy_fev"]
    ratios.append(ratio)
    lines.append(f"| {r['problem']} | {r['n']} | {r['scipy_fev']} | "
                 f"{r['posconstr_fev']} | {ratio:.2f} | {r['scipy_f']:.6g} | "
                 f"{r['posconstr_f']:.6g} |")
  lines.append(f"\nMedian ratio {np.median(ratios):.2f}, worst "
               f"{max(ratios):.2f}; scipy {result['scipy']}, jax "
               f"{result['jax']}.")
  return "\n".join(lines)


if __name__ == "__main__":
  import json
  import sys
  out = comparison()
  if len(sys.argv) > 1:  # e.g. benchmarks/results/cutest.json
    with open(sys.argv[1], "w") as f:
      json.dump(out, f, indent=1)
  print(comparison_table(out))
