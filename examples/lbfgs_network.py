"""L-BFGS for a non-negative network: reparameterize, or use real bounds.

Trains one small MLP (64 -> 32 -> 10, relu; both kernels >= 0, biases free)
on scikit-learn's digits, full batch, by minimizing the training
cross-entropy plus ``--l2`` times the squared applied kernels, three ways
from the same applied weights:

  * ``lbfgs+softplus``: the kernels are ``softplus(latent)``
    (``posconstr.linen.Reparameterized``); plain ``optax.lbfgs`` trains the
    latents: the constraint is in the model, any optimizer works;
  * ``lbfgsb``:         ``posconstr.lbfgsb(lower=bounds)``, ``bounds`` 0 on
    the kernels and None (no bound) on the biases: a projected quasi-Newton
    step whose curvature pairs and line search see only feasible points;
  * ``lbfgs+clip``:     the cautionary baseline: ``optax.lbfgs`` followed by
    clipping, the Optax way: ``chain(optax.lbfgs(), project_nonneg(...))``.
    The line search accepts a point that the clipping then moves, and the
    value and gradient it hands on (``value_and_grad_from_state``) are those
    of the unclipped point: the iteration stalls well above the optimum;
  * ``lbfgs+clip+reeval``: the same clipping, but the value and gradient
    are evaluated again at each clipped point. That repairs much of it on
    this problem, at about twice the function evaluations per iteration, and
    with no guarantee: nothing makes the clipped point a descent step.

All but the last use ``optax.value_and_grad_from_state``, which reuses the
value and gradient the line search already computed, as in optax's L-BFGS
docs.

This example is full batch. Mini-batches are measured in
``stochastic_lbfgs.py``: ``lbfgsb`` works on them when each curvature pair
sees one batch at both points (its line search on each batch, or
``overlap_grads``), and diverges when a fixed step mixes two batches.

It prints a markdown table (final objective, test accuracy, iterations,
function evaluations, smallest applied kernel weight, share of kernel weights
on the bound or dead) and saves a figure of the objective against iterations
and against function evaluations. Run it with::

  python examples/lbfgs_network.py            # 200 iterations
  python examples/lbfgs_network.py --steps 100 --out /tmp/lbfgs
"""

from __future__ import annotations

import dataclasses
import fnmatch
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

import posconstr  # noqa: E402

DEFAULT_STEPS = 200
HIDDEN = 32
L2 = 1e-3  # On the applied kernels: the problem has a minimizer.
KERNEL_PATTERN = "*/kernel"
RULES = {KERNEL_PATTERN: posconstr.Softplus()}
NO_MINIBATCH = ("Full batch; for mini-batches see stochastic_lbfgs.py (each "
                "curvature pair must see one batch at both points).")


@dataclasses.dataclass(frozen=True)
class Method:
  """One way of running L-BFGS: a row of the table.

  Attributes:
    name: the row's label.
    reparameterized: ``params`` hold softplus latents of the kernels.
    bounded: the optimizer is ``posconstr.lbfgsb`` with ``lower`` 0 on the
      kernels; else ``optax.lbfgs``.
    clip: ``"chain"``: ``optax.lbfgs`` chained with
      ``posconstr.project_nonneg`` (the Optax idiom); ``"reeval"``: clip
      after ``optax.lbfgs`` and evaluate again at the clipped point; None.
  """
  name: str
  reparameterized: bool = False
  bounded: bool = False
  clip: Optional[str] = None


METHODS = (Method("lbfgs+softplus", reparameterized=True),
           Method("lbfgsb", bounded=True),
           Method("lbfgs+clip", clip="chain"),
           Method("lbfgs+clip+reeval", clip="reeval"))


def objective(model, l2: float, rules, data: Dict[str, jax.Array]):
  """``params -> cross-entropy + l2 * sum(applied kernel ** 2)``, full batch."""

  def fun(params):
    applied = params if rules is None else posconstr.reparam(params, rules)
    penalty = sum(jnp.sum(k ** 2) for k in
                  _common.leaves_matching(applied, KERNEL_PATTERN).values())
    return (_common.cross_entropy(model, params, data["x_train"],
                                  data["y_train"]) + l2 * penalty)

  return fun


