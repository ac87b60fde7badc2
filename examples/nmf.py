"""Non-negative matrix factorization of digits: posconstr vs scikit-learn.

Factorizes scikit-learn's bundled digits, ``X`` (1797 images x 64 pixels,
values 0..16), as ``X ~ W H`` with ``W >= 0`` (1797 x rank) and ``H >= 0``
(rank x 64, the "parts"), minimizing ``0.5 ||X - W H||_F^2``, four ways from
the same NNDSVDa initialization (scikit-learn's ``init="nndsvda"``,
recomputed here with the same randomized SVD and seed):

  * ``projected-adam``: ``posconstr.projected(optax.adam(...), NonNegative())``
    (cosine-decayed step) on ``{"W": W, "H": H}`` jointly, jitted in chunks;
  * ``anls-minimize``:  alternating non-negative least squares: each sweep
    improves ``W`` with ``H`` fixed, then ``H`` with ``W`` fixed, by
    ``--inner`` iterations of ``posconstr.minimize(..., lower=0.0)`` (bounded
    L-BFGS, one ``lax.while_loop`` per solve, warm-started) on the Gram form
    ``0.5 tr(W G W^T) - tr(W B^T)``, ``G = H H^T``, ``B = X H^T``. Inexact
    solves and many sweeps beat exact solves and few sweeps here;
  * ``anls-box_qp``: the same sweeps with exact solves, all rows of a factor
    in one ``posconstr.box_qp`` call on the shared Gram matrix (block
    principal pivoting; Kim & Park's ANLS-BPP), warm-started;
  * ``sklearn-cd`` and ``sklearn-mu``: ``sklearn.decomposition.NMF``,
    ``solver="cd"`` (coordinate descent) and ``"mu"`` (multiplicative
    updates), Frobenius loss, no regularization, stopped as users get it: by
    its default ``tol`` (``--tol``; 0 runs all ``--iters``).

The JAX methods run in float64 by default (``--dtype float32`` to compare),
inside ``jax.enable_x64``; compilation is timed apart from the solve. Every
method is scored in numpy float64 on its factors: the objective and the KKT
residuals ``max |min(W, grad_W)|`` and ``max |min(H, grad_H)|``, with
``grad_W = (W H - X) H^T`` and ``grad_H = W^T (W H - X)``: zero exactly at a
stationary point. They certify stationarity, not quality (``W = H = 0`` is a
KKT point), and depend on how the scale is split between ``W`` and ``H``.

It prints a markdown table and saves a figure: objective against time and
iteration, and the learned parts (rows of ``H``) of each method. Run it with::

  python examples/nmf.py                      # out/nmf.png
  python examples/nmf.py --sweeps 50 --tol 0 --iters 500 --out /tmp/nmf
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from typing import Any, Callable, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import decomposition  # noqa: E402
from sklearn import exceptions  # noqa: E402
from sklearn.utils import extmath  # noqa: E402

import posconstr  # noqa: E402

RANK = 16
DEFAULT_STEPS = 5000  # projected Adam steps.
LEARNING_RATE = 0.3  # Adam's peak step, in the units of W and H.
SWEEPS = 120  # ANLS sweeps.
INNER_ITERS = 5  # L-BFGS-B iterations per W or H solve: inexact ANLS.
SKLEARN_ITERS = 2000  # The cap; its default tol stops cd after a few hundred.
SKLEARN_TOL = 1e-4  # NMF's default.
ADAM_CHUNK = 250  # Most steps per jitted call (one point of the curve each).


# ----------------------------------------------------------------- data ----

def load_data() -> np.ndarray:
  """Digits as a (1797, 64) float64 array of pixel values 0..16."""
  return datasets.load_digits().data.astype(np.float64)


def nndsvda(x: np.ndarray, rank: int, seed: int):
  """NNDSVDa (Boutsidis & Gallopoulos 2008), as ``NMF(init="nndsvda")``.

  The same randomized SVD and seed as scikit-learn, so ``(W0, H0)`` is the
  start that ``NMF(init="nndsvda", random_state=seed)`` uses; zeros are
  filled with the mean of ``x``.
  """
  u, s, v = extmath.randomized_svd(x, rank, random_state=seed)
  w, h = np.zeros((x.shape[0], rank)), np.zeros((rank, x.shape[1]))
  w[:, 0] = np.sqrt(s[0]) * np.abs(u[:, 0])
  h[0] = np.sqrt(s[0]) * np.abs(v[0])
  for j in range(1, rank):
    a, b = u[:, j], v[j]
    ap, bp = np.maximum(a, 0), np.maximum(b, 0)
    an, bn = np.abs(np.minimum(a, 0)), np.abs(np.minimum(b, 0))
    apn, bpn = np.linalg.norm(ap), np.linalg.norm(bp)
    ann, bnn = np.linalg.norm(an), np.linalg.norm(bn)
    if apn * bpn > ann * bnn:  # Keep the dominant sign pattern.
      col, row, sigma = ap / apn, bp / bpn, apn * bpn
    else:
      col, row, sigma = an / ann, bn / bnn, ann * bnn
    scale = np.sqrt(s[j] * sigma)
    w[:, j], h[j] = scale * col, scale * row
  w[w < 1e-6], h[h < 1e-6] = 0.0, 0.0
  mean = x.mean()
  w[w == 0], h[h == 0] = mean, mean
  return w, h


# --------------------------------------------------------------- scoring ----

def objective(x: np.ndarray, w, h) -> float:
  """``0.5 ||X - W H||_F^2`` in float64."""
  w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
  return float(0.5 * np.sum((x - w @ h) ** 2))


def kkt(x: np.ndarray, w, h):
  """``(max |min(W, grad_W)|, max |min(H, grad_H)|)`` in float64."""
  w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
  residual = w @ h - x
  return (float(np.max(np.abs(np.minimum(w, residual @ h.T)))),
          float(np.max(np.abs(np.minimum(h, w.T @ residual)))))


class History:
  """Objective after each chunk of iterations, against solve time."""

  def __init__(self, x: np.ndarray, w0, h0):
    self.x = x
    self.iterations, self.seconds = [0], [0.0]
    self.objectives = [objective(x, w0, h0)]

  def add(self, iterations: int, seconds: float, w, h) -> float:
    """Adds a point ``iterations`` and ``seconds`` after the last one."""
    self.iterations.append(self.iterations[-1] + iterations)
    self.seconds.append(self.seconds[-1] + seconds)
    self.objectives.append(objective(self.x, w, h))
    return self.objectives[-1]


def _result(x, w, h, history: History, compile_seconds: float = 0.0,
            **extra) -> Dict[str, Any]:
  w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
  kkt_w, kkt_h = kkt(x, w, h)
  return {
      "W": w, "H": h, "objective": objective(x, w, h),
      "relative_error": float(np.linalg.norm(x - w @ h) / np.linalg.norm(x)),
      "kkt_W": kkt_w, "kkt_H": kkt_h, "min_entry": float(min(w.min(), h.min())),
      "zeros_W": float(np.mean(w == 0)), "zeros_H": float(np.mean(h == 0)),
      "iterations": history.iterations[-1], "seconds": history.seconds[-1],
      "compile_seconds": compile_seconds,
      "history": {name: np.asarray(getattr(history, name))
                  for name in ("iterations", "seconds", "objectives")},
      **extra,
  }


def _timed_compile(fn: Callable, *args):
  """AOT-compiles jitted ``fn`` for ``args``: (compiled, seconds)."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


