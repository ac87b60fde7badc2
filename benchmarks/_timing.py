"""What every benchmark shares: timing, the machine, the command line, results.

Timing: :func:`interleaved_times` runs the variants round-robin, the order
rotated each round, after warm-up rounds (they include compilation), so that
drifts of a shared machine hit every variant alike; a sample is ``timeit`` of
one call blocked with ``jax.block_until_ready``. :func:`timing_row`: median,
quartiles and the *paired* ratio to the baseline (the median of per-round
ratios, which cancels drifts that a ratio of medians only averages out).

Results: the raw JSON of a run (every sample, the machine, the configuration)
goes outside the source tree, to ``--out``, by default
``$POSCONSTR_BENCH_DIR/NAME.json``, else ``~/.cache/posconstr/benchmarks/``
(``NAME.quick.json`` for ``--quick``). ``--summary`` (refused with ``--quick``)
also writes the committed ``benchmarks/results/NAME.json``: the payload cut
down to the script's ``SUMMARY_KEYS`` (what ``readme_tables`` renders), the
machine and the configuration; fractions to 7 digits, a few KB. A script::

  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", ...)                   # its own options
  args = _timing.parse_args(ap, argv, "NAME", repeats=40, min_repeats=15,
                            warmup=1, quick={"repeats": 8, "min_repeats": 5})
  report = _timing.Report("NAME", args)             # prints the machine
  for ...:
    report.add(result, table(result))               # prints, rewrites raw JSON
  return report.finish(SUMMARY_KEYS)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import timeit
from importlib import metadata
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
import tabulate
import threadpoolctl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_DIR = os.path.join(REPO, "benchmarks", "results")
# tabulate pads every column to its header plus 2; the committed README tables
# are as narrow as their widest cell.
tabulate.MIN_PADDING = 0


def loadavg() -> Optional[list[float]]:
  """1, 5 and 15 minute load averages (other processes skew timings)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except (OSError, AttributeError):  # Not Unix.
    return None


def blas_info() -> list[dict[str, Any]]:
  """numpy's (and jaxlib's LAPACK's) BLAS libraries and their threads."""
  return [{k: d.get(k) for k in ("internal_api", "num_threads", "version",
                                 "architecture")}
          for d in threadpoolctl.threadpool_info()
          if d.get("user_api") == "blas"]


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine_info() -> dict[str, Any]:
  """A JSON-able description of the machine and the software versions."""
  versions = {}
  for dist in ("posconstr", "jax", "jaxlib", "optax", "numpy", "scipy",
               "jaxopt"):
    try:
      versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      pass
  devices = jax.devices()
  return {"jax_backend": jax.default_backend(),
          "device_kind": devices[0].device_kind,
          "device_count": len(devices), "versions": versions,
          "python": platform.python_version(), "platform": platform.platform(),
          "processor": _cpu_model(), "cpu_count": os.cpu_count(),
          "blas": blas_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "loadavg_start": loadavg()}


def describe_machine(info: Mapping[str, Any]) -> str:
  """One line for the top of a report."""
  v = info["versions"]
  return (f"{info['jax_backend']} ({info['device_kind']}, {info['cpu_count']}"
          f" CPUs: {info['processor']}), jax {v.get('jax')}, optax "
          f"{v.get('optax')}, {info['platform']}")


