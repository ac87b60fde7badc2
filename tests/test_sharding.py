"""Sharded parameters on 8 simulated CPU devices, in a separate process.

XLA's device count is fixed when JAX starts, so the checks run in
tests/sharding_check.py under a fresh interpreter with
``--xla_force_host_platform_device_count=8``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True,
                        text=True, env=env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith("{")]
  return {row["case"]: row for row in rows}


def test_every_case_ran(results):
  assert len(results) == 10


def test_outputs_keep_the_input_sharding(results):
  for name, row in results.items():
    assert row["same_sharding"], name


def test_sharded_results_match_the_unsharded_run(results):
  for name, row in results.items():
    assert row["max_diff"] <= 1e-5, (name, row["max_diff"])


def test_local_constraints_compile_to_no_collectives(results):
  # Elementwise sets, and per-axis sets reducing over an unsharded axis.
  for name, row in results.items():
    if row["local"]:
      assert row["collectives"] == 0, (name, row["collectives"])


def test_reductions_over_a_sharded_axis_communicate(results):
  for name, row in results.items():
    if not row["local"]:
      assert row["collectives"] > 0, name
