"""Compile cost with many parameter leaves: posconstr against its Optax peers.

One jitted step on a dict of N small float32 leaves (N/2 layers of an
(8, 8) ``kernel`` and an (8,) ``bias``): seconds to trace, lower and compile
it, the program sizes and the peak resident memory (``VmHWM``). Each variant
runs in a process of its own, killed past ``--mem-cap-gb`` ("killed at X
GB") or ``--timeout-s``. Times are the process's CPU seconds (less disturbed
by neighbours than the wall seconds, also recorded); ratios are to the peer:

* ``keep_nonneg`` (Adam + ``optax.keep_params_nonnegative``) for
  ``project_nonneg`` (``mask="*/kernel"``), ``constrain`` (NonNegative
  kernels, ``Box(-1, 1)`` biases), ``box`` (``Box(-1, 1)``), ``maxnorm``
  (``MaxNorm(2, axis=0)`` kernels) and ``projected(adam, NonNegative())``;
* ``optax_lbfgs`` (one update, ``value_fn``) for ``lbfgsb(lower=0)``, and
  ``optax_lbfgs_loop`` (20 in a loop) for ``minimize(lower=0, maxiter=20)``.

Run only when named in ``--variants``, against ``keep_nonneg``: three
floors, the projections by hand without posconstr's exact landing or NaN
guard: ``box_by_hand`` (``clip(p + u, -1, 1) - p``), ``maxnorm_by_hand``
(``MaxNorm(p + u) - p``) and ``projected_by_hand`` (the gradient zeroed
where ``p <= 0`` and ``g > 0``, Adam, then the peer); and three forms that
drop posconstr's extras: ``box_post``, ``maxnorm_post`` (Adam, then
``project_params`` of those sets after ``apply_updates`` in the same step:
no landing needed) and ``projected_unguarded`` (``nan_guard=False``).
XLA:CPU's compile time and memory follow the HLO instructions of each
leaf's kernels (more than the number of kernels), so the landing's
operations per leaf are what ``box`` and ``maxnorm`` pay over these floors.

Usage::

  python -m benchmarks.compile_cost --quick  # 200, 2,000 leaves; full: +10,000
  python -m benchmarks.compile_cost --leaves 100 --variants box,lbfgsb
  python -m benchmarks.compile_cost --leaves 10000 --tag 10k \
      --variants project_nonneg,constrain,box,maxnorm --mem-cap-gb 20
  python -m benchmarks.compile_cost --leaves 200,1000,2000 --tag floors \
      --variants box,box_by_hand,box_post,maxnorm,maxnorm_by_hand,\
maxnorm_post --repeats 3
  python -m benchmarks.compile_cost --leaves 200,1000,2000 --tag projected \
      --variants projected,projected_unguarded,projected_by_hand --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

import posconstr as pc
from benchmarks import _timing
from benchmarks import projection_overhead

PEERS = {"adam": None, "keep_nonneg": None, "project_nonneg": "keep_nonneg",
         "constrain": "keep_nonneg", "box": "keep_nonneg",
         "maxnorm": "keep_nonneg", "projected": "keep_nonneg",
         "box_by_hand": "keep_nonneg", "maxnorm_by_hand": "keep_nonneg",
         "box_post": "keep_nonneg", "maxnorm_post": "keep_nonneg",
         "projected_unguarded": "keep_nonneg",
         "projected_by_hand": "keep_nonneg",
         "optax_lbfgs": None, "lbfgsb": "optax_lbfgs",
         "optax_lbfgs_loop": None, "minimize": "optax_lbfgs_loop"}
# The floors and the project_params forms: run when named in --variants.
ON_REQUEST = ("box_by_hand", "maxnorm_by_hand", "box_post", "maxnorm_post",
              "projected_unguarded", "projected_by_hand")
# project_params after apply_updates, in the same jitted step.
POST = {"box_post": (pc.Box(-1.0, 1.0), None),
        "maxnorm_post": (pc.MaxNorm(2.0, axis=0), "*/kernel")}
LEAVES, QUICK_LEAVES = (200, 2000, 10000), (200, 2000)
STAGES = ("trace", "lower", "compile")
SUMMARY_KEYS = ("leaves", "variant", "peer", "status", "trace_cpu_s",
                "lower_cpu_s", "compile_cpu_s", "median_s", "total_wall_s",
                "peak_rss_gb", "hlo_instructions", "ratio_of_medians",
                "ratio_peak_rss", "ratio_hlo")


def _step(variant: str, params):
  """``(step, args)``: the body of the jitted step and its arguments."""
  def loss(x):
    return sum(jnp.sum(jnp.square(v - 0.5)) for v in jax.tree.leaves(x))

  if variant == "minimize":
    return lambda x: pc.minimize(loss, x, lower=0.0, maxiter=20).params, (
        params,)
  adam = optax.adam(1e-3)
  tx = {"adam": lambda: adam,
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
        "projected_unguarded": lambda: pc.projected(
            adam, pc.NonNegative(), nan_guard=False),
        "projected_by_hand": lambda: optax.chain(optax.stateless(
            lambda g, p: jax.tree.map(
                lambda gi, pi: jnp.where((pi <= 0) & (gi > 0), 0.0, gi),
                g, p)), adam, optax.keep_params_nonnegative()),
        "box_by_hand": lambda: optax.chain(adam, optax.stateless(
            lambda u, p: jax.tree.map(
                lambda ui, pi: jnp.clip(pi + ui, -1.0, 1.0) - pi, u, p))),
        "maxnorm_by_hand": lambda: optax.chain(
            adam, projection_overhead.maxnorm_update_by_hand()),
        **{name: lambda: adam for name in POST},
        "lbfgsb": lambda: pc.lbfgsb(lower=0.0)}.get(variant, optax.lbfgs)()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def solver_step(x, state):
    value, grad = value_and_grad(x, state=state)
    u, state = tx.update(grad, state, x, value=value, grad=grad,
                         value_fn=loss)
    return optax.apply_updates(x, u), state

  if variant == "optax_lbfgs_loop":
    return (lambda x: jax.lax.fori_loop(
        0, 20, lambda _, c: solver_step(*c), (x, tx.init(x)))[0], (params,))
  if variant in ("optax_lbfgs", "lbfgsb"):
    return solver_step, (params, tx.init(params))

  def step(x, state, g):
    u, state = tx.update(g, state, x)
    x = optax.apply_updates(x, u)
    if variant in POST:
      x = pc.project_params(x, *POST[variant])
    return x, state

  return step, (params, tx.init(params), jax.tree.map(lambda v: v + 0.1,
                                                      params))


def _status_gb(field: str, pid="self") -> float:
  """``VmHWM`` (peak) or ``VmRSS`` of a process from ``/proc``, in GB."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024 / 1e9
  except OSError:  # Gone, or not Linux.
    pass
  return 0.0


