"""Non-negative least squares: posconstr.minimize vs scipy and jaxopt.

Solves ``min_x 0.5 ||A x - b||^2  s.t.  x >= 0`` in float64 (problems:
``_nnls_problems.make_problem``; solvers: ``_nnls_solvers``) with

* ``posconstr``: ``posconstr.minimize`` (jitted, ``x0 = 0``, relative
  projected-gradient tolerance ``--tol``), the gradient written ``r @ A``;
* ``jaxopt LBFGSB``, the unmaintained peer (jitted; absolute tolerance ``tol *
  pg0``, the same stopping point); left out, and said so, if it fails;
* ``scipy L-BFGS-B`` (``gtol = tol * pg0``, ``ftol = 0``, ``maxcor`` = the
  posconstr memory) and ``scipy nnls`` (active set, the reference objective;
  at 5000x2000, ~10 s, it runs once, outside the rounds).

``pg0 = max(A^T b, 0)``, the projected gradient at 0, is computed inside every
timed call. Problems: Gaussian 200x50, 2000x500 and 5000x2000 with a planted
sparse solution; "digits as columns" (64x1000, ill-conditioned and
underdetermined); a batch of 64 200x50 problems (``jax.vmap`` against loops).

Per method: iterations, evaluations, time after compilation (median of
interleaved rounds, quartiles, paired ratio to scipy L-BFGS-B), compile time,
the objective gap to the reference, the KKT residual ``||x - max(x - grad,
0)||_inf`` (numpy, for every method) and ``min(x)``. Then posconstr against
its floors (``_floors``): ``fev x 2 size(A) / bandwidth`` measured here, ``fev
x`` one evaluation timed in a jitted loop, and the evaluations of CG handed
the solution's free set. ``--blas-threads best`` (default) gives the scipy
methods the faster of 1 thread and the library default, per problem.

Usage::

  python -m benchmarks.lbfgsb                # full (several minutes)
  python -m benchmarks.lbfgsb --quick        # 200x50 and the batch, no jaxopt
  python -m benchmarks.lbfgsb --problems 5000x2000 --repeats 5
  python -m benchmarks.lbfgsb --tol 1e-8     # away from float64's noise floor
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _floors
from benchmarks import _nnls_problems
from benchmarks import _nnls_solvers
from benchmarks import _timing

PC = "posconstr"
JAXOPT = "jaxopt LBFGSB"
SCIPY_LB = "scipy L-BFGS-B"  # The baseline of the ratios.
SCIPY_NNLS = "scipy nnls"
LARGE_NNLS = 5000 * 2000  # Size of A from which scipy nnls is run only once.
EVAL_PREFIX = "eval:"
SUMMARY_KEYS = ("bandwidth", "problem", "note", "shape", "reference",
                "blas_threads", "median_s", "vs_baseline", "compile_s",
                "gap_rel", "kkt", "min_x", "status", "iters_mean", "iters_max",
                "fev_mean", "fev_per_iter", "cg_evals", "floor_bw_s",
                "ratio_bw", "eval_jax_s")


JAX_SOLVERS = {PC: (_nnls_solvers.posconstr_solve,
                     _nnls_solvers.posconstr_status),
               JAXOPT: (_nnls_solvers.jaxopt_solve,
                        _nnls_solvers.jaxopt_status)}


def _jax_method(prob, make, status_of, args, Aj, bj):
  """Compiles a JAX solver, runs it once for the metrics; (record, call)."""
  solve = make(args.tol, args.maxiter, args.memory)
  solve = jax.vmap(solve) if prob.batched else solve
  compiled, t_compile = _timing.compile_timed(jax.jit(solve), Aj, bj)
  x, it, fev, conv, stop = (np.asarray(v) for v in
                            jax.block_until_ready(compiled(Aj, bj)))
  status = ([status_of(c, s) for c, s in zip(conv, stop)] if prob.batched
            else status_of(conv, stop))
  return ({"compile_s": t_compile, "x": x, "iters": it, "fev": fev,
           "status": status}, lambda: compiled(Aj, bj))


def run_problem(prob: _nnls_problems.Problem, args, have_jaxopt: bool):
  A, b = prob.A, prob.b
  Aj, bj = jnp.asarray(A), jnp.asarray(b)
  methods: Dict[str, Dict[str, Any]] = {}
  fns: Dict[str, Callable[[], Any]] = {}
  notes: List[str] = []
  for name in [PC, JAXOPT] if have_jaxopt else [PC]:
    make, status_of = JAX_SOLVERS[name]
    try:
      methods[name], fns[name] = _jax_method(prob, make, status_of, args,
                                             Aj, bj)
    except Exception as e:  # pylint: disable=broad-except
      methods[name] = {"failed": f"{type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}"}
      _timing.eprint(f"  [{name}] FAILED: {methods[name]['failed']}")
      traceback.print_exc(file=sys.stderr)

  pairs = list(zip(A, b)) if prob.batched else [(A, b)]

  def run_lb():
    return [_nnls_solvers.scipy_lbfgsb(a, bb, args.tol, args.maxiter,
                                       args.memory) for a, bb in pairs]

  def run_nnls():
    return [_nnls_solvers.scipy_nnls(a, bb) for a, bb in pairs]

  threads, calib = _floors.choose_blas_threads(args.blas_threads, run_lb)
  if calib:
    notes.append("scipy L-BFGS-B with numpy BLAS threads " + ", ".join(
        f"{k}: {_timing.fmt_time(v)}" for k, v in calib.items())
                 + f" -> using {threads}")
  with _floors.blas_limit(threads):
    lbs = run_lb()
    methods[SCIPY_LB] = {
        "x": np.stack([r.x for r in lbs]), "iters": [r.nit for r in lbs],
        "fev": [r.nfev for r in lbs],
        "status": [_nnls_solvers.scipy_status(r) for r in lbs]}
    t0 = time.perf_counter()
    nns = run_nnls()
    single_s = time.perf_counter() - t0
    methods[SCIPY_NNLS] = {"x": np.stack([r[0] for r in nns]),
                           "status": ["done"] * len(nns)}
    fns[SCIPY_LB] = run_lb
    if prob.batched or A.size < LARGE_NNLS:
      fns[SCIPY_NNLS] = run_nnls
    else:
      notes.append(f"scipy nnls run once ({_timing.fmt_time(single_s)}), "
                   "not in the rounds")
    # Interleaved rounds, with k-evaluation probes for the floor.
    evals, k_evals = _nnls_solvers.eval_callables(A, b)
    fns.update({EVAL_PREFIX + key: fn for key, fn in evals.items()})
    _timing.eprint(f"  timing {list(fns)} ...")
    times = _timing.interleaved_times(
        fns, repeats=args.repeats, warmup=args.warmup,
        budget_s=args.budget_s, min_repeats=args.min_repeats)
  eval_s = {key[len(EVAL_PREFIX):]: float(np.median(times.pop(key))) / k_evals
            for key in list(times) if key.startswith(EVAL_PREFIX)}
  times.setdefault(SCIPY_NNLS, [single_s])

  # Metrics (numpy, float64, the same for every method).
  for m in methods.values():
    if "failed" not in m:
      xs = m["x"].reshape(len(pairs), -1)
      m["objective"] = np.array([_nnls_problems.objective(a, bb, x)
                                 for (a, bb), x in zip(pairs, xs)])
      m["kkt"] = np.array([_nnls_problems.kkt_residual(a, bb, x)
                           for (a, bb), x in zip(pairs, xs)])
  pg0 = np.array([_nnls_problems.pg0_of(a, bb) for a, bb in pairs])
  ref = methods[SCIPY_NNLS]["objective"]
  base = times[SCIPY_LB]
  rows = {}
  for name, m in methods.items():
    if "failed" in m:
      rows[name] = {"failed": m["failed"]}
      continue
    gap = (m["objective"] - ref) / np.maximum(np.abs(ref), 1e-300)
    row = {"time": _timing.summarize(times[name]), "times_s": times[name],
           "compile_s": m.get("compile_s"),
           "objective": float(m["objective"].sum()),
           "gap_rel": float(gap[np.argmax(np.abs(gap))]),
           "kkt": float(np.max(m["kkt"])),
           "kkt_rel": float(np.max(m["kkt"] / pg0)),
           "min_x": float(np.min(m["x"])),
           "status": status_summary(m["status"])}
    if "iters" in m:
      it = np.atleast_1d(m["iters"]).astype(float)
      fev = np.atleast_1d(m["fev"]).astype(float)
      row.update({"iters_mean": it.mean(), "iters_max": it.max(),
                  "fev_mean": fev.mean(), "fev_max": fev.max(),
                  "fev_total": fev.sum(),
                  "fev_per_iter": fev.sum() / max(it.sum(), 1)})
    if len(times[name]) > 1:
      row["vs_baseline"] = _timing.paired_ratio(times[name], base)
    rows[name] = row
  result = {"problem": prob.name, "note": prob.note, "shape": list(A.shape),
            "A_bytes": int(A.nbytes), "reference": SCIPY_NNLS,
            "blas_threads": threads, "blas_calibration_s": calib,
            "methods": rows, "notes": notes, "eval_s": eval_s}
  if not prob.batched:
    result["krylov"] = _floors.cg_oracle_evaluations(
        A, b, methods[SCIPY_NNLS]["x"][0], args.tol)
  return result


def status_summary(statuses) -> str:
  if isinstance(statuses, str):
    return statuses
  vals, counts = np.unique(np.asarray(statuses), return_counts=True)
  if len(vals) == 1:
    return str(vals[0])
  return ", ".join(f"{c}x {v}" for v, c in zip(vals, counts))


def method_table(res) -> str:
  """Every method on one problem (batch: means, and worst cases)."""
  batched = res["problem"] == "batch"
  b = lambda text: text if batched else ""  # noqa: E731
  headers = ["method", "iters" + b(" mean (max)"), "fev" + b(" mean"),
             "fev/iter", "time" + b(" (batch)"), "[q1, q3]", f"vs {SCIPY_LB}",
             "compile", "gap" + b(" (worst)"), "KKT" + b(" (worst)"), "min x",
             "status"]
  rows = []
  for name, r in res["methods"].items():
    if "failed" in r:
      rows.append([name] + ["-"] * 10 + [f"FAILED: {r['failed'][:60]}"])
      continue
    t, vs, digits = r["time"], r.get("vs_baseline"), 1 if batched else 0
    iters = fev = fpi = "-"
    if "iters_mean" in r:
      iters = f"{r['iters_mean']:.{digits}f}" + b(f" ({r['iters_max']:.0f})")
      fev, fpi = f"{r['fev_mean']:.{digits}f}", f"{r['fev_per_iter']:.2f}"
    rows.append([
        name, iters, fev, fpi, _timing.fmt_time(t["median_s"]),
        (f"[{_timing.fmt_time(t['q1_s'])}, {_timing.fmt_time(t['q3_s'])}]"
         if t["n"] > 1 else "(1 run)"),
        _timing.fmt_ratio(vs["median"], 2) if vs else "-",
        _timing.fmt_time(r["compile_s"]) if r["compile_s"] else "-",
        f"{r['gap_rel']:+.1e}", f"{r['kkt']:.1e}", f"{r['min_x']:.1e}",
        r["status"]])
  return _timing.markdown_table(headers, rows, align="l" + "r" * 10 + "l")


def floor_rows(res, bandwidth: float):
  """posconstr against its floors: DRAM bandwidth, the measured evaluation
  time, and CG handed the solution's free set."""
  r = res["methods"].get(PC)
  if not r or "failed" in r:
    return None
  batched = res["problem"] == "batch"
  per_a = res["A_bytes"] / (res["shape"][0] if batched else 1)
  t, eval_jax = r["time"]["median_s"], res["eval_s"]["jax"]
  floor_bw = r["fev_total"] * 2 * per_a / bandwidth
  # Batched: one vmapped evaluation covers all lanes, max(fev) of them.
  floor_eval = (r["fev_max"] if batched else r["fev_total"]) * eval_jax
  out = {"fev": r["fev_total"], "bytes_per_fev": 2 * per_a,
         "other_per_iter_s": (t - floor_eval) / max(
             r["iters_max"] if batched else r["iters_mean"], 1),
         "floor_bw_s": floor_bw, "ratio_bw": t / floor_bw,
         "eval_jax_s": eval_jax, "eval_numpy_s": res["eval_s"]["numpy"],
         "floor_eval_s": floor_eval, "ratio_eval": t / floor_eval,
         "time_s": t}
  if "krylov" in res and SCIPY_LB in res["methods"]:
    cg = res["krylov"]["cg_evals"]
    out.update(cg_evals=cg, cg_time_s=cg * eval_jax, cg_vs_scipy=cg * eval_jax
               / res["methods"][SCIPY_LB]["time"]["median_s"])
  return out


