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
from typing import Any, Callable, Dict, List, NamedTuple, Optional

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np
import scipy
import scipy.optimize

import posconstr
from benchmarks import _krylov_floor
from benchmarks import _timing

DEFAULT_OUT = os.path.join("benchmarks", "results", "lbfgsb.json")
ALL_PROBLEMS = "200x50,2000x500,5000x2000,digits,batch"
QUICK_PROBLEMS = "200x50,batch"
LARGE_NNLS = 5000 * 2000  # Size of A from which scipy nnls is run only once.
BATCH = 64
BATCH_SHAPE = (200, 50)

PC = "posconstr"
JAXOPT = "jaxopt LBFGSB"
SCIPY_LB = "scipy L-BFGS-B"
SCIPY_NNLS = "scipy nnls"
BASELINE = SCIPY_LB
EVAL_PREFIX = "eval:"


# ----------------------------------------------------------------------------
# Problems.


class Problem(NamedTuple):
  name: str
  A: np.ndarray  # (m, n), or (batch, m, n)
  b: np.ndarray  # (m,), or (batch, m)
  note: str

  @property
  def batched(self) -> bool:
    return self.A.ndim == 3


def gaussian(m: int, n: int, seed: int, density: float = 0.2,
             noise: float = 1e-2):
  """Gaussian ``A``; ``b = A x* + noise``, ``x*`` sparse and non-negative."""
  rng = np.random.default_rng(seed)
  A = rng.standard_normal((m, n))
  x_star = np.where(rng.random(n) < density, rng.uniform(0.5, 1.5, n), 0.0)
  b = A @ x_star + noise * rng.standard_normal(m)
  return A, b


def make_problem(name: str, seed: int) -> Problem:
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    data = load_digits().data / 16.0
    held_out = 1000 + int(np.random.default_rng(seed).integers(
        0, data.shape[0] - 1000))
    return Problem("digits", np.ascontiguousarray(data[:1000].T),
                   data[held_out].copy(),
                   f"64x1000, b = digit #{held_out} (held out)")
  if name == "batch":
    pairs = [gaussian(*BATCH_SHAPE, seed=seed + 1000 + i) for i in range(BATCH)]
    return Problem(
        "batch", np.stack([p[0] for p in pairs]),
        np.stack([p[1] for p in pairs]),
        f"{BATCH} x {BATCH_SHAPE[0]}x{BATCH_SHAPE[1]} Gaussian, vmap vs loops")
  m, n = (int(v) for v in name.split("x"))
  A, b = gaussian(m, n, seed)
  return Problem(name, A, b, f"{m}x{n} Gaussian, planted sparse x* >= 0")


def objective(A, b, x) -> float:
  r = A @ x - b
  return 0.5 * float(r @ r)


def kkt_residual(A, b, x) -> float:
  """``||x - max(x - grad, 0)||_inf``: 0 exactly at a KKT point."""
  g = A.T @ (A @ x - b)
  return float(np.max(np.abs(x - np.maximum(x - g, 0.0))))


def pg0_of(A, b) -> float:
  """``||x0 - P(x0 - g0)||_inf`` at ``x0 = 0``: ``max(A^T b, 0)``."""
  return float(max(np.max(A.T @ b), 0.0))


# ----------------------------------------------------------------------------
# Solvers. Each returns (x, iterations, evaluations, status) per problem.


def least_squares(A, b):
  """``0.5 ||A x - b||^2`` with the gradient ``r @ A``, written out.

  On XLA:CPU with ``A`` a runtime argument, ``A.T @ r`` materializes the
  transpose of ``A`` in every evaluation (3.6x slower than ``r @ A`` at
  5000x2000 float64, 12x at 2000x500; with ``A`` a compile-time constant the
  transpose is folded away and it looks fastest, a trap). Written out,
  ``r @ A`` is also faster than what autodiff emits for the same
  expression. SciPy's L-BFGS-B gets the written-out ``A.T @ r`` (numpy's
  BLAS reads the transpose in place).
  """
  @jax.custom_jvp
  def fun(x):
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r)

  @fun.defjvp
  def fun_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r), jnp.vdot(r @ A, dx)

  return fun


