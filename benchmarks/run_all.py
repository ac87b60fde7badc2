"""Runs every posconstr benchmark and writes one JSON with the machine.

Each script runs in a fresh Python process through its ``main(argv)``, one
after the other: a crash, a timeout or a global setting of one script (the
L-BFGS-B benchmark turns on ``jax_enable_x64``) cannot touch the others, and
only one process holds the accelerator at a time. Their markdown tables are
printed as they come; their JSON results are collected into one file::

  {"benchmark": "all",
   "machine": {"jax_backend", "device_kind", "jax_version", "jaxlib_version",
               "cpu_count", "processor", "loadavg_start", "loadavg_end", ...},
   "config": {"quick", "only", "script_args", ...},
   "scripts": {NAME: {"status": "ok" | "failed", "argv", "returncode",
                      "wall_s", "error", "result": <the script's own JSON>}},
   "failed": [NAME, ...], "wall_s": ...}

Nothing in it assumes a CPU: the same command runs on GPU and TPU, and
``machine.device_kind`` says which device measured the numbers.

Usage::

  python -m benchmarks                  # everything (several minutes)
  python -m benchmarks --quick          # about a minute on 2 CPU cores
  python -m benchmarks --only reparam_overhead,lbfgsb --out /tmp/b.json
  python benchmarks/run_all.py --quick --script-args "lbfgsb=--problems 200x50"

The exit status is 1 if any script failed (the others still run).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _timing  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "all.json")
# Each script in the order it runs; their own --quick settings add up to about
# a minute on 2 CPU cores (projection ~10 s, reparam ~10 s, L-BFGS-B ~30 s).
SCRIPTS = ("projection_overhead", "reparam_overhead", "lbfgsb", "nnls_batch")
# Calls the script's main(argv) in the child; argv[1] names the script (and,
# in argv[0], its usage messages).
_CHILD = ("import importlib, sys; "
          "sys.argv[0] = 'python -m benchmarks.' + sys.argv[1]; "
          "sys.exit(importlib.import_module('benchmarks.' + sys.argv[1])"
          ".main(sys.argv[2:]))")
_ERROR_LINES = 30  # Lines of a failed script's stderr kept as its error.


def parse_script_args(items: Optional[Sequence[str]],
                      ap: argparse.ArgumentParser) -> Dict[str, List[str]]:
  """``["NAME=ARGS", ...]`` -> ``{NAME: shlex.split(ARGS)}``."""
  out: Dict[str, List[str]] = {}
  for item in items or ():
    name, sep, text = item.partition("=")
    if not sep or name not in SCRIPTS:
      ap.error(f"--script-args: {item!r} is not NAME=ARGS with NAME one of "
               f"{list(SCRIPTS)}")
    out.setdefault(name, []).extend(shlex.split(text))
  return out


def _pump(stream, sink, tail: Optional[collections.deque]) -> None:
  """Copies a child's stream line by line (live), keeping its last lines."""
  for line in stream:
    sink.write(line)
    sink.flush()
    if tail is not None:
      tail.append(line)
  stream.close()


def run_script(name: str, argv: Sequence[str],
               timeout_s: Optional[float]) -> Dict[str, Any]:
  """Runs one script in a child process; its record for the JSON."""
  with tempfile.TemporaryDirectory(prefix=f"posconstr_{name}_") as tmp:
    out = os.path.join(tmp, f"{name}.json")
    argv = [*argv, "--out", out]  # The last --out wins in argparse.
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, name, *argv],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: collections.deque = collections.deque(maxlen=_ERROR_LINES)
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout,
                                                  None)),
             threading.Thread(target=_pump, args=(proc.stderr, sys.stderr,
                                                  tail))]
    for p in pumps:
      p.start()
    timed_out = False
    try:
      returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      timed_out = True
      proc.kill()
      returncode = proc.wait()
    for p in pumps:
      p.join()
    record: Dict[str, Any] = {
        "status": "ok", "argv": argv[:-2], "returncode": returncode,
        "wall_s": time.perf_counter() - t0, "error": None, "result": None}
    if os.path.exists(out):  # Partial results survive a failure too.
      with open(out) as f:
        record["result"] = json.load(f)
  if timed_out:
    record["error"] = f"timed out after {timeout_s} s"
  elif returncode != 0:
    record["error"] = (f"exit status {returncode}; stderr ends:\n"
                       + "".join(tail))
  elif record["result"] is None:
    record["error"] = "exited 0 but wrote no JSON"
  if record["error"] is not None:
    record["status"] = "failed"
  return record