def floor_table(results) -> str:
  rows = []
  for res in results:
    f = res.get("floor")
    if f:
      rows.append([res["problem"], f"{f['fev']:.0f}",
                   _timing.fmt_bytes(f["bytes_per_fev"]),
                   *map(_timing.fmt_time, (f["floor_bw_s"], f["time_s"])),
                   _timing.fmt_ratio(f["ratio_bw"], 1),
                   *map(_timing.fmt_time, (f["eval_jax_s"], f["eval_numpy_s"],
                                           f["floor_eval_s"])),
                   _timing.fmt_ratio(f["ratio_eval"], 1),
                   _timing.fmt_time(f["other_per_iter_s"]),
                   f.get("cg_evals", "-"),
                   _timing.fmt_ratio(f["cg_vs_scipy"], 2)
                   if "cg_vs_scipy" in f else "-"])
  return _timing.markdown_table(
      ["problem", "fev", "bytes/fev", "BW floor", "time", "time/floor",
       "1 eval jax", "1 eval numpy", "evals x eval", "time/(evals x eval)",
       "rest/iter", "CG oracle fev", "CG oracle vs scipy L-BFGS-B"], rows)


FLOOR_NOTE = (
    "BW floor: fev x 2 size(A) / bandwidth (under 32 MB, A is read from "
    "cache and it understates). evals x eval: fev (batch: the max over "
    "lanes, one vmapped evaluation each) x one value_and_grad timed in a "
    "jitted loop. rest/iter: the rest per iteration (direction, bookkeeping, "
    "loop). CG oracle: the evaluations of conjugate gradients from 0 on the "
    "solution's free columns to the same tolerance (about the fewest any "
    "gradient method can use), and their time against scipy L-BFGS-B's.")


