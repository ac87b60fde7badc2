"""Shared test fixtures; helper scripts pytest must not import."""

import jax
import pytest

collect_ignore = ["sharding_check.py"]


@pytest.fixture
def x64():
  """float64 for one test only: ``jax.enable_x64`` restores the flag after."""
  with jax.enable_x64(True):
    yield