def measure(variant: str, leaves: int) -> dict[str, Any]:
  """One variant at one size, in this process (the child)."""
  params = {f"layer_{i:05d}": {"kernel": jnp.full((8, 8), 0.5),
                               "bias": jnp.full((8,), 0.5)}
            for i in range(leaves // 2)}
  body, args = _step(variant, params)
  out: dict[str, Any] = {"rss_before_gb": _status_gb("VmHWM")}
  stages = [jax.jit(body)]
  for name, run in zip(STAGES, (lambda jitted: jitted.trace(*args),
                                lambda traced: traced.lower(),
                                lambda lowered: lowered.compile())):
    w0, c0 = time.perf_counter(), time.process_time()
    stages.append(run(stages[-1]))
    out[f"{name}_wall_s"] = time.perf_counter() - w0
    out[f"{name}_cpu_s"] = time.process_time() - c0
  # The peak before the program texts below, which are large themselves.
  out["peak_rss_gb"] = _status_gb("VmHWM")
  _, traced, lowered, compiled = stages
  lines = lambda text, part: sum(  # noqa: E731
      part in line for line in text.splitlines())
  hlo = compiled.as_text()
  out.update(jaxpr_eqns=len(traced.jaxpr.eqns), hlo_instructions=lines(
      hlo, " = "), hlo_fusions=lines(hlo, " fusion("), stablehlo_ops=lines(
          lowered.as_text(), " = "))
  for kind in ("wall", "cpu"):
    out[f"total_{kind}_s"] = sum(out[f"{s}_{kind}_s"] for s in STAGES)
  return {**out, "status": "ok"}


def run_child(variant: str, leaves: int, cap_gb: float,
              timeout_s: float) -> dict[str, Any]:
  """:func:`measure` in a fresh process, killed past ``cap_gb`` resident
  or ``timeout_s``."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "benchmarks.compile_cost", "--child", variant,
       str(leaves), str(cap_gb)], cwd=_timing.REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  seen_gb, t0, status = 0.0, time.perf_counter(), None
  while proc.poll() is None and status is None:
    seen_gb = max(seen_gb, _status_gb("VmRSS", proc.pid))
    if seen_gb > cap_gb:
      status = f"killed at {seen_gb:.1f} GB"
    elif time.perf_counter() - t0 > timeout_s:
      status = f"killed after {timeout_s:.0f} s"
    time.sleep(0.1)
  if status:
    proc.kill()
  stdout, stderr = proc.communicate()
  if status is None and proc.returncode == 0:
    return json.loads(stdout.strip().splitlines()[-1])
  error = ([line for line in stderr.splitlines() if "Error" in line]
           or ["?"])[-1]
  return {"status": status or f"failed ({error[:200]})",
          "peak_rss_gb": seen_gb, "wall_s": time.perf_counter() - t0}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """One variant's runs: the median of each number, or the first failure."""
  failed = [r for r in runs if r["status"] != "ok"]
  if failed:
    return failed[0]
  times = [r["total_cpu_s"] for r in runs]  # What the ratios compare.
  return {**{k: (statistics.median(r[k] for r in runs)
                 if isinstance(v, (int, float)) else v)
             for k, v in runs[0].items()},
          "times_s": times, "median_s": statistics.median(times),
          "min_s": min(times)}


def _ratios(row: dict[str, Any], peer: Optional[dict[str, Any]]) -> None:
  ok = peer and peer["status"] == "ok" and row["status"] == "ok"
  for key, name in (("median_s", "ratio_of_medians"), ("hlo_instructions",
                    "ratio_hlo"), ("peak_rss_gb", "ratio_peak_rss")):
    row[name] = row[key] / peer[key] if ok else None


def table(rows: list[dict[str, Any]]) -> str:
  keys = ("trace_cpu_s", "lower_cpu_s", "compile_cpu_s", "total_cpu_s",
          "total_wall_s", "ratio_of_medians", "hlo_instructions", "ratio_hlo",
          "peak_rss_gb", "ratio_peak_rss")
  return _timing.markdown_table(
      ["leaves", "variant", "vs", "trace", "lower", "compile", "total",
       "(wall)", "ratio", "HLO instr.", "ratio", "peak RSS GB", "ratio",
       "status"],
      [[r["leaves"], r["variant"], r["peer"] or "-",
        *("n/a" if r.get(k) is None else format(r[k], ".2f" if isinstance(
            r[k], float) else "d") for k in keys), r["status"]]
       for r in rows], align="rll" + "r" * len(keys) + "l")


def readme_table(payload) -> str:
  """Per variant and leaf count: trace+lower+compile CPU seconds (ratio to
  its peer, and that of the HLO instructions) and peak memory, or how the
  process ended."""
  counts = [r["leaves"] for r in payload["results"]]
  by_name: dict[str, dict[int, dict[str, Any]]] = {}
  for res in payload["results"]:
    for row in res["variants"]:
      by_name.setdefault(row["variant"], {})[res["leaves"]] = row

  def cell(row):
    if row is None:
      return "-"
    if row["status"].startswith("killed at"):  # Says its memory.
      return row["status"]
    if row["status"] != "ok":
      return f"{row['status']} ({row['peak_rss_gb']:.1f} GB)"
    total = sum(row[f"{stage}_cpu_s"] for stage in STAGES)
    ratio = ("" if row.get("ratio_of_medians") is None
             else f" ({row['ratio_of_medians']:.2f}x; HLO "
                  f"{row['ratio_hlo']:.2f}x)")
    return f"{total:.1f} s{ratio}, {row['peak_rss_gb']:.1f} GB"

  return _timing.markdown_table(
      ["variant", "vs", *(f"{n:,} leaves" for n in counts)],
      [[name, PEERS[name] or "-", *(cell(rows.get(n)) for n in counts)]
       for name, rows in by_name.items()])


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--child"]:  # Address space capped too: a backstop for
    cap = int(float(argv[3]) * 2 * 2**30)  # growth between the polls.
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    print(json.dumps(measure(argv[1], int(argv[2]))), flush=True)
    return 0
  # No abbreviations: --tag is read before parsing, to name the results.
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               allow_abbrev=False)
  for flag, kind, text in (
      ("--leaves", str, f"comma-separated counts (default {LEAVES}; --quick "
                        f"{QUICK_LEAVES})"),
      ("--variants", str, f"comma-separated, of {list(PEERS)}; with peers"),
      ("--mem-cap-gb", float, "kill a variant past this resident (8)"),
      ("--timeout-s", float, "kill a variant after this (1800; --quick 150)"),
      ("--tag", str, "name the results compile_cost_TAG (a run apart)")):
    ap.add_argument(flag, type=kind, help=text)
  ap.add_argument("--no-peers", action="store_true", help="add no peers")
  tag = _timing.option(argv, "--tag")
  name = f"compile_cost_{tag}" if tag else "compile_cost"
  args = _timing.parse_args(ap, argv, name, repeats=1,
                            min_repeats=1, warmup=0, quick={})
  leaves = ([int(s) for s in args.leaves.split(",")] if args.leaves
            else list(QUICK_LEAVES if args.quick else LEAVES))
  args.timeout_s = args.timeout_s or (150.0 if args.quick else 1800.0)
  args.mem_cap_gb = args.mem_cap_gb or 8.0
  chosen = [s.strip() for s in (args.variants or "").split(",") if s.strip()]
  if set(chosen) - set(PEERS):
    ap.error(f"--variants: unknown {sorted(set(chosen) - set(PEERS))}; "
             f"choose from {list(PEERS)}")
  peers = set() if args.no_peers else {PEERS[m] for m in chosen}
  names = [n for n in PEERS  # Peers first, in PEERS' order.
           if n in chosen or n in peers or not (chosen or n in ON_REQUEST)]
  report = _timing.Report(name, args)
  for n in leaves:
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(args.repeats):  # Interleaved rounds, order rotated.
      for name in names[r % len(names):] + names[:r % len(names)]:
        _timing.eprint(f"[compile_cost] {name} at {n} leaves, round {r + 1}")
        samples[name].append(run_child(name, n, args.mem_cap_gb,
                                       args.timeout_s))
        _timing.write_json(args.out, {**report.payload, "running": {
            "leaves": n, "samples": samples}})  # Survives a crash.
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
      rows[name] = {"leaves": n, "variant": name, "peer": PEERS[name],
                    **_median(samples[name])}
      _ratios(rows[name], rows.get(PEERS[name]))
    report.add({"leaves": n, "variants": list(rows.values())},
               f"### {n} leaves (CPU seconds; median of {args.repeats})\n\n"
               + table(list(rows.values())))
  return report.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
