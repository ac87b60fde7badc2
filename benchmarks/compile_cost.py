"""Compile cost with many parameter leaves: posconstr against its Optax peers.

One jitted step on a dict of N small leaves (N/2 layers, each an (8, 8)
``kernel`` and an (8,) ``bias``; float32): the time to trace it
(``jax.jit(step).trace``), to lower it to StableHLO, to compile it with XLA,
the sizes of the programs and the peak memory (``VmHWM``) of the process.
Each variant runs in a process of its own, killed once its resident memory
passes ``--mem-cap-gb`` (reported as "killed at X GB"), so one blow-up cannot
take the machine. Times are wall *and* CPU seconds of the process: CPU time
is less disturbed by neighbours on a shared machine, and the ratios use it.

Variants and their peers (ratios are to the peer, measured in the same run):

* projections, peer ``keep_nonneg`` (``adam`` + ``optax.keep_params_nonnegative``):
  ``project_nonneg`` (``mask="*/kernel"``), ``constrain`` (NonNegative kernels,
  ``Box(-1, 1)`` biases), ``box`` (``Box(-1, 1)`` everywhere), ``maxnorm``
  (``MaxNorm(2, axis=0)`` kernels), ``projected`` (``projected(adam,
  NonNegative())``); plain ``adam`` for scale;
* ``lbfgsb`` (one update with ``value_fn``, ``lower=0``), peer
  ``optax_lbfgs``; ``minimize`` (``lower=0``, ``maxiter=20``), peer
  ``optax_lbfgs_loop`` (``optax.lbfgs`` in a ``lax.while_loop``, 20 steps).

Usage::

  python -m benchmarks.compile_cost --quick      # 200 and 2,000 leaves
  python -m benchmarks.compile_cost --summary    # + 10,000; summary JSON
  python -m benchmarks.compile_cost --leaves 100 --variants keep_nonneg,box
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

from benchmarks import _timing

PEERS = {"adam": None, "keep_nonneg": None, "project_nonneg": "keep_nonneg",
         "constrain": "keep_nonneg", "box": "keep_nonneg",
         "maxnorm": "keep_nonneg", "projected": "keep_nonneg",
         "optax_lbfgs": None, "lbfgsb": "optax_lbfgs",
         "optax_lbfgs_loop": None, "minimize": "optax_lbfgs_loop"}
LEAVES, QUICK_LEAVES = (200, 2000, 10000), (200, 2000)
SUMMARY_KEYS = ("leaves", "variant", "peer", "status", "trace_cpu_s",
                "lower_cpu_s", "compile_cpu_s", "median_s", "total_wall_s",
                "peak_rss_gb", "hlo_instructions", "ratio_of_medians",
                "ratio_peak_rss", "ratio_hlo")


def _step(variant: str, params):
  """``(step, args)``: the jitted function's body and its arguments."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import posconstr as pc  # pylint: disable=g-import-not-at-top

  def loss(x):
    return sum(jnp.sum(jnp.square(v - 0.5)) for v in jax.tree.leaves(x))

  adam = optax.adam(1e-3)
  transforms = {
      "adam": lambda: adam,
      "keep_nonneg": lambda: optax.chain(
          adam, optax.keep_params_nonnegative()),
      "project_nonneg": lambda: optax.chain(
          adam, pc.project_nonneg(mask="*/kernel")),
      "constrain": lambda: optax.chain(adam, pc.constrain(
          {"*/kernel": pc.NonNegative(), "*/bias": pc.Box(-1.0, 1.0)})),
      "box": lambda: optax.chain(adam, pc.project(pc.Box(-1.0, 1.0))),
      "maxnorm": lambda: optax.chain(
          adam, pc.project(pc.MaxNorm(2.0, axis=0), mask="*/kernel")),
      "projected": lambda: pc.projected(adam, pc.NonNegative()),
      "optax_lbfgs": optax.lbfgs,
      "lbfgsb": lambda: pc.lbfgsb(lower=0.0),
  }
  if variant == "minimize":
    return (lambda x: pc.minimize(loss, x, lower=0.0, maxiter=20).params,
            (params,))
  if variant == "optax_lbfgs_loop":
    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
      x, state, k = carry
      value, grad = value_and_grad(x, state=state)
      u, state = tx.update(grad, state, x, value=value, grad=grad,
                           value_fn=loss)
      return optax.apply_updates(x, u), state, k + 1

    return (lambda x: jax.lax.while_loop(lambda c: c[2] < 20, body,
                                         (x, tx.init(x), 0))[0], (params,))
  tx = transforms[variant]()
  grads = jax.tree.map(lambda v: v + 0.1, params)
  if variant in ("optax_lbfgs", "lbfgsb"):
    value_and_grad = optax.value_and_grad_from_state(loss)

    def solver_step(x, state):
      value, grad = value_and_grad(x, state=state)
      u, state = tx.update(grad, state, x, value=value, grad=grad,
                           value_fn=loss)
      return optax.apply_updates(x, u), state

    return solver_step, (params, tx.init(params))

  def step(x, state, g):
    u, state = tx.update(g, state, x)
    return optax.apply_updates(x, u), state

  return step, (params, tx.init(params), grads)


