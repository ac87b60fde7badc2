"""Input-convex networks on digits: why the initialization of Wz >= 0 matters.

A fully input-convex network (ICNN; Amos, Xu & Kolter, "Input Convex Neural
Networks", ICML 2017) maps an image ``x`` to ten class energies ``E(x)``,
each convex in ``x``::

  z_1     = relu(Wx_0 x + b_0)
  z_{k+1} = relu(Wz_k z_k + Wx_k x + b_k)      Wz_k >= 0,  k = 1 .. depth-2
  E(x)    =      Wz_L z_L + Wx_L x + b_L        Wz_L >= 0   (10 energies)

and is trained as a classifier with ``logits = -E(x)`` (cross-entropy, full
batch, Adam) on scikit-learn's bundled digits, at depth 3, 5 and 7 (the
number of linear maps along the ``z`` path). Three ways of keeping ``Wz >= 0``:

  * ``he+clip``:   He-normal ``Wz``, clipped to ``>= 0`` at initialization and,
    by ``posconstr.project_nonneg(mask="Wz_*/kernel")`` as the last link of
    the optimizer, after every Adam step;
  * ``icnn+proj``: the same projection, but ``Wz`` drawn from
    ``posconstr.initializers.icnn()`` with biases from ``icnn_bias(fan_in)``
    (Hoedt & Klambauer, "Principled Weight Initialisation for Input-Convex
    Neural Networks", NeurIPS 2023);
  * ``exp``:       ``Wz = exp(latent)`` through
    ``posconstr.linen.NonNegDense(parameterization=posconstr.Exp())``, with
    the same principled initialization of the applied weights (the log-normal
    ``icnn()`` draw is a normal draw of the latents), trained by plain Adam.

Clipped He weights have a positive mean, so every layer multiplies the mean
activation (about 4.5x per layer at width 64): the initial loss explodes with
depth and training degrades. The principled initialization keeps the signal
at its fixed point at every depth (Hoedt & Klambauer's depth effect). At the
same Adam step size ``exp`` trains more slowly (a step in the latent changes
a weight by a factor, ``exp(lr)``), but it does not degrade with depth either.

Every trained model is checked for convexity numerically: along random
segments ``[a, b]`` (pairs of test images and pairs of far-off Gaussian
points) every energy must satisfy
``E(t a + (1 - t) b) <= t E(a) + (1 - t) E(b) + tol`` with
``tol = 1e-5 * (1 + |E(a)| + |E(b)|)`` (float32 rounding). The same check
run on the same architecture with free ``Wz`` shows that it has teeth.

It prints a markdown table and saves the loss curves per depth. Run it with::

  python examples/icnn.py                     # 300 steps, out/icnn.png
  python examples/icnn.py --steps 100 --depths 3 7 --out /tmp/icnn
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common.
import _common  # noqa: E402  pylint: disable=g-import-not-at-top

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import posconstr  # noqa: E402
from posconstr import initializers  # noqa: E402

DEFAULT_STEPS = 300
DEPTHS = (3, 5, 7)
LEARNING_RATE = 3e-3
WIDTH = 64
NUM_CLASSES = 10
WZ_PATTERN = "Wz_*/kernel"  # The kernels that must stay >= 0.
CONVEXITY_TOL = 1e-5  # Relative to 1 + |E(a)| + |E(b)|: float32 rounding.
SEGMENT_T = np.linspace(0.05, 0.95, 10)


# ----------------------------------------------------------------- model ----

class ICNN(nn.Module):
  """A fully input-convex network: ``x -> num_outputs`` convex energies.

  Attributes:
    depth: number of linear maps along the ``z`` path (>= 2): ``Wx_0``, then
      ``Wz_1 .. Wz_{depth-1}`` (the last one gives the energies).
    wz: ``"he"`` (``nn.Dense``, He-normal, to be clipped), ``"icnn"``
      (``nn.Dense`` with the principled init, to be projected) or ``"exp"``
      (``NonNegDense`` with ``Exp``: always >= 0, ``params`` hold latents).
      Unprojected, ``"he"`` is also the free-``Wz`` model of the sanity check.
  """
  depth: int
  wz: str = "icnn"
  width: int = WIDTH
  num_outputs: int = NUM_CLASSES

  def _wz_layer(self, features: int, fan_in: int, name: str) -> nn.Module:
    if self.wz == "he":
      return nn.Dense(features, kernel_init=nn.initializers.he_normal(),
                      name=name)
    kernel_init = initializers.icnn()
    bias_init = initializers.icnn_bias(fan_in)
    if self.wz == "icnn":
      return nn.Dense(features, kernel_init=kernel_init, bias_init=bias_init,
                      name=name)
    if self.wz == "exp":
      return posconstr.linen.NonNegDense(
          features, parameterization=posconstr.Exp(), kernel_init=kernel_init,
          bias_init=bias_init, name=name)
    raise ValueError(f"unknown wz {self.wz!r}")

  @nn.compact
  def __call__(self, x):
    if self.depth < 2:
      raise ValueError(f"depth must be >= 2, got {self.depth}")
    z = nn.relu(nn.Dense(self.width, kernel_init=nn.initializers.he_normal(),
                         name="Wx_0")(x))
    for k in range(1, self.depth):
      last = k == self.depth - 1
      features = self.num_outputs if last else self.width
      pre = (self._wz_layer(features, z.shape[-1], f"Wz_{k}")(z)
             + nn.Dense(features, use_bias=False, name=f"Wx_{k}")(x))
      z = pre if last else nn.relu(pre)
    return z  # Energies; logits are -z.


# -------------------------------------------------------------- variants ----

@dataclasses.dataclass(frozen=True)
class Variant:
  """One way of keeping ``Wz >= 0``: one row per depth in the table.

  Attributes:
    name: the row's label in the table and the figure.
    wz: the :class:`ICNN` ``wz`` option.
    optimizer: an Optax transformation. A projection must be its last link.
    project_init: whether to project the initial ``Wz`` onto ``>= 0``.
    applied_params: maps trained ``params`` to the applied ones (the identity
      unless ``params`` hold latents).
  """
  name: str
  wz: str
  optimizer: optax.GradientTransformation
  project_init: bool = False
  applied_params: Callable[[Any], Any] = _common.identity


@jax.jit  # One compilation, not one per eager op and kernel shape.
def _exp_applied(params):
  """Applied params of the ``exp`` model: ``Wz`` kernels are ``exp(latent)``."""
  return posconstr.reparam(params, {WZ_PATTERN: posconstr.Exp()})


def make_variants(learning_rate: float = LEARNING_RATE) -> List[Variant]:
  """The compared variants (same data, same seed, same steps)."""
  clip = posconstr.chain(optax.adam(learning_rate),
                         posconstr.project_nonneg(mask=WZ_PATTERN))
  return [
      Variant("he+clip", "he", clip, project_init=True),
      Variant("icnn+proj", "icnn", clip, project_init=True),
      Variant("exp", "exp", optax.adam(learning_rate),
              applied_params=_exp_applied),
  ]


# -------------------------------------------------------------- training ----

def _loss(model, params, x, y):
  logits = -model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(model: nn.Module, tx: optax.GradientTransformation, params,
               opt_state, x_train: jax.Array, y_train: jax.Array):
  """A full-batch step: ``(params, opt_state), loss``.

  Compiled once per (model, optimizer): the two projected variants share it.
  """
  loss, grads = jax.value_and_grad(
      lambda p: _loss(model, p, x_train, y_train))(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return (optax.apply_updates(params, updates), opt_state), loss


def applied_model(depth: int, wz: str) -> "ICNN":
  """The model that applies the params of an ``ICNN(depth, wz)``.

  ``"he"`` and ``"icnn"`` differ only in their init: they share one model,
  hence one compiled step and one compiled check.
  """
  return ICNN(depth=depth, wz="exp" if wz == "exp" else "he")


def init_params(model: nn.Module, key: jax.Array, x: jax.Array):
  """``model``'s initial params, computed eagerly (not jitted).

  Under ``jit`` each of the nine models would compile its whole
  initialization (seconds on CPU); eagerly, the few random ops compile once
  and serve every model.
  """
  return model.init(key, x)["params"]


def segments(data: Dict[str, jax.Array], seed: int, n: int = 256):
  """Endpoints ``(a, b)``: ``n`` pairs of test images, ``n`` Gaussian pairs.

  The Gaussian points (std 3 in standardized units) lie far off the data:
  convexity is a global property, not one of the training distribution.
  """
  rng = np.random.default_rng(seed)
  x_test = np.asarray(data["x_test"])
  i, j = rng.integers(0, len(x_test), (2, n))
  dim = x_test.shape[1]
  a = np.concatenate([x_test[i], 3 * rng.normal(size=(n, dim))])
  b = np.concatenate([x_test[j], 3 * rng.normal(size=(n, dim))])
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def convexity_gap(model: nn.Module, params, a: jax.Array, b: jax.Array):
  """The largest relative gap ``(E(mid) - chord) / (1 + |E(a)| + |E(b)|)``.

  Over all segments ``[a_i, b_i]``, all ``t`` in ``SEGMENT_T`` and all
  energies; convex energies give a gap <= 0 up to float32 rounding
  (``CONVEXITY_TOL``).
  """
  f = lambda x: model.apply({"params": params}, x)
  t = jnp.asarray(SEGMENT_T, jnp.float32)[None, :, None]  # (1, T, 1)
  mid = f(t * a[:, None] + (1 - t) * b[:, None])  # (n, T, outputs)
  fa, fb = f(a)[:, None], f(b)[:, None]
  chord = t * fa + (1 - t) * fb
  return jnp.max((mid - chord) / (1 + jnp.abs(fa) + jnp.abs(fb)))


@functools.partial(jax.jit, static_argnums=0)
def assess(model: nn.Module, params, data: Dict[str, jax.Array],
           a: jax.Array, b: jax.Array):
  """(test accuracy, training loss on the whole training set, convexity gap).

  One compiled function per model (compilation dominates short runs).
  """
  logits = -model.apply({"params": params}, data["x_test"])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == data["y_test"])
  return (accuracy, _loss(model, params, data["x_train"], data["y_train"]),
          convexity_gap(model, params, a, b))


def train_variant(variant: Variant, depth: int, data: Dict[str, jax.Array],
                  steps: int, key: jax.Array, check_segments,
                  progress: bool = True) -> Dict[str, Any]:
  """Trains one variant at one depth from ``key``; returns metrics, curves."""
  params = init_params(ICNN(depth=depth, wz=variant.wz), key,
                       data["x_train"][:1])
  if variant.project_init:
    params = posconstr.project_params(params, posconstr.NonNegative(),
                                      mask=WZ_PATTERN)
  model, tx = applied_model(depth, variant.wz), variant.optimizer

  (params, _), losses, seconds = _common.run_steps(
      lambda carry, i: train_step(model, tx, *carry, data["x_train"],
                                  data["y_train"]),
      (params, tx.init(params)), steps,
      desc=f"depth {depth} {variant.name:>9}", show=progress, every=50)

  accuracy, train_loss, gap = assess(model, params, data, *check_segments)
  gap = float(gap)
  wz = _common.flat_matching(variant.applied_params(params), WZ_PATTERN)
  return {
      "depth": depth,
      "method": variant.name,
      "test_accuracy": float(accuracy),
      "initial_loss": float(losses[0]),
      "final_train_loss": float(train_loss),
      "convexity_gap": gap,
      "convex": bool(gap <= CONVEXITY_TOL),
      "min_wz": float(wz.min()),
      "losses": losses,
      "train_seconds": seconds,
      "params": params,
  }


def free_wz_gap(depth: int, data, key: jax.Array, check_segments) -> float:
  """Convexity gap of the same architecture with free He-normal ``Wz``.

  Untrained: a sanity check that the numeric test detects non-convexity.
  """
  model = applied_model(depth, "he")
  params = init_params(model, key, data["x_train"][:1])
  return float(assess(model, params, data, *check_segments)[2])


# --------------------------------------------------------------- reports ----

def summary_table(results: Dict[str, Dict[str, Any]],
                  free_gaps: Dict[int, float]) -> str:
  """A markdown table, one row per (depth, variant)."""
  rows = [[r["depth"], r["method"], f"{r['initial_loss']:.4g}",
           f"{r['final_train_loss']:.4g}", f"{r['test_accuracy']:.4f}",
           f"{r['convexity_gap']:.2e}", "yes" if r["convex"] else "NO",
           f"{r['min_wz']:.3g}", f"{r['train_seconds']:.1f}"]
          for r in results.values()]
  rows += [[depth, "free Wz (untrained, sanity)", "", "", "", f"{gap:.2e}",
            "yes" if gap <= CONVEXITY_TOL else "NO", "", ""]
           for depth, gap in free_gaps.items()]
  return _common.markdown_table(
      ["depth", "method", "initial loss", "final train loss", "test accuracy",
       "max convexity gap", "convex", "min Wz", "train s"], rows,
      "rlrrrrcrr")


def save_figure(results: Dict[str, Dict[str, Any]], depths: Sequence[int],
                out_dir: str) -> str:
  """One panel per depth: training loss per step, one line per method."""
  methods = list(dict.fromkeys(r["method"] for r in results.values()))
  colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths), 3.8),
                           sharey=True, constrained_layout=True, squeeze=False)
  for ax, depth in zip(axes[0], depths):
    for r in results.values():
      if r["depth"] == depth:
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], lw=1.5,
                color=colors[r["method"]],
                label=f"{r['method']} ({r['final_train_loss']:.2g})")
    ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_title(f"depth {depth}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="method (final loss)", fontsize=8)
  axes[0, 0].set_ylabel("training cross-entropy")
  fig.suptitle("ICNN on digits: training loss by depth and way of keeping "
               "Wz >= 0")
  return _common.save_figure(fig, out_dir, "icnn.png")


# ------------------------------------------------------------------ main ----

def parse_args(argv: Optional[Sequence[str]] = None):
  parser = _common.parser(__doc__, "icnn.png", DEFAULT_STEPS,
                          "Adam steps per run", lr=LEARNING_RATE)
  parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS),
                      help="depths to compare (default %(default)s)")
  args = _common.parse(parser, argv)
  if min(args.depths) < 2:
    parser.error("--depths must be >= 2")
  return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"runs", "free_wz_gaps", "figure"}``.

  ``runs`` maps ``"depth <d> <method>"`` to metrics: ``depth``, ``method``,
  ``test_accuracy``, ``initial_loss``, ``final_train_loss``,
  ``convexity_gap`` (largest relative gap), ``convex`` (gap <= tolerance),
  ``min_wz`` (smallest applied ``Wz`` weight), ``losses`` (per step),
  ``train_seconds`` and the trained ``params``. ``free_wz_gaps`` maps each
  depth to the gap of the unconstrained sanity model.
  """
  args = parse_args(argv)
  data = _common.load_digits(args.seed)
  key = jax.random.key(args.seed)
  check_segments = segments(data, args.seed + 1)
  results, free_gaps = {}, {}
  variants = make_variants(args.lr)  # One optimizer object: one compile.
  for depth in args.depths:
    for variant in variants:
      # Same key for every variant: the free layers (Wx) start identical.
      results[f"depth {depth} {variant.name}"] = train_variant(
          variant, depth, data, args.steps, key, check_segments,
          progress=not args.no_progress)
    free_gaps[depth] = free_wz_gap(depth, data, key, check_segments)
  figure = save_figure(results, args.depths, args.out)
  _common.report(
      summary_table(results, free_gaps), figure,
      f"convex: every energy satisfies E(ta+(1-t)b) <= tE(a)+(1-t)E(b) "
      f"+ {CONVEXITY_TOL:g}(1+|E(a)|+|E(b)|) on {len(check_segments[0])} "
      f"segments x {len(SEGMENT_T)} points.",
      "train s includes compilation; icnn+proj reuses the step that "
      "he+clip compiled at the same depth.")
  return {"runs": results, "free_wz_gaps": free_gaps, "figure": figure}


if __name__ == "__main__":
  main()