def compile_timed(jitted, *args, **kwargs):
  """``(compiled, seconds)`` of ``jitted.lower(...).compile()``: tracing,
  lowering and XLA; calling ``compiled`` then times execution alone."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, time.perf_counter() - t0


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int,
                      warmup: int = 1, budget_s: Optional[float] = None,
                      min_repeats: int = 3) -> dict[str, list[float]]:
  """name -> seconds of each recorded round, the callables run round-robin.

  The ``warmup`` rounds first are not recorded; the order of the variants
  rotates by one each round, so none always follows the same neighbour. With
  ``budget_s`` no round starts after that many seconds of recorded rounds
  once ``min_repeats`` have run. ``fns`` may keep state (donated buffers) in
  a closure.
  """
  names = list(fns)
  timers = {n: timeit.Timer(lambda f=f: jax.block_until_ready(f()))
            for n, f in fns.items()}
  for _ in range(warmup):
    for t in timers.values():
      t.timeit(1)
  times: dict[str, list[float]] = {n: [] for n in names}
  start = timeit.default_timer()
  for r in range(repeats):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      times[n].append(timers[n].timeit(1))
    if (budget_s is not None and r + 1 >= min_repeats
        and timeit.default_timer() - start > budget_s):
      break
  return times


def _quartiles(xs: Sequence[float]):
  if len(xs) < 2:
    return xs[0], xs[0], xs[0]
  return statistics.quantiles(xs, n=4, method="inclusive")  # numpy's linear


def summarize(samples: Sequence[float]) -> dict[str, float]:
  """Median, quartiles, min and count of a list of seconds."""
  q1, med, q3 = _quartiles(samples)
  return {"median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(samples),
          "n": len(samples)}


def paired_ratio(samples: Sequence[float],
                 baseline: Sequence[float]) -> dict[str, float]:
  """Median and quartiles of the per-round ratios ``samples[i] / baseline[i]``
  (round ``i`` of interleaved variants ran at nearly the same time)."""
  q1, med, q3 = _quartiles([s / b for s, b in zip(samples, baseline)])
  return {"median": med, "q1": q1, "q3": q3}


def timing_row(samples: Sequence[float],
               baseline: Sequence[float]) -> dict[str, Any]:
  """A variant's samples, :func:`summarize`, and its ratios to the baseline;
  ``ratio_of_mins`` compares the least disturbed rounds (neighbours on a
  shared machine only ever add time)."""
  row = summarize(samples)
  return {"times_s": list(samples), **row,
          "ratio_of_medians": row["median_s"] / statistics.median(baseline),
          "paired_ratio": paired_ratio(samples, baseline),
          "ratio_of_mins": row["min_s"] / min(baseline)}


TIMING_HEADERS = ("median", "IQR", "paired ratio [q1, q3]",
                  "ratio of medians", "min ratio")


def timing_cells(row: Mapping[str, Any]) -> list[str]:
  """Table cells for :data:`TIMING_HEADERS` from a :func:`timing_row`."""
  pr = row["paired_ratio"]
  return [fmt_time(row["median_s"]),
          f"{fmt_time(row['q1_s'])}-{fmt_time(row['q3_s'])}",
          f"{pr['median']:.3f}x [{pr['q1']:.3f}, {pr['q3']:.3f}]",
          fmt_ratio(row["ratio_of_medians"]), fmt_ratio(row["ratio_of_mins"])]


def fmt_time(seconds: Optional[float]) -> str:
  if seconds is None:
    return "n/a"
  return (f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.2f} ms"
          if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us")


def fmt_bytes(n: Optional[float]) -> str:
  if n is None:
    return "n/a"
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n:.0f} B"


def fmt_bandwidth(bytes_per_s: Optional[float]) -> str:
  return "n/a" if bytes_per_s is None else f"{bytes_per_s / 1e9:.1f} GB/s"


def fmt_ratio(r: Optional[float], digits: int = 3) -> str:
  return "n/a" if r is None else f"{r:.{digits}f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: Optional[Sequence[str]] = None) -> str:
  """A GitHub table; ``align``: 'l' or 'r' per column (first left, default)."""
  align = align or ["l"] + ["r"] * (len(headers) - 1)
  return tabulate.tabulate(
      [[str(c) for c in row] for row in rows], headers, tablefmt="pipe",
      disable_numparse=True,
      colalign=["right" if a == "r" else "left" for a in align])


def eprint(*args, **kwargs) -> None:
  print(*args, file=sys.stderr, flush=True, **kwargs)


def raw_path(name: str, quick: bool = False) -> str:
  """Where a run's raw JSON goes by default: outside the source tree."""
  root = (os.environ.get("POSCONSTR_BENCH_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "posconstr",
                          "benchmarks"))
  return os.path.join(os.path.abspath(root),
                      f"{name}.quick.json" if quick else f"{name}.json")


def summary_path(name: str) -> str:
  return os.path.join(SUMMARY_DIR, f"{name}.json")


def option(argv: Sequence[str], flag: str, **kwargs) -> Any:
  """One option's value, read before the full parse (an option that names
  the results, which the full parse's defaults need)."""
  pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  pre.add_argument(flag, dest="value", **kwargs)
  return pre.parse_known_args(argv)[0].value


