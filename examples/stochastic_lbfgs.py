"""Stochastic (mini-batch) L-BFGS with bounds: does it still work?

Two problems on scikit-learn's digits, each with non-negative weights:

  * ``mlp``:  the 64-32-10 MLP of ``lbfgs_network.py`` (relu, both kernels
    >= 0, cross-entropy + 1e-3 * squared kernels);
  * ``icnn``: the depth-3 ``posconstr.linen.ICNN`` classifier of
    ``icnn.py`` (``logits = -E(x)``, the ``Wz`` kernels >= 0).

Six ways of training them from the same applied weights, for the same
budget of examples (mini-batches of 128):

  * ``minibatch-lbfgsb``: ``posconstr.lbfgsb`` with its line search on the
    current batch: a new batch every step, whose value and gradient restart
    the search with the curvature memory kept. The pair
    ``y = g_{B_k}(x_{k+1}) - g_{B_k}(x_k)`` sees one batch (the search
    evaluates it at the new point);
  * ``naive-lbfgsb``: ``posconstr.lbfgsb(learning_rate=--lr)``, a fixed
    projected two-metric step; the gradient at the new point comes from the
    next batch, so the pair ``y = g_{B_{k+1}}(x_{k+1}) - g_{B_k}(x_k)``
    mixes two batches;
  * ``multibatch-lbfgsb``: the same fixed step with the multi-batch pairs
    of Berahas, Nocedal & Takac ("A Multi-Batch L-BFGS Method for Machine
    Learning", NeurIPS 2016): consecutive batches ``S_k``, ``S_{k+1}``
    share 32 examples ``O_k``; the step uses ``g_{S_k}(x_k)``, the pair
    ``y = g_{O_k}(x_{k+1}) - g_{O_k}(x_k)``, given to ``lbfgsb`` as
    ``overlap_grads`` (pairs with ``s^T y <= eps ||s||^2`` are skipped,
    ``--overlap-eps``, 1e-2).
    The overlap gradients are parts of the batch gradients: no extra
    evaluation;
  * ``fullbatch-lbfgsb``: ``posconstr.lbfgsb`` with its line search on the
    whole training set (one epoch per evaluation);
  * ``adam+projected``: ``posconstr.projected(optax.adam(3e-3),
    NonNegative)`` on the same mini-batches;
  * ``lbfgs+softplus``: ``optax.lbfgs`` (zoom line search on the current
    batch, pairs across batches) on softplus latents of the kernels.

The x axis is fair: an *epoch* is as many examples as the training set has,
counted over every value and gradient a method evaluates (its line-search
trials and, for the multi-batch method, the overlap, which is evaluated
once per batch it belongs to). The training loss (whole training set) and
the test accuracy are evaluated outside the timed loop; wall times exclude
compilation. Three seeds (the initialization and the batch order; the
split is fixed): the figure shows the median and the min-max band.

Run it with::

  python examples/stochastic_lbfgs.py                   # 40 epochs
  python examples/stochastic_lbfgs.py --lr 0.03 --variants naive-lbfgsb \\
      multibatch-lbfgsb                                 # another step
  python examples/stochastic_lbfgs.py --steps 2 --seeds 1 --out /tmp/s
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import icnn as icnn_example  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lbfgs_network  # noqa: E402  pylint: disable=g-import-not-at-top
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import posconstr  # noqa: E402

DEFAULT_EPOCHS = 40
BATCH = 128
OVERLAP = 32  # |O_k|: a quarter of each batch is shared with the next.
LBFGSB_LR = 0.1  # The fixed step of both mini-batch lbfgsb variants.
ADAM_LR = 3e-3
EVALS_PER_EPOCH = 4  # Points on the curves.
# Noisy gradients never meet the stall test: it would stop the iteration.
NEVER = 2 ** 30
VARIANTS = ("minibatch-lbfgsb", "naive-lbfgsb", "multibatch-lbfgsb",
            "fullbatch-lbfgsb", "adam+projected", "lbfgs+softplus")
SEARCH = "minibatch-lbfgsb"  # The line search on each batch.
PROBLEMS = ("mlp", "icnn")
SOFTPLUS = posconstr.Softplus()


def notes(seeds: int) -> str:
  """What the table's columns mean."""
  return ("diverged: seeds whose final training loss is not finite or above "
          "the initial one. Epochs count every example a method's value and "
          "gradient evaluations touched (line searches and overlaps "
          "included); wall s excludes compilation and the evaluation of the "
          "curves; min constrained weight is over every iterate (>= 0: "
          "feasible throughout; nan: the weights became NaN). Median "
          f"[min-max] over {seeds} seeds.")


