"""Exponentiated gradient (EGU) against projection and softplus: who converges.

Kernels >= 0 three ways, each with ``sgd`` and ``adam`` at its best step size
of a wide grid: ``egu`` (``chain(base(lr), multiplicative_update())``),
``project`` (``chain(base(lr), project_nonneg())``), ``softplus`` (``base(lr)``
on latents). NNLS in float64 from ``x0 = c 1 > 0``: the gap ``(f(x_N) - f*) /
(f(x0) - f*)`` (``f*``: ``scipy.optimize.nnls``), median over seeds, on
Gaussian ``A`` with a planted sparse ``x* >= 0`` (as ``benchmarks/_nnls.py``)
and digits (1000 images as columns, ``b`` a held-out one). The quickstart MLP
(64-64-10 on digits, kernels from ``|lecun_normal|``, biases free): training
loss and test accuracy, means over seeds. Convergence, not timing. ``python
-m benchmarks.exponentiated_gradient`` (about 4 min on 2 CPU cores) writes
its results outside the tree (``_timing.raw_path``, or ``--out``); with
``--summary`` also ``benchmarks/results/exponentiated_gradient.json``, which
``readme_tables`` renders (never with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from sklearn import datasets
from sklearn import model_selection
from sklearn import preprocessing

import posconstr
from benchmarks import _timing

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "exponentiated_gradient.json")
METHODS = ("egu", "project", "softplus")
BASES = {"sgd": optax.sgd, "adam": optax.adam}
# Wide grids: EGU's step scales with w and softplus's with sigmoid(z)**2, so
# small weights (digits: x ~ 1e-3) need far larger step sizes than 1 / L.
NNLS_GRID = {"sgd": [2.0 ** k for k in range(-1, 21)],  # times 1 / L
             "adam": [float(f"{10 ** (k / 2):.1g}") for k in range(-8, 3)]}
MLP_GRID = {"sgd": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
            "adam": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]}
QUICKSTART_LR = 3e-3  # examples/quickstart.py's Adam learning rate.
RULES = {"*/kernel": posconstr.Softplus()}


def train(method, base, loss, params, lr, steps):
  """``steps`` of ``method``; per step the loss, and the final weights."""
  link = {"egu": posconstr.multiplicative_update("*/kernel"),
          "project": posconstr.project_nonneg(mask="*/kernel")}.get(method)
  tx = base(lr) if link is None else optax.chain(base(lr), link)
  softplus = method == "softplus"
  weights = (lambda z: posconstr.reparam(z, RULES)) if softplus else (
      lambda p: p)
  z = posconstr.unreparam(params, RULES) if softplus else params

  def body(carry, _):
    z, state = carry
    value, grad = jax.value_and_grad(lambda z: loss(weights(z)))(z)
    updates, state = tx.update(grad, state, z)
    return (optax.apply_updates(z, updates), state), value
  (z, _), values = jax.lax.scan(body, (z, tx.init(z)), None, steps)
  return values, weights(z)


def nnls_case(name, seeds, checkpoints):
  """One row per family and checkpoint: each method's best median gap."""
  gaps = {(f, m): [] for f in BASES for m in METHODS}  # per seed: (lr, N)
  with jax.enable_x64(True):
    for seed in seeds:
      rng = np.random.default_rng(seed)
      if name == "digits":
        data = datasets.load_digits().data / 16.0
        A, b = data[:1000].T, data[rng.integers(1000, len(data))]
      else:
        m, n = (int(v) for v in name.split("x"))
        A = rng.standard_normal((m, n))
        x_star = np.where(rng.random(n) < 0.2, rng.uniform(0.5, 1.5, n), 0.0)
        b = A @ x_star + 1e-2 * rng.standard_normal(m)
      x = scipy.optimize.nnls(A, b, maxiter=50 * A.shape[1])[0]
      f_star, inv_l = 0.5 * np.sum((A @ x - b) ** 2), np.linalg.norm(A, 2) ** -2
      A, b = jnp.asarray(A), jnp.asarray(b)
      ones = A @ jnp.ones(A.shape[1])  # x0 = c 1, c fitted (> 0)
      x0 = {"x": {"kernel": jnp.full(A.shape[1], max(
          float(ones @ b / (ones @ ones)), 1.0 / A.shape[1]))}}

      def loss(p, A=A, b=b):
        return 0.5 * jnp.sum((A @ p["x"]["kernel"] - b) ** 2)
      for (family, method), out in gaps.items():
        def values(lr, family=family, method=method, loss=loss, x0=x0):
          steps = max(checkpoints) + 1
          return train(method, BASES[family], loss, x0, lr, steps)[0]
        lrs = jnp.asarray(NNLS_GRID[family]) * (inv_l if family == "sgd" else 1)
        f = np.asarray(jax.jit(jax.vmap(values))(lrs))[:, checkpoints]
        gap = (f - f_star) / (float(loss(x0)) - f_star)
        out.append(np.where(np.isfinite(gap), np.maximum(gap, 0), np.inf))
  rows = []
  for family in BASES:
    for j, n in enumerate(checkpoints):  # Per method, median over seeds.
      medians = {m: np.median(np.stack(gaps[family, m])[:, :, j], axis=0)
                 for m in METHODS}
      rows.append({"problem": name, "family": family, "steps": n,
                   "gap": {m: float(v.min()) for m, v in medians.items()},
                   "lr": {m: NNLS_GRID[family][int(v.argmin())]
                          for m, v in medians.items()}})
      print(rows[-1], flush=True)
  return rows