def summary_table(scripts: Dict[str, Dict[str, Any]]) -> str:
  rows = []
  for name, rec in scripts.items():
    error = (rec["error"] or "").strip().splitlines()
    rows.append([name, rec["status"], f"{rec['wall_s']:.1f} s",
                 " ".join(rec["argv"]) or "-",
                 error[-1][:80] if error else ""])
  return _timing.markdown_table(
      ["script", "status", "wall", "arguments", "error (last line)"], rows,
      align=["l", "l", "r", "l", "l"])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="each script's --quick (about a minute on 2 cores).")
  ap.add_argument("--only", default=None,
                  help="comma-separated subset of: " + ", ".join(SCRIPTS))
  ap.add_argument("--script-args", action="append", metavar="NAME=ARGS",
                  help="extra arguments for one script, e.g. "
                       "'lbfgsb=--problems 200x50' (repeatable).")
  ap.add_argument("--timeout-s", type=float, default=None,
                  help="per script: stop it (and record a failure) after "
                       "this many seconds.")
  ap.add_argument("--out", default=DEFAULT_OUT, help="JSON output path.")
  args = ap.parse_args(argv)
  names = list(SCRIPTS)
  if args.only:
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SCRIPTS]
    if unknown or not names:
      ap.error(f"--only: unknown {unknown or args.only!r}; choose from "
               f"{list(SCRIPTS)}")
  extra = parse_script_args(args.script_args, ap)
  out = os.path.abspath(args.out)

  loadavg_start = _timing.loadavg()
  time_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  t_start = time.perf_counter()
  scripts: Dict[str, Dict[str, Any]] = {}
  for name in names:
    script_argv = (["--quick"] if args.quick else []) + extra.get(name, [])
    print(f"\n## {name} {' '.join(script_argv)}\n", flush=True)
    scripts[name] = run_script(name, script_argv, args.timeout_s)
    if scripts[name]["error"]:  # Its stderr has been shown above.
      _timing.eprint(f"[{name}] FAILED: "
                     f"{scripts[name]['error'].splitlines()[0]}")

  # The backend is started here only after every child has exited: a TPU
  # (or a preallocating GPU client) is held by one process at a time.
  try:
    machine = _timing.machine_info()
  except Exception as e:  # pylint: disable=broad-except
    machine = {"error": f"{type(e).__name__}: {e}"}
  machine.update(time_utc=time_utc, loadavg_start=loadavg_start,
                 loadavg_end=_timing.loadavg())
  failed = [n for n, rec in scripts.items() if rec["status"] != "ok"]
  payload = {"benchmark": "all", "machine": machine,
             "config": {**vars(args), "out": out}, "scripts": scripts,
             "failed": failed, "wall_s": time.perf_counter() - t_start}
  _timing.write_json(out, payload)
  print("\n## Summary\n\n" + summary_table(scripts) + "\n", flush=True)
  print(f"Machine: {_timing.describe_machine(machine)}"
        if "error" not in machine else f"Machine: {machine['error']}")
  print(f"Load average (1, 5, 15 min) at start {loadavg_start}, at end "
        f"{machine['loadavg_end']}. Total {payload['wall_s']:.1f} s; JSON: "
        f"{out}", flush=True)
  if failed:
    _timing.eprint(f"FAILED: {', '.join(failed)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
