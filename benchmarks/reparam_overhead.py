"""What does a reparameterized kernel cost? fwd+bwd of a Dense layer.

One Dense layer ``y = x @ K + b`` (width x width, default 1024) and the loss
``mean(y**2)``; ``jax.value_and_grad`` with respect to the parameters, jitted
and compiled ahead. The kernel is ``K = g(latent)`` for:

* ``dense``: no ``g`` (the baseline);
* ``posconstr Softplus``: :class:`posconstr.Softplus` (a ``custom_jvp`` whose
  forward and backward share one ``exp``);
* ``jax.nn.softplus``: the same function from JAX (the peer);
* ``posconstr Exp`` / ``Square`` / ``ReLU`` / ``Sigmoid``, and
  ``jax.nn.sigmoid`` (the peer of ``Sigmoid(0, 1)``).

All variants run in one process, interleaved round-robin (``_timing``), for
each batch size (default 128 and 16: at small batches the matmul is cheap and
the elementwise ``g`` and its backward show). Reported: median time after
compilation, the median of the per-round ratios to ``dense``, the ratios of
medians and of minima (the least disturbed by neighbours), and XLA's cost analysis of the very executable that is timed
(bytes accessed, transcendentals), plus the paired ratio of
``posconstr Softplus`` to ``jax.nn.softplus``.

Usage::

  python -m benchmarks.reparam_overhead                # batches 128,16
  python -m benchmarks.reparam_overhead --quick        # ~10 s smoke run
  python -m benchmarks.reparam_overhead --batches 128 --repeats 100 --out r.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

import posconstr
from benchmarks import _timing
from benchmarks import _xla_cost

BASELINE = "dense"
PEER = ("posconstr Softplus", "jax.nn.softplus")
DEFAULT_OUT = os.path.join("benchmarks", "results", "reparam_overhead.json")


def variants() -> Dict[str, Optional[Callable]]:
  return {
      "dense": None,
      "posconstr Softplus": posconstr.Softplus().forward,
      "jax.nn.softplus": jax.nn.softplus,
      "posconstr Exp": posconstr.Exp().forward,
      "posconstr Square": posconstr.Square().forward,
      "posconstr ReLU": posconstr.ReLU().forward,
      "posconstr Sigmoid": posconstr.Sigmoid(0.0, 1.0).forward,
      "jax.nn.sigmoid": jax.nn.sigmoid,
  }


def make_step(g: Optional[Callable]):
  def loss(params, x):
    kernel = params["latent"] if g is None else g(params["latent"])
    y = x @ kernel + params["bias"]
    return jnp.mean(y * y)
  return jax.value_and_grad(loss)


def run_batch(batch: int, width: int, names, args) -> Dict[str, Any]:
  kk, kx = jax.random.split(jax.random.key(0))
  params = {"latent": jax.random.normal(kk, (width, width), jnp.float32)
                      / np.sqrt(width),
            "bias": jnp.zeros((width,), jnp.float32)}
  x = jax.random.normal(kx, (batch, width), jnp.float32)
  specs = variants()
  compiled, costs, compile_s, checks = {}, {}, {}, {}
  for name in names:
    t0 = time.perf_counter()
    exe = jax.jit(make_step(specs[name])).lower(params, x).compile()
    compile_s[name] = time.perf_counter() - t0
    compiled[name] = exe
    costs[name] = _xla_cost.cost_summary(exe)
    value, grads = exe(params, x)
    checks[name] = bool(np.isfinite(float(value))
                        and all(np.isfinite(np.asarray(v)).all()
                                for v in jax.tree.leaves(grads)))
  fns = {name: (lambda exe=exe: exe(params, x)) for name, exe in compiled.items()}
  times = _timing.interleaved_times(fns, repeats=args.repeats, warmup=args.warmup,
                                    time_budget_s=args.budget_s,
                                    min_repeats=args.min_repeats)
  base = times[BASELINE]
  rows = {}
  for name in names:
    rows[name] = {
        **_timing.timing_row(times[name], base),
        "bytes_accessed": costs[name]["bytes accessed"],
        "flops": costs[name]["flops"],
        "transcendentals": costs[name]["transcendentals"],
        "compile_s": compile_s[name],
        "finite": checks[name],
    }
  result = {"batch": batch, "width": width, "repeats": len(base), "variants": rows}
  if all(p in times for p in PEER):
    result["softplus_vs_jax"] = _timing.paired_ratio(times[PEER[0]], times[PEER[1]])
    result["softplus_vs_jax"]["ratio_of_mins"] = min(times[PEER[0]]) / min(times[PEER[1]])
  return result


def table(result) -> str:
  headers = ["kernel", *_timing.TIMING_HEADERS, "bytes accessed",
             "transcendentals"]
  rows = []
  for name, v in result["variants"].items():
    tr = v["transcendentals"]
    rows.append([name, *_timing.timing_cells(v),
                 _timing.fmt_bytes(v["bytes_accessed"]),
                 "n/a" if tr is None else f"{tr:.3g}"])
  text = (f"### fwd+bwd, Dense {result['width']}x{result['width']}, batch "
          f"{result['batch']}, {result['repeats']} interleaved rounds\n\n"
          + _timing.markdown_table(headers, rows))
  if "softplus_vs_jax" in result:
    r = result["softplus_vs_jax"]
    text += (f"\n\nposconstr Softplus / jax.nn.softplus (paired): "
             f"{r['median']:.3f}x [{r['q1']:.3f}, {r['q3']:.3f}], "
             f"ratio of mins {r['ratio_of_mins']:.3f}x")
  return text


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="128,16", help="comma-separated batch sizes.")
  ap.add_argument("--width", type=int, default=1024)
  ap.add_argument("--variants", default=None,
                  help="comma-separated subset of: " + ", ".join(variants()))
  _timing.add_round_args(ap, DEFAULT_OUT, repeats=60, quick_repeats=12,
                         min_repeats=10, warmup=2,
                         quick_help="few repeats (~10 s).")
  args = ap.parse_args(argv)
  _timing.resolve_rounds(args, repeats=60, quick_repeats=12,
                         quick_min_repeats=6, quick_budget_s=3.0)
  names = _timing.select_variants(ap, args.variants, list(variants()),
                                  BASELINE)

  payload = _timing.start_report("reparam_overhead", args)
  t_start = time.perf_counter()
  for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
    result = run_batch(batch, args.width, names, args)
    result["loadavg_after"] = _timing.loadavg()
    payload["results"].append(result)
    print("\n" + table(result) + f"\n\n(load average after: "
          f"{result['loadavg_after']})", flush=True)
    _timing.write_json(args.out, payload)  # Partial results survive.
  print()
  _timing.finish(args.out, payload, t_start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
