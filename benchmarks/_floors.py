"""Floors for the solver benchmarks, and numpy's BLAS threads.

The memory bandwidth (a numpy copy; ``(A x) A`` jitted and in numpy) for the
floor ``evaluations x bytes / bandwidth``; the evaluations CG needs given the
solution's free set; numpy's BLAS threads (also jaxlib's CPU LAPACK's: one
OpenBLAS), since on a loaded 2-core machine 2 threads can be ~30x slower.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import timeit
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from benchmarks import _timing


@functools.cache
def _controller() -> threadpoolctl.ThreadpoolController:
  # Once, after numpy, scipy and jaxlib are loaded: scanning takes a while.
  return threadpoolctl.ThreadpoolController()


def blas_default_threads() -> int:
  return max([d["num_threads"] for d in _controller().info()
              if d.get("user_api") == "blas"] or [1])


def blas_limit(n: Optional[int]):
  """A context with ``n`` BLAS threads (``None``: as they are)."""
  return (_controller().limit(limits=n, user_api="blas") if n
          else contextlib.nullcontext())


def choose_blas_threads(setting: str, run_scipy, repeats: int = 3):
  """``(threads, {threads: median s})``: ``setting`` N (0: the library's
  default) or "best", the faster of 1 and the default on ``run_scipy``."""
  default = blas_default_threads()
  if setting != "best":
    return int(setting) or default, {}
  if default == 1:
    return 1, {}
  times = _timing.interleaved_times(
      {str(n): lambda n=n: _limited(n, run_scipy) for n in (1, default)},
      repeats=repeats, warmup=0)
  medians = {n: statistics.median(t) for n, t in times.items()}
  return int(min(medians, key=medians.get)), medians


def _limited(n, fn):
  with blas_limit(n):
    fn()


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 7) -> float:
  """Bytes/s (read plus write) of the median numpy copy of ``nbytes``; make it
  much larger than the last-level cache to measure main memory."""
  src = np.ones(max(1, nbytes // 8))
  dst = np.empty_like(src)
  np.copyto(dst, src)  # Touch the pages first.
  t = timeit.repeat(lambda: np.copyto(dst, src), number=1, repeat=repeats)
  return 2 * src.nbytes / statistics.median(t)


def measure_bandwidth(quick: bool) -> Dict[str, Any]:
  """Bytes/s of a numpy copy and of ``(A x) A`` passes (jitted and numpy)."""
  m, n = (4000, 2000) if quick else (5000, 4000)  # 64 / 160 MB > 32 MB L3.
  A = np.random.default_rng(0).standard_normal((m, n))
  x = np.ones(n)
  Aj, xj = jnp.asarray(A), jnp.asarray(x)
  # (A x) A, not A.T @ (A x): on XLA:CPU the explicit transpose is 5-15x
  # slower (it is not folded into the dot); autodiff's vjp emits r @ A.
  compiled, _ = _timing.compile_timed(jax.jit(lambda A, x: (A @ x) @ A), Aj,
                                      xj)
  fns = {"jax (Ax)A": lambda: compiled(Aj, xj)}
  for k in sorted({1, blas_default_threads()}):
    fns[f"numpy (Ax)A {k} thr"] = lambda k=k: _limited(k, lambda: (A @ x) @ A)
  times = _timing.interleaved_times(fns, repeats=5 if quick else 15)
  out = {"matrix": f"{m}x{n} float64 ({_timing.fmt_bytes(A.nbytes)})",
         "copy": copy_bandwidth((64 if quick else 256) * 2**20,
                                        repeats=5 if quick else 11)}
  out.update({name: 2 * A.nbytes / statistics.median(t)
              for name, t in times.items()})
  out["best"] = max(v for v in out.values() if isinstance(v, float))
  return out


def cg_oracle_evaluations(A: np.ndarray, b: np.ndarray, x_star: np.ndarray,
                          tol: float, max_iter: int = 10_000) -> Dict[str, Any]:
  """Evaluations conjugate gradients needs on the free columns of ``x_star``.

  Once the active set of an NNLS problem is known, what is left is least
  squares on the free columns ``F = {x_star > 0}``, where CG is optimal among
  methods whose steps lie in the span of the gradients seen (one product
  with ``A_F^T A_F``, i.e. one gradient evaluation, per iteration). Started
  at 0 and stopped when ``||A_F^T (A_F z - b)||_inf <= tol * max(A^T b, 0)``
  (the relative projected-gradient test of the solvers), it needs about the
  fewest evaluations any gradient method can; an L-BFGS-B-type solver must
  also find the active set. The initial gradient counts as one, as the
  solvers count it.
  """
  free = x_star > 0
  a_free = A[:, free]
  threshold = tol * max(float(np.max(A.T @ b)), 0.0)
  z = np.zeros(a_free.shape[1])
  residual = a_free.T @ b  # -gradient at z = 0
  direction = residual.copy()
  rr = residual @ residual
  evals = 1
  while np.max(np.abs(residual), initial=0.0) > threshold and evals < max_iter:
    hd = a_free.T @ (a_free @ direction)
    evals += 1
    step = rr / (direction @ hd)
    z += step * direction
    residual = residual - step * hd
    rr_new = residual @ residual
    direction = residual + (rr_new / rr) * direction
    rr = rr_new
  return {"cg_evals": evals, "free": int(free.sum()),
          "converged": bool(np.max(np.abs(residual), initial=0.0)
                            <= threshold)}
