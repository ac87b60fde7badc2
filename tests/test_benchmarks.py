"""The benchmark suite (``python -m benchmarks``) and its committed summaries.

Speed itself is not tested here (that is what the benchmarks are for): only
that every script ran, measured something, reported it, wrote its raw JSON
outside the checkout, and that the committed summaries are what ``--summary``
writes. The suite runs in a subprocess as a user runs it, with small
problems, its results in ``tmp_path`` and no bytecode written.
"""

import importlib
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import _floors
from benchmarks import _timing
from benchmarks import run_all

REPO = _timing.REPO
# --quick, made smaller still (each variant costs a compile of its own): one
# small size / batch / problem each, few variants and rounds.
SMALL = ("projection_overhead=--sizes 0.05M --repeats 4 --min-repeats 3 "
         "--variants nonneg(all),maxnorm(kernel)",
         "reparam_overhead=--batches 16 --width 256 --repeats 4 "
         "--min-repeats 3",
         "lbfgsb=--problems 200x50 --repeats 3 --min-repeats 3",
         "nnls_batch=--cases unmix --unmix-k 64 --repeats 3 --min-repeats 3",
         "column_sums=--columns 12500 --repeats 2 --min-repeats 2")
MARKDOWN_SEPARATOR = re.compile(r"^\|(:?-+:?\|)+$", re.MULTILINE)


def run_suite(tmp_path, *args):
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=REPO,
             POSCONSTR_BENCH_DIR=str(tmp_path / "bench"))
  return subprocess.run([sys.executable, "-m", "benchmarks", *args],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=600)


def numbers_under(tree, keys):
  """Every number (list items and paired-ratio medians included) under
  ``keys`` anywhere in ``tree``."""
  if isinstance(tree, list):
    return [n for item in tree for n in numbers_under(item, keys)]
  if not isinstance(tree, dict):
    return []
  found = []
  for key, value in tree.items():
    if key in keys:
      found += (value if isinstance(value, list) else
                [value.get("median")] if isinstance(value, dict) else [value])
    found += numbers_under(value, keys)
  return found


def assert_finite_positive(values, what):
  numbers = [v for v in values if v is not None]
  assert numbers, f"no {what}"
  bad = [v for v in numbers
         if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0]
  assert not bad, f"{what}: not finite and positive: {bad[:5]}"


def _results_dir_state():
  return {f: os.path.getmtime(os.path.join(_timing.SUMMARY_DIR, f))
          for f in os.listdir(_timing.SUMMARY_DIR)}


