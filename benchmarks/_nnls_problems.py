"""The NNLS problems of ``benchmarks/lbfgsb.py`` and numpy checks of answers."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

BATCH = 64
BATCH_SHAPE = (200, 50)


class Problem(NamedTuple):
  name: str
  A: np.ndarray  # (m, n), or (batch, m, n)
  b: np.ndarray  # (m,), or (batch, m)
  note: str

  @property
  def batched(self) -> bool:
    return self.A.ndim == 3


def gaussian(m: int, n: int, seed: int, density: float = 0.2,
             noise: float = 1e-2):
  """Gaussian ``A``; ``b = A x* + noise``, ``x*`` sparse and non-negative."""
  rng = np.random.default_rng(seed)
  A = rng.standard_normal((m, n))
  x_star = np.where(rng.random(n) < density, rng.uniform(0.5, 1.5, n), 0.0)
  b = A @ x_star + noise * rng.standard_normal(m)
  return A, b


def make_problem(name: str, seed: int) -> Problem:
  if name == "digits":
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    data = load_digits().data / 16.0
    held_out = 1000 + int(np.random.default_rng(seed).integers(
        0, data.shape[0] - 1000))
    return Problem("digits", np.ascontiguousarray(data[:1000].T),
                   data[held_out].copy(),
                   f"64x1000, b = digit #{held_out} (held out)")
  if name == "batch":
    pairs = [gaussian(*BATCH_SHAPE, seed=seed + 1000 + i) for i in range(BATCH)]
    return Problem(
        "batch", np.stack([p[0] for p in pairs]),
        np.stack([p[1] for p in pairs]),
        f"{BATCH} x {BATCH_SHAPE[0]}x{BATCH_SHAPE[1]} Gaussian, vmap vs loops")
  m, n = (int(v) for v in name.split("x"))
  A, b = gaussian(m, n, seed)
  return Problem(name, A, b, f"{m}x{n} Gaussian, planted sparse x* >= 0")


def objective(A, b, x) -> float:
  r = A @ x - b
  return 0.5 * float(r @ r)


def kkt_residual(A, b, x) -> float:
  """``||x - max(x - grad, 0)||_inf``: 0 exactly at a KKT point."""
  g = A.T @ (A @ x - b)
  return float(np.max(np.abs(x - np.maximum(x - g, 0.0))))


def pg0_of(A, b) -> float:
  """``||x0 - P(x0 - g0)||_inf`` at ``x0 = 0``: ``max(A^T b, 0)``."""
  return float(max(np.max(A.T @ b), 0.0))
