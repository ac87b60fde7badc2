"""numpy's BLAS threads for the scipy methods, and this machine's bandwidth."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _timing


class BlasThreads:
  """Sets numpy's BLAS threads (threadpoolctl); no-op without it."""

  def __init__(self):
    try:
      from threadpoolctl import ThreadpoolController  # pylint: disable=g-import-not-at-top
      self._ctl = ThreadpoolController()
      blas = [d for d in self._ctl.info() if d.get("user_api") == "blas"]
      self.default = max([d["num_threads"] for d in blas] or [1])
    except Exception:  # pylint: disable=broad-except
      self._ctl, self.default = None, None

  def limit(self, n: Optional[int]):
    if self._ctl is None or not n:
      return _NullContext()
    return self._ctl.limit(limits=n, user_api="blas")


class _NullContext:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def choose_blas_threads(setting: str, blas: BlasThreads, run_scipy, repeats=3):
  """Thread count for the scipy methods, and the calibration timings."""
  if blas.default is None:
    return None, {}
  if setting != "best":
    n = int(setting)
    return (n or blas.default), {}
  candidates = sorted({1, blas.default})
  if len(candidates) == 1:
    return candidates[0], {}
  times = {n: [] for n in candidates}
  for _ in range(repeats):
    for n in candidates:
      with blas.limit(n):
        t0 = time.perf_counter()
        run_scipy()
        times[n].append(time.perf_counter() - t0)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return min(med, key=med.get), {str(n): v for n, v in med.items()}


# ----------------------------------------------------------------------------
# Memory bandwidth.


def measure_bandwidth(quick: bool, blas: BlasThreads) -> Dict[str, Any]:
  """Bytes/s of a numpy copy and of ``(A x) A`` passes (jitted and numpy)."""
  m, n = (4000, 2000) if quick else (5000, 4000)  # 64 / 160 MB > 32 MB L3.
  A = np.random.default_rng(0).standard_normal((m, n))
  x = np.ones(n)
  Aj, xj = jnp.asarray(A), jnp.asarray(x)
  pass_bytes = 2 * A.nbytes
  # (A x) A, not A.T @ (A x): on XLA:CPU the explicit transpose is 5-15x
  # slower (it is not folded into the dot); autodiff's vjp emits r @ A.
  gemv_pass = jax.jit(lambda A, x: (A @ x) @ A)
  compiled, _ = _timing.compile_timed(gemv_pass, Aj, xj)
  fns = {"jax (Ax)A": lambda: compiled(Aj, xj)}
  thread_counts = sorted({1, blas.default or 1})
  for k in thread_counts:
    def numpy_pass(k=k):
      with blas.limit(k):
        return (A @ x) @ A
    fns[f"numpy (Ax)A {k} thr"] = numpy_pass
  times = _timing.interleaved_times(fns, repeats=5 if quick else 15, warmup=1)
  out = {"matrix": f"{m}x{n} float64 ({_timing.fmt_bytes(A.nbytes)})",
         "copy": _timing.copy_bandwidth((64 if quick else 256) * 2**20,
                                        repeats=5 if quick else 11)}
  for name, t in times.items():
    out[name] = pass_bytes / float(np.median(t))
  out["best"] = max(v for k, v in out.items() if isinstance(v, float))
  return out
