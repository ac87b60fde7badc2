"""A non-negative coding layer, trained end to end through posconstr.nnls.

Each digit image ``b`` (64 pixels in [0, 1]) is encoded by its non-negative
least-squares code ``h(D, b) = argmin_{h >= 0} ||D h - b||^2`` over a
dictionary ``D`` (64 x ``--atoms``, non-negative columns of unit norm), and
a linear classifier reads the codes. ``posconstr.nnls`` solves all images of
a batch in one call (they share ``D``), and is differentiable: ``jax.grad``
of the classification loss reaches ``D`` through the solver, by the
implicit function theorem on each code's free set. Two dictionaries, from
the same start:

  * ``nmf (fixed)``: scikit-learn's NMF of the training images; only the
    classifier is trained on its codes;
  * ``task-driven``: the same NMF dictionary as a start, then trained with
    the classifier (Mairal, Bach & Ponce, "Task-driven dictionary learning",
    IEEE TPAMI 34(4), 2012; the layer is an OptNet layer, Amos & Kolter,
    ICML 2017). ``D = softplus(Z)`` with unit-norm columns keeps it
    non-negative and fixes the scale between ``D`` and the codes.

It prints a table (test accuracy, training loss, reconstruction error, code
sparsity) and saves a figure: loss and test accuracy against steps, and the
atoms before and after. Run it with::

  python examples/coding_layer.py                  # out/coding_layer.png
  python examples/coding_layer.py --atoms 16 --steps 200
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import decomposition  # noqa: E402
from sklearn import model_selection  # noqa: E402

import posconstr  # noqa: E402

SOFTPLUS = posconstr.Softplus()


def load(seed: int) -> Dict[str, jax.Array]:
  """Digits as pixels in [0, 1] (non-negative), the usual 75/25 split."""
  x, y = datasets.load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
  return {"x_train": jnp.asarray(x_train, jnp.float32),
          "y_train": jnp.asarray(y_train, jnp.int32),
          "x_test": jnp.asarray(x_test, jnp.float32),
          "y_test": jnp.asarray(y_test, jnp.int32)}


def nmf_dictionary(x_train, atoms: int, seed: int) -> np.ndarray:
  """64 x atoms, unit-norm columns: NMF's parts of the training images."""
  model = decomposition.NMF(atoms, init="nndsvda", max_iter=500,
                            random_state=seed)
  model.fit(np.asarray(x_train))
  parts = model.components_.T + 1e-3  # no exact zeros: softplus's range
  return (parts / np.linalg.norm(parts, axis=0)).astype(np.float32)


def dictionary(z):
  """The applied dictionary: softplus of the latent, columns of unit norm."""
  d = SOFTPLUS.forward(z)
  return d / jnp.linalg.norm(d, axis=0)


def codes(d, x):
  """NNLS codes of the rows of ``x`` (one right-hand side per image)."""
  return posconstr.nnls(d, x.T).x.T


