"""The benchmark suite entry point (``python -m benchmarks``), end to end.

The suite runs in a subprocess, as a user runs it, with small problems so
that it takes seconds; its JSON goes to ``tmp_path`` and Python writes no
bytecode, so nothing is written into the repository. Speed itself is not
tested here (that is what the benchmarks are for); only that every script
ran, measured something and reported it.
"""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jaxlib
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ALL = os.path.join(REPO, "benchmarks", "run_all.py")
SCRIPTS = ("projection_overhead", "reparam_overhead", "lbfgsb", "nnls_batch")
# --quick, made smaller still (each variant costs a compile of its own): one
# small size / batch / problem each, few variants and rounds.
SMALL = ("projection_overhead=--sizes 0.05M --repeats 4 --min-repeats 3 "
         "--variants nonneg(all),maxnorm(kernel)",
         "reparam_overhead=--batches 16 --width 256 --repeats 4 "
         "--min-repeats 3",
         "lbfgsb=--problems 200x50 --repeats 3 --min-repeats 3",
         "nnls_batch=--cases unmix --unmix-k 64 --repeats 3 --min-repeats 3")
MARKDOWN_SEPARATOR = re.compile(r"^\|(:?-+:?\|)+$", re.MULTILINE)


def run_suite(tmp_path, *args):
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
  proc = subprocess.run([sys.executable, RUN_ALL, *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=600)
  return proc


def numbers_under(tree, wanted):
  """Every value (list items included) under a key for which ``wanted``."""
  found = []
  if isinstance(tree, dict):
    for key, value in tree.items():
      if wanted(key):
        if isinstance(value, list):
          found.extend(value)
        elif isinstance(value, dict):
          found.append(value.get("median"))
        else:
          found.append(value)
      found.extend(numbers_under(value, wanted))
  elif isinstance(tree, list):
    for item in tree:
      found.extend(numbers_under(item, wanted))
  return found


def is_time(key):
  return key in ("median_s", "q1_s", "q3_s", "min_s", "times_s")


def is_ratio(key):
  return "ratio" in key or key == "vs_baseline"


def assert_finite_positive(values, what):
  numbers = [v for v in values if v is not None]
  assert numbers, f"no {what}"
  bad = [v for v in numbers
         if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
  assert not bad, f"{what}: not finite and positive: {bad[:5]}"


@pytest.mark.slow  # About 30 s: four scripts, each compiling its variants.
def test_quick_suite_writes_json_and_prints_tables(tmp_path):
  out = tmp_path / "all.json"
  script_args = [a for s in SMALL for a in ("--script-args", s)]
  proc = run_suite(tmp_path, "--quick", "--out", str(out), *script_args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads(out.read_text())

  machine = payload["machine"]
  assert machine["jax_backend"] == jax.default_backend()
  assert machine["device_kind"] == jax.devices()[0].device_kind
  assert machine["jax_version"] == jax.__version__
  assert machine["jaxlib_version"] == jaxlib.__version__
  assert machine["cpu_count"] == os.cpu_count()
  assert machine["processor"]
  for key in ("loadavg_start", "loadavg_end"):
    assert len(machine[key]) == 3 and all(v >= 0 for v in machine[key])

  assert payload["failed"] == []
  assert list(payload["scripts"]) == list(SCRIPTS)
  for name, record in payload["scripts"].items():
    assert record["status"] == "ok" and record["error"] is None, name
    assert record["returncode"] == 0 and record["wall_s"] > 0, name
    assert "--quick" in record["argv"], name
    result = record["result"]
    assert result["benchmark"] == name
    assert len(result["results"]) == 1, name  # One size / batch / problem.
    assert_finite_positive(numbers_under(result["results"], is_time),
                           f"{name} times")
    assert_finite_positive(numbers_under(result["results"], is_ratio),
                           f"{name} ratios")

  # Each script's section of the output holds at least one markdown table,
  # and the summary table lists every script as ok.
  sections = dict(s.split("\n", 1) for s in proc.stdout.split("\n## ")[1:])
  for name in SCRIPTS:
    body = next(b for h, b in sections.items() if h.startswith(name))
    assert MARKDOWN_SEPARATOR.search(body), f"no table printed by {name}"
  summary = sections["Summary"]
  for name in SCRIPTS:
    assert re.search(rf"^\| {name} +\| ok ", summary, re.MULTILINE), summary


@pytest.mark.slow  # Compile-heavy; `pytest -m slow`.
def test_failing_script_is_recorded_and_others_still_run(tmp_path):
  out = tmp_path / "all.json"
  proc = run_suite(
      tmp_path, "--only", "projection_overhead,reparam_overhead",
      "--out", str(out),
      "--script-args", "projection_overhead=--variants no_such_variant",
      "--script-args", "reparam_overhead=--batches 8 --width 64 --repeats 3 "
                       "--min-repeats 3 --variants 'posconstr Exp'")
  assert proc.returncode == 1
  payload = json.loads(out.read_text())
  assert payload["failed"] == ["projection_overhead"]
  failed = payload["scripts"]["projection_overhead"]
  assert failed["status"] == "failed" and failed["returncode"] == 2
  assert "no_such_variant" in failed["error"]
  ran = payload["scripts"]["reparam_overhead"]
  assert ran["status"] == "ok"
  assert list(ran["result"]["results"][0]["variants"]) == ["dense",
                                                          "posconstr Exp"]


@pytest.mark.parametrize("args, message", [
    (["--only", "projection_overhead,nope"], "--only: unknown ['nope']"),
    (["--script-args", "nope=--quick"], "--script-args: 'nope=--quick'"),
])
def test_bad_arguments_are_usage_errors(tmp_path, args, message):
  proc = run_suite(tmp_path, "--out", str(tmp_path / "x.json"), *args)
  assert proc.returncode == 2
  assert message in proc.stderr
  assert not (tmp_path / "x.json").exists()


def test_cg_oracle_counts_evaluations():
  """CG on orthonormal free columns is exact after one step (2 evaluations);
  on Gaussian ones it needs at most ``|F| + 1`` (finite termination)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, REPO)
  from benchmarks import _krylov_floor  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(40, 12)))
  x_star = np.where(np.arange(12) % 3 == 0, 0.0, 1.0)  # 8 free columns
  b = rng.normal(size=40)
  out = _krylov_floor.cg_oracle_evaluations(q, b, x_star, tol=1e-12)
  assert out == {"cg_evals": 2, "free": 8, "converged": True}
  a = rng.normal(size=(40, 12))
  out = _krylov_floor.cg_oracle_evaluations(a, b, x_star, tol=1e-10)
  assert out["converged"] and 3 <= out["cg_evals"] <= 9