def readme_table(payload) -> str:
  """The README's table: one row per problem, ratios of medians."""
  rows = []
  for res in payload["results"]:
    m = res["methods"]
    pc, lb = m.get(PC, {}), m.get("scipy L-BFGS-B", {})
    if "time" not in pc or "time" not in lb:
      continue
    base = lb["time"]["median_s"]
    ratio = lambda name: (  # noqa: E731
        _timing.fmt_ratio(m[name]["time"]["median_s"] / base, 2)
        if "time" in m.get(name, {}) else "-")
    nnls = (m.get("scipy nnls", {}).get("time", {}).get("median_s"))
    jx = m.get("jaxopt LBFGSB", {})
    iters = (f"{pc['iters_mean']:.1f} (max {pc['iters_max']:.0f})"
             if pc["iters_mean"] != pc["iters_max"]
             else f"{pc['iters_max']:.0f}")
    rows.append([
        res["problem"], iters, f"{pc['fev_mean']:.1f}".removesuffix(".0"),
        f"{pc['fev_per_iter']:.2f}", ratio(PC),
        _timing.fmt_ratio(pc["time"]["median_s"] / nnls, 2) if nnls else "-",
        (f"{ratio('jaxopt LBFGSB')} ({jx['fev_per_iter']:.2f})"
         if "fev_per_iter" in jx else "-"),
        str(res.get("floor", {}).get("cg_evals", "-")),
        f"{pc['compile_s']:.1f} s"])
  return _timing.markdown_table(
      ["problem", "iters", "fev", "fev/iter", "vs scipy L-BFGS-B",
       "vs scipy nnls", "jaxopt vs scipy L-BFGS-B (fev/iter)",
       "CG-oracle fev", "compile"], rows)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--problems", default=None,
                  help="comma-separated subset of 200x50,2000x500,5000x2000,"
                       "digits,batch (all; --quick: 200x50,batch).")
  ap.add_argument("--jaxopt", choices=("auto", "on", "off"), default="auto",
                  help="include jaxopt.LBFGSB (auto: not with --quick).")
  ap.add_argument("--tol", type=float, default=1e-10,
                  help="relative projected-gradient tolerance for all "
                       "L-BFGS-B solvers.")
  ap.add_argument("--maxiter", type=int, default=5000)
  ap.add_argument("--memory", type=int, default=10,
                  help="curvature pairs (maxcor / history_size).")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--blas-threads", default="best",
                  help="numpy BLAS threads for scipy: 'best' (per problem, "
                       "the faster of 1 and the default), or N (0: default).")
  args = _timing.parse_args(
      ap, argv, "lbfgsb", repeats=21, min_repeats=5, warmup=1, budget_s=60.0,
      quick={"repeats": 5, "min_repeats": 3, "budget_s": 8.0})
  problems = args.problems or ("200x50,batch" if args.quick else
                               "200x50,2000x500,5000x2000,digits,batch")
  jax.config.update("jax_enable_x64", True)  # Here, not at import.

  have_jaxopt = False
  if args.jaxopt == "on" or (args.jaxopt == "auto" and not args.quick):
    try:
      import jaxopt  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      have_jaxopt = True
    except Exception as e:  # pylint: disable=broad-except
      _timing.eprint(f"jaxopt left out: {type(e).__name__}: {e}")
  out = _timing.Report("lbfgsb", args, bandwidth=None)
  bw = out.payload["bandwidth"] = _floors.measure_bandwidth(args.quick)
  print("Memory bandwidth (" + bw["matrix"] + "): " + ", ".join(
      f"{k} {_timing.fmt_bandwidth(v)}" for k, v in bw.items()
      if isinstance(v, float)) + "\n", flush=True)
  for name in problems.split(","):
    t0 = time.perf_counter()
    _timing.eprint(f"[{name}]")
    prob = _nnls_problems.make_problem(name.strip(), args.seed)
    res = run_problem(prob, args, have_jaxopt)
    res["floor"] = floor_rows(res, bw["best"])
    res["wall_s"] = time.perf_counter() - t0
    out.add(res, f"### {name}: {prob.note}\n\n{method_table(res)}\n\n"
            f"Gap: relative to {res['reference']}. KKT: ||x - max(x - grad, "
            f"0)||_inf. numpy BLAS threads for scipy: {res['blas_threads']}. "
            + " ".join(n + "." for n in res["notes"])
            + f" ({res['wall_s']:.0f} s)")
  results = out.payload["results"]
  print(f"### posconstr vs its floors (bandwidth "
        f"{_timing.fmt_bandwidth(bw['best'])}, best measured)\n\n"
        f"{floor_table(results)}\n\n{FLOOR_NOTE}\n")
  print("### Summary (the README's table)\n\n"
        + readme_table(out.payload) + "\n")
  return out.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