# --------------------------------------------------------------- methods ----

def run_projected_adam(x: np.ndarray, w0, h0, steps: int, lr: float,
                       dtype: str, progress: bool = True) -> Dict[str, Any]:
  """``projected(adam)`` on ``{"W", "H"}`` jointly, cosine-decayed step."""
  with jax.enable_x64(dtype == "float64"):
    xj = jnp.asarray(x, dtype)
    params = {"W": jnp.asarray(w0, dtype), "H": jnp.asarray(h0, dtype)}
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.01)
    tx = posconstr.projected(optax.adam(schedule), posconstr.NonNegative())
    state = tx.init(params)

    def loss(p):
      return 0.5 * jnp.sum((xj - p["W"] @ p["H"]) ** 2)

    @jax.jit
    def run(params, state, n):
      def body(_, carry):
        params, state = carry
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state
      return jax.lax.fori_loop(0, n, body, (params, state))

    compiled, compile_seconds = _timed_compile(run, params, state, 0)
    history = History(x, w0, h0)
    bar = _common.progress(total=steps, desc=f"{'projected-adam':>14}",
                           disable=not progress)
    done = 0
    while done < steps:
      # Chunks of 10, 20, 40, ... up to ADAM_CHUNK steps: even on a log axis.
      n = min(max(10, done), ADAM_CHUNK, steps - done)
      start = time.perf_counter()
      params, state = jax.block_until_ready(compiled(params, state, n))
      value = history.add(n, time.perf_counter() - start, params["W"],
                          params["H"])
      done += n
      bar.update(n)
      bar.set_postfix(objective=f"{value:.4g}")
    bar.close()
    return _result(x, params["W"], params["H"], history, compile_seconds)


