"""Quickstart: a non-negative-weight MLP on scikit-learn's digits.

Trains the same small MLP (64 -> 64 -> 10, relu) with cross-entropy, full
batch (``--batch-size`` for minibatches), from the same init, two ways:

  * ``adam``:        plain ``optax.adam`` (the unconstrained reference);
  * ``adam+nonneg``: ``optax.adam`` followed by
    ``posconstr.project_nonneg(mask="*/kernel")`` as the *last* link of the
    chain, so every kernel stays >= 0 after every step (biases are free).

It prints a markdown table (test accuracy, final training loss, smallest
kernel weight, share of kernel weights exactly on the bound 0) and saves a
figure with the loss curves and kernel-weight histograms.

Run it with::

  python examples/quickstart.py               # 1000 steps, out/quickstart.png
  python examples/quickstart.py --steps 200 --out /tmp/qs

The dataset ships with scikit-learn (no download). To compare another way of
training, add a :class:`Variant` to :func:`make_variants`: a name, a model, an
optimizer and, for a reparameterized model whose ``params`` hold latents, the
map from ``params`` to the weights the model actually applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # Headless: write the figure to a file, never a window.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import model_selection  # noqa: E402
from sklearn import preprocessing  # noqa: E402
from tqdm import tqdm  # noqa: E402

import posconstr  # noqa: E402

DEFAULT_STEPS = 1000
BATCH_SIZE = None  # Full batch; an int trains on random minibatches.
LEARNING_RATE = 3e-3
HIDDEN = 64
NUM_CLASSES = 10
KERNEL_PATTERN = "*/kernel"


# ----------------------------------------------------------------- data ----

def load_data(seed: int) -> Dict[str, jax.Array]:
  """Digits (8x8 images, 64 features), standardized on a fixed 75/25 split."""
  x, y = datasets.load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x.astype(np.float32), y, test_size=0.25, random_state=seed, stratify=y)
  scaler = preprocessing.StandardScaler().fit(x_train)  # Train stats only.
  return {
      "x_train": jnp.asarray(scaler.transform(x_train), jnp.float32),
      "y_train": jnp.asarray(y_train, jnp.int32),
      "x_test": jnp.asarray(scaler.transform(x_test), jnp.float32),
      "y_test": jnp.asarray(y_test, jnp.int32),
  }


# -------------------------------------------------------------- variants ----

class MLP(nn.Module):
  """64 -> ``hidden`` (relu) -> ``num_classes`` logits."""
  hidden: int = HIDDEN
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


def _identity(params):
  return params


@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of training: what the script compares, row by row.

  Attributes:
    name: the row's label in the table and the figure.
    model: a flax.linen module mapping (batch, 64) inputs to 10 logits.
    optimizer: an Optax transformation. A projection must be its last link.
    applied_params: maps the trained ``params`` to the parameters the model
      actually applies; the identity unless ``params`` hold latents (e.g. a
      softplus reparameterization: ``lambda p: posconstr.reparam(p, rules)``).
      The kernel statistics are computed on its output.
  """
  name: str
  model: nn.Module
  optimizer: optax.GradientTransformation
  applied_params: Callable[[Any], Any] = _identity


def make_variants(learning_rate: float = LEARNING_RATE) -> List[Variant]:
  """The compared variants. Append here to add one (same data, same seed)."""
  return [
      Variant("adam", MLP(), optax.adam(learning_rate)),
      Variant(
          "adam+nonneg",
          MLP(),
          # posconstr.chain is optax.chain that refuses, at init, a projection
          # that is not the last link.
          posconstr.chain(optax.adam(learning_rate),
                          posconstr.project_nonneg(mask=KERNEL_PATTERN))),
  ]


# -------------------------------------------------------------- training ----

def _loss(model, params, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    x_train: jax.Array, y_train: jax.Array,
                    batch_size: Optional[int] = None):
  """A jitted optimizer step: ``step(params, opt_state, key, i)``.

  Full-batch when ``batch_size`` is None (or not smaller than the training
  set); else minibatch ``i`` is drawn, without replacement, from
  ``fold_in(key, i)``.
  """
  n = x_train.shape[0]
  full_batch = batch_size is None or batch_size >= n

  @jax.jit
  def step(params, opt_state, key, i):
    if full_batch:
      x, y = x_train, y_train
    else:
      idx = jax.random.choice(jax.random.fold_in(key, i), n, (batch_size,),
                              replace=False)
      x, y = x_train[idx], y_train[idx]
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x, y))(params)
    # `params` is required: the projection turns u into P(p + u) - p.
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: nn.Module, key: jax.Array, x: jax.Array):
  """``model``'s initial params (compiled once per distinct model)."""
  return model.init(key, x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model: nn.Module, params, data: Dict[str, jax.Array]):
  """(test accuracy, training loss on the whole training set)."""
  logits = model.apply({"params": params}, data["x_test"])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == data["y_test"])
  return accuracy, _loss(model, params, data["x_train"], data["y_train"])