def posconstr_solve(tol: float, maxiter: int, memory_size: int):
  def solve(A, b):
    fun = least_squares(A, b)
    res = posconstr.minimize(fun, jnp.zeros(A.shape[1], A.dtype), lower=0.0,
                             tol=tol, maxiter=maxiter,
                             memory_size=memory_size)
    return (res.params, res.num_iter, res.num_fun_evals, res.converged,
            res.linesearch_failed.astype(jnp.int32)
            + 2 * res.stalled.astype(jnp.int32))
  return solve


def posconstr_status(converged, stop) -> str:
  """``stop``: 1 the line search failed twice, 2 stalled (see minimize)."""
  return "converged" if converged else {
      1: "linesearch failed", 2: "stalled"}.get(int(stop), "maxiter")


def jaxopt_solve(tol: float, maxiter: int, memory_size: int):
  import jaxopt  # pylint: disable=g-import-not-at-top

  def fun(x, A, b):
    r = A @ x - b
    return 0.5 * jnp.vdot(r, r)

  def solve(A, b):
    n = A.shape[1]
    abs_tol = tol * jnp.maximum(jnp.max(b @ A), 0.0)
    solver = jaxopt.LBFGSB(fun=fun, tol=abs_tol, maxiter=maxiter,
                           history_size=memory_size)
    bounds = (jnp.zeros(n, A.dtype), jnp.full(n, jnp.inf, A.dtype))
    res = solver.run(jnp.zeros(n, A.dtype), bounds, A, b)
    st = res.state
    return (res.params, st.iter_num, st.num_fun_eval, st.error <= abs_tol,
            st.failed_linesearch)
  return solve


def jaxopt_status(converged, failed) -> str:
  return "converged" if converged else (
      "linesearch failed" if failed else "maxiter")


def scipy_lbfgsb(A, b, tol: float, maxiter: int, memory_size: int):
  n = A.shape[1]
  gtol = tol * max(float(np.max(A.T @ b)), 0.0)

  def fun_and_grad(x):
    r = A @ x - b
    return 0.5 * float(r @ r), A.T @ r

  res = scipy.optimize.minimize(
      fun_and_grad, np.zeros(n), jac=True, method="L-BFGS-B",
      bounds=scipy.optimize.Bounds(np.zeros(n), np.full(n, np.inf)),
      options=dict(maxcor=memory_size, ftol=0.0, gtol=gtol, maxiter=maxiter,
                   maxfun=20 * maxiter))
  return res


def scipy_status(res) -> str:
  msg = str(res.message)
  for key, short in (("PROJECTED GRADIENT", "converged (pgtol)"),
                     ("REDUCTION OF F", "no progress (ftol=0)"),
                     ("ABNORMAL", "abnormal line search")):
    if key in msg:
      return short
  return msg[:40]


def scipy_nnls(A, b):
  return scipy.optimize.nnls(A, b, maxiter=50 * A.shape[1])


# ----------------------------------------------------------------------------
# BLAS threads for numpy / scipy.


class BlasThreads:
  """Sets numpy's BLAS threads (threadpoolctl); no-op without it."""

  def __init__(self):
    try:
      from threadpoolctl import ThreadpoolController  # pylint: disable=g-import-not-at-top
      self._ctl = ThreadpoolController()
      blas = [d for d in self._ctl.info() if d.get("user_api") == "blas"]
      self.default = max([d["num_threads"] for d in blas] or [1])
    except Exception:  # pylint: disable=broad-except
      self._ctl, self.default = None, None

  def limit(self, n: Optional[int]):
    if self._ctl is None or not n:
      return _NullContext()
    return self._ctl.limit(limits=n, user_api="blas")


