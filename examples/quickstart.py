"""Quickstart: a non-negative-weight MLP on scikit-learn's digits, six ways.

Trains the same small MLP (64 -> 64 -> 10, relu) with cross-entropy, full
batch (``--batch-size`` for minibatches), from the same seed, six ways:

  * ``adam``:          plain ``optax.adam``, free weights (the reference);
  * ``adam+project``:  ``optax.adam`` followed by
    ``posconstr.project_nonneg(mask="*/kernel")`` as the *last* link of the
    chain: every kernel is >= 0 after every step, and weights can sit
    exactly on the bound 0 (biases are free);
  * ``adam+softplus``: the kernels are ``softplus(latent)`` through
    ``posconstr.linen.Reparameterized(nn.Dense(...), kernel=Softplus())``;
    ``params`` hold the latents and plain ``optax.adam`` trains them. The
    applied weights are > 0 always, never exactly 0;
  * ``adam+softplus+revive``: the same, with the optimizer wrapped in
    ``posconstr.revive_dead(optax.adam(lr), rules)``: a latent that is dead
    (softplus' < 1e-3) while its gradient asks for a larger weight, for 100
    consecutive steps, is moved to the latent of 0.01;
  * ``adam+relu``: the kernels are ``relu(latent)`` (``posconstr.ReLU``),
    whose latents below 0 get no gradient at all and stay dead;
  * ``adam+relu+revive``: the same with ``revive_dead(..., probe=True)``:
    with no gradient there is no sign to read, so every latent dead for 100
    steps is moved to 0.01, and those the loss wants at 0 die again.

It prints a markdown table (test accuracy, final training loss, smallest
applied kernel weight, the share of kernel weights exactly on the bound
(projection) or *dead*, i.e. whose latent has a derivative below 1e-3
(reparameterization, ``posconstr.dead_fraction``), and how many latents
``revive_dead`` moved) and saves a figure with the loss curves and histograms
of the applied kernel weights.

Run it with::

  python examples/quickstart.py               # 1000 steps, out/quickstart.png
  python examples/quickstart.py --steps 200 --out /tmp/qs

The dataset ships with scikit-learn (no download). To compare another way of
training, add a :class:`Variant` to :func:`make_variants`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import posconstr  # noqa: E402

DEFAULT_STEPS = 1000
LEARNING_RATE = 3e-3
KERNEL_PATTERN = "*/kernel"
DEAD_TOL = 1e-3  # posconstr.dead_fraction's default: softplus'(z) < 1e-3.
PATIENCE = 100  # revive_dead: consecutive stalled steps before a revival.


class ReLUKernelMLP(_common.MLP):
  """``_common.MLP`` whose kernels are ``relu(latent)``."""

  def _dense(self, features: int, name: str) -> nn.Module:
    return posconstr.linen.Reparameterized(
        nn.Dense(features), kernel=posconstr.ReLU(), name=name)


# -------------------------------------------------------------- variants ----

@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of training: a row of the table.

  Attributes:
    name: the row's label in the table and the figure.
    model: a flax.linen module mapping (batch, 64) inputs to 10 logits.
    optimizer: an Optax transformation. A projection must be its last link.
    rules: ``{pattern: parameterization}`` when ``params`` hold latents
      (the applied weights are ``posconstr.reparam(params, rules)``), else
      None.
    projected: whether the optimizer projects the kernels onto ``>= 0``.
  """
  name: str
  model: nn.Module
  optimizer: optax.GradientTransformation
  rules: Optional[Dict[str, posconstr.Parameterization]] = None
  projected: bool = False


def make_variants(learning_rate: float = LEARNING_RATE) -> List[Variant]:
  """The compared variants. Append here to add one (same data, same seed)."""
  softplus = {KERNEL_PATTERN: posconstr.Softplus()}
  relu = {KERNEL_PATTERN: posconstr.ReLU()}
  return [
      Variant("adam", _common.MLP(), optax.adam(learning_rate)),
      # posconstr.chain is optax.chain that refuses, at init, a projection
      # that is not the last link.
      Variant("adam+project", _common.MLP(),
              posconstr.chain(optax.adam(learning_rate),
                              posconstr.project_nonneg(mask=KERNEL_PATTERN)),
              projected=True),
      Variant("adam+softplus", _common.MLP(kernels="softplus"),
              optax.adam(learning_rate),
              rules={KERNEL_PATTERN: posconstr.Softplus()}),
      # revive_dead wraps the optimizer of the latents, as projected does.
      Variant("adam+softplus+revive", _common.MLP(kernels="softplus"),
              posconstr.revive_dead(optax.adam(learning_rate), softplus,
                                    patience=PATIENCE),
              rules=softplus),
      Variant("adam+relu", ReLUKernelMLP(), optax.adam(learning_rate),
              rules=relu),
      Variant("adam+relu+revive", ReLUKernelMLP(),
              posconstr.revive_dead(optax.adam(learning_rate), relu,
                                    patience=PATIENCE, probe=True),
              rules=relu),
  ]


# -------------------------------------------------------------- training ----