# --------------------------------------------------------------- problems ----

def setup(problem: str, key: jax.Array, data) -> Dict[str, Any]:
  """The two models (weights; softplus latents), their starts (the same
  applied weights), the bounds (0 on the constrained kernels, None
  elsewhere) and the loss's ``l2`` and sign of the logits."""
  x0 = data["x_train"][:1]
  if problem == "mlp":
    latent_model = _common.MLP(lbfgs_network.HIDDEN, kernels="softplus")
    model = _common.MLP(lbfgs_network.HIDDEN, kernels="free")
    latents = _common.init_params(latent_model, key, x0)
    start = jax.jit(lambda p: posconstr.reparam(p, lbfgs_network.RULES))(
        latents)
    lower = lbfgs_network.kernel_bounds(start)
    l2, sign = lbfgs_network.L2, 1.0
  else:  # The softplus ICNN stores the inverse of the same applied draws.
    model = icnn_example.make_model(3, positivity="project")
    latent_model = icnn_example.make_model(3, positivity=SOFTPLUS)
    start = model.init(key, x0)["params"]
    latents = latent_model.init(key, x0)["params"]
    paths = set(model.constrained_paths())
    lower = jax.tree_util.tree_map_with_path(
        lambda p, _: 0.0 if _common.path_of(p) in paths else None, start)
    l2, sign = 0.0, -1.0  # logits = -E(x)
  return {"model": model, "latent_model": latent_model, "start": start,
          "latents": latents, "lower": lower, "l2": l2, "sign": sign}


def _constrained(params, lower):
  return [p for p, b in zip(jax.tree.leaves(params), jax.tree.leaves(
      lower, is_leaf=lambda v: v is None)) if b is not None]


def make_loss(model, lower, l2: float, sign: float):
  """``(params, x, y) -> mean cross-entropy + l2 * sum(constrained ** 2)``.

  ``params`` are the weights, or latents when ``model`` is the softplus one
  (then its ``applied_kernels`` or the softplus give the weights).
  """

  def loss(params, x, y):
    logits = sign * model.apply({"params": params}, x)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    if l2:
      applied = params
      if getattr(model, "kernels", "free") == "softplus":
        applied = posconstr.reparam(params, lbfgs_network.RULES)
      value += l2 * sum(jnp.sum(k ** 2) for k in _constrained(applied, lower))
    return value

  return loss


def applied_min(model, params, lower) -> jax.Array:
  """The smallest constrained weight, as the model applies it."""
  if hasattr(model, "applied_kernels"):  # ICNN: z kernels.
    kernels = model.apply({"params": params}, method="applied_kernels")
    return jnp.min(jnp.stack([k.min() for n, k in kernels.items()
                              if n[0] == "z"]))
  if getattr(model, "kernels", "free") == "softplus":
    params = posconstr.reparam(params, lbfgs_network.RULES)
  return jnp.min(jnp.stack([k.min() for k in _constrained(params, lower)]))


# ------------------------------------------------------------------ steps ----

