"""The project passes its own linters: ruff (fast, on the library, tests,
benchmarks and examples) and pyright (slow, on the library).

Both are configured in ``pyproject.toml`` and installed by the test extra
(``pyright[nodejs]`` brings Node from PyPI, so no other download is needed).
"""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*command):
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                        timeout=600)


def test_ruff_reports_nothing_on_the_project():
  result = _run(sys.executable, "-m", "ruff", "check", "posconstr", "tests",
                "benchmarks", "examples")
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # About a minute of CPU.
def test_pyright_basic_reports_no_errors_on_the_library():
  pyright = shutil.which("pyright") or pytest.fail(
      "pyright is not installed: pip install -e '.[test]'")
  result = _run(pyright)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr
  assert "0 errors" in result.stdout
