"""Batched NNLS: posconstr.nnls vs loops of scipy.optimize.nnls, optax.nnls.

Float64; times after compilation, medians of interleaved rounds and paired
ratios to the loop of ``scipy.optimize.nnls``. Cases: ``batch``, 64 problems
of 200x50 each with its own ``A`` (``jax.vmap`` of ``nnls``, of
``posconstr.minimize`` at tol 1e-10 and of ``optax.nnls``), with the floors
of its Gram matrices (in XLA and NumPy) and of one batched Cholesky of them;
``unmix``, one
non-negative 200x20 ``A`` and 10,000 right-hand sides with sparse abundances,
with the floor of one ``A^T B`` plus one ``G X``; ``large``, one 5000x2000
problem against scipy nnls and L-BFGS-B (run once). Every method gets the
faster of 1 BLAS thread and the default, chosen on scipy (jaxlib's CPU LAPACK
is the same OpenBLAS). ``optax.nnls`` gets the fewest of 32, 64, ... 2^14
iterations whose worst KKT residual is within max(10x posconstr's, 1e-10
pg0). KKT residuals and gaps (to scipy nnls) are recomputed in numpy, worst
column; "support": the fraction of columns with scipy's support.

Usage: ``python -m benchmarks.nnls_batch [--quick] [--cases unmix]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from benchmarks import _floors
from benchmarks import _timing
from benchmarks._nnls_problems import gaussian
from benchmarks._nnls_problems import make_problem
from benchmarks._nnls_solvers import posconstr_solve
from benchmarks._nnls_solvers import scipy_lbfgsb
from posconstr import nnls

SCIPY = "scipy nnls loop"
FLOOR = "floor: A^T B + G X"
# The batch's floors: its 64 Gram matrices (XLA and NumPy), and one batched
# Cholesky of them (each active-set solve factors at least once).
GRAM, GRAM_NUMPY, CHOLESKY = ("floor: Gram matrices", "floor: Gram in NumPy",
                              "floor: one Cholesky")
SUMMARY_KEYS = ("case", "note", "method", "median_s", "paired_ratio",
                "kkt_max", "gap_max", "support_equal", "iters_mean",
                "iters_max", "compile_s", "blas_threads", "products_s",
                "ratio_to_scipy", "gram_s", "gram_numpy_s", "cholesky_s")


def unmixing(seed: int, m=200, n=20, k=10_000):
  rng = np.random.default_rng(seed)
  A = np.abs(rng.standard_normal((m, n)))
  X = np.where(rng.random((n, k)) < 0.2, rng.random((n, k)), 0.0)
  return A, A @ X + 0.01 * rng.standard_normal((m, k))


def metrics(A, B, X) -> Dict[str, np.ndarray]:
  """Per column: objective, KKT residual, pg0 (A: (m, n) or (p, m, n) with
  B, X stacked the same way as columns: (m, k)/(n, k) or (p, m)/(p, n))."""
  if A.ndim == 3:
    R = np.einsum("pmn,pn->pm", A, X) - B
    grad = np.einsum("pmn,pm->pn", A, R)
    pg0 = np.max(np.einsum("pmn,pm->pn", A, B), axis=1)
    axis = 1
  else:
    R = A @ X - B
    grad = A.T @ R
    pg0 = np.max(A.T @ B, axis=0)
    axis = 0
  kkt = np.max(np.abs(X - np.maximum(X - grad, 0.0)), axis=axis)
  return {"obj": 0.5 * np.sum(R * R, axis=axis), "kkt": kkt,
          "pg0": np.maximum(pg0, 1e-300)}


def jitted(fn, *args):
  compiled, t = _timing.compile_timed(jax.jit(fn), *args)
  return (lambda: compiled(*args)), t


def optax_at_kkt(A, B, target, batched, max_log2=14):
  """The fewest optax.nnls iterations (32, 64, ...) reaching ``target``."""
  for log2 in range(5, max_log2 + 1):
    iters = 2**log2
    solve = (jax.vmap(lambda a, b: optax.nnls(a, b, iters)) if batched
             else (lambda a, b: optax.nnls(a, b, iters)))
    fn, t_comp = jitted(solve, jnp.asarray(A), jnp.asarray(B))
    X = np.asarray(fn())
    kkt = metrics(A, B, X)["kkt"]
    if np.all(kkt <= target):
      break
  return fn, t_comp, X, iters


def run_case(name: str, args) -> Dict[str, Any]:
  t0 = time.perf_counter()
  batched = name == "batch"
  if batched:
    prob = make_problem("batch", args.seed)
    A, B = prob.A, prob.b
    note = prob.note
  elif name == "unmix":
    A, B = unmixing(args.seed, k=args.unmix_k)
    note = f"one 200x20 non-negative A, {B.shape[1]} right-hand sides"
  else:
    (A, B), note = gaussian(5000, 2000, args.seed), "one 5000x2000 Gaussian"
  Aj, Bj = jnp.asarray(A), jnp.asarray(B)
  fns: Dict[str, Callable[[], Any]] = {}
  out: Dict[str, Dict[str, Any]] = {}

  def scipy_loop():
    if batched:
      return [scipy.optimize.nnls(A[i], B[i])[0] for i in range(len(A))]
    if B.ndim == 1:
      return [scipy.optimize.nnls(A, B)[0]]
    return [scipy.optimize.nnls(A, B[:, j])[0] for j in range(B.shape[1])]

  probe = ((lambda: scipy_lbfgsb(A, B, 1e-10, 5000, 10)) if name == "large"
           else scipy_loop)
  threads, _ = _floors.choose_blas_threads("best", probe)
  with _floors.blas_limit(threads):
    t_s = time.perf_counter()
    xs = scipy_loop()
    t_scipy_once = time.perf_counter() - t_s
    solve = jax.vmap(nnls) if batched else nnls
    fn, t_comp = jitted(solve, Aj, Bj)
    res = fn()
  fns["posconstr.nnls"] = fn
  out["posconstr.nnls"] = {"X": np.asarray(res.x), "compile_s": t_comp,
                           "iters": np.asarray(res.num_iter),
                           "converged": float(np.mean(res.converged))}
  Xs = np.stack(xs) if batched else (np.stack(xs, 1) if B.ndim == 2
                                     else xs[0])
  ref = metrics(A, B, Xs)
  target = np.maximum(10 * np.max(metrics(A, B, out["posconstr.nnls"]["X"])
                                  ["kkt"]), 1e-10 * ref["pg0"])
  if name == "large":
    out[SCIPY] = {"X": Xs, "single_s": t_scipy_once}
    with _floors.blas_limit(threads):
      t_s = time.perf_counter()
      lb = scipy_lbfgsb(A, B, 1e-10, 5000, 10)
    out["scipy L-BFGS-B"] = {"X": lb.x, "single_s": time.perf_counter() - t_s,
                             "iters": np.array([lb.nit])}
  else:
    fns[SCIPY] = scipy_loop
    out[SCIPY] = {"X": Xs}
    fn, t_comp, Xo, iters = optax_at_kkt(A, B, target, batched)
    fns[f"optax.nnls ({iters} it)"] = fn
    out[f"optax.nnls ({iters} it)"] = {"X": Xo, "compile_s": t_comp,
                                       "iters": np.array([iters])}
  if batched:
    fn, t_comp = jitted(jax.vmap(
        lambda a, b: posconstr_solve(1e-10, 5000, 10)(a, b)[:2]), Aj, Bj)
    x_m, it_m = fn()
    fns["vmap posconstr.minimize"] = fn
    out["vmap posconstr.minimize"] = {"X": np.asarray(x_m), "compile_s": t_comp,
                                      "iters": np.asarray(it_m)}
  if name == "unmix":
    G = jnp.asarray(A.T @ A)
    fns[FLOOR] = jitted(lambda A, B, X: (A.T @ B, G @ X), Aj, Bj,
                        jnp.asarray(Xs))[0]
  if batched:
    grams = jax.vmap(lambda a, b: (a.T @ a, a.T @ b))
    fns[GRAM] = jitted(grams, Aj, Bj)[0]
    fns[GRAM_NUMPY] = lambda: (np.matmul(A.transpose(0, 2, 1), A),
                               np.einsum("pmn,pm->pn", A, B))
    fns[CHOLESKY] = jitted(jax.vmap(jnp.linalg.cholesky), grams(Aj, Bj)[0])[0]
  with _floors.blas_limit(threads):
    times = _timing.interleaved_times(
        fns, repeats=args.repeats, warmup=args.warmup,
        budget_s=args.budget_s, min_repeats=args.min_repeats)
  base = times.get(SCIPY, [out[SCIPY].get("single_s", np.nan)])
  rows = []
  for method, m in out.items():
    t = times.get(method) or [m.get("single_s")]
    met = metrics(A, B, m["X"])
    gap = (met["obj"] - ref["obj"]) / np.maximum(ref["obj"], 1e-300)
    same = (m["X"] > 0) == (Xs > 0)  # per column: support equal to scipy's
    same = np.all(same, axis=-1 if batched else 0) if same.ndim > 1 else same
    it = np.atleast_1d(m.get("iters", np.array([np.nan])))
    rows.append({"method": method, **_timing.timing_row(t, base),
                 "kkt_max": float(np.max(met["kkt"])),
                 "kkt_rel_max": float(np.max(met["kkt"] / ref["pg0"])),
                 "gap_max": float(np.max(gap)),
                 "support_equal": float(np.mean(same)),
                 "iters_mean": float(np.mean(it)),
                 "iters_max": float(np.max(it)),
                 "compile_s": m.get("compile_s")})
  floor = None
  if name == "unmix":
    bw = _floors.copy_bandwidth(64 * 2**20, repeats=5)
    t_prod = float(np.median(times[FLOOR]))
    floor = {"products_s": t_prod, "bytes_s": (B.nbytes + Xs.nbytes) / bw,
             "copy_bandwidth": bw,
             "ratio_to_scipy": t_prod / float(np.median(base))}
  if batched:
    floor = {key: float(np.median(times[fn])) for key, fn in (
        ("gram_s", GRAM), ("gram_numpy_s", GRAM_NUMPY),
        ("cholesky_s", CHOLESKY))}
    floor["ratio_to_scipy"] = floor["gram_s"] / float(np.median(base))
  return {"case": name, "note": note, "rows": rows, "floor": floor,
          "wall_s": time.perf_counter() - t0, "blas_threads": threads}


def table(res) -> str:
  rows = [[r["method"], _timing.fmt_time(r["median_s"]),
           f"{r['paired_ratio']['median']:.3f}x", f"{r['kkt_max']:.1e}",
           f"{r['gap_max']:.1e}", f"{100 * r['support_equal']:.0f}%",
           f"{r['iters_mean']:.1f} / {r['iters_max']:.0f}",
           "" if r["compile_s"] is None else f"{r['compile_s']:.1f} s"]
          for r in res["rows"]]
  return _timing.markdown_table(
      ["method", "median", "vs scipy nnls", "KKT max", "gap max", "support",
       "iters mean / max", "compile"], rows)


def floor_text(res) -> str:
  """The case's floors in a sentence ("" without floors)."""
  f = res.get("floor")  # (None: not in the summary.)
  if not f:
    return ""
  if "products_s" in f:
    text = (f"Floor: `A^T B + G X` {_timing.fmt_time(f['products_s'])} "
            f"({f['ratio_to_scipy']:.3f}x scipy)")
    if "copy_bandwidth" in f:  # Not in the committed summary.
      text += (f"; B and X at {_timing.fmt_bandwidth(f['copy_bandwidth'])}: "
               f"{_timing.fmt_time(f['bytes_s'])}")
    return text + "."
  return (f"Floors: the Gram matrices `A^T A`, `A^T b` "
          f"{_timing.fmt_time(f['gram_s'])} ({f['ratio_to_scipy']:.3f}x "
          f"scipy; NumPy {_timing.fmt_time(f['gram_numpy_s'])}); one batched "
          f"Cholesky of them {_timing.fmt_time(f['cholesky_s'])}.")


def readme_table(res) -> str:
  """:func:`table` and the floors under it."""
  floors = floor_text(res)
  return table(res) + (f"\n\n{floors}" if floors else "")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--cases", default=None, help="comma-separated subset of "
                  "batch,unmix,large (--quick: batch,unmix).")
  ap.add_argument("--unmix-k", type=int, default=10_000)
  ap.add_argument("--seed", type=int, default=0)
  args = _timing.parse_args(
      ap, argv, "nnls_batch", repeats=15, min_repeats=5, warmup=1,
      budget_s=60.0, quick={"repeats": 5, "min_repeats": 3, "budget_s": 10.0})
  jax.config.update("jax_enable_x64", True)  # Here, not at import.
  report = _timing.Report("nnls_batch", args)
  for name in (args.cases or ("batch,unmix" if args.quick
                              else "batch,unmix,large")).split(","):
    _timing.eprint(f"[{name}]")
    res = run_case(name.strip(), args)
    text = f"### {name}: {res['note']}\n\n{table(res)}\n\n"
    text += floor_text(res) + "\n\n" if res.get("floor") else ""
    report.add(res, text + f"({res['wall_s']:.0f} s; numpy BLAS threads for "
               f"scipy: {res['blas_threads']})")
  return report.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