def batch_stream(key: jax.Array, n: int, length: int) -> np.ndarray:
  """Indices: one permutation of the ``n`` examples per epoch, chained."""
  epochs = -(-length // n)
  return np.concatenate([np.asarray(jax.random.permutation(
      jax.random.fold_in(key, e), n)) for e in range(epochs)])[:length]


def optimizers(lower, lr: float = LBFGSB_LR, overlap_eps: float = 1e-2
               ) -> Dict[str, optax.GradientTransformation]:
  """One optimizer per variant (the two fixed-step lbfgsb share one)."""
  mask = jax.tree.map(lambda b: b is not None, lower,
                      is_leaf=lambda v: v is None)
  fixed = posconstr.lbfgsb(lr, lower=lower, stall_iters=NEVER,
                           min_overlap_curvature=overlap_eps)
  return {"naive-lbfgsb": fixed, "multibatch-lbfgsb": fixed,
          "fullbatch-lbfgsb": posconstr.lbfgsb(lower=lower),
          "adam+projected": posconstr.projected(
              optax.adam(ADAM_LR), posconstr.NonNegative(), mask=mask),
          "lbfgs+softplus": optax.lbfgs(),
          SEARCH: posconstr.lbfgsb(lower=lower, stall_iters=NEVER)}


def make_step(variant: str, loss, opt, min_weight):
  """A jitted step on batch ``idx``: ``carry -> carry, (examples, min)``.

  ``carry``: params, optimizer state, and for the multi-batch method the
  overlap gradient at the previous point. ``min``: the smallest constrained
  weight of the new iterate.
  """

  @jax.jit
  def step(carry, data, idx):
    params, state, tail_grad = carry
    x, y = data["x_train"], data["y_train"]
    if variant == "fullbatch-lbfgsb":
      fun = lambda p: loss(p, x, y)  # noqa: E731
      fresh = jnp.isinf(state.value).astype(jnp.int32)
      value, grad = optax.value_and_grad_from_state(fun)(params, state=state)
      updates, state = opt.update(grad, state, params, value=value,
                                  grad=grad, value_fn=fun)
      evals = (fresh + state.info.num_fun_evals) * x.shape[0]
    elif variant == "multibatch-lbfgsb":
      # S_k = O_{k-1} (head) + middle + O_k (tail): the three gradients
      # are one pass over S_k; the heads' is g_{O_{k-1}}(x_k).
      parts = (idx[:OVERLAP], idx[OVERLAP:-OVERLAP], idx[-OVERLAP:])
      grads = [jax.grad(loss)(params, x[i], y[i]) for i in parts]
      grad = jax.tree.map(lambda *g: sum(len(i) * gi for i, gi in zip(
          parts, g)) / len(idx), *grads)
      updates, state = opt.update(grad, state, params,
                                  overlap_grads=(tail_grad, grads[0]))
      tail_grad, evals = grads[2], len(idx)
    else:
      fun = lambda p: loss(p, x[idx], y[idx])  # noqa: E731
      value, grad = jax.value_and_grad(fun)(params)
      evals = len(idx)
      if variant == "lbfgs+softplus":
        updates, state = opt.update(grad, state, params, value=value,
                                    grad=grad, value_fn=fun)
        evals *= 1 + optax.tree.get(state, "num_linesearch_steps")
      elif variant == SEARCH:  # The pair is on this batch: both gradients.
        updates, state = opt.update(grad, state, params, value=value,
                                    grad=grad, value_fn=fun)
        evals *= 1 + state.info.num_fun_evals
      else:
        updates, state = opt.update(grad, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state, tail_grad), (evals, min_weight(params))

  return step


def make_run(variant: str, problem: Dict[str, Any], opt):
  """``(data, start, key, epochs) -> curves``, compiled once for all seeds."""
  latent = variant == "lbfgs+softplus"
  model = problem["latent_model" if latent else "model"]
  lower, sign = problem["lower"], problem["sign"]
  loss = make_loss(model, lower, problem["l2"], sign)
  min_weight = lambda p: applied_min(model, p, lower)  # noqa: E731
  step = make_step(variant, loss, opt, min_weight)

  @jax.jit
  def assess(params, data):
    """(training loss on the whole set, test accuracy)."""
    logits = sign * model.apply({"params": params}, data["x_test"])
    return (loss(params, data["x_train"], data["y_train"]),
            jnp.mean(jnp.argmax(logits, -1) == data["y_test"]))

  def run(data, params, key, epochs: float) -> Dict[str, Any]:
    state = jax.tree.map(lambda v: jnp.asarray(v, v.dtype), opt.init(params))
    carry = (params, state, jax.tree.map(jnp.zeros_like, params))
    n = data["x_train"].shape[0]
    budget = int(epochs * n)
    advance = BATCH - OVERLAP if variant == "multibatch-lbfgsb" else BATCH
    stream = batch_stream(key, n, budget + BATCH)
    jax.block_until_ready(step(carry, data, jnp.asarray(stream[:BATCH])))
    rows, seen, seconds, k = [], 0, 0.0, 0
    lowest = float(min_weight(params))  # Over every iterate.
    next_eval = 0
    while True:
      if seen >= next_eval or seen >= budget:  # Outside the timed loop.
        f, acc = (float(v) for v in assess(carry[0], data))
        rows.append((seen / n, seconds, f, acc))
        next_eval += n // EVALS_PER_EPOCH
        if seen >= budget:
          break
      begin = time.perf_counter()
      carry, (evals, low) = step(carry, data,
                                 stream[k * advance:k * advance + BATCH])
      evals = int(evals)  # Waits for the step.
      seconds += time.perf_counter() - begin
      lowest = float(np.minimum(lowest, low))  # NaN stays NaN.
      k += 1
      seen = seen + evals if evals else budget  # 0: lbfgsb has stopped.
    curve = np.asarray(rows)
    return {"epochs": curve[:, 0], "seconds": curve[:, 1],
            "loss": curve[:, 2], "accuracy": curve[:, 3], "steps": k,
            "min_weight": lowest, "params": carry[0]}

  return run


# ---------------------------------------------------------------- reports ----

def _spread(values, fmt: str) -> str:
  """``median [min-max]``; NaN (a diverged run) counts as worst, ``inf``."""
  values = np.nan_to_num(np.asarray(values, np.float64), nan=np.inf)
  return (f"{np.median(values):{fmt}} [{values.min():{fmt}}-"
          f"{values.max():{fmt}}]")


def _diverged(run) -> bool:
  """The final training loss is not finite or above the initial one."""
  return not run["loss"][-1] <= run["loss"][0]


def summary_table(results) -> str:
  """One row per (problem, variant): medians [min-max] over the seeds."""
  rows = []
  for (problem, variant), runs in results.items():
    lowest = np.min([r["min_weight"] for r in runs])  # NaN stays NaN.
    rows.append([problem, variant,
                 _spread([r["loss"][-1] for r in runs], ".4g"),
                 sum(_diverged(r) for r in runs),
                 _spread([r["accuracy"][-1] for r in runs], ".4f"),
                 f"{np.median([r['epochs'][-1] for r in runs]):.1f}",
                 int(np.median([r["steps"] for r in runs])),
                 f"{np.median([r['seconds'][-1] for r in runs]):.2f}",
                 f"{lowest:.3g}"])
  return _common.markdown_table(
      ["problem", "method", "final train loss", "diverged", "test accuracy",
       "epochs",
       "steps", "wall s", "min constrained weight"], rows)


def _on_grid(runs, grid):
  """Each seed's curves interpolated at the epochs of ``grid``."""
  return {key: np.stack([np.interp(grid, r["epochs"], r[key]) for r in runs])
          for key in ("seconds", "loss", "accuracy")}


def save_figure(results, out_dir: str) -> str:
  """Rows: problems; columns: loss vs epochs, loss vs time, accuracy.

  Lines: the median over seeds; bands: min to max. The loss axis stops at
  10x the initial loss (diverged runs leave it) and 1e-3 of it.
  """
  problems = list(dict.fromkeys(p for p, _ in results))
  fig, axes = plt.subplots(len(problems), 3, figsize=(13, 3.6 * len(problems)),
                           constrained_layout=True, squeeze=False)
  colors = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()[
      "color"]))
  for row, problem in zip(axes, problems):
    start = max(r["loss"][0] for (p, _), runs in results.items()
                if p == problem for r in runs)
    for (p, variant), runs in results.items():
      if p != problem:
        continue
      grid = np.linspace(0, min(r["epochs"][-1] for r in runs), 161)
      curves = _on_grid(runs, grid)
      for ax, x, key in ((row[0], grid, "loss"),
                         (row[1], np.median(curves["seconds"], 0), "loss"),
                         (row[2], grid, "accuracy")):
        y = curves[key]
        ax.plot(x, np.median(y, 0), color=colors[variant], lw=1.5,
                label=variant)
        ax.fill_between(x, y.min(0), y.max(0), color=colors[variant],
                        alpha=0.2, lw=0)
    row[0].set_ylabel(f"{problem}: training loss")
    row[2].set_ylabel(f"{problem}: test accuracy")
    row[2].set_ylim(0.8, 1.0)
    for ax, label in zip(row, ("epochs (examples evaluated / n)",
                               "wall s (no compile, no evaluation)",
                               "epochs")):
      ax.set_xlabel(label)
      ax.grid(alpha=0.3, which="both")
    for ax in row[:2]:
      ax.set_yscale("log")
      ax.set_ylim(1e-3 * start, 10 * start)
  axes[0, 0].legend(fontsize=8)
  fig.suptitle("Mini-batch L-BFGS with weights >= 0 on digits (median, "
               "min-max band over seeds)", fontsize=11)
  return _common.save_figure(fig, out_dir, "stochastic_lbfgs.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the study; returns ``{"runs": {(problem, variant): [per seed]},
  "figure"}``.

  Each run: ``epochs``, ``seconds``, ``loss`` (whole training set) and
  ``accuracy`` (test) at the checkpoints, ``steps``, ``min_weight`` (the
  smallest constrained weight over every iterate) and the final ``params``.
  """
  parser = _common.parser(__doc__, "stochastic_lbfgs.png", DEFAULT_EPOCHS,
                          "epochs (examples evaluated / training set size)",
                          lr=LBFGSB_LR, lr_help="fixed step of naive- and "
                          "multibatch-lbfgsb",
                          seed_help="first seed of the init and batch order")
  parser.add_argument("--overlap-eps", type=float, default=1e-2,
                      help="min_overlap_curvature: skip overlap pairs with "
                      "s^T y <= eps ||s||^2 (default %(default)s; 0: none)")
  parser.add_argument("--seeds", type=int, default=3,
                      help="number of seeds (default %(default)s)")
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS),
                      choices=PROBLEMS)
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                      choices=VARIANTS)
  args = _common.parse(parser, argv, positive=("steps", "seeds"))
  data = _common.load_digits(0)  # One split; the seeds vary the rest.
  results = {}
  for name in args.problems:
    keys = [jax.random.key(args.seed + i) for i in range(args.seeds)]
    problems = [setup(name, jax.random.fold_in(k, 0), data) for k in keys]
    opts = optimizers(problems[0]["lower"], args.lr, args.overlap_eps)
    for variant in args.variants:
      run = make_run(variant, problems[0], opts[variant])
      results[(name, variant)] = []
      for problem, key in zip(problems, keys):
        start = problem["latents" if variant == "lbfgs+softplus" else "start"]
        results[(name, variant)].append(
            run(data, start, jax.random.fold_in(key, 1), args.steps))
        if not args.no_progress:
          r = results[(name, variant)][-1]
          print(f"{name} {variant:>18}: loss {r['loss'][-1]:.4f} acc "
                f"{r['accuracy'][-1]:.4f} {r['seconds'][-1]:.2f}s",
                file=sys.stderr, flush=True)
  figure = save_figure(results, args.out)
  _common.report(summary_table(results), figure, notes(args.seeds))
  return {"runs": results, "figure": figure}


if __name__ == "__main__":
  main()
