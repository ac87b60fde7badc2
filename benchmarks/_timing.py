"""Reusable helpers for posconstr benchmarks.

* :func:`machine_info`: what the numbers were measured on.
* :func:`interleaved_times`: round-robin timing of several callables, so that
  slow drifts of a noisy machine (frequency, neighbours, page cache) hit every
  variant alike instead of whichever happened to run last.
* :func:`compile_timed`: ahead-of-time compilation, timed.
* :func:`copy_bandwidth`, :func:`blas_info`: memory bandwidth and numpy's
  BLAS threads (both skew CPU comparisons with numpy/scipy).
* :func:`timing_row`, :func:`timing_cells`: one variant's times against the
  baseline's, as JSON and as table cells.
* :func:`add_round_args`, :func:`resolve_rounds`, :func:`select_variants`:
  the command-line options every benchmark shares.
* :func:`markdown_table`, :func:`write_json`, :func:`start_report`,
  :func:`finish`: reporting.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np


def machine_info() -> Dict[str, Any]:
  """A JSON-able description of the machine and the software versions."""
  import optax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  info = {
      "jax_backend": jax.default_backend(),
      "device_kind": devices[0].device_kind if devices else None,
      "device_count": len(devices),
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jax.lib, "__version__", None)
                        or _jaxlib_version(),
      "optax_version": optax.__version__,
      "numpy_version": np.__version__,
      "python_version": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "platform": platform.platform(),
      "processor": _cpu_model() or platform.processor(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "loadavg_start": loadavg(),
  }
  try:
    import posconstr  # pylint: disable=g-import-not-at-top
    info["posconstr_version"] = posconstr.__version__
  except ImportError:  # pragma: no cover
    pass
  return info


def loadavg() -> Optional[List[float]]:
  """1, 5 and 15 minute load averages (other processes skew timings)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (OSError, AttributeError):  # pragma: no cover  (not Unix)
    return None


def blas_info() -> Optional[List[Dict[str, Any]]]:
  """numpy's BLAS libraries and their thread counts (needs threadpoolctl)."""
  try:
    from threadpoolctl import threadpool_info  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return None
  return [{k: d.get(k) for k in ("internal_api", "num_threads", "version",
                                 "architecture")}
          for d in threadpool_info() if d.get("user_api") == "blas"]