def run_anls(x: np.ndarray, w0, h0, sweeps: int, inner: int, dtype: str,
             progress: bool = True, exact: bool = False) -> Dict[str, Any]:
  """Alternating bounded solves for ``W`` and ``H``: ``inner`` iterations of
  ``posconstr.minimize``, or (``exact``) ``posconstr.box_qp``, all rows of a
  factor in one call (they share the Gram matrix)."""
  tol = 1e-8 if dtype == "float64" else 1e-4  # See minimize's docstring.
  name = "anls-box_qp" if exact else "anls-minimize"
  with jax.enable_x64(dtype == "float64"):
    xj = jnp.asarray(x, dtype)

    def nnls(gram, cross, start):
      """``argmin_{V >= 0} 0.5 tr(V G V^T) - tr(V B^T)``: rows of ``V``."""
      if exact:
        result = posconstr.box_qp(gram, -cross.T, lower=0.0, x0=start.T)
        return result.x.T, jnp.max(result.num_iter)
      result = posconstr.minimize(
          lambda v: 0.5 * jnp.sum((v @ gram) * v) - jnp.sum(cross * v),
          start, lower=0.0, maxiter=inner, tol=tol)
      return result.params, result.num_iter

    @jax.jit
    def sweep(w, h):
      w, iters_w = nnls(h @ h.T, xj @ h.T, w)
      ht, iters_h = nnls(w.T @ w, xj.T @ w, h.T)
      return w, ht.T, iters_w + iters_h

    w, h = jnp.asarray(w0, dtype), jnp.asarray(h0, dtype)
    compiled, compile_seconds = _timed_compile(sweep, w, h)
    history = History(x, w0, h0)
    inner_total = 0
    bar = _common.progress(range(sweeps), desc=f"{name:>14}",
                           disable=not progress)
    for _ in bar:
      start = time.perf_counter()
      w, h, iters = jax.block_until_ready(compiled(w, h))
      value = history.add(1, time.perf_counter() - start, w, h)
      inner_total += int(iters)
      bar.set_postfix(objective=f"{value:.4g}")
    return _result(x, w, h, history, compile_seconds,
                   inner_iterations=inner_total)


