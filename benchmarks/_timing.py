"""Reusable helpers for posconstr benchmarks.

* :func:`machine_info`: what the numbers were measured on.
* :func:`interleaved_times`: round-robin timing of several callables, so that
  slow drifts of a noisy machine (frequency, neighbours, page cache) hit every
  variant alike instead of whichever happened to run last.
* :func:`bytes_accessed` / :func:`cost_summary`: XLA's cost analysis of a
  compiled computation, whatever shape ``cost_analysis()`` returns.
* :func:`compile_timed`: ahead-of-time compilation, timed.
* :func:`copy_bandwidth`, :func:`blas_info`: memory bandwidth and numpy's
  BLAS threads (both skew CPU comparisons with numpy/scipy).
* :func:`markdown_table`, :func:`write_json`: reporting.
"""

from __future__ import annotations

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
  except OSError:  # pragma: no cover
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


def _first_cost_dict(cost) -> Optional[Mapping[str, Any]]:
  if cost is None:
    return None
  if isinstance(cost, Mapping):
    return cost
  if isinstance(cost, (list, tuple)):
    dicts = [c for c in cost if isinstance(c, Mapping)]
    if not dicts:
      return None
    if len(dicts) == 1:
      return dicts[0]
    merged: Dict[str, float] = {}
    for d in dicts:  # One per partition/program: add them up.
      for k, v in d.items():
        if isinstance(v, (int, float)):
          merged[k] = merged.get(k, 0.0) + float(v)
    return merged
  return None


def cost_summary(compiled) -> Dict[str, Optional[float]]:
  """``flops``, ``bytes accessed`` etc. of a ``jax.stages.Compiled``.

  ``cost_analysis()`` has returned a dict, a list of dicts (one per
  program), or ``None`` across jax versions and backends; missing keys give
  ``None``.
  """
  try:
    cost = _first_cost_dict(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    cost = None
  keys = ("bytes accessed", "flops", "transcendentals",
          "bytes accessedout{}", "optimal_seconds")
  if cost is None:
    return {k: None for k in keys}
  out = {}
  for k in keys:
    v = cost.get(k)
    out[k] = float(v) if isinstance(v, (int, float)) else None
  return out


def temp_bytes(compiled) -> Optional[float]:
  """Scratch memory XLA allocates for one run (``memory_analysis()``)."""
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def minor_faults_per_call(fn: Callable[[], Any], calls: int = 3
                          ) -> Optional[float]:
  """Minor page faults of this process per call of ``fn`` (Unix only).

  XLA:CPU maps a fresh temp buffer for each run of an executable, so every
  page of it faults on first touch, each step: a cost that "bytes accessed"
  does not show.
  """
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return None
  jax.block_until_ready(fn())
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(fn())
  after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  return (after - before) / calls


def bytes_accessed(compiled) -> Optional[float]:
  return cost_summary(compiled)["bytes accessed"]


def hlo_stats(compiled) -> Dict[str, int]:
  """Rough counts from the optimized HLO text of a compiled computation."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return {}
  lines = text.splitlines()
  entry = _entry_lines(lines)
  return {
      "fusions_total": sum(1 for l in lines if " fusion(" in l
                           or "= fusion(" in l),
      "entry_fusions": sum(1 for l in entry if "fusion(" in l),
      "entry_instructions": sum(1 for l in entry if " = " in l),
      "hlo_lines": len(lines),
  }


def _entry_lines(lines: Sequence[str]) -> List[str]:
  out, inside = [], False
  for l in lines:
    if l.startswith("ENTRY"):
      inside = True
      continue
    if inside:
      if l.startswith("}"):
        break
      out.append(l)
  return out


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