def parse_args(ap: argparse.ArgumentParser, argv, name: str, *, repeats: int,
               min_repeats: int, warmup: int,
               budget_s: Optional[float] = None,
               quick: Mapping[str, Any]) -> argparse.Namespace:
  """Adds the options every benchmark shares and parses ``argv``; unset
  rounds options take the defaults given, or ``quick``'s under ``--quick``."""
  q = dict(quick)
  g = ap.add_argument_group("shared by every benchmark")
  g.add_argument("--quick", action="store_true",
                 help="a smoke run: small sizes, few rounds.")
  g.add_argument("--repeats", type=int, help=f"interleaved rounds (default "
                 f"{repeats}; --quick {q.get('repeats', repeats)}).")
  g.add_argument("--min-repeats", type=int,
                 help=f"rounds run even past --budget-s (default "
                      f"{min_repeats}).")
  g.add_argument("--budget-s", type=float,
                 help=f"stop adding rounds after this many seconds (default "
                      f"{budget_s}; --quick {q.get('budget_s', budget_s)}).")
  g.add_argument("--warmup", type=int, default=warmup,
                 help="unrecorded rounds first (they include compilation).")
  g.add_argument("--out", help=f"raw JSON (default {raw_path(name)}; "
                 "$POSCONSTR_BENCH_DIR moves the folder).")
  g.add_argument("--summary", action="store_true",
                 help=f"also write the committed summary "
                      f"{os.path.relpath(summary_path(name), REPO)}.")
  args = ap.parse_args(argv)
  if args.quick and args.summary:
    ap.error("--summary with --quick: a smoke run never replaces the "
             "committed summary")
  defaults = {"repeats": repeats, "min_repeats": min_repeats,
              "budget_s": budget_s, **(q if args.quick else {})}
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.out = os.path.abspath(args.out or raw_path(name, args.quick))
  return args


def select_variants(ap: argparse.ArgumentParser, text: Optional[str],
                    known: Sequence[str], baseline: str) -> list[str]:
  """The variants named in comma-separated ``text`` (all if empty), baseline
  first; an unknown name is a usage error that lists the known ones."""
  names = [s.strip() for s in (text or "").split(",") if s.strip()]
  unknown = [s for s in names if s not in known]
  if unknown:
    ap.error(f"--variants: unknown {unknown}; choose from {list(known)}")
  if not names:
    return list(known)
  return names if baseline in names else [baseline] + names


def write_json(path: str, payload: Any) -> str:
  """Writes ``payload`` as indented JSON (atomically), making the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1, default=_json_default)
    f.write("\n")
  os.replace(path + ".tmp", path)
  return path


def _json_default(o):
  return o.tolist() if isinstance(o, (np.generic, np.ndarray)) else str(o)


def _rounded(value):
  if isinstance(value, float) and not value.is_integer():  # Counts stay exact.
    return float(f"{value:.7g}")
  if isinstance(value, dict):
    return {k: _rounded(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_rounded(v) for v in value]
  return value


def _cut(tree, keys):
  """``tree`` keeping the entries under ``keys`` (rounded), dicts and lists of
  dicts that hold some; lists of numbers (samples) are leaves."""
  if isinstance(tree, list):
    return [_cut(v, keys) for v in tree]
  out = {}
  for k, v in tree.items():
    if k in keys:
      out[k] = _rounded(v)
    elif isinstance(v, dict) or (isinstance(v, list) and v
                                 and all(isinstance(i, dict) for i in v)):
      sub = _cut(v, keys)
      if any(sub) if isinstance(sub, list) else sub:
        out[k] = sub
  return out


def summary(payload: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
  """The committed summary of a raw payload: ``keys`` (at any depth), the
  machine and the configuration (without the paths)."""
  out = _cut(dict(payload), set(keys) | {"benchmark", "machine"})
  out["config"] = {k: v for k, v in payload["config"].items()
                   if k not in ("out", "summary")}
  return out


class Report:
  """A run's JSON payload; prints each result and keeps the file current."""

  def __init__(self, name: str, args: argparse.Namespace, **extra):
    self.name, self.args, self.t0 = name, args, time.perf_counter()
    self.machine = machine_info()
    self.payload = {"benchmark": name, "machine": self.machine,
                    "config": dict(vars(args)), **extra, "results": []}
    print(f"Machine: {describe_machine(self.machine)}; load average "
          f"{self.machine['loadavg_start']}\n", flush=True)

  def add(self, result: dict[str, Any], text: str) -> None:
    """Records and prints ``result``; partial results survive a crash."""
    result["loadavg_after"] = loadavg()
    self.payload["results"].append(result)
    print(f"{text}\n\n(load average after: {result['loadavg_after']})\n",
          flush=True)
    write_json(self.args.out, self.payload)

  def finish(self, summary_keys: Iterable[str]) -> int:
    """Writes the raw JSON (and the summary under ``--summary``); exit 0."""
    self.machine["loadavg_end"] = loadavg()
    write_json(self.args.out, self.payload)
    print(f"Load average (1, 5, 15 min) at start "
          f"{self.machine['loadavg_start']}, at end "
          f"{self.machine['loadavg_end']}. Total "
          f"{time.perf_counter() - self.t0:.1f} s; raw JSON: {self.args.out}",
          flush=True)
    if self.args.summary:
      path = write_json(summary_path(self.name),
                        summary(self.payload, summary_keys))
      print(f"Summary: {path}", flush=True)
    return 0
