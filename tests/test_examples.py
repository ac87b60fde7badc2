"""Smoke tests of the examples: they run, end to end, in a few steps."""

import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load_example(name):
  """Imports ``examples/<name>.py`` from its path (examples/ is no package)."""
  module_name = f"_posconstr_example_{name}"
  spec = importlib.util.spec_from_file_location(module_name,
                                                EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module  # dataclasses look their module up here.
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module


def test_quickstart_smoke(tmp_path):
  quickstart = _load_example("quickstart")
  results = quickstart.main(["--steps", "5", "--out", str(tmp_path)])

  figure = tmp_path / "quickstart.png"
  assert results["figure"] == os.path.join(str(tmp_path), "quickstart.png")
  assert figure.is_file() and figure.stat().st_size > 0

  variants = results["variants"]
  assert set(variants) == {"adam", "adam+nonneg"}
  for metrics in variants.values():
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert np.isfinite(metrics["final_train_loss"])
    assert 0.0 <= metrics["frac_at_bound"] <= 1.0
    assert len(metrics["losses"]) == 5
  # Projection keeps every kernel on the set; the reference has negatives.
  assert variants["adam+nonneg"]["min_kernel"] >= 0.0
  assert np.all(variants["adam+nonneg"]["kernels"] >= 0.0)
  assert variants["adam"]["min_kernel"] < 0.0