def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    data: Dict[str, jax.Array], key: jax.Array,
                    batch_size: Optional[int] = None):
  """A jitted step ``((params, opt_state), i) -> (params, opt_state), loss``.

  Full batch when ``batch_size`` is None (or not smaller than the training
  set); else minibatch ``i`` is drawn without replacement from
  ``fold_in(key, i)``.
  """
  x_train, y_train = data["x_train"], data["y_train"]
  n = x_train.shape[0]
  full_batch = batch_size is None or batch_size >= n

  @jax.jit
  def step(carry, i):
    params, opt_state = carry
    x, y = x_train, y_train
    if not full_batch:
      idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch_size,),
                              replace=False)
      x, y = x_train[idx], y_train[idx]
    loss, grads = jax.value_and_grad(
        lambda p: _common.cross_entropy(model, p, x, y))(params)
    # `params` is required: the projection turns u into P(p + u) - p.
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def train_variant(variant: Variant, data: Dict[str, jax.Array], steps: int,
                  key: jax.Array, batch_size: Optional[int] = None,
                  progress: bool = True) -> Dict[str, Any]:
  """Trains one variant from ``key``; returns its metrics and curves."""
  init_key, data_key = jax.random.split(key)
  params = _common.init_params(variant.model, init_key, data["x_train"][:1])
  step = make_train_step(variant.model, variant.optimizer, data, data_key,
                         batch_size)
  (params, opt_state), losses, seconds = _common.run_steps(
      step, (params, variant.optimizer.init(params)), steps,
      desc=f"{variant.name:>20}", show=progress)

  accuracy, train_loss = _common.evaluate(variant.model, params, data)
  return {
      "test_accuracy": float(accuracy),
      "final_train_loss": float(train_loss),
      **_common.kernel_stats(params, KERNEL_PATTERN, variant.rules,
                             variant.projected, DEAD_TOL),
      # Latents that revive_dead moved (None without it).
      "revivals": (int(opt_state.revivals)
                   if isinstance(opt_state, posconstr.ReviveState) else None),
      "losses": losses,
      "train_seconds": seconds,
      "params": params,
  }


# --------------------------------------------------------------- reports ----

def summary_table(results: Dict[str, Dict[str, Any]]) -> str:
  """A markdown table, one row per variant."""
  rows = []
  for name, r in results.items():
    rows.append([name, f"{r['test_accuracy']:.4f}",
                 f"{r['final_train_loss']:.4f}", f"{r['min_kernel']:.3g}",
                 _common.share_text(r),
                 "-" if r["revivals"] is None else str(r["revivals"]),
                 f"{r['train_seconds']:.1f}"])
  return _common.markdown_table(
      ["variant", "test accuracy", "final train loss",
       "min applied kernel weight", "kernel weights on bound / dead",
       "latents revived", "train s"], rows)


def save_figure(results: Dict[str, Dict[str, Any]], out_dir: str) -> str:
  """Loss curves (left), then one applied-kernel histogram per variant, in
  two rows."""
  n = len(results)
  rows = 2 if n > 3 else 1
  cols = -(-n // rows)  # ceil
  fig = plt.figure(figsize=(3.9 * (cols + 1), 3.3 * rows),
                   constrained_layout=True)
  grid = fig.add_gridspec(rows, cols + 1)
  ax = fig.add_subplot(grid[:, 0])
  for name, r in results.items():
    ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], lw=1.5,
            label=name)
  ax.set_yscale("log")
  ax.set_xlabel("Adam step")
  ax.set_ylabel("training cross-entropy")
  ax.set_title("Training loss")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")

  lo = min(r["kernels"].min() for r in results.values())
  hi = max(r["kernels"].max() for r in results.values())
  bins = np.linspace(lo, max(hi, lo + 1e-6), 61)  # Shared, never empty.
  for i, (name, r) in enumerate(results.items()):
    ax = fig.add_subplot(grid[i // cols, 1 + i % cols])
    ax.hist(r["kernels"], bins=bins, color="tab:gray")
    ax.axvline(0.0, color="tab:red", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("applied kernel weight (both layers)")
    if i % cols == 0:
      ax.set_ylabel("count")
    ax.set_title(f"{name}: min {r['min_kernel']:.2g}, {_common.share_text(r)}",
                 fontsize=9)
    ax.grid(alpha=0.3)
  return _common.save_figure(fig, out_dir, "quickstart.png")


# ------------------------------------------------------------------ main ----

def parse_args(argv: Optional[Sequence[str]] = None):
  parser = _common.parser(__doc__, "quickstart.png", DEFAULT_STEPS,
                          lr=LEARNING_RATE)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="minibatch size (default: full batch)")
  args = _common.parse(parser, argv)
  if args.batch_size is not None and args.batch_size < 1:
    parser.error("--batch-size must be >= 1")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"variants": {name: metrics}, "figure"}``.

  Each variant's metrics: ``test_accuracy``, ``final_train_loss`` (full
  training set, after the last step), ``min_kernel`` (smallest applied
  kernel weight), ``bound_or_dead`` (share exactly 0 for the projection,
  share dead for the reparameterization, None for free weights) and its
  ``kind``, ``revivals`` (latents ``revive_dead`` moved, None without it),
  ``losses`` (per step), ``kernels`` (applied, flattened),
  ``train_seconds`` and the trained ``params`` (latents for a
  reparameterization).
  """
  args = parse_args(argv)
  data = _common.load_digits(args.seed)
  key = jax.random.key(args.seed)
  results = {}
  for variant in make_variants(args.lr):
    # Same key for every variant: same init draw and minibatch sequence.
    results[variant.name] = train_variant(
        variant, data, args.steps, key, batch_size=args.batch_size,
        progress=not args.no_progress)
  figure = save_figure(results, args.out)
  _common.report(summary_table(results), figure,
                 f"dead: softplus'(latent) < {DEAD_TOL:g} (the applied "
                 "weight still moves, but ~1000x slower than a live one), "
                 "relu: latent <= 0 (no gradient at all). latents revived: "
                 "moves by posconstr.revive_dead over the whole run "
                 f"(patience {PATIENCE}), counted once per move.")
  return {"variants": results, "figure": figure}


if __name__ == "__main__":
  main()
