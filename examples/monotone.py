"""Monotone networks on diabetes: non-decreasing in bmi and blood pressure.

Disease progression (scikit-learn's diabetes data: 442 patients, 10
features) should not *decrease* when body-mass index (``bmi``) or blood
pressure (``bp``) increase, all else equal. ``posconstr.linen.MonotoneMLP``
(Runje & Shankaranarayana, "Constrained Monotonic Neural Networks", ICML
2023) is built that way: with ``monotonicity=(1, 1, 0, ..., 0)`` (one entry
per input; the monotone features come first) its first kernel is ``|W|`` on
the rows of bmi and bp and free on the others, every later kernel is
``|W|``, and each hidden layer mixes convex (``relu``), concave
(``-relu(-h)``) and saturated (``clip(h, -1, 1)``) units, all
non-decreasing, so that the network is monotone without being forced to be
convex. Three variants (10 -> 16 -> 16 -> 1), trained by full-batch Adam on
the MSE plus ``--l2`` times the squared applied kernels, from the same
initialization:

  * ``mlp``:           the same network with free weights (``positivity=
    "project"`` and no projection: the reference);
  * ``monotone-abs``:  ``positivity=posconstr.Abs()``, the paper's ``|W|``
    (params hold latents), trained by plain Adam;
  * ``monotone-proj``: ``positivity="project"``, the weights kept in their
    sign pattern by ``posconstr.projected(optax.adam(lr),
    model.constraint_rules())``.

Monotonicity is checked with ``jax.grad`` of the prediction with respect to
the monotone inputs, at every test point and along individual conditional
expectation (ICE) curves (each test patient with one monotone feature swept
over its range); the figure shows those curves and their mean, the partial
dependence.

The data are noisy (ordinary least squares, printed as a reference, reaches a
test R^2 of 0.36) and the training set small (331 patients): at the default
penalty the networks overfit (their test MSE is lowest after about 100
steps). Monotonicity is largely in the data: with ``--l2 0.1`` all three
networks reach a test R^2 of 0.38 and the free one comes out monotone too;
the constrained networks are monotone by construction, whatever the penalty,
steps or seed.

Run it with::

  python examples/monotone.py                 # 1000 steps, out/monotone.png
  python examples/monotone.py --steps 500 --monotone bmi s5 --out /tmp/mono
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import linear_model  # noqa: E402
from sklearn import model_selection  # noqa: E402
from sklearn import preprocessing  # noqa: E402

import posconstr  # noqa: E402

DEFAULT_STEPS = 1000
LEARNING_RATE = 3e-3
HIDDEN = 16
L2 = 1e-2  # Penalty on the squared applied kernels: the data set is small.
MONOTONE = ("bmi", "bp")
GRID_POINTS = 41  # Points of each ICE curve.


# ----------------------------------------------------------------- data ----

def load_data(seed: int, monotone: Sequence[str]) -> Dict[str, Any]:
  """Diabetes, monotone features first, on a fixed 75/25 split: raw, and
  standardized with training statistics (a positive scaling: derivative signs
  are those in raw units)."""
  bunch = datasets.load_diabetes(scaled=False)
  names = list(bunch.feature_names)
  unknown = [m for m in monotone if m not in names]
  if unknown:
    raise ValueError(f"unknown feature(s) {unknown}; choose from {names}")
  order = [names.index(m) for m in monotone]
  order += [i for i in range(len(names)) if i not in order]
  x = bunch.data[:, order].astype(np.float32)
  y = bunch.target.astype(np.float32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.25, random_state=seed)
  scaler = preprocessing.StandardScaler().fit(x_train)  # Train stats only.
  y_mean, y_std = float(y_train.mean()), float(y_train.std())
  return {
      "x_train": jnp.asarray(scaler.transform(x_train), jnp.float32),
      "y_train": jnp.asarray((y_train - y_mean) / y_std, jnp.float32),
      "x_test": jnp.asarray(scaler.transform(x_test), jnp.float32),
      "y_test": jnp.asarray((y_test - y_mean) / y_std, jnp.float32),
      "raw_x_train": x_train, "raw_y_train": y_train, "raw_x_test": x_test,
      "raw_y_test": y_test, "scaler": scaler, "y_mean": y_mean, "y_std": y_std,
      "names": [names[i] for i in order], "num_monotone": len(monotone),
  }


# --------------------------------------------------------------- variants ----

VARIANTS = ("mlp", "monotone-abs", "monotone-proj")


def make_model(variant: str, num_monotone: int, num_features: int,
               hidden: int = HIDDEN) -> posconstr.linen.MonotoneMLP:
  """The network of ``variant``: monotone in the first ``num_monotone`` inputs.

  ``mlp`` is the same network as ``monotone-proj`` trained without the
  projection: its weights are free.
  """
  monotonicity = (1,) * num_monotone + (0,) * (num_features - num_monotone)
  positivity = posconstr.Abs() if variant == "monotone-abs" else "project"
  return posconstr.linen.MonotoneMLP((hidden, hidden, 1), monotonicity,
                                     positivity=positivity)


def make_optimizer(variant: str, model, learning_rate: float = LEARNING_RATE):
  """Adam; for ``monotone-proj`` Adam under ``posconstr.projected``."""
  if variant == "monotone-proj":
    return posconstr.projected(optax.adam(learning_rate),
                               model.constraint_rules())
  return optax.adam(learning_rate)


# -------------------------------------------------------------- training ----

def _mse(model, params, x, y):
  return jnp.mean((model.apply({"params": params}, x)[..., 0] - y) ** 2)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    data: Dict[str, Any], l2: float):
  """A jitted full-batch step: ``(params, opt_state), (mse, test mse)``.

  The loss: the training MSE plus ``l2`` times the squared *applied* kernels
  (the same penalty on the same weights for every variant).
  """

  def loss_fn(params):
    mse = _mse(model, params, data["x_train"], data["y_train"])
    kernels = model.apply({"params": params}, method="applied_kernels")
    return mse + l2 * sum(jnp.sum(k ** 2) for k in kernels.values()), mse

  @jax.jit
  def step(params, opt_state):
    (_, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return ((optax.apply_updates(params, updates), opt_state),
            (mse, _mse(model, params, data["x_test"], data["y_test"])))

  return step


@functools.partial(jax.jit, static_argnums=(0, 3))
def predict_with_grads(model: nn.Module, params, x: jax.Array,
                       num_monotone: int):
  """``(predictions (rows,), d prediction / d x_mono (rows, num_monotone))``.

  One compiled function per model serves the test points and the ICE grids.
  """
  def f(row):
    return model.apply({"params": params}, row[None])[0, 0]
  values, grads = jax.vmap(jax.value_and_grad(f))(x)
  return values, grads[:, :num_monotone]


@functools.partial(jax.jit, static_argnums=(0, 2))
def monotone_kernels_min(model: nn.Module, params, num_monotone: int):
  """The smallest applied weight on a monotone path (>= 0 when constrained)."""
  kernels = model.apply({"params": params}, method="applied_kernels")
  return jnp.min(jnp.stack(
      [kernels["dense_0"][:num_monotone].min()]
      + [k.min() for name, k in kernels.items() if name != "dense_0"]))


def ice_inputs(data: Dict[str, Any], num_points: int = GRID_POINTS):
  """Test inputs with each monotone feature ``j`` swept over its range.

  Returns ``(grids in raw units (m, points), inputs (m, test, points,
  features))``: block ``j`` sweeps feature ``j``, the rest as in the test set.
  """
  m, scaler, x_test = data["num_monotone"], data["scaler"], data["x_test"]
  raw = data["raw_x_train"][:, :m]
  grids = np.linspace(raw.min(0), raw.max(0), num_points, axis=1)
  x = np.tile(np.asarray(x_test)[None, :, None], (m, 1, num_points, 1))
  for j in range(m):
    x[j, :, :, j] = (grids[j] - scaler.mean_[j]) / scaler.scale_[j]
  return grids, jnp.asarray(x, jnp.float32)


def train_variant(variant: str, data: Dict[str, Any], steps: int,
                  key: jax.Array, learning_rate: float = LEARNING_RATE,
                  l2: float = L2, hidden: int = HIDDEN,
                  progress: bool = True) -> Dict[str, Any]:
  """Trains one variant from ``key``; returns its metrics and curves."""
  m, n_test = data["num_monotone"], data["x_test"].shape[0]
  model = make_model(variant, m, data["x_train"].shape[1], hidden)
  tx = make_optimizer(variant, model, learning_rate)
  params = _common.init_params(model, key, data["x_train"][:1])
  step = make_train_step(model, tx, data, l2)
  (params, _), history, seconds = _common.run_steps(
      lambda carry, i: step(*carry), (params, tx.init(params)),
      steps, desc=f"{variant:>13}", show=progress, every=200, label="mse")

  # One call: the test points, then the ICE grids of every monotone feature.
  grids, blocks = ice_inputs(data)
  rows = jnp.concatenate([data["x_test"], blocks.reshape(-1, blocks.shape[-1])])
  values, grads = (np.asarray(v, np.float64) for v in predict_with_grads(
      model, params, rows, m))
  pred_test, grads_test = values[:n_test], grads[:n_test]
  curves = (values[n_test:].reshape(blocks.shape[:3]) * data["y_std"]
            + data["y_mean"])
  # Along each sweep, the derivative with respect to the swept feature.
  ice_grads = np.diagonal(grads[n_test:].reshape(*blocks.shape[:3], m),
                          axis1=0, axis2=3)
  y_test = np.asarray(data["y_test"], np.float64)
  mse = np.mean((pred_test - y_test) ** 2)
  return {
      # Monotone by construction: by |W| or by the projection.
      "constrained": variant != "mlp",
      "test_rmse": float(np.sqrt(mse) * data["y_std"]),
      "test_r2": float(1 - mse / np.var(y_test)),
      "final_train_mse": float(history[-1, 0]),
      "min_grad": grads_test.min(axis=0),  # Per monotone feature.
      "neg_grad_frac_test": float(np.mean(grads_test < 0)),
      "neg_grad_frac_ice": float(np.mean(ice_grads < 0)),
      "min_mono_kernel": float(monotone_kernels_min(model, params, m)),
      "grads_test": grads_test,
      "ice": {data["names"][j]: (grids[j], curves[j]) for j in range(m)},
      "train_losses": history[:, 0], "test_losses": history[:, 1],
      "train_seconds": seconds, "params": params,
  }


# --------------------------------------------------------------- reports ----

def summary_table(results: Dict[str, Dict[str, Any]],
                  names: Sequence[str]) -> str:
  """A markdown table, one row per variant."""
  rows = [[name, f"{r['test_rmse']:.2f}", f"{r['test_r2']:.3f}",
           *(f"{g:.3g}" for g in r["min_grad"]),
           _common.percent(r["neg_grad_frac_test"]),
           _common.percent(r["neg_grad_frac_ice"]),
           f"{r['min_mono_kernel']:.3g}",
           "no" if r["neg_grad_frac_test"] or r["neg_grad_frac_ice"] else "yes",
           f"{r['train_seconds']:.1f}"] for name, r in results.items()]
  return _common.markdown_table(
      ["variant", "test RMSE", "test R^2",
       *(f"min d/d{n} (test)" for n in names),
       "negative derivatives (test)", "negative derivatives (ICE grid)",
       "min weight on monotone paths", "monotone", "train s"], rows,
      "lrr" + "r" * len(names) + "rrrcr")


def save_figure(results: Dict[str, Dict[str, Any]], data: Dict[str, Any],
                out_dir: str, num_ice: int = 40) -> str:
  """ICE curves and partial dependence per (monotone feature, variant).

  Last column: MSE curves (top) and the derivative distribution (bottom).
  """
  names = data["names"][:data["num_monotone"]]
  n, rows = len(results), max(len(names), 2)
  fig, axes = plt.subplots(rows, n + 1, figsize=(4.2 * (n + 1), 3.5 * rows),
                           constrained_layout=True, squeeze=False)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  shown = np.random.default_rng(0).permutation(
      len(data["raw_x_test"]))[:num_ice]
  y_raw = data["raw_y_train"]
  for i, feature in enumerate(names):
    lo = min(r["ice"][feature][1].min() for r in results.values())
    hi = max(r["ice"][feature][1].max() for r in results.values())
    for j, (name, r) in enumerate(results.items()):
      ax, (grid, values) = axes[i, j], r["ice"][feature]
      ax.scatter(data["raw_x_train"][:, i], y_raw, s=4, color="0.75",
                 label="training data")
      ax.plot(grid, values[shown].T, color=colors[j], lw=0.7, alpha=0.5)
      ax.plot(grid, values.mean(0), color="k", lw=2.5,
              label="partial dependence")
      share = 100 * np.mean(np.diff(values, axis=1) < 0)
      ax.set(xlabel=feature, ylabel="predicted progression",
             ylim=(min(lo, y_raw.min()) - 10, max(hi, y_raw.max()) + 10))
      ax.set_title(f"{name}: {share:.0f}% of ICE steps decrease", fontsize=10)
      ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8, loc="upper left")
  for ax in axes[len(names):, :n].ravel():
    ax.axis("off")

  ax_mse, ax_grad = axes[0, n], axes[1, n]
  all_grads = np.concatenate([np.ravel(r["grads_test"])
                              for r in results.values()])
  bins = np.linspace(all_grads.min(), all_grads.max() + 1e-6, 50)
  for j, (name, r) in enumerate(results.items()):
    steps = np.arange(1, len(r["train_losses"]) + 1)
    ax_mse.plot(steps, r["train_losses"], color=colors[j], lw=1.2,
                label=f"{name} train")
    ax_mse.plot(steps, r["test_losses"], color=colors[j], lw=1.2, ls="--",
                label=f"{name} test")
    ax_grad.hist(np.ravel(r["grads_test"]), bins=bins, color=colors[j],
                 alpha=0.5, label=name)
  ax_mse.set(yscale="log", xlabel="Adam step",
             ylabel="MSE (standardized target)")
  ax_mse.set_title("Training (solid) and test (dashed) MSE", fontsize=10)
  ax_grad.axvline(0.0, color="tab:red", lw=1, ls="--")
  ax_grad.set(xlabel=f"d prediction / d ({', '.join(names)}), test points",
              ylabel="count")
  ax_grad.set_title("Derivatives wrt the monotone inputs", fontsize=10)
  for ax, size in ((ax_mse, 7), (ax_grad, 8)):
    ax.legend(fontsize=size)
    ax.grid(alpha=0.3, which="both")
  return _common.save_figure(fig, out_dir, "monotone.png", dpi=65)


# ------------------------------------------------------------------ main ----

def parse_args(argv: Optional[Sequence[str]] = None):
  parser = _common.parser(__doc__, "monotone.png", DEFAULT_STEPS,
                          "Adam steps per variant", lr=LEARNING_RATE, l2=L2)
  parser.add_argument("--monotone", nargs="+", default=list(MONOTONE),
                      help="monotone features (default %(default)s)")
  parser.add_argument("--hidden", type=int, default=HIDDEN,
                      help="units per hidden layer (default %(default)s)")
  args = _common.parse(parser, argv)
  if args.hidden < 2:
    parser.error("--hidden must be >= 2")
  if len(set(args.monotone)) != len(args.monotone):
    parser.error("--monotone features must be distinct")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"variants": {name: metrics}, "figure"}``.

  Each variant's metrics: ``constrained``, ``test_rmse`` (raw units),
  ``test_r2``, ``final_train_mse``, ``min_grad`` (per monotone feature, test
  set), ``neg_grad_frac_test`` and ``neg_grad_frac_ice`` (shares of negative
  derivatives), ``min_mono_kernel`` (smallest applied weight on a monotone
  path),
  ``grads_test``, ``ice`` (``{feature: (grid, curves)}``), ``train_losses``,
  ``test_losses``, ``train_seconds`` and the trained ``params``.
  """
  args = parse_args(argv)
  data = load_data(args.seed, args.monotone)
  key = jax.random.key(args.seed)  # The same for all: same free layers.
  results = {v: train_variant(v, data, args.steps, key, args.lr,
                              l2=args.l2, hidden=args.hidden,
                              progress=not args.no_progress)
             for v in VARIANTS}
  ols = linear_model.LinearRegression().fit(data["raw_x_train"],
                                            data["raw_y_train"])
  x_test, y_test = data["raw_x_test"], data["raw_y_test"]
  figure = save_figure(results, data, args.out)
  _common.report(
      summary_table(results, args.monotone), figure,
      "Reference, ordinary least squares: test RMSE "
      f"{np.sqrt(np.mean((ols.predict(x_test) - y_test) ** 2)):.2f}, "
      f"R^2 {ols.score(x_test, y_test):.3f}; "
      "coefficients " + ", ".join(
          f"{n} {c:+.3g}" for n, c in zip(data["names"], ols.coef_)
          if n in args.monotone) + ".")
  return {"variants": results, "figure": figure}


if __name__ == "__main__":
  main()