def run_sklearn(x: np.ndarray, w0, h0, solver: str, iters: int, tol: float,
                seed: int, progress: bool = True) -> Dict[str, Any]:
  """``NMF(init="nndsvda", solver=solver)``, timed up to 1, 2, 5, 10, ... its.

  One fit with ``tol`` and ``max_iter=iters`` finds where scikit-learn's own
  stop ends (``n_iter_``; all ``iters`` when ``tol`` is 0). The curve then
  comes from fits with ``tol=0``: the first runs 1 iteration from
  ``init="nndsvda"``, each next one continues from the last factors
  (``init="custom"``) up to the next point of 1, 2, 5, 10, ... and finally
  ``n_iter_``. Neither solver keeps state between iterations, so the factors
  are those of the fit with ``tol``; the dozen calls add little overhead.
  """

  def fit(max_iter: int, tol: float, w=None, h=None):
    model = decomposition.NMF(
        RANK, init="nndsvda" if w is None else "custom", solver=solver,
        beta_loss="frobenius", tol=tol, max_iter=max_iter, random_state=seed)
    # Copies: the solvers update W (and H) in place.
    w = model.fit_transform(x, W=None if w is None else w.copy(),
                            H=None if h is None else h.copy())
    return w, model.components_, model.n_iter_

  history = History(x, w0, h0)
  w = h = None
  with warnings.catch_warnings():
    # A fit that ends at max_iter is "not converged" by design here.
    warnings.simplefilter("ignore", exceptions.ConvergenceWarning)
    iters = fit(iters, tol)[2] if tol > 0 else iters
    bar = _common.progress(total=iters, desc=f"{'sklearn-' + solver:>14}",
                           disable=not progress)
    ends = sorted({m * 10**k for k in range(6) for m in (1, 2, 5)
                   if m * 10**k < iters} | {iters})  # 1, 2, 5, 10, ...
    for end in ends:
      n = end - history.iterations[-1]
      start = time.perf_counter()
      w, h, _ = fit(n, 0.0, w, h)
      value = history.add(n, time.perf_counter() - start, w, h)
      bar.update(n)
      bar.set_postfix(objective=f"{value:.4g}")
  bar.close()
  return _result(x, w, h, history)


# --------------------------------------------------------------- reports ----

def summary_table(results: Dict[str, Dict[str, Any]]) -> str:
  """A markdown table, one row per method."""
  rows = []
  for name, r in results.items():
    iterations = str(r["iterations"])
    if "inner_iterations" in r:
      iterations += f" ({r['inner_iterations']} inner)"
    rows.append([name, iterations, f"{r['seconds']:.2f}",
                 f"{r['compile_seconds']:.2f}", f"{r['objective']:.1f}",
                 f"{r['relative_error']:.4f}", f"{r['kkt_W']:.3g}",
                 f"{r['kkt_H']:.3g}", _common.percent(r["zeros_W"]),
                 _common.percent(r["zeros_H"]), f"{r['min_entry']:.3g}"])
  return _common.markdown_table(
      ["method", "iterations", "solve s", "compile s", "objective",
       "relative error", "KKT W", "KKT H", "zeros in W", "zeros in H",
       "min entry"], rows)