def _peak_rss_gb() -> float:
  """This process's peak resident memory (``VmHWM``), in GB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure(variant: str, leaves: int) -> dict[str, Any]:
  """One variant at one size, in this process (the child)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = {f"layer_{i:05d}": {"kernel": jnp.full((8, 8), 0.5),
                               "bias": jnp.full((8,), 0.5)}
            for i in range(leaves // 2)}
  body, args = _step(variant, params)
  rss_before = _peak_rss_gb()
  out: dict[str, Any] = {}
  jitted = jax.jit(body)
  stages = [None]
  for name, run in (("trace", lambda _: jitted.trace(*args)),
                    ("lower", lambda traced: traced.lower()),
                    ("compile", lambda lowered: lowered.compile())):
    w0, c0 = time.perf_counter(), time.process_time()
    stages.append(run(stages[-1]))
    out[f"{name}_wall_s"] = time.perf_counter() - w0
    out[f"{name}_cpu_s"] = time.process_time() - c0
  # The peak before the program texts below, which are large themselves.
  out.update(rss_before_gb=rss_before, peak_rss_gb=_peak_rss_gb())
  _, traced, lowered, compiled = stages
  out["jaxpr_eqns"] = len(traced.jaxpr.eqns)
  out["stablehlo_ops"] = _count(lowered.as_text(), " = ")
  hlo = compiled.as_text()
  out["hlo_instructions"] = _count(hlo, " = ")
  out["hlo_fusions"] = _count(hlo, " = ", " fusion(")
  for kind in ("wall", "cpu"):
    out[f"total_{kind}_s"] = sum(out[f"{s}_{kind}_s"]
                                 for s in ("trace", "lower", "compile"))
  out["status"] = "ok"
  return out


def _count(text: str, *parts: str) -> int:
  """Lines of ``text`` that hold every one of ``parts``."""
  return sum(all(p in line for p in parts) for line in text.splitlines())


def run_child(variant: str, leaves: int, cap_gb: float,
              timeout_s: float) -> dict[str, Any]:
  """:func:`measure` in a fresh process, killed past ``cap_gb`` resident."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.compile_cost", "--child", variant,
       str(leaves), str(cap_gb)], cwd=_timing.REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  seen_gb, t0, status = 0.0, time.perf_counter(), None
  while proc.poll() is None:
    seen_gb = max(seen_gb, _rss_gb(proc.pid))
    if seen_gb > cap_gb:
      status = f"killed at {seen_gb:.1f} GB"
    elif time.perf_counter() - t0 > timeout_s:
      status = f"killed after {timeout_s:.0f} s"
    if status:
      proc.kill()
      break
    time.sleep(0.1)
  stdout, stderr = proc.communicate()
  if status is None and proc.returncode == 0:
    return json.loads(stdout.strip().splitlines()[-1])
  errors = [line for line in stderr.splitlines()
             if "Error" in line or "Exception" in line] or ["no output"]
  error = errors[-1][:200]
  return {"status": status or f"failed ({error})", "peak_rss_gb": seen_gb,
          "wall_s": time.perf_counter() - t0}


def _rss_gb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:
    pass
  return 0.0


def _ratios(row: dict[str, Any], peer: Optional[dict[str, Any]]) -> None:
  for key, name in (("median_s", "ratio_of_medians"),
                    ("peak_rss_gb", "ratio_peak_rss"),
                    ("hlo_instructions", "ratio_hlo")):
    ok = peer and peer.get("status") == "ok" and row.get("status") == "ok"
    row[name] = row[key] / peer[key] if ok else None


def table(rows: list[dict[str, Any]]) -> str:
  def num(row, key, fmt):
    return "n/a" if row.get(key) is None else format(row[key], fmt)
  return _timing.markdown_table(
      ["leaves", "variant", "vs", "trace", "lower", "compile", "total (wall)",
       "ratio", "HLO instr.", "ratio", "peak RSS", "ratio", "status"],
      [[r["leaves"], r["variant"], r["peer"] or "-",
        num(r, "trace_cpu_s", ".2f"), num(r, "lower_cpu_s", ".2f"),
        num(r, "compile_cpu_s", ".2f"),
        f"{num(r, 'total_cpu_s', '.2f')} ({num(r, 'total_wall_s', '.2f')})",
        num(r, "ratio_of_medians", ".2f"), num(r, "hlo_instructions", "d"),
        num(r, "ratio_hlo", ".2f"), num(r, "peak_rss_gb", ".2f"),
        num(r, "ratio_peak_rss", ".2f"), r["status"]] for r in rows],
      align="rllrrrrrrrrrl")


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--child"]:  # Address space capped: a backstop between
    cap = int(float(argv[3]) * 2 * 2**30)  # the parent's polls.
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps(measure(argv[1], int(argv[2]))), flush=True)
    return 0
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--leaves", help="comma-separated leaf counts (default "
                  f"{LEAVES}; --quick {QUICK_LEAVES}).")
  ap.add_argument("--variants", help="comma-separated subset of "
                  f"{list(PEERS)} (their peers are added).")
  ap.add_argument("--no-peers", action="store_true",
                  help="only the named --variants (no ratios to absent peers).")
  ap.add_argument("--mem-cap-gb", type=float, default=8.0,
                  help="kill a variant whose resident memory passes this.")
  ap.add_argument("--timeout-s", type=float,
                  help="kill a variant that takes longer than this (default "
                       "1800 s; --quick 150 s).")
  args = _timing.parse_args(ap, argv, "compile_cost", repeats=1,
                            min_repeats=1, warmup=0, quick={})
  leaves = ([int(s) for s in args.leaves.split(",")] if args.leaves
            else list(QUICK_LEAVES if args.quick else LEAVES))
  args.timeout_s = args.timeout_s or (150.0 if args.quick else 1800.0)
  chosen = [s.strip() for s in (args.variants or "").split(",") if s.strip()]
  if set(chosen) - set(PEERS):
    ap.error(f"--variants: unknown {sorted(set(chosen) - set(PEERS))}; "
             f"choose from {list(PEERS)}")
  peers = set() if args.no_peers else {PEERS[m] for m in chosen}
  names = [n for n in PEERS if not chosen or n in chosen
           or n in peers]  # Peers first: PEERS' order.
  report = _timing.Report("compile_cost", args)
  for n in leaves:
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.repeats):  # Interleaved rounds, order rotated.
      for name in names[r % len(names):] + names[:r % len(names)]:
        _timing.eprint(f"[compile_cost] {name} at {n} leaves, round {r + 1}")
        samples[name].append(run_child(name, n, args.mem_cap_gb,
                                       args.timeout_s))
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
      rows[name] = {"leaves": n, "variant": name, "peer": PEERS[name],
                    **_median(samples[name])}
      _ratios(rows[name], rows.get(PEERS[name]))
    report.add({"leaves": n, "variants": list(rows.values())},
               f"### {n} leaves (CPU seconds; median of {args.repeats})\n\n"
               + table(list(rows.values())))
  return report.finish(SUMMARY_KEYS)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The runs of one variant: the median of each number if all ran, else
  the first failure."""
  failed = [r for r in runs if r["status"] != "ok"]
  if failed:
    return failed[0]
  times = [r["total_cpu_s"] for r in runs]  # What the ratios compare.
  return {**{k: (statistics.median(r[k] for r in runs)
                 if isinstance(v, (int, float)) else v)
             for k, v in runs[0].items()},
          "times_s": times, "median_s": statistics.median(times),
          "min_s": min(times)}


if __name__ == "__main__":
  sys.exit(main())