class _NullContext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def choose_blas_threads(setting: str, blas: BlasThreads, run_scipy, repeats=3):
  """Thread count for the scipy methods, and the calibration timings."""
  if blas.default is None:
    return None, {}
  if setting != "best":
    n = int(setting)
    return (n or blas.default), {}
  candidates = sorted({1, blas.default})
  if len(candidates) == 1:
    return candidates[0], {}
  times = {n: [] for n in candidates}
  for _ in range(repeats):
    for n in candidates:
      with blas.limit(n):
        t0 = time.perf_counter()
        run_scipy()
        times[n].append(time.perf_counter() - t0)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return min(med, key=med.get), {str(n): v for n, v in med.items()}


# ----------------------------------------------------------------------------
# Memory bandwidth.


def measure_bandwidth(quick: bool, blas: BlasThreads) -> Dict[str, Any]:
  """Bytes/s of a numpy copy and of ``(A x) A`` passes (jitted and numpy)."""
  m, n = (4000, 2000) if quick else (5000, 4000)  # 64 / 160 MB > 32 MB L3.
  A = np.random.default_rng(0).standard_normal((m, n))
  x = np.ones(n)
  Aj, xj = jnp.asarray(A), jnp.asarray(x)
  pass_bytes = 2 * A.nbytes
  # (A x) A, not A.T @ (A x): on XLA:CPU the explicit transpose is 5-15x
  # slower (it is not folded into the dot); autodiff's vjp emits r @ A.
  gemv_pass = jax.jit(lambda A, x: (A @ x) @ A)
  compiled, _ = _timing.compile_timed(gemv_pass, Aj, xj)
  fns = {"jax (Ax)A": lambda: compiled(Aj, xj)}
  thread_counts = sorted({1, blas.default or 1})
  for k in thread_counts:
    def numpy_pass(k=k):
      with blas.limit(k):
        return (A @ x) @ A
    fns[f"numpy (Ax)A {k} thr"] = numpy_pass
  times = _timing.interleaved_times(fns, repeats=5 if quick else 15, warmup=1)
  out = {"matrix": f"{m}x{n} float64 ({_timing.fmt_bytes(A.nbytes)})",
         "copy": _timing.copy_bandwidth((64 if quick else 256) * 2**20,
                                        repeats=5 if quick else 11)}
  for name, t in times.items():
    out[name] = pass_bytes / float(np.median(t))
  out["best"] = max(v for k, v in out.items() if isinstance(v, float))
  return out


def eval_callables(A, b):
  """Callables doing ``k`` f+grad evaluations (jitted loop; numpy), and ``k``.

  The JAX one is a ``fori_loop`` of ``k`` chained evaluations: what an
  evaluation costs inside ``minimize``'s while loop, without dispatch; for a
  batch, one vmapped evaluation of all problems. They are timed in the same
  interleaved rounds as the solvers (same machine conditions).
  """
  batched = A.ndim == 3
  Aj, bj = jnp.asarray(A), jnp.asarray(b)
  x = np.full(A.shape[:-2] + A.shape[-1:], 0.1)
  xj = jnp.asarray(x)

  def fun(x, A, b):
    return least_squares(A, b)(x)
  vg = jax.value_and_grad(fun)
  if batched:
    vg = jax.vmap(vg)
  k = int(np.clip(20e-3 / (2 * A.nbytes / 1e10), 3, 1000))  # ~20 ms a call

  def chained(x, A, b):
    def body(_, carry):
      x, acc = carry
      v, g = vg(x, A, b)
      return x - 1e-12 * g, acc + v
    return jax.lax.fori_loop(0, k, body, (x, jnp.zeros(x.shape[:-1])))
  compiled, _ = _timing.compile_timed(jax.jit(chained), xj, Aj, bj)

  def numpy_evals():
    for _ in range(k):
      if batched:
        r = (A @ x[:, :, None])[..., 0] - b
        g = (r[:, None, :] @ A)[:, 0]
      else:
        g = A.T @ (A @ x - b)
    return g
  return {"jax": lambda: compiled(xj, Aj, bj), "numpy": numpy_evals}, k


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
        "status": _status_summary(m["status"]),
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


def _status_summary(statuses) -> str:
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