def kernel_leaves(params, pattern: str = KERNEL_PATTERN) -> List[jax.Array]:
  """The leaves whose ``/``-joined path matches ``pattern`` (as the mask)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [leaf for path, leaf in flat
          if fnmatch.fnmatchcase(
              "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                       for k in path), pattern)]


def train_variant(variant: Variant, data: Dict[str, jax.Array], steps: int,
                  key: jax.Array, batch_size: Optional[int] = BATCH_SIZE,
                  progress: bool = True) -> Dict[str, Any]:
  """Trains one variant from ``key``; returns its metrics and curves."""
  init_key, data_key = jax.random.split(key)
  params = init_params(variant.model, init_key, data["x_train"][:1])
  opt_state = variant.optimizer.init(params)
  step = make_train_step(variant.model, variant.optimizer, data["x_train"],
                         data["y_train"], batch_size)

  losses = []
  start = time.perf_counter()
  bar = tqdm(range(steps), desc=f"{variant.name:>12}", disable=not progress,
             leave=True, dynamic_ncols=True)
  for i in bar:
    params, opt_state, loss = step(params, opt_state, data_key, i)
    losses.append(loss)
    if i % 100 == 0 or i == steps - 1:
      bar.set_postfix(loss=f"{float(loss):.4f}")
  losses = np.asarray(jax.device_get(losses), np.float64)
  train_seconds = time.perf_counter() - start

  accuracy, train_loss = evaluate(variant.model, params, data)
  kernels = np.concatenate([np.ravel(k) for k in kernel_leaves(
      variant.applied_params(params))])
  return {
      "test_accuracy": float(accuracy),
      "final_train_loss": float(train_loss),
      "min_kernel": float(kernels.min()),
      "frac_at_bound": float(np.mean(kernels == 0.0)),
      "losses": losses,
      "kernels": kernels,
      "train_seconds": train_seconds,
      "params": params,
  }


# --------------------------------------------------------------- reports ----

def summary_table(results: Dict[str, Dict[str, Any]]) -> str:
  """A markdown table, one row per variant."""
  lines = [
      "| variant | test accuracy | final train loss | min kernel weight "
      "| kernel weights == 0 |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    lines.append(
        f"| {name} | {r['test_accuracy']:.4f} | {r['final_train_loss']:.4f} "
        f"| {r['min_kernel']:.3g} | {100 * r['frac_at_bound']:.1f}% |")
  return "\n".join(lines)


def save_figure(results: Dict[str, Dict[str, Any]], path: str) -> str:
  """Loss curves (left), then one kernel-weight histogram per variant."""
  n = len(results)
  fig, axes = plt.subplots(1, n + 1, figsize=(4.6 * (n + 1), 3.8),
                           constrained_layout=True)
  ax = axes[0]
  for name, r in results.items():
    ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], lw=1.5,
            label=name)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training cross-entropy")
  ax.set_title("Training loss")
  ax.legend()
  ax.grid(alpha=0.3, which="both")

  lo = min(r["kernels"].min() for r in results.values())
  hi = max(r["kernels"].max() for r in results.values())
  hi = max(hi, lo + 1e-6)  # One shared range, never empty.
  bins = np.linspace(lo, hi, 61)
  for ax, (name, r) in zip(axes[1:], results.items()):
    ax.hist(r["kernels"], bins=bins, color="tab:gray")
    ax.axvline(0.0, color="tab:red", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("kernel weight (all layers)")
    ax.set_ylabel("count")
    ax.set_title(f"{name}: min {r['min_kernel']:.3g}, "
                 f"{100 * r['frac_at_bound']:.0f}% at 0")
    ax.grid(alpha=0.3)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ------------------------------------------------------------------ main ----

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                      help="optimizer steps per variant (default %(default)s)")
  parser.add_argument("--out", default="out",
                      help="folder for quickstart.png (default %(default)s/)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the split, init and minibatches")
  parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                      help="minibatch size (default: full batch)")
  parser.add_argument("--lr", type=float, default=LEARNING_RATE)
  parser.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error("--batch-size must be >= 1")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"variants": {name: metrics}, "figure"}``.

  Each variant's metrics: ``test_accuracy``, ``final_train_loss`` (full
  training set, after the last step), ``min_kernel`` and ``frac_at_bound``
  (over the applied kernels of all layers), ``losses`` (per step),
  ``kernels`` (flattened), ``train_seconds`` and the trained ``params``.
  """
  args = parse_args(argv)
  data = load_data(args.seed)
  key = jax.random.key(args.seed)
  results = {}
  for variant in make_variants(args.lr):
    # Same key for every variant: same init and same minibatch sequence.
    results[variant.name] = train_variant(
        variant, data, args.steps, key, batch_size=args.batch_size,
        progress=not args.no_progress)
  print()
  print(summary_table(results))
  figure = save_figure(results, os.path.join(args.out, "quickstart.png"))
  print(f"\nSaved figure: {figure}")
  return {"variants": results, "figure": figure}


if __name__ == "__main__":
  main()
