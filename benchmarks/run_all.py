"""Runs every posconstr benchmark, each in its own process; one JSON of all.

One after the other, each in a fresh process: a crash, a timeout or a global
setting (``jax_enable_x64``) of one cannot touch the others, and one process
at a time holds the accelerator. Their tables are printed as they come; their
raw JSON files go next to this run's (``_timing``: outside the source tree),
which collects them: ``{"benchmark": "all", "machine", "config", "scripts":
{NAME: {"status": "ok" | "failed", "argv", "returncode", "wall_s", "error",
"result": <its raw JSON>}}, "failed": [NAME, ...], "wall_s"}``. Nothing
assumes a CPU: ``machine.device_kind`` says what measured the numbers.

Usage::

  python -m benchmarks                  # everything (several minutes)
  python -m benchmarks --quick          # about a minute on 2 CPU cores
  python -m benchmarks --summary        # ... and rewrite benchmarks/results/
  python -m benchmarks --only reparam_overhead,lbfgsb --out /tmp/b/all.json
  python -m benchmarks --quick --script-args "lbfgsb=--problems 200x50"

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
import time
from typing import Any, Optional, Sequence

from benchmarks import _timing

# In the order they run; their --quick runs add up to about a minute on 2
# CPU cores.
# compile_cost, projection_scale and exponentiated_gradient run on their own
# (python -m benchmarks.NAME): minutes to hours each.
SCRIPTS = ("projection_overhead", "reparam_overhead", "lbfgsb", "nnls_batch",
           "column_sums")
_ERROR_LINES = 30  # Lines of a failed script's stderr kept as its error.


def run_script(name: str, argv: Sequence[str], out: str,
               timeout_s: Optional[float]) -> dict[str, Any]:
  """Runs one script: its stdout live, its stderr shown when it ends."""
  if os.path.exists(out):
    os.remove(out)  # An old file must not pass for this run's results.
  t0, error = time.perf_counter(), None
  try:
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *argv, "--out", out],
        cwd=_timing.REPO, stderr=subprocess.PIPE, text=True,
        timeout=timeout_s)
    returncode, stderr = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:  # Its stderr comes as bytes.
    returncode, stderr = None, (e.stderr or b"").decode(errors="replace")
    error = f"timed out after {timeout_s} s"
  sys.stderr.write(stderr)
  if returncode:
    error = (f"exit status {returncode}; stderr ends:\n"
             + "".join(stderr.splitlines(True)[-_ERROR_LINES:]))
  elif error is None and not os.path.exists(out):
    error = "exited 0 but wrote no JSON"
  result = None
  if os.path.exists(out):  # Partial results survive a failure too.
    with open(out) as f:
      result = json.load(f)
  return {"status": "failed" if error else "ok", "argv": list(argv),
          "returncode": returncode, "wall_s": time.perf_counter() - t0,
          "error": error, "result": result}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true",
                  help="each script's --quick (about a minute on 2 cores).")
  ap.add_argument("--summary", action="store_true",
                  help="each script's --summary: rewrite the committed "
                       "summaries in benchmarks/results/ (not with --quick).")
  ap.add_argument("--only", default=None,
                  help="comma-separated subset of: " + ", ".join(SCRIPTS))
  ap.add_argument("--script-args", action="append", default=[],
                  metavar="NAME=ARGS",
                  help="extra arguments for one script, e.g. "
                       "'lbfgsb=--problems 200x50' (repeatable).")
  ap.add_argument("--timeout-s", type=float, default=None,
                  help="per script: stop it (and record a failure) after "
                       "this many seconds.")
  ap.add_argument("--out", default=None,
                  help=f"JSON of the whole run (default "
                       f"{_timing.raw_path('all')}); the scripts' raw JSON "
                       "go to the same folder.")
  args = ap.parse_args(argv)
  if args.quick and args.summary:
    ap.error("--summary with --quick: a smoke run never replaces the "
             "committed summaries")
  names = [s.strip() for s in (args.only or ",".join(SCRIPTS)).split(",")
           if s.strip()]
  if not names or set(names) - set(SCRIPTS):
    ap.error(f"--only: unknown {sorted(set(names) - set(SCRIPTS)) or names}; "
             f"choose from {list(SCRIPTS)}")
  extra = collections.defaultdict(list)
  for item in args.script_args:
    name, sep, text = item.partition("=")
    if not sep or name not in SCRIPTS:
      ap.error(f"--script-args: {item!r} is not NAME=ARGS with NAME one of "
               f"{list(SCRIPTS)}")
    extra[name] += shlex.split(text)
  out = os.path.abspath(args.out or _timing.raw_path("all", args.quick))

  loadavg_start, t_start = _timing.loadavg(), time.perf_counter()
  time_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  scripts: dict[str, dict[str, Any]] = {}
  for name in names:
    script_argv = ([f for f, on in (("--quick", args.quick),
                                     ("--summary", args.summary)) if on]
                   + extra[name])
    print(f"\n## {name} {' '.join(script_argv)}\n", flush=True)
    raw = os.path.join(os.path.dirname(out), os.path.basename(
        _timing.raw_path(name, args.quick)))
    scripts[name] = run_script(name, script_argv, raw, args.timeout_s)
    if scripts[name]["error"]:  # Its stderr has been shown above.
      _timing.eprint(f"[{name}] FAILED: "
                     f"{scripts[name]['error'].splitlines()[0]}")

  # The backend starts here only after every child has exited: a TPU (or a
  # preallocating GPU client) is held by one process at a time.
  machine = _timing.machine_info()
  machine.update(time_utc=time_utc, loadavg_start=loadavg_start,
                 loadavg_end=_timing.loadavg())
  failed = [n for n, rec in scripts.items() if rec["error"]]
  payload = {"benchmark": "all", "machine": machine,
             "config": {**vars(args), "out": out}, "scripts": scripts,
             "failed": failed, "wall_s": time.perf_counter() - t_start}
  _timing.write_json(out, payload)
  print("\n## Summary\n\n" + _timing.markdown_table(
      ["script", "status", "wall", "arguments", "error (last line)"],
      [[n, r["status"], f"{r['wall_s']:.1f} s", " ".join(r["argv"]) or "-",
        r["error"].strip().splitlines()[-1][:80] if r["error"] else ""]
       for n, r in scripts.items()], align="llrll"), flush=True)
  print(f"\nMachine: {_timing.describe_machine(machine)}\nLoad average (1, 5,"
        f" 15 min) at start {loadavg_start}, at end {machine['loadavg_end']}."
        f" Total {payload['wall_s']:.1f} s; JSON: {out}", flush=True)
  if failed:
    _timing.eprint(f"FAILED: {', '.join(failed)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