def compile_timed(jitted, *args, **kwargs):
  """``(compiled, seconds)``: ``jitted.lower(*args, **kwargs).compile()``.

  The seconds cover tracing, lowering and XLA compilation; call the returned
  ``jax.stages.Compiled`` to time execution alone.
  """
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
  """Bytes/s of a large numpy copy, counting the read and the write.

  The median of ``repeats`` copies of a ``nbytes`` float64 array (make it
  much larger than the last-level cache to measure main memory).
  """
  src = np.ones(max(1, nbytes // 8))
  dst = np.empty_like(src)
  np.copyto(dst, src)  # Touch the pages first.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t0)
  return 2 * src.nbytes / float(np.median(times))


def fmt_bandwidth(bytes_per_s: Optional[float]) -> str:
  return "n/a" if bytes_per_s is None else f"{bytes_per_s / 1e9:.1f} GB/s"


def _jaxlib_version() -> Optional[str]:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except Exception:  # pylint: disable=broad-except
    return None


def _cpu_model() -> Optional[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def describe_machine(info: Mapping[str, Any]) -> str:
  """One line for the top of a report."""
  return (f"{info['jax_backend']} ({info['device_kind']}, "
          f"{info['cpu_count']} CPUs: {info['processor']}), "
          f"jax {info['jax_version']}, optax {info['optax_version']}, "
          f"{info['platform']}")


def interleaved_times(fns: Mapping[str, Callable[[], Any]],
                      repeats: int,
                      warmup: int = 2,
                      inner: int = 1,
                      rotate: bool = True,
                      time_budget_s: Optional[float] = None,
                      min_repeats: int = 3) -> Dict[str, List[float]]:
  """Times each callable ``repeats`` times, round-robin over the callables.

  Each call's result is passed to ``jax.block_until_ready``; the first
  ``warmup`` rounds (which include compilation) are not recorded. With
  ``rotate`` the starting variant of each round moves by one, so no variant
  always runs right after the same neighbour.

  Args:
    fns: name -> zero-argument callable (it may carry state, e.g. donated
      buffers, in a closure).
    repeats: recorded rounds.
    warmup: unrecorded rounds first.
    inner: calls per sample (the sample is their mean), for very fast calls.
    rotate: rotate the order of the variants in each round.
    time_budget_s: stop early (after at least ``min_repeats`` rounds) once the
      recorded rounds have taken this long.
    min_repeats: see ``time_budget_s``.

  Returns:
    name -> list of per-call seconds, one per recorded round.
  """
  names = list(fns)
  times = {n: [] for n in names}
  for _ in range(warmup):
    for n in names:
      jax.block_until_ready(fns[n]())
  gc_was_enabled = gc.isenabled()
  gc.collect()
  gc.disable()
  try:
    start = time.perf_counter()
    for r in range(repeats):
      k = r % len(names) if rotate else 0
      for n in names[k:] + names[:k]:
        fn = fns[n]
        t0 = time.perf_counter()
        for _ in range(inner):
          out = fn()
        jax.block_until_ready(out)
        times[n].append((time.perf_counter() - t0) / inner)
      if (time_budget_s is not None and r + 1 >= min_repeats
          and time.perf_counter() - start > time_budget_s):
        break
  finally:
    if gc_was_enabled:
      gc.enable()
  return times


def summarize(samples: Sequence[float]) -> Dict[str, float]:
  """Median, quartiles, min and count of a list of seconds."""
  arr = np.asarray(samples, dtype=float)
  q1, med, q3 = np.percentile(arr, [25, 50, 75])
  return {"median_s": float(med), "q1_s": float(q1), "q3_s": float(q3),
          "min_s": float(arr.min()), "n": int(arr.size)}


def paired_ratio(samples: Sequence[float],
                 baseline: Sequence[float]) -> Dict[str, float]:
  """Median and quartiles of per-round ratios ``samples[i] / baseline[i]``.

  Rounds are interleaved, so round ``i`` of two variants ran at nearly the
  same time; the per-round ratio cancels drifts that the ratio of medians
  only averages out.
  """
  n = min(len(samples), len(baseline))
  r = np.asarray(samples[:n], float) / np.asarray(baseline[:n], float)
  q1, med, q3 = np.percentile(r, [25, 50, 75])
  return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def timing_row(samples: Sequence[float],
               baseline: Sequence[float]) -> Dict[str, Any]:
  """One variant's samples, their summary and their ratios to the baseline.

  ``ratio_of_mins`` compares the least disturbed rounds (other processes on
  a shared machine only ever add time).

  >>> row = timing_row([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
  >>> row["median_s"], row["ratio_of_medians"], row["ratio_of_mins"]
  (4.0, 2.0, 2.0)
  >>> row["paired_ratio"]["median"]
  2.0
  """
  summary = summarize(samples)
  return {"times_s": list(samples), **summary,
          "ratio_of_medians": summary["median_s"]
                              / float(np.median(np.asarray(baseline, float))),
          "paired_ratio": paired_ratio(samples, baseline),
          "ratio_of_mins": summary["min_s"] / float(min(baseline))}


TIMING_HEADERS = ("median", "IQR", "paired ratio [q1, q3]",
                  "ratio of medians", "min ratio")


def timing_cells(row: Mapping[str, Any]) -> List[str]:
  """Table cells for :data:`TIMING_HEADERS` from a :func:`timing_row`."""
  pr = row["paired_ratio"]
  return [fmt_time(row["median_s"]),
          f"{fmt_time(row['q1_s'])}-{fmt_time(row['q3_s'])}",
          f"{pr['median']:.3f}x [{pr['q1']:.3f}, {pr['q3']:.3f}]",
          fmt_ratio(row["ratio_of_medians"]), fmt_ratio(row["ratio_of_mins"])]


def fmt_time(seconds: Optional[float]) -> str:
  if seconds is None:
    return "n/a"
  if seconds >= 1:
    return f"{seconds:.3f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.2f} ms"
  return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: Optional[float]) -> str:
  if n is None:
    return "n/a"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} B"


def fmt_ratio(r: Optional[float], digits: int = 3) -> str:
  return "n/a" if r is None else f"{r:.{digits}f}x"


def markdown_table(headers: Sequence[str],
                   rows: Sequence[Sequence[Any]],
                   align: Optional[Sequence[str]] = None) -> str:
  """A GitHub markdown table; ``align`` entries are 'l' or 'r'."""
  align = align or ["l"] + ["r"] * (len(headers) - 1)
  cells = [[str(c) for c in row] for row in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells])
            for i, h in enumerate(headers)]

  def line(items):
    parts = [s.ljust(w) if a == "l" else s.rjust(w)
             for s, w, a in zip(items, widths, align)]
    return "| " + " | ".join(parts) + " |"

  sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else
                       (":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
  return "\n".join([line(headers), sep] + [line(r) for r in cells])


def write_json(path: str, payload: Any) -> str:
  """Writes ``payload`` as indented JSON, creating the directory; atomic."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
    f.write("\n")
  os.replace(tmp, path)
  return path


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def eprint(*args, **kwargs) -> None:
  print(*args, file=sys.stderr, flush=True, **kwargs)


# ----------------------------------------------------------------------------
# Command line and the end of a run, shared by the benchmark scripts.


def add_round_args(ap: argparse.ArgumentParser, default_out: str, *,
                   repeats: int, quick_repeats: int, min_repeats: int,
                   warmup: int, quick_help: str) -> None:
  """--quick, --repeats, --min-repeats, --budget-s, --warmup and --out."""
  ap.add_argument("--quick", action="store_true", help=quick_help)
  ap.add_argument("--repeats", type=int, default=None,
                  help=f"interleaved rounds (default {repeats}; quick "
                       f"{quick_repeats}).")
  ap.add_argument("--min-repeats", type=int, default=min_repeats,
                  help="rounds always run even past --budget-s.")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="stop adding rounds after this many seconds (at least "
                       "--min-repeats rounds).")
  ap.add_argument("--warmup", type=int, default=warmup,
                  help="unrecorded rounds first.")
  ap.add_argument("--out", default=default_out, help="JSON output path.")


def resolve_rounds(args: argparse.Namespace, *, repeats: int,
                   quick_repeats: int, quick_min_repeats: int,
                   budget_s: Optional[float] = None,
                   quick_budget_s: Optional[float] = None) -> None:
  """Fills the round options that :func:`add_round_args` left unset.

  >>> args = argparse.Namespace(quick=True, repeats=None, min_repeats=10,
  ...                           budget_s=None)
  >>> resolve_rounds(args, repeats=40, quick_repeats=8, quick_min_repeats=5,
  ...                budget_s=60.0, quick_budget_s=3.0)
  >>> args.repeats, args.min_repeats, args.budget_s
  (8, 5, 3.0)
  """
  if args.quick:
    args.repeats = args.repeats or quick_repeats
    args.min_repeats = min(args.min_repeats, quick_min_repeats)
    args.budget_s = args.budget_s or quick_budget_s
  args.repeats = args.repeats or repeats
  args.budget_s = args.budget_s or budget_s


def select_variants(ap: argparse.ArgumentParser, text: Optional[str],
                    known: Sequence[str], baseline: str) -> List[str]:
  """The variants named in comma-separated ``text`` (all if empty), baseline
  first; an unknown name is a usage error that lists the known ones."""
  if not text:
    return list(known)
  names = [s.strip() for s in text.split(",") if s.strip()]
  unknown = [s for s in names if s not in known]
  if unknown:
    ap.error(f"--variants: unknown {unknown}; choose from {list(known)}")
  return names if baseline in names else [baseline] + names


def start_report(benchmark: str, args: argparse.Namespace) -> Dict[str, Any]:
  """Prints the machine line; the JSON payload that results are added to."""
  info = machine_info()
  print(f"Machine: {describe_machine(info)}; load average "
        f"{info['loadavg_start']}\n", flush=True)
  return {"benchmark": benchmark, "machine": info, "config": dict(vars(args)),
          "results": []}


def finish(path: str, payload: Dict[str, Any], t_start: float) -> str:
  """Records the final load average, writes the JSON and says so."""
  info = payload["machine"]
  info["loadavg_end"] = loadavg()
  path = write_json(path, payload)
  print(f"Load average (1, 5, 15 min) at start {info['loadavg_start']}, at "
        f"end {info['loadavg_end']}. Total {time.perf_counter() - t_start:.1f}"
        f" s; JSON: {path}", flush=True)
  return path
