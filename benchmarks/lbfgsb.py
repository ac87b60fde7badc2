"""Non-negative least squares: posconstr.minimize vs scipy and jaxopt.

Solves ``min_x 0.5 ||A x - b||^2  s.t.  x >= 0`` in float64 with

* ``posconstr``: ``posconstr.minimize`` (jitted; ``x0 = 0``, relative
  projected-gradient tolerance ``--tol``, default 1e-10), with the gradient
  written out as ``r @ A`` (``least_squares``), as scipy gets ``A.T @ r``;
* ``jaxopt LBFGSB``: ``jaxopt.LBFGSB`` (the unmaintained peer; jitted, its
  absolute tolerance set to ``tol * pg0`` so that it stops at the same
  projected gradient); skipped, with the reason recorded, if jaxopt cannot
  be imported or fails;
* ``scipy L-BFGS-B``: ``scipy.optimize.minimize(method="L-BFGS-B",
  jac=True)`` with ``gtol = tol * pg0`` (scipy's gtol is the same absolute
  ``||x - P(x - g)||_inf``), ``ftol = 0`` (stop only on gtol or when no
  progress is possible) and ``maxcor`` = the posconstr memory;
* ``scipy nnls``: ``scipy.optimize.nnls`` (active set; the reference
  objective). At 5000x2000 it takes ~10 s, so it is run once, untimed in the
  rounds (``--skip-large-nnls`` skips it).

``pg0 = ||x0 - P(x0 - grad f(x0))||_inf = max(A^T b, 0)`` is computed inside
every timed call.

Problems: Gaussian ``A`` of 200x50, 2000x500 and 5000x2000 with a planted
sparse non-negative solution (``b = A x* + 0.01 noise``, seeded); "digits as
columns" (``A = load_digits().data[:1000].T / 16``, 64x1000, ``b`` a
held-out digit: ill-conditioned and underdetermined); and a batch of 64
problems of 200x50, solved by ``jax.vmap`` of the jitted solvers against
Python loops of the scipy solvers.

Per method: iterations, function(+gradient) evaluations and their ratio,
time after compilation (median of interleaved rounds, quartiles, and the
median of the per-round ratios to scipy L-BFGS-B), compile time for the JAX
methods, the objective gap relative to the reference (scipy nnls where
available, else the best objective found), the KKT residual
``||x - max(x - grad, 0)||_inf`` (recomputed in numpy for every method) and
``min(x)``. Then the memory-bandwidth floor of posconstr: ``fev * 2 * size(A)
bytes / bandwidth`` (two passes over ``A`` per evaluation: ``A x`` and
``A^T r``), with the bandwidth measured on this machine (the best of a large
numpy copy and jitted / numpy ``A^T (A x)`` passes over a matrix larger than
the last-level cache), next to the floor ``fev * t(one value_and_grad)`` with
the evaluation timed inside a jitted loop at each size.

numpy's BLAS threads: on a loaded 2-core machine a 2-thread OpenBLAS can be
~30x slower on scipy's L-BFGS-B than one thread. ``--blas-threads best``
(default) times scipy L-BFGS-B with 1 thread and with the library default
per problem and uses the faster for both scipy methods; an integer fixes it
(0: library default). XLA's threads are left alone.

Usage::

  python -m benchmarks.lbfgsb                # full (several minutes)
  python -m benchmarks.lbfgsb --quick        # 200x50 and the batch, no jaxopt
  python -m benchmarks.lbfgsb --problems 5000x2000 --repeats 5
  python -m benchmarks.lbfgsb --tol 1e-8   # away from float64's noise floor
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np
import scipy
import scipy.optimize

from benchmarks import _krylov_floor
from benchmarks import _timing
from benchmarks._blas_threads import BlasThreads
from benchmarks._blas_threads import choose_blas_threads
from benchmarks._blas_threads import measure_bandwidth
from benchmarks._nnls_problems import kkt_residual
from benchmarks._nnls_problems import make_problem
from benchmarks._nnls_problems import objective
from benchmarks._nnls_problems import pg0_of
from benchmarks._nnls_problems import Problem
from benchmarks._nnls_report import BASELINE
from benchmarks._nnls_report import floor_rows
from benchmarks._nnls_report import floor_table
from benchmarks._nnls_report import summary_table
from benchmarks._nnls_report import JAXOPT
from benchmarks._nnls_report import method_table
from benchmarks._nnls_report import PC
from benchmarks._nnls_report import SCIPY_LB
from benchmarks._nnls_report import SCIPY_NNLS
from benchmarks._nnls_report import status_summary
from benchmarks._nnls_report import targets
from benchmarks._nnls_solvers import eval_callables
from benchmarks._nnls_solvers import jaxopt_solve
from benchmarks._nnls_solvers import jaxopt_status
from benchmarks._nnls_solvers import posconstr_solve
from benchmarks._nnls_solvers import posconstr_status
from benchmarks._nnls_solvers import scipy_lbfgsb
from benchmarks._nnls_solvers import scipy_nnls
from benchmarks._nnls_solvers import scipy_status

DEFAULT_OUT = os.path.join("benchmarks", "results", "lbfgsb.json")
ALL_PROBLEMS = "200x50,2000x500,5000x2000,digits,batch"
QUICK_PROBLEMS = "200x50,batch"
LARGE_NNLS = 5000 * 2000  # Size of A from which scipy nnls is run only once.

EVAL_PREFIX = "eval:"


# ----------------------------------------------------------------------------
# One problem.


def run_problem(prob: Problem, args, blas: BlasThreads,
                have_jaxopt: bool) -> Dict[str, Any]:
  tol, maxiter, mem = args.tol, args.maxiter, args.memory
  A, b = prob.A, prob.b
  Aj, bj = jnp.asarray(A), jnp.asarray(b)
  size = A.shape[-2] * A.shape[-1]
  methods: Dict[str, Dict[str, Any]] = {}
  fns: Dict[str, Callable[[], Any]] = {}
  notes: List[str] = []

  # --- JAX solvers: compile, then one run for the metrics.
  jax_solvers = [(PC, posconstr_solve, posconstr_status)]
  if have_jaxopt:
    jax_solvers.append((JAXOPT, jaxopt_solve, jaxopt_status))
  for name, make, status_of in jax_solvers:
    try:
      solve = make(tol, maxiter, mem)
      if prob.batched:
        solve = jax.vmap(solve)
      compiled, t_compile = _timing.compile_timed(jax.jit(solve), Aj, bj)
      out = jax.block_until_ready(compiled(Aj, bj))
      x, it, fev, conv, failed = (np.asarray(v) for v in out)
      methods[name] = {"compile_s": t_compile, "x": x, "iters": it,
                       "fev": fev,
                       "status": ([status_of(c, f) for c, f in zip(conv, failed)]
                                  if prob.batched else status_of(conv, failed))}
      fns[name] = (lambda c=compiled: c(Aj, bj))
    except Exception as e:  # pylint: disable=broad-except
      msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      _timing.eprint(f"  [{name}] FAILED: {msg}")
      traceback.print_exc(file=sys.stderr)
      methods[name] = {"failed": msg}

  # --- scipy.
  if prob.batched:
    def run_lb():
      return [scipy_lbfgsb(A[i], b[i], tol, maxiter, mem) for i in range(len(A))]

    def run_nnls():
      return [scipy_nnls(A[i], b[i]) for i in range(len(A))]
  else:
    def run_lb():
      return scipy_lbfgsb(A, b, tol, maxiter, mem)

    def run_nnls():
      return scipy_nnls(A, b)
  threads, calib = choose_blas_threads(args.blas_threads, blas, run_lb)
  if calib:
    notes.append("scipy L-BFGS-B with numpy BLAS threads "
                 + ", ".join(f"{k}: {_timing.fmt_time(v)}"
                             for k, v in calib.items())
                 + f" -> using {threads}")
  with blas.limit(threads):
    lb = run_lb()
    lbs = lb if prob.batched else [lb]
    methods[SCIPY_LB] = {
        "x": np.stack([r.x for r in lbs]), "iters": np.array([r.nit for r in lbs]),
        "fev": np.array([r.nfev for r in lbs]),
        "status": [scipy_status(r) for r in lbs]}
    fns[SCIPY_LB] = _discard(run_lb)

    nnls_once = (not prob.batched) and size >= LARGE_NNLS
    if nnls_once and args.skip_large_nnls:
      notes.append("scipy nnls skipped (--skip-large-nnls)")
    else:
      t0 = time.perf_counter()
      nn = run_nnls()
      t_nnls = time.perf_counter() - t0
      nns = nn if prob.batched else [nn]
      methods[SCIPY_NNLS] = {"x": np.stack([r[0] for r in nns]),
                             "status": ["done"] * len(nns)}
      if nnls_once:
        methods[SCIPY_NNLS]["single_run_s"] = t_nnls
        notes.append(f"scipy nnls run once ({_timing.fmt_time(t_nnls)}), "
                     "not in the rounds")
      else:
        fns[SCIPY_NNLS] = _discard(run_nnls)

    # --- Timing: interleaved rounds (with k-evaluation probes for the floor).
    evals, k_evals = eval_callables(A, b)
    for key, fn in evals.items():
      fns[EVAL_PREFIX + key] = fn
    _timing.eprint(f"  timing {list(fns)} ...")
    times = _timing.interleaved_times(
        fns, repeats=args.repeats, warmup=args.warmup,
        time_budget_s=args.budget_s, min_repeats=args.min_repeats)
    eval_s = {key[len(EVAL_PREFIX):]: float(np.median(times.pop(key))) / k_evals
              for key in list(times) if key.startswith(EVAL_PREFIX)}
  if SCIPY_NNLS in methods and "single_run_s" in methods[SCIPY_NNLS]:
    times[SCIPY_NNLS] = [methods[SCIPY_NNLS]["single_run_s"]]

  # --- Metrics (numpy, float64, the same for every method).
  As = A if prob.batched else A[None]
  bs = b if prob.batched else b[None]
  for name, m in methods.items():
    if "failed" in m:
      continue
    xs = m["x"] if prob.batched or m["x"].ndim == 2 else m["x"][None]
    m["objective"] = [objective(a, bb, x) for a, bb, x in zip(As, bs, xs)]
    m["kkt"] = [kkt_residual(a, bb, x) for a, bb, x in zip(As, bs, xs)]
    m["min_x"] = float(np.min(xs))
    m["pg0"] = [pg0_of(a, bb) for a, bb in zip(As, bs)]
  if SCIPY_NNLS in methods:
    ref = np.asarray(methods[SCIPY_NNLS]["objective"])
    ref_name = SCIPY_NNLS
  else:
    ref = np.min([methods[k]["objective"] for k in methods
                  if "objective" in methods[k]], axis=0)
    ref_name = "best found"
  base = times.get(BASELINE)
  rows = {}
  for name, m in methods.items():
    if "failed" in m:
      rows[name] = {"failed": m["failed"]}
      continue
    obj = np.asarray(m["objective"])
    gap = (obj - ref) / np.maximum(np.abs(ref), 1e-300)
    row = {
        "time": _timing.summarize(times[name]) if name in times else None,
        "times_s": times.get(name),
        "compile_s": m.get("compile_s"),
        "objective": float(obj.sum()) if prob.batched else float(obj[0]),
        "gap_rel": float(gap[np.argmax(np.abs(gap))]),
        "kkt": float(np.max(m["kkt"])),
        "kkt_rel": float(np.max(np.asarray(m["kkt"]) / np.asarray(m["pg0"]))),
        "min_x": m["min_x"],
        "status": status_summary(m["status"]),
    }
    if "iters" in m:
      it = np.atleast_1d(m["iters"]).astype(float)
      fev = np.atleast_1d(m["fev"]).astype(float)
      row.update({"iters_mean": float(it.mean()), "iters_max": float(it.max()),
                  "fev_mean": float(fev.mean()), "fev_max": float(fev.max()),
                  "fev_total": float(fev.sum()),
                  "fev_per_iter": float(fev.sum() / max(it.sum(), 1))})
    if base is not None and name in times and len(times[name]) > 1:
      row["vs_baseline"] = _timing.paired_ratio(times[name], base)
    rows[name] = row

  result = {"problem": prob.name, "note": prob.note, "shape": list(A.shape),
            "A_bytes": int(A.nbytes), "reference": ref_name,
            "blas_threads": threads, "blas_calibration_s": calib,
            "methods": rows, "notes": notes}
  result["eval_s"] = eval_s
  if not prob.batched:
    solution = methods.get(SCIPY_NNLS, methods.get(PC, {})).get("x")
    if solution is not None:
      result["krylov"] = _krylov_floor.cg_oracle_evaluations(
          A, b, np.reshape(solution, -1), tol)
  return result


def _discard(fn):
  """``fn`` returning None (scipy results are not jax pytrees to block on)."""
  def call():
    fn()
  return call


# ----------------------------------------------------------------------------


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--problems", default=None,
                  help=f"comma-separated subset of {ALL_PROBLEMS} (--quick: "
                       f"{QUICK_PROBLEMS}).")
  ap.add_argument("--quick", action="store_true",
                  help="small problems, few repeats, no jaxopt (~30 s idle).")
  ap.add_argument("--jaxopt", choices=("auto", "on", "off"), default="auto",
                  help="include jaxopt.LBFGSB (auto: not with --quick).")
  ap.add_argument("--tol", type=float, default=1e-10,
                  help="relative projected-gradient tolerance for all "
                       "L-BFGS-B solvers.")
  ap.add_argument("--maxiter", type=int, default=5000)
  ap.add_argument("--memory", type=int, default=10,
                  help="curvature pairs (maxcor / history_size).")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeats", type=int, default=None,
                  help="interleaved rounds per problem (default 21; quick 5).")
  ap.add_argument("--min-repeats", type=int, default=5)
  ap.add_argument("--budget-s", type=float, default=None,
                  help="per problem: stop adding rounds after this many "
                       "seconds (at least --min-repeats; default 60, quick 8).")
  ap.add_argument("--warmup", type=int, default=1,
                  help="unrecorded rounds (after the compile and the run "
                       "that gives the metrics).")
  ap.add_argument("--blas-threads", default="best",
                  help="numpy BLAS threads for scipy: 'best' (per problem, "
                       "the faster of 1 and the default), or N (0: default).")
  ap.add_argument("--skip-large-nnls", action="store_true",
                  help="do not run scipy nnls at 5000x2000 (~10 s).")
  ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output path.")
  args = ap.parse_args(argv)

  if args.quick:
    args.problems = args.problems or QUICK_PROBLEMS
    args.repeats = args.repeats or 5
    args.min_repeats = min(args.min_repeats, 3)
    args.budget_s = args.budget_s or 8.0
    args.warmup = min(args.warmup, 1)
  args.problems = args.problems or ALL_PROBLEMS
  args.repeats = args.repeats or 21
  args.budget_s = args.budget_s or 60.0
  names = [s.strip() for s in args.problems.split(",") if s.strip()]

  info = _timing.machine_info()
  info["scipy_version"] = scipy.__version__
  info["blas"] = _timing.blas_info()
  have_jaxopt = False
  jaxopt_note = "off"
  want_jaxopt = args.jaxopt == "on" or (args.jaxopt == "auto" and not args.quick)
  if want_jaxopt:
    try:
      import jaxopt  # pylint: disable=g-import-not-at-top,unused-import
      from importlib import metadata  # pylint: disable=g-import-not-at-top
      try:
        jaxopt_note = metadata.version("jaxopt")
      except metadata.PackageNotFoundError:
        jaxopt_note = "installed"
      have_jaxopt = True
    except Exception as e:  # pylint: disable=broad-except
      jaxopt_note = f"unavailable ({type(e).__name__}: {e})"
  info["jaxopt"] = jaxopt_note
  print(f"Machine: {_timing.describe_machine(info)}; scipy "
        f"{scipy.__version__}; jaxopt {jaxopt_note}; numpy BLAS "
        f"{info['blas']}; load average {info['loadavg_start']}\n", flush=True)

  blas = BlasThreads()
  t_start = time.perf_counter()
  bw = measure_bandwidth(args.quick, blas)
  print("Memory bandwidth (" + bw["matrix"] + "): " + ", ".join(
      f"{k} {_timing.fmt_bandwidth(v)}" for k, v in bw.items()
      if isinstance(v, float)) + "\n", flush=True)

  results = []
  payload = {}
  for name in names:
    t0 = time.perf_counter()
    _timing.eprint(f"[{name}]")
    prob = make_problem(name, args.seed)
    res = run_problem(prob, args, blas, have_jaxopt)
    res["floor"] = floor_rows(res, bw["best"])
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_after"] = _timing.loadavg()
    results.append(res)
    print(f"### {name}: {prob.note}\n\n" + method_table(res)
          + f"\n\nGap: relative to {res['reference']}. KKT: "
          "||x - max(x - grad, 0)||_inf. numpy BLAS threads for scipy: "
          f"{res['blas_threads']}. " + " ".join(n + "." for n in res["notes"])
          + f" ({res['wall_s']:.0f} s; load average after: "
          f"{res['loadavg_after']})\n", flush=True)
    payload = {"benchmark": "lbfgsb", "machine": info, "bandwidth": bw,
               "config": dict(vars(args)), "results": results,
               "targets": targets(results)}
    _timing.write_json(args.out, payload)  # Partial results survive.

  print(f"### posconstr vs its floors (bandwidth {_timing.fmt_bandwidth(bw['best'])}"
        ", best measured)\n\n" + floor_table(results, bw["best"]) +
        "\n\nBW floor: fev x 2 x size(A) bytes / bandwidth (the DRAM bound; "
        "problems under 32 MB run from cache, so it understates them). "
        "evals x eval: fev (batch: max fev over lanes) x the median time of "
        "one value_and_grad inside a jitted loop at that size (batch: one "
        "vmapped evaluation of all 64). rest/iter: (time - evals x eval) / "
        "iterations (batch: max over lanes), i.e. the direction, bookkeeping "
        "and loop overhead per iteration. CG oracle: evaluations conjugate "
        "gradients needs from 0 on the solution's free columns to the same "
        "tolerance (about the fewest any gradient method can use; it must "
        "also find the active set), and that many jax evaluations against scipy "
        "L-BFGS-B's time.\n")
  print("### Summary (the README's table)\n\n" + summary_table(results) + "\n")
  tg = targets(results)
  if tg:
    print("### Targets\n\n" + _timing.markdown_table(
        ["target", "value", "where", "met"],
        [[t["target"], f"{t['value']:.2f}", t["where"],
          "yes" if t["met"] else "NO"] for t in tg]) + "\n")
  info["loadavg_end"] = _timing.loadavg()
  payload["targets"] = tg
  _timing.write_json(args.out, payload)
  print(f"Load average (1, 5, 15 min) at start {info['loadavg_start']}, at "
        f"end {info['loadavg_end']}. Total {time.perf_counter() - t_start:.0f}"
        f" s; JSON: {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