def kernel_bounds(params):
  """``lower`` for ``lbfgsb``: 0 on the kernels, None (free) elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 0.0 if fnmatch.fnmatchcase(
          _common.path_of(p), KERNEL_PATTERN) else None, params)


def make_step(method: Method, fun, opt):
  """A jitted iteration: ``((params, state), i) -> carry, (value, evals)``.

  ``value`` is the objective at the iterate the step starts from; ``evals``
  counts the evaluations of ``fun`` and its gradient the iteration made
  (line search, plus a fresh evaluation where none is reused).
  """
  from_state = optax.value_and_grad_from_state(fun)

  @jax.jit
  def step(carry, i):
    del i
    params, state = carry
    if method.clip == "reeval":  # Not the line search's unclipped point.
      value, grad = jax.value_and_grad(fun)(params)
      fresh = jnp.ones((), jnp.int32)
    else:
      fresh = jnp.isinf(optax.tree.get(state, "value")).astype(jnp.int32)
      value, grad = from_state(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                value_fn=fun)
    params = optax.apply_updates(params, updates)
    if method.clip == "reeval":
      params = posconstr.project_params(params, posconstr.NonNegative(),
                                        mask=KERNEL_PATTERN)
    if method.bounded:
      evals = state.info.num_fun_evals
    else:
      evals = optax.tree.get(state, "num_linesearch_steps")
    return (params, state), (value, fresh + evals)

  return step


def run_method(method: Method, start, data: Dict[str, jax.Array], steps: int,
               l2: float, progress: bool = True) -> Dict[str, Any]:
  """Runs ``steps`` iterations of ``method`` from applied weights ``start``."""
  model = _common.MLP(HIDDEN, kernels="softplus" if method.reparameterized
                      else "free")
  rules = RULES if method.reparameterized else None
  params = start
  if rules:  # Jitted: one compilation, not one per eager op and leaf.
    params = jax.jit(lambda p: posconstr.unreparam(p, RULES))(start)
  fun = objective(model, l2, rules, data)
  if method.bounded:
    opt = posconstr.lbfgsb(lower=kernel_bounds(params))
  elif method.clip == "chain":  # posconstr.chain: the projection is last.
    opt = posconstr.chain(optax.lbfgs(),
                          posconstr.project_nonneg(mask=KERNEL_PATTERN))
  else:
    opt = optax.lbfgs()
  # Strong types: optax.lbfgs' state starts weakly typed and would compile
  # the step a second time after the first iteration.
  state = jax.tree.map(lambda x: jnp.asarray(x, x.dtype), opt.init(params))
  (params, _), history, seconds = _common.run_steps(
      make_step(method, fun, opt), (params, state), steps,
      desc=f"{method.name:>17}", show=progress, every=20, label="objective")
  accuracy, _ = _common.evaluate(model, params, data)
  final = float(jax.jit(fun)(params))
  return {
      "objective": final,
      "test_accuracy": float(accuracy),
      "iterations": steps,
      "fun_evals": int(history[:, 1].sum()),
      # Objective at iterates 0 .. steps, evaluations used to reach each.
      "objectives": np.append(history[:, 0], final),
      "evals": np.concatenate([[0], np.cumsum(history[:, 1])]),
      **_common.kernel_stats(params, KERNEL_PATTERN, rules,
                             projected=not method.reparameterized),
      "seconds": seconds,
      "params": params,
  }


def summary_table(results: Dict[str, Dict[str, Any]]) -> str:
  rows = [[name, f"{r['objective']:.5f}", f"{r['test_accuracy']:.4f}",
           r["iterations"], r["fun_evals"], f"{r['min_kernel']:.3g}",
           _common.share_text(r), f"{r['seconds']:.1f}"]
          for name, r in results.items()]
  return _common.markdown_table(
      ["method", "final objective", "test accuracy", "iterations",
       "function evaluations", "min applied kernel weight",
       "kernel weights on bound / dead", "s (with compile)"], rows)


def save_figure(results: Dict[str, Dict[str, Any]], out_dir: str) -> str:
  """The objective against iterations (left) and evaluations (right)."""
  fig, (ax_it, ax_ev) = plt.subplots(1, 2, figsize=(9.5, 3.4),
                                     constrained_layout=True)
  for name, r in results.items():
    ax_it.plot(np.arange(len(r["objectives"])), r["objectives"], lw=1.5,
               label=f"{name} ({r['objective']:.4f})")
    ax_ev.plot(r["evals"], r["objectives"], lw=1.5, label=name)
  ax_it.set_xlabel("iteration")
  ax_ev.set_xlabel("function + gradient evaluations")
  ax_it.set_ylabel("cross-entropy + l2 * ||kernels||^2")
  ax_it.legend(title="method (final)", fontsize=8)
  for ax in (ax_it, ax_ev):
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  fig.suptitle("Full-batch L-BFGS, kernels >= 0 (digits)", fontsize=11)
  return _common.save_figure(fig, out_dir, "lbfgs_network.png")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """Runs the comparison; returns ``{"methods": {name: metrics}, "figure"}``.

  Each method's metrics: ``objective`` (final), ``test_accuracy``,
  ``iterations``, ``fun_evals``, ``objectives`` and ``evals`` (per iterate),
  ``kernels`` (applied, flat), ``min_kernel``, ``bound_or_dead`` and its
  ``kind``, ``seconds`` and the trained ``params``.
  """
  parser = _common.parser(__doc__, "lbfgs_network.png", DEFAULT_STEPS,
                          "L-BFGS iterations per method", l2=L2)
  names = [m.name for m in METHODS]
  parser.add_argument("--methods", nargs="+", default=names, choices=names,
                      help="methods to run (default: all)")
  args = _common.parse(parser, argv)
  print(NO_MINIBATCH)
  data = _common.load_digits(args.seed)
  # One start for all: the softplus model's initial (positive) weights.
  latents = _common.init_params(_common.MLP(HIDDEN, kernels="softplus"),
                                jax.random.key(args.seed), data["x_train"][:1])
  start = jax.jit(lambda p: posconstr.reparam(p, RULES))(latents)
  results = {m.name: run_method(m, start, data, args.steps, args.l2,
                                not args.no_progress)
             for m in METHODS if m.name in args.methods}
  figure = save_figure(results, args.out)
  _common.report(summary_table(results), figure, NO_MINIBATCH)
  return {"methods": results, "figure": figure}


if __name__ == "__main__":
  main()
