"""What does a reparameterized kernel cost? fwd+bwd of a Dense layer.

``jax.value_and_grad`` of ``mean((x @ g(latent) + b)**2)`` (width x width,
default 1024), jitted and compiled ahead, for ``dense`` (no ``g``, the
baseline), ``posconstr`` Softplus (one ``exp`` shared by forward and
backward), Exp, Square, ReLU and Sigmoid(0, 1), and their peers
``jax.nn.softplus`` and ``jax.nn.sigmoid``; per batch size (default 128 and
16: at small batches the elementwise ``g`` and its backward show). Reported:
median time after compilation, paired ratio to ``dense``, ratios of medians
and of minima, XLA's bytes accessed and transcendentals of the executable
timed, and posconstr's Softplus paired against ``jax.nn.softplus``.

The floor estimate: ``g`` alone, forward and backward on the kernel
(``value_and_grad`` of ``vdot(g(latent), c)``, no matmul), timed in the same
rounds; ``1 + median(alone / dense)`` is the ratio a Dense with ``g`` would
have if ``g`` cost nothing beyond its own elementwise passes. A ratio near
its floor means the overhead is the transcendental (or elementwise) work
per weight per step, not an inefficiency of the reparameterization.

Usage::

  python -m benchmarks.reparam_overhead                # batches 128,16
  python -m benchmarks.reparam_overhead --quick        # ~10 s smoke run
  python -m benchmarks.reparam_overhead --batches 128 --repeats 100
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

import posconstr
from benchmarks import _timing
from benchmarks import _xla_cost

BASELINE = "dense"
PEER = ("posconstr Softplus", "jax.nn.softplus")
SUMMARY_KEYS = ("batch", "width", "repeats", "median_s", "paired_ratio",
                "ratio_of_mins", "floor", "bytes_accessed", "transcendentals",
                "softplus_vs_jax")


def variants() -> Dict[str, Optional[Callable]]:
  return {"dense": None,
          "posconstr Softplus": posconstr.Softplus().forward,
          "jax.nn.softplus": jax.nn.softplus,
          "posconstr Exp": posconstr.Exp().forward,
          "posconstr Square": posconstr.Square().forward,
          "posconstr ReLU": posconstr.ReLU().forward,
          "posconstr Sigmoid": posconstr.Sigmoid(0.0, 1.0).forward,
          "jax.nn.sigmoid": jax.nn.sigmoid}


def make_step(g: Optional[Callable]):
  def loss(params, x):
    kernel = params["latent"] if g is None else g(params["latent"])
    y = x @ kernel + params["bias"]
    return jnp.mean(y * y)
  return jax.jit(jax.value_and_grad(loss))


def make_alone(g: Callable):
  """``g``'s own forward and backward on the kernel, without the matmul."""
  return jax.jit(jax.value_and_grad(lambda z, c: jnp.vdot(g(z), c)))


def run_batch(batch: int, width: int, names, args) -> Dict[str, Any]:
  kk, kx = jax.random.split(jax.random.key(0))
  params = {"latent": jax.random.normal(kk, (width, width)) / np.sqrt(width),
            "bias": jnp.zeros((width,))}
  x = jax.random.normal(kx, (batch, width))
  specs = variants()
  rows, fns = {}, {}
  for name in names:
    exe, compile_s = _timing.compile_timed(make_step(specs[name]), params, x)
    value, grads = exe(params, x)
    costs = _xla_cost.cost_summary(exe)
    rows[name] = {"bytes_accessed": costs["bytes accessed"],
                  "flops": costs["flops"],
                  "transcendentals": costs["transcendentals"],
                  "compile_s": compile_s,
                  "finite": bool(all(np.isfinite(v).all() for v in
                                     jax.tree.leaves((value, grads))))}
    fns[name] = lambda exe=exe: exe(params, x)
    if specs[name] is not None:
      alone, _ = _timing.compile_timed(make_alone(specs[name]),
                                       params["latent"], params["latent"])
      fns[f"{name} alone"] = lambda f=alone: f(params["latent"],
                                               params["latent"])
  times = _timing.interleaved_times(
      fns, repeats=args.repeats, warmup=args.warmup, budget_s=args.budget_s,
      min_repeats=args.min_repeats)
  for name in names:
    rows[name] = {**_timing.timing_row(times[name], times[BASELINE]),
                  **rows[name]}
    if f"{name} alone" in times:
      rows[name]["floor"] = 1 + float(np.median(
          np.asarray(times[f"{name} alone"]) / np.asarray(times[BASELINE])))
  result = {"batch": batch, "width": width, "repeats": len(times[BASELINE]),
            "variants": rows}
  if all(p in times for p in PEER):
    mine, peer = times[PEER[0]], times[PEER[1]]
    result["softplus_vs_jax"] = {**_timing.paired_ratio(mine, peer),
                                 "ratio_of_mins": min(mine) / min(peer)}
  return result


