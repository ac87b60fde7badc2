"""Tables and targets of ``benchmarks/lbfgsb.py``."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from benchmarks import _timing

PC = "posconstr"
JAXOPT = "jaxopt LBFGSB"
SCIPY_LB = "scipy L-BFGS-B"
SCIPY_NNLS = "scipy nnls"
BASELINE = SCIPY_LB


def status_summary(statuses) -> str:
  if isinstance(statuses, str):
    return statuses
  vals, counts = np.unique(np.asarray(statuses), return_counts=True)
  if len(vals) == 1:
    return str(vals[0])
  return ", ".join(f"{c}x {v}" for v, c in zip(vals, counts))


# ----------------------------------------------------------------------------
# Reporting.


def method_table(res) -> str:
  batched = res["problem"] == "batch"
  headers = ["method", "iters" + (" mean (max)" if batched else ""),
             "fev" + (" mean" if batched else ""), "fev/iter",
             "time" + (" (batch)" if batched else ""), "[q1, q3]",
             f"vs {BASELINE}", "compile", "gap" + (" (worst)" if batched else ""),
             "KKT" + (" (worst)" if batched else ""), "min x", "status"]
  rows = []
  for name, r in res["methods"].items():
    if "failed" in r:
      rows.append([name] + ["-"] * 10 + [f"FAILED: {r['failed'][:60]}"])
      continue
    t = r["time"]
    if "iters_mean" in r:
      iters = (f"{r['iters_mean']:.1f} ({r['iters_max']:.0f})" if batched
               else f"{r['iters_mean']:.0f}")
      fev = f"{r['fev_mean']:.1f}" if batched else f"{r['fev_mean']:.0f}"
      fpi = f"{r['fev_per_iter']:.2f}"
    else:
      iters = fev = fpi = "-"
    vs = r.get("vs_baseline")
    rows.append([
        name, iters, fev, fpi,
        _timing.fmt_time(t["median_s"]) if t else "-",
        (f"[{_timing.fmt_time(t['q1_s'])}, {_timing.fmt_time(t['q3_s'])}]"
         if t and t["n"] > 1 else ("(1 run)" if t else "-")),
        _timing.fmt_ratio(vs["median"], 2) if vs else "-",
        _timing.fmt_time(r["compile_s"]) if r["compile_s"] else "-",
        f"{r['gap_rel']:+.1e}", f"{r['kkt']:.1e}", f"{r['min_x']:.1e}",
        r["status"]])
  return _timing.markdown_table(headers, rows,
                                align=["l"] + ["r"] * 10 + ["l"])


def floor_rows(res, bandwidth: float):
  """posconstr vs its floors (DRAM bandwidth, measured eval time)."""
  r = res["methods"].get(PC)
  if not r or "failed" in r or not r.get("time"):
    return None
  batched = res["problem"] == "batch"
  per_a = res["A_bytes"] / (res["shape"][0] if batched else 1)
  fev_total = r["fev_total"]
  t = r["time"]["median_s"]
  floor_bw = fev_total * 2 * per_a / bandwidth
  eval_jax = res["eval_s"]["jax"]
  # Batched: one vmapped evaluation covers all lanes; at least max(fev) of them.
  n_evals = r["fev_max"] if batched else fev_total
  floor_eval = n_evals * eval_jax
  iters = r["iters_max"] if batched else r["iters_mean"]
  krylov = res.get("krylov", {})
  scipy_t = (res["methods"].get(SCIPY_LB, {}).get("time") or {}).get(
      "median_s")
  oracle = {}
  if krylov and scipy_t:
    oracle = {"cg_evals": krylov["cg_evals"],
              "cg_time_s": krylov["cg_evals"] * eval_jax,
              "cg_vs_scipy": krylov["cg_evals"] * eval_jax / scipy_t}
  return {**oracle,"fev": fev_total, "bytes_per_fev": 2 * per_a,
          "other_per_iter_s": (t - floor_eval) / max(iters, 1),
          "floor_bw_s": floor_bw, "ratio_bw": t / floor_bw,
          "eval_jax_s": eval_jax, "eval_numpy_s": res["eval_s"]["numpy"],
          "floor_eval_s": floor_eval, "ratio_eval": t / floor_eval,
          "time_s": t}


def floor_table(results, bandwidth) -> str:
  headers = ["problem", "fev", "bytes/fev", "BW floor", "time", "time/floor",
             "1 eval jax", "1 eval numpy", "evals x eval", "time/(evals x eval)",
             "rest/iter", "CG oracle fev", "CG oracle vs scipy L-BFGS-B"]
  rows = []
  for res in results:
    f = res.get("floor")
    if not f:
      continue
    rows.append([res["problem"], f"{f['fev']:.0f}",
                 _timing.fmt_bytes(f["bytes_per_fev"]),
                 _timing.fmt_time(f["floor_bw_s"]), _timing.fmt_time(f["time_s"]),
                 _timing.fmt_ratio(f["ratio_bw"], 1),
                 _timing.fmt_time(f["eval_jax_s"]),
                 _timing.fmt_time(f["eval_numpy_s"]),
                 _timing.fmt_time(f["floor_eval_s"]),
                 _timing.fmt_ratio(f["ratio_eval"], 1),
                 _timing.fmt_time(f["other_per_iter_s"]),
                 f"{f['cg_evals']}" if "cg_evals" in f else "-",
                 _timing.fmt_ratio(f["cg_vs_scipy"], 2)
                 if "cg_vs_scipy" in f else "-"])
  return _timing.markdown_table(headers, rows)


def summary_table(results) -> str:
  """The README's table: one row per problem, ratios of medians."""
  rows = []
  for res in results:
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
             if pc["iters_mean"] != pc["iters_max"] else f"{pc['iters_max']:.0f}")
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


def targets(results) -> List[Dict[str, Any]]:
  out = []
  by = {r["problem"]: r for r in results}
  fpis = {p: r["methods"][PC]["fev_per_iter"] for p, r in by.items()
          if "fev_per_iter" in r["methods"].get(PC, {})}
  if fpis:
    worst = max(fpis, key=fpis.get)
    out.append({"target": "posconstr fev/iter <= 1.3", "value": fpis[worst],
                "where": f"worst: {worst}", "met": fpis[worst] <= 1.3,
                "all": fpis})

  def ratio(problem, name, base):
    r = by.get(problem)
    if not r or name not in r["methods"] or base not in r["methods"]:
      return None
    a, b = r["methods"][name], r["methods"][base]
    if "failed" in a or "failed" in b or not a.get("times_s") or not b.get(
        "times_s"):
      return None
    return _timing.paired_ratio(a["times_s"], b["times_s"])["median"]

  for problem, base, bound in (("5000x2000", SCIPY_LB, 0.6),
                               ("batch", SCIPY_LB, 0.3),
                               ("batch", SCIPY_NNLS, 1.0)):
    v = ratio(problem, PC, base)
    if v is not None:
      out.append({"target": f"{problem}: posconstr <= {bound}x {base}",
                  "value": v, "where": problem, "met": v <= bound})
  return out