def save_figure(results: Dict[str, Dict[str, Any]], out_dir: str) -> str:
  """Relative objective gap vs time and iteration (top); parts per method."""
  names = list(results)
  best = min(min(r["history"]["objectives"]) for r in results.values())
  fig = plt.figure(figsize=(13, 4.2 + 0.95 * len(names)),
                   constrained_layout=True)
  top, bottom = fig.subfigures(2, 1, height_ratios=[4.2, 0.95 * len(names)])
  ax_time, ax_iter = top.subplots(1, 2)
  floor = 1e-5
  for name, r in results.items():
    hist = r["history"]
    gap = np.maximum(hist["objectives"] / best - 1, floor)  # Log axis.
    ax_time.plot(hist["seconds"][1:], gap[1:], lw=1.5, label=name)
    ax_iter.plot(hist["iterations"][1:], gap[1:], lw=1.5, label=name)
  for ax, label in ((ax_time, "solve time (s, compilation excluded)"),
                    (ax_iter, "iteration (Adam: step; ANLS, sklearn: "
                              "sweep over W and H)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.grid(alpha=0.3, which="both")
  ax_time.set_ylabel(f"objective / best - 1 (best {best:.5g}; "
                     f"floor {floor:g})")
  ax_time.set_title("0.5 ||X - WH||^2 against time")
  ax_iter.set_title("... and against iterations")
  ax_time.legend(fontsize=8)

  # One mosaic (a row of 8x8 parts per method), not one axes per part: fast.
  ax = bottom.subplots()
  mosaic = np.full((9 * len(names) - 1, 9 * RANK - 1), 0.2)  # Gray gaps.
  for i, name in enumerate(names):
    w, h = results[name]["W"], results[name]["H"]
    # Largest contribution first: ||W[:, j]|| ||H[j]||.
    order = np.argsort(-np.linalg.norm(w, axis=0) * np.linalg.norm(h, axis=1))
    for k, j in enumerate(order):
      mosaic[9 * i:9 * i + 8, 9 * k:9 * k + 8] = (
          h[j].reshape(8, 8) / max(h[j].max(), 1e-12))
  ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks(9 * np.arange(len(names)) + 3.5, names, fontsize=9)
  bottom.suptitle(f"Parts: the {RANK} rows of H, by contribution", fontsize=10)
  return _common.save_figure(fig, out_dir, "nmf.png", dpi=70)


# ------------------------------------------------------------------ main ----

def parse_args(argv: Optional[Sequence[str]] = None):
  parser = _common.parser(__doc__, "nmf.png", DEFAULT_STEPS,
                          "projected Adam steps", lr=LEARNING_RATE,
                          lr_help="projected Adam's peak step",
                          seed_help="seed of the NNDSVDa initialization")
  for flag, default, kind, meaning in (
      ("sweeps", SWEEPS, int, "ANLS sweeps"),
      ("inner", INNER_ITERS, int, "L-BFGS-B iterations per ANLS solve"),
      ("iters", SKLEARN_ITERS, int, "most scikit-learn iterations"),
      ("tol", SKLEARN_TOL, float, "scikit-learn's tol, 0: all --iters")):
    parser.add_argument(f"--{flag}", type=kind, default=default,
                        help=f"{meaning} (default %(default)s)")
  parser.add_argument("--dtype", choices=("float64", "float32"),
                      default="float64", help="dtype of the JAX methods")
  args = _common.parse(parser, argv, ("steps", "sweeps", "inner", "iters"))
  if args.tol < 0:
    parser.error("--tol must be >= 0")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"methods": {name: metrics}, "figure"}``.

  Each method's metrics: the factors ``W`` and ``H`` (float64 copies),
  ``objective``, ``relative_error`` (``||X - WH|| / ||X||``), ``kkt_W``,
  ``kkt_H``, ``min_entry``, ``zeros_W``, ``zeros_H`` (shares exactly 0),
  ``iterations``, ``seconds`` (solve time), ``compile_seconds`` and
  ``history`` (``iterations``, ``seconds``, ``objectives`` per chunk).
  """
  args = parse_args(argv)
  x = load_data()
  w0, h0 = nndsvda(x, RANK, args.seed)
  progress = not args.no_progress
  results = {
      "projected-adam": run_projected_adam(x, w0, h0, args.steps, args.lr,
                                           args.dtype, progress),
      "anls-minimize": run_anls(x, w0, h0, args.sweeps, args.inner,
                                args.dtype, progress),
      "anls-box_qp": run_anls(x, w0, h0, args.sweeps, args.inner, args.dtype,
                              progress, exact=True),
      **{f"sklearn-{solver}": run_sklearn(x, w0, h0, solver, args.iters,
                                          args.tol, args.seed, progress)
         for solver in ("cd", "mu")},
  }
  figure = save_figure(results, args.out)
  _common.report(
      summary_table(results), figure,
      f"X: digits {x.shape}, rank {RANK}, objective at the NNDSVDa start "
      f"{objective(x, w0, h0):.4g}, 0.5||X||^2 = {0.5 * np.sum(x**2):.4g}; "
      f"JAX methods in {args.dtype}; scikit-learn's tol {args.tol:g} (0: "
      f"all --iters {args.iters}).")
  return {"methods": results, "figure": figure}


if __name__ == "__main__":
  main()