def table(result) -> str:
  rows = [[name, *_timing.timing_cells(v),
           "" if "floor" not in v else f"{v['floor']:.3f}x",
           _timing.fmt_bytes(v["bytes_accessed"]),
           "n/a" if v["transcendentals"] is None
           else f"{v['transcendentals']:.3g}"]
          for name, v in result["variants"].items()]
  text = (f"### fwd+bwd, Dense {result['width']}x{result['width']}, batch "
          f"{result['batch']}, {result['repeats']} interleaved rounds\n\n"
          + _timing.markdown_table(["kernel", *_timing.TIMING_HEADERS,
                                    "1 + g alone", "bytes accessed",
                                    "transcendentals"],
                                   rows))
  if "softplus_vs_jax" in result:
    r = result["softplus_vs_jax"]
    text += (f"\n\nposconstr Softplus / jax.nn.softplus (paired): "
             f"{r['median']:.3f}x [{r['q1']:.3f}, {r['q3']:.3f}], "
             f"ratio of mins {r['ratio_of_mins']:.3f}x")
  return text


# The README's table: its label -> variant.
README_ROWS = {
    "`posconstr.Softplus` (one shared `exp`)": "posconstr Softplus",
    "`jax.nn.softplus`": "jax.nn.softplus",
    "`posconstr.Exp`": "posconstr Exp",
    "`posconstr.Square`": "posconstr Square",
    "`posconstr.ReLU`": "posconstr ReLU",
    "`posconstr.Sigmoid(0, 1)`": "posconstr Sigmoid",
    "`jax.nn.sigmoid`": "jax.nn.sigmoid",
}


def readme_table(payload) -> str:
  """Paired time ratios to the plain Dense per batch; Softplus vs JAX's."""
  results = payload["results"]

  def cell(v):
    ratio = f"{v['paired_ratio']['median']:.2f}x"
    return ratio + (f" ({v['floor']:.2f}x)" if v.get("floor") else "")

  table_ = _timing.markdown_table(
      ["kernel (floor: 1 + g alone)", *(f"batch {r['batch']}"
                                        for r in results)],
      [[label, *(cell(r["variants"][name]) for r in results)]
       for label, name in README_ROWS.items()])
  peer = "; ".join(f"{r['softplus_vs_jax']['median']:.2f}x "
                   f"[{r['softplus_vs_jax']['q1']:.2f}, "
                   f"{r['softplus_vs_jax']['q3']:.2f}] at batch {r['batch']}"
                   for r in results)
  return (f"{table_}\n\n`posconstr.Softplus` against `jax.nn.softplus`, "
          f"paired (median [quartiles]): {peer}.")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="128,16",
                  help="comma-separated batch sizes.")
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--variants", default=None,
                  help="comma-separated subset of: " + ", ".join(variants()))
  args = _timing.parse_args(
      ap, argv, "reparam_overhead", repeats=60, min_repeats=10, warmup=2,
      quick={"repeats": 12, "min_repeats": 6, "budget_s": 3.0})
  names = _timing.select_variants(ap, args.variants, list(variants()),
                                  BASELINE)
  report = _timing.Report("reparam_overhead", args)
  for batch in args.batches.split(","):
    res = run_batch(int(batch), args.width, names, args)
    report.add(res, table(res))
  return report.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