def mlp_case(seeds, steps):
  """Per family and method: mean train loss and test accuracy per lr."""
  init, x, y = jax.nn.initializers.lecun_normal(), *datasets.load_digits(
      return_X_y=True)
  runs = {(f, m): [] for f in BASES for m in ("free",) + METHODS}
  for seed in seeds:
    xtr, xte, ytr, yte = model_selection.train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y)
    scale = preprocessing.StandardScaler().fit(xtr).transform
    xtr, xte = np.float32(scale(xtr)), np.float32(scale(xte))
    keys = jax.random.split(jax.random.key(seed))
    params = {name: {"kernel": jnp.abs(init(key, shape)),
                     "bias": jnp.zeros(shape[1])}
              for name, key, shape in zip(("h", "out"), keys,
                                          ((64, 64), (64, 10)))}

    def logits(p, x):
      h = jax.nn.relu(x @ p["h"]["kernel"] + p["h"]["bias"])
      return h @ p["out"]["kernel"] + p["out"]["bias"]

    def loss(p, xtr=xtr, ytr=ytr, logits=logits):
      return optax.softmax_cross_entropy_with_integer_labels(
          logits(p, xtr), ytr).mean()
    for (family, method), out in runs.items():
      def run(lr, family=family, method=method, params=params, loss=loss,
              logits=logits, xte=xte, yte=yte):
        p = train(method, BASES[family], loss, params, lr, steps)[1]
        return loss(p), jnp.mean(jnp.argmax(logits(p, xte), -1) == yte)
      out.append(jax.jit(jax.vmap(run))(jnp.asarray(MLP_GRID[family])))
  rows = []
  for (family, method), out in runs.items():
    loss, acc = (np.mean([np.asarray(r[i]) for r in out], 0) for i in (0, 1))
    rows.append({"family": family, "method": method, "seeds": len(seeds),
                 "lr": MLP_GRID[family][int(np.argmin(np.nan_to_num(
                     loss, nan=np.inf)))], "steps": steps,
                 "grid": MLP_GRID[family], "train_losses": loss.tolist(),
                 "test_accuracies": acc.tolist()})
    print(rows[-1], flush=True)
  return rows


def readme_table(payload) -> str:
  """The README tables (``benchmarks/readme_tables.py``) from the JSON."""
  out = ["| NNLS problem | optimizer | steps | " + " | ".join(METHODS) + " |",
         "|---|---|---:|" + "---:|" * len(METHODS)]
  for r in payload["nnls"]:
    sgd, best = r["family"] == "sgd", min(r["gap"].values())
    cells = [("**{:.1e}**" if r["gap"][m] == best else "{:.1e}").format(
        r["gap"][m]) + (f" (2^{math.log2(r['lr'][m]):.0f}/L)" if sgd
                        else f" ({r['lr'][m]:g})") for m in METHODS]
    out.append(f"| {r['problem']} | {r['family']} | {r['steps']} | "
               + " | ".join(cells) + " |")
  names = ("free",) + METHODS
  out += ["", "| MLP on digits: train loss / test accuracy | "
          + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for family, fixed in (("sgd", None), ("adam", None),
                        ("adam", QUICKSTART_LR)):
    rows = {r["method"]: r for r in payload["mlp"] if r["family"] == family}
    cells = []
    for m in names:
      k = rows[m]["grid"].index(fixed or rows[m]["lr"])
      cells.append(f"{rows[m]['train_losses'][k]:.1e} / "
                   f"{rows[m]['test_accuracies'][k]:.3f}"
                   + ("" if fixed else f" ({rows[m]['lr']:g})"))
    label = f"lr {fixed:g} (quickstart)" if fixed else "best lr"
    out.append(f"| {family}, {label} | " + " | ".join(cells) + " |")
  r, m = payload["mlp"][0], payload["machine"]
  return "\n".join(out) + (
      f"\n\nNNLS: gap (f - f*) / (f0 - f*), median of {payload['nnls_seeds']}"
      f" seeds, best step size in parentheses (sgd: 2^k/L), smallest in bold. "
      f"MLP: {r['steps']} full-batch steps, means of {r['seeds']} seeds, at "
      f"the lr with the lowest training loss, and at the quickstart's. jax "
      f"{m['jax']}, optax {m['optax']}, {m['backend']}.")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true",
                  help="one seed, 200x50 and digits, fewer steps")
  ap.add_argument("--out", help="JSON of this run (default: outside the "
                  "source tree, see _timing.raw_path)")
  ap.add_argument("--summary", action="store_true",
                  help=f"also write {OUT}, the README table's source")
  args = ap.parse_args(argv)
  if args.quick and args.summary:
    ap.error("--quick never writes the committed summary: drop --summary")
  seeds = [0] if args.quick else [0, 1, 2]
  checkpoints = [30, 100] if args.quick else [100, 1000]
  problems = ["200x50", "digits"] + ([] if args.quick else ["2000x500"])
  machine = {"jax": jax.__version__, "optax": optax.__version__,
             "backend": jax.default_backend(), "cpus": os.cpu_count(),
             "processor": platform.processor(), "loadavg": os.getloadavg()}
  payload = {"benchmark": "exponentiated_gradient", "quick": args.quick,
             "nnls_seeds": len(seeds), "machine": machine, "nnls": [
                 r for p in problems for r in nnls_case(p, seeds, checkpoints)],
             "mlp": mlp_case(seeds, 200 if args.quick else 1000)}
  outs = [args.out or _timing.raw_path("exponentiated_gradient", args.quick)]
  for out in outs + ([OUT] if args.summary else []):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(payload, f, indent=1)
  print(readme_table(payload))
  return 0


if __name__ == "__main__":
  sys.exit(main())