@pytest.mark.slow  # About 30 s: four scripts, each compiling its variants.
def test_quick_suite_reports_and_writes_outside_the_checkout(tmp_path):
  committed = _results_dir_state()
  script_args = [a for s in SMALL for a in ("--script-args", s)]
  proc = run_suite(tmp_path, "--quick", *script_args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert _results_dir_state() == committed  # --quick never touches them.
  bench = tmp_path / "bench"
  assert sorted(os.listdir(bench)) == sorted(
      f"{n}.quick.json" for n in ("all", *run_all.SCRIPTS))
  payload = json.loads((bench / "all.quick.json").read_text())

  machine = payload["machine"]
  assert machine["jax_backend"] == jax.default_backend()
  assert machine["device_kind"] == jax.devices()[0].device_kind
  assert machine["versions"]["jax"] == jax.__version__
  for key in ("loadavg_start", "loadavg_end"):
    assert len(machine[key]) == 3 and all(v >= 0 for v in machine[key])
  assert payload["failed"] == []
  assert list(payload["scripts"]) == list(run_all.SCRIPTS)
  for name, record in payload["scripts"].items():
    assert record["status"] == "ok" and record["error"] is None, name
    assert "--quick" in record["argv"], name
    result = record["result"]
    assert result["benchmark"] == name
    assert result["machine"]["versions"]["jax"] == jax.__version__
    assert len(result["results"]) == 1, name  # One size / batch / problem.
    assert_finite_positive(
        numbers_under(result["results"], {"median_s", "min_s", "times_s"}),
        f"{name} times")
    assert_finite_positive(
        numbers_under(result["results"], {"paired_ratio", "vs_baseline",
                                          "ratio_of_medians"}),
        f"{name} ratios")
    # What --summary would write keeps no samples.
    summary = _timing.summary(result, importlib.import_module(
        f"benchmarks.{name}").SUMMARY_KEYS)
    assert numbers_under(summary, {"median_s"}), name
    assert "times_s" not in json.dumps(summary), name

  # Each script's section of the output holds a markdown table, and the
  # summary table lists every script as ok.
  sections = dict(s.split("\n", 1) for s in proc.stdout.split("\n## ")[1:])
  for name in run_all.SCRIPTS:
    body = next(b for h, b in sections.items() if h.startswith(name))
    assert MARKDOWN_SEPARATOR.search(body), f"no table printed by {name}"
  for name in run_all.SCRIPTS:
    assert re.search(rf"^\| {name} +\| ok ", sections["Summary"],
                     re.MULTILINE), sections["Summary"]


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
  assert "no_such_variant" in failed["error"] and failed["result"] is None
  ran = payload["scripts"]["reparam_overhead"]
  assert ran["status"] == "ok"
  assert list(ran["result"]["results"][0]["variants"]) == ["dense",
                                                          "posconstr Exp"]
  assert (tmp_path / "reparam_overhead.json").exists()  # Next to --out.


@pytest.mark.parametrize("args, message", [
    (["--only", "projection_overhead,nope"], "--only: unknown ['nope']"),
    (["--script-args", "nope=--quick"], "--script-args: 'nope=--quick'"),
    (["--quick", "--summary"], "--summary with --quick"),
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, args, message):
  with pytest.raises(SystemExit) as exit_:
    run_all.main(["--out", str(tmp_path / "x.json"), *args])
  assert exit_.value.code == 2
  assert message in capsys.readouterr().err
  assert not os.listdir(tmp_path)


def test_a_script_refuses_to_write_the_summary_from_a_quick_run(capsys):
  reparam_overhead = importlib.import_module("benchmarks.reparam_overhead")
  with pytest.raises(SystemExit) as exit_:
    reparam_overhead.main(["--quick", "--summary"])
  assert exit_.value.code == 2
  assert "--summary with --quick" in capsys.readouterr().err


# Summaries of the scripts outside the suite, and the script whose keys they
# keep (projection_scale is projection_overhead at 100M).
OTHER_SUMMARIES = {"projection_scale": "projection_overhead",
                   "projection_scale_hugetlb": "projection_overhead",
                   "compile_cost": "compile_cost",
                   "compile_cost_10k": "compile_cost",
                   "compile_cost_floors": "compile_cost",
                   "compile_cost_10k_post": "compile_cost",
                   "compile_cost_projected": "compile_cost"}


@pytest.mark.parametrize("name,script", [
    *((name, name) for name in run_all.SCRIPTS), *OTHER_SUMMARIES.items()])
def test_committed_summary_is_what_summary_writes(name, script):
  """Its keys are the script's SUMMARY_KEYS (a renderer of the README may
  only use those), no samples, a few KB."""
  path = _timing.summary_path(name)
  with open(path) as f:
    committed = json.load(f)
  keys = importlib.import_module(f"benchmarks.{script}").SUMMARY_KEYS
  # As JSON: NaN (iterations of scipy's nnls) is not equal to itself.
  assert json.dumps(_timing.summary(committed, keys)) == json.dumps(committed)
  assert committed["machine"]["versions"]["jax"]
  assert os.path.getsize(path) < 16_000


def test_raw_results_go_outside_the_checkout(monkeypatch):
  monkeypatch.delenv("POSCONSTR_BENCH_DIR", raising=False)
  for quick in (False, True):
    path = _timing.raw_path("lbfgsb", quick)
    assert not os.path.abspath(path).startswith(REPO + os.sep), path
  monkeypatch.setenv("POSCONSTR_BENCH_DIR", "/somewhere")
  assert _timing.raw_path("lbfgsb", True) == "/somewhere/lbfgsb.quick.json"


def test_cg_oracle_counts_evaluations():
  """CG on orthonormal free columns is exact after one step (2 evaluations);
  on Gaussian ones it needs at most ``|F| + 1`` (finite termination)."""
  rng = np.random.default_rng(0)
  q, _ = np.linalg.qr(rng.normal(size=(40, 12)))
  x_star = np.where(np.arange(12) % 3 == 0, 0.0, 1.0)  # 8 free columns
  b = rng.normal(size=40)
  out = _floors.cg_oracle_evaluations(q, b, x_star, tol=1e-12)
  assert out == {"cg_evals": 2, "free": 8, "converged": True}
  a = rng.normal(size=(40, 12))
  out = _floors.cg_oracle_evaluations(a, b, x_star, tol=1e-10)
  assert out["converged"] and 3 <= out["cg_evals"] <= 9