def loss_fn(params, x, y, l2: float):
  h = codes(dictionary(params["z"]), x)
  logits = h @ params["w"] + params["c"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return ce + l2 * jnp.sum(params["w"] ** 2)


def train(data, d0: np.ndarray, learn_dictionary: bool, steps: int,
          lr: float, l2: float, seed: int, show: bool):
  key = jax.random.key(seed)
  params = {"z": SOFTPLUS.inverse(jnp.asarray(d0)),
            "w": 0.01 * jax.random.normal(key, (d0.shape[1], 10)),
            "c": jnp.zeros(10)}
  # The fixed dictionary: a zero learning rate on its latent.
  tx = optax.multi_transform(
      {"learned": optax.adam(lr),
       "fixed": optax.set_to_zero()},
      {"z": "learned" if learn_dictionary else "fixed", "w": "learned",
       "c": "learned"})
  value_and_grad = jax.value_and_grad(loss_fn)

  @jax.jit
  def step(carry, _):
    params, state = carry
    loss, grads = value_and_grad(params, data["x_train"], data["y_train"], l2)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (loss, accuracy(params, data["x_test"],
                                            data["y_test"]))

  name = "task-driven" if learn_dictionary else "nmf (fixed)"
  (params, _), history, seconds = _common.run_steps(
      step, (params, tx.init(params)), steps, desc=f"{name:>12}", show=show,
      every=20)
  return name, params, history, seconds


@jax.jit
def accuracy(params, x, y):
  h = codes(dictionary(params["z"]), x)
  return jnp.mean(jnp.argmax(h @ params["w"] + params["c"], -1) == y)


@jax.jit
def code_stats(params, x):
  """Relative reconstruction error and the share of exactly-zero codes."""
  d = dictionary(params["z"])
  h = codes(d, x)
  error = jnp.linalg.norm(h @ d.T - x) / jnp.linalg.norm(x)
  return error, jnp.mean(h == 0)


def save_figure(runs: Dict[str, Any], d0: np.ndarray, out_dir: str) -> str:
  fig = plt.figure(figsize=(11, 5.5))
  grid = fig.add_gridspec(2, 3)
  ax_loss, ax_acc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
  for name, run in runs.items():
    ax_loss.plot(run["history"][:, 0], label=name)
    ax_acc.plot(run["history"][:, 1], label=name)
  ax_loss.set(ylabel="training loss", yscale="log",
              title="classifier on NNLS codes")
  ax_acc.set(xlabel="step", ylabel="test accuracy")
  ax_loss.legend()
  for col, (title, d) in enumerate(
      [("atoms: NMF (start)", d0),
       ("atoms: task-driven", runs["task-driven"]["dictionary"])], start=1):
    ax = fig.add_subplot(grid[:, col])
    atoms = d.shape[1]
    per_row = int(np.ceil(np.sqrt(atoms)))
    tiles = np.ones((per_row * 9, per_row * 9)) * np.nan
    for i in range(atoms):
      r, c = divmod(i, per_row)
      tiles[r * 9:r * 9 + 8, c * 9:c * 9 + 8] = d[:, i].reshape(8, 8)
    ax.imshow(tiles, cmap="gray_r")
    ax.set(title=title, xticks=[], yticks=[])
  fig.tight_layout()
  return _common.save_figure(fig, out_dir, "coding_layer.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  parser = _common.parser(__doc__, "coding_layer.png", steps=150, lr=0.03,
                          l2=1e-4)
  parser.add_argument("--atoms", type=int, default=16,
                      help="columns of the dictionary (default %(default)s)")
  args = _common.parse(parser, argv, positive=("steps", "atoms"))
  data = load(args.seed)
  d0 = nmf_dictionary(data["x_train"], args.atoms, args.seed)
  runs, rows = {}, []
  for learn in (False, True):
    name, params, history, seconds = train(
        data, d0, learn, args.steps, args.lr, args.l2, args.seed,
        not args.no_progress)
    error, zeros = code_stats(params, data["x_test"])
    runs[name] = {"history": history, "seconds": seconds,
                  "test_accuracy": float(history[-1, 1]),
                  "train_loss": float(history[-1, 0]),
                  "reconstruction_error": float(error),
                  "zero_codes": float(zeros),
                  "dictionary": np.asarray(dictionary(params["z"]))}
    rows.append([name, f"{runs[name]['test_accuracy']:.4f}",
                 f"{runs[name]['train_loss']:.4f}", f"{float(error):.3f}",
                 _common.percent(float(zeros)), f"{seconds:.1f}"])
  table = _common.markdown_table(
      ["dictionary", "test accuracy", "train loss", "test reconstruction "
       "error", "codes exactly 0", "seconds"], rows)
  figure = save_figure(runs, d0, args.out)
  _common.report(table, figure, f"{args.atoms} atoms, {args.steps} full-batch "
                 f"Adam steps (lr {args.lr}); codes by posconstr.nnls, "
                 "gradients through it by implicit differentiation.")
  return {"runs": runs, "figure": figure}


if __name__ == "__main__":
  main()
