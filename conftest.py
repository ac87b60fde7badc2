"""Settings for every test, the doctests in ``posconstr/`` included."""

import os

# The tests check results, not speed: LLVM's cheapest optimization level cuts
# the suite's (compile-bound) time by about a fifth. Set before JAX starts its
# backend; an explicit choice in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=g-import-not-at-top
import pytest


@pytest.fixture(autouse=True)
def _x64_flag_is_not_leaked():
  """Fails the test (doctests included) that leaves ``jax_enable_x64`` changed.

  A leaked flag turns every later float32 doctest into float64 on whichever
  xdist worker ran the culprit, so the failure shows up far from its cause.
  The flag is restored first so that one leak fails one test only.
  """
  before = jax.config.read("jax_enable_x64")
  yield
  after = jax.config.read("jax_enable_x64")
  if after != before:
    jax.config.update("jax_enable_x64", before)
    pytest.fail(f"jax_enable_x64 changed from {before} to {after} during the "
                "test; use `with jax.enable_x64(...)` or the `x64` fixture.")
