"""What does projecting inside the optimizer cost? posconstr vs plain Adam.

A jitted MLP train step (MSE on random data, ``jax.value_and_grad`` +
optimizer update + ``optax.apply_updates``; params and optimizer state
donated) is timed for several model sizes and these variants, all in one
process and interleaved round-robin so that drifts of a noisy machine hit
them alike:

* ``adam``: plain ``optax.adam`` (the baseline);
* ``nonneg(all)``: ``+ posconstr.project_nonneg()``;
* ``nonneg(kernel)``: ``+ posconstr.project_nonneg(mask="*/kernel")``;
* ``maxnorm(kernel)``: ``+ posconstr.project(MaxNorm(2.0, axis=0), mask="*/kernel")``;
* ``constrain``: ``+ posconstr.constrain({"*/kernel": NonNegative(), "*/bias": Box(-1, 1)})``;
* ``optax keep_nonneg``: ``+ optax.keep_params_nonnegative()`` (the peer);
* ``adam; jit(max)``: the adam step, then a *separate* jitted, donated
  ``max(p, 0)`` pass (what not fusing costs);
* ``adam+max in-jit``: ``max(p, 0)`` applied by hand to the new params inside
  the same jitted step (the cheapest possible projection; a reference);
* ``adam+maxnorm in-jit``: the same for MaxNorm(2.0, axis=0) on the kernels
  (the by-hand reference for ``maxnorm(kernel)``).

A variant whose ``update`` cannot be traced under ``jit`` as is gets one
retry with ``tx.update`` under ``jax.ensure_compile_time_eval()`` and is
marked ``*`` with the error; one that still fails is listed as FAILED.

For each variant: median step time after compilation, its ratio to
``adam``, the median (and quartiles) of the per-round ratios to ``adam``, the
ratio of the fastest rounds (least disturbed by other processes on a shared
machine), XLA's "bytes accessed" (from ``cost_analysis()`` of the very
executable that is timed) and its ratio, the number of fusions in the entry
computation, XLA's temp buffer (``memory_analysis()``) and the minor page
faults per step (XLA:CPU maps its temp buffer afresh for every run, so a
temp of T bytes costs about T/4096 page faults each step).
``--mode update`` times the optimizer update alone instead (fixed
gradients, no forward/backward), where the projection's share is largest;
``--mode both`` runs both.

Usage::

  python -m benchmarks.projection_overhead            # 0.2M, 3M, 12M, 40M
  python -m benchmarks.projection_overhead --quick    # ~10 s smoke run
  python -m benchmarks.projection_overhead --sizes 3M,12M --repeats 40
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import optax

import posconstr
from benchmarks import _timing
from benchmarks import _xla_cost

DEPTH = 3  # Dense layers of width x width: params = DEPTH * (width^2 + width).
BATCH = 128
LEARNING_RATE = 1e-4
BASELINE = "adam"
DEFAULT_SIZES = "0.2M,3M,12M,40M"
QUICK_SIZES = "0.2M"
DEFAULT_OUT = os.path.join("benchmarks", "results", "projection_overhead.json")


# ----------------------------------------------------------------------------
# Model and data.


def width_for(n_params: float, depth: int = DEPTH) -> int:
  """The width whose MLP has about ``n_params`` parameters."""
  return max(8, int(round((-1 + math.sqrt(1 + 4 * n_params / depth)) / 2)))


def n_params_of(width: int, depth: int = DEPTH) -> int:
  return depth * (width * width + width)


def parse_size(text: str) -> float:
  text = text.strip().lower()
  scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:], None)
  return float(text[:-1]) * scale if scale else float(text)


def init_params(key, width: int, depth: int = DEPTH):
  """Linen-style params: {"Dense_i": {"kernel": (w, w), "bias": (w,)}}."""
  params = {}
  for i, k in enumerate(jax.random.split(key, depth)):
    params[f"Dense_{i}"] = {
        "kernel": jax.random.normal(k, (width, width), jnp.float32)
                  / math.sqrt(width),
        "bias": jnp.zeros((width,), jnp.float32),
    }
  return params


def mlp(params, x):
  n = len(params)
  for i in range(n):
    layer = params[f"Dense_{i}"]
    x = x @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  return jnp.mean((mlp(params, x) - y) ** 2)


def copy_tree(tree):
  """Fresh buffers (each variant donates its own)."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


# ----------------------------------------------------------------------------
# Variants.


def _nonneg_tree(params):
  return jax.tree.map(lambda p: jnp.maximum(p, 0), params)


def _maxnorm_kernels(params, max_value=2.0):
  """Keras-style MaxNorm(axis=0) of the kernels, by hand (a reference)."""
  def one(path, p):
    if not jax.tree_util.keystr(path).endswith("['kernel']"):
      return p
    norm = jnp.sqrt(jnp.sum(p * p, axis=0, keepdims=True))
    return p * jnp.where(norm <= max_value, 1.0,
                         max_value / jnp.where(norm > 0, norm, 1.0))
  return jax.tree_util.tree_map_with_path(one, params)


def variant_specs() -> Dict[str, Dict[str, Any]]:
  """name -> {"tx": optax transform, "post": in-jit fn, "separate": fn}."""
  adam = lambda: optax.adam(LEARNING_RATE)
  nn = posconstr.NonNegative
  return {
      "adam": {"tx": adam()},
      "nonneg(all)": {"tx": optax.chain(adam(), posconstr.project_nonneg())},
      "nonneg(kernel)": {"tx": optax.chain(
          adam(), posconstr.project_nonneg(mask="*/kernel"))},
      "maxnorm(kernel)": {"tx": optax.chain(adam(), posconstr.project(
          posconstr.MaxNorm(2.0, axis=0), mask="*/kernel"))},
      "constrain": {"tx": optax.chain(adam(), posconstr.constrain({
          "*/kernel": nn(), "*/bias": posconstr.Box(-1.0, 1.0)}))},
      "optax keep_nonneg": {"tx": optax.chain(
          adam(), optax.keep_params_nonnegative())},
      "adam; jit(max)": {"tx": adam(), "separate": _nonneg_tree},
      "adam+max in-jit": {"tx": adam(), "post": _nonneg_tree},
      "adam+maxnorm in-jit": {"tx": adam(), "post": _maxnorm_kernels},
  }


def _update(tx, grads, opt_state, params, cte: bool):
  if not cte:
    return tx.update(grads, opt_state, params)
  # Workaround: constant-only checks in `update` evaluate eagerly even while
  # the step is traced (traced values are traced as usual).
  with jax.ensure_compile_time_eval():
    return tx.update(grads, opt_state, params)


def build_train_step(tx, post: Optional[Callable] = None, cte: bool = False):
  def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = _update(tx, grads, opt_state, params, cte)
    params = optax.apply_updates(params, updates)
    if post is not None:
      params = post(params)
    return params, opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def build_update_step(tx, post: Optional[Callable] = None, cte: bool = False):
  def step(params, opt_state, grads):
    updates, opt_state = _update(tx, grads, opt_state, params, cte)
    params = optax.apply_updates(params, updates)
    if post is not None:
      params = post(params)
    return params, opt_state
  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """One variant: compiled executables plus its own (donated) buffers."""

  def __init__(self, name, spec, mode, params, data, cte=False):
    self.name = name
    self.cte = cte
    tx = spec["tx"]
    post = spec.get("post")
    separate = spec.get("separate")
    self.params = copy_tree(params)
    self.opt_state = tx.init(self.params)
    self.data = data
    build = build_train_step if mode == "train" else build_update_step
    t0 = time.perf_counter()
    self.step = build(tx, post, cte).lower(self.params, self.opt_state,
                                      *data).compile()
    self.compiled = [self.step]
    self.proj = None
    if separate is not None:
      self.proj = jax.jit(separate, donate_argnums=0).lower(
          self.params).compile()
      self.compiled.append(self.proj)
    self.compile_s = time.perf_counter() - t0

  def __call__(self):
    out = self.step(self.params, self.opt_state, *self.data)
    self.params, self.opt_state = out[0], out[1]
    if self.proj is not None:
      self.params = self.proj(self.params)
    return (self.params, self.opt_state) + tuple(out[2:])

  def costs(self) -> Dict[str, Any]:
    summaries = [_xla_cost.cost_summary(c) for c in self.compiled]
    out = {}
    for key in summaries[0]:
      vals = [s[key] for s in summaries]
      out[key] = None if any(v is None for v in vals) else float(sum(vals))
    stats = [_xla_cost.hlo_stats(c) for c in self.compiled]
    out["entry_fusions"] = sum(s.get("entry_fusions", 0) for s in stats)
    temps = [_xla_cost.temp_bytes(c) for c in self.compiled]
    out["temp_bytes"] = None if None in temps else sum(temps)
    out["executables"] = len(self.compiled)
    return out

  def hlo_text(self) -> str:
    return "\n\n".join(c.as_text() for c in self.compiled)

  def check(self) -> Dict[str, Any]:
    """Feasibility of the current params (sanity: the variant did its job)."""
    leaves = jax.tree_util.tree_leaves_with_path(self.params)
    kernels = [v for p, v in leaves if "kernel" in jax.tree_util.keystr(p)]
    finite = all(bool(jnp.all(jnp.isfinite(v))) for _, v in leaves)
    return {"finite": finite,
            "min_kernel": float(min(jnp.min(k) for k in kernels))}


# ----------------------------------------------------------------------------
# The benchmark.


def run_size(n_target, mode, names, args) -> Dict[str, Any]:
  width = width_for(n_target)
  n = n_params_of(width)
  key = jax.random.PRNGKey(0)
  kp, kx, ky, kg = jax.random.split(key, 4)
  params = init_params(kp, width)
  if mode == "train":
    data = (jax.random.normal(kx, (BATCH, width), jnp.float32),
            jax.random.normal(ky, (BATCH, width), jnp.float32))
  else:
    data = (jax.tree.map(lambda p: 1e-2 * jax.random.normal(kg, p.shape),
                         params),)
  specs = variant_specs()
  runners, notes = {}, {}
  for name in names:
    try:
      runners[name] = Runner(name, specs[name], mode, params, data)
    except Exception as e:  # pylint: disable=broad-except
      first = f"{type(e).__name__}: {str(e).splitlines()[0]}"
      try:  # E.g. a check in `update` that is not jit-safe.
        runners[name] = Runner(name, specs[name], mode, params, data, cte=True)
        notes[name] = ("does not trace under jit as is (" + first + "); "
                       "timed with tx.update under "
                       "jax.ensure_compile_time_eval()")
      except Exception:  # pylint: disable=broad-except
        notes[name] = "FAILED: " + first
      _timing.eprint(f"  [{name}] {notes[name]}")
  names = [n for n in names if n in runners]
  del params
  repeats = args.repeats
  times = _timing.interleaved_times(
      runners, repeats=repeats, warmup=args.warmup,
      time_budget_s=args.budget_s, min_repeats=args.min_repeats)
  base = times[BASELINE]
  base_costs = runners[BASELINE].costs()
  rows = {}
  for name in names:
    r = runners[name]
    costs = r.costs()
    b = costs["bytes accessed"]
    bb = base_costs["bytes accessed"]
    rows[name] = {
        **_timing.timing_row(times[name], base),
        "bytes_accessed": b,
        "bytes_ratio": (b / bb) if (b is not None and bb) else None,
        "flops": costs["flops"],
        "entry_fusions": costs["entry_fusions"],
        "temp_bytes": costs["temp_bytes"],
        "minor_faults_per_step": _xla_cost.minor_faults_per_call(r),
        "executables": costs["executables"],
        "compile_s": r.compile_s,
        "check": r.check(),
        "note": notes.get(name),
    }
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      safe = "".join(c if c.isalnum() else "_" for c in name)
      with open(os.path.join(args.dump_hlo,
                             f"{mode}_{width}_{safe}.hlo.txt"), "w") as f:
        f.write(r.hlo_text())
  failed = {k: v for k, v in notes.items() if k not in rows}
  return {"mode": mode, "width": width, "depth": DEPTH, "batch": BATCH,
          "n_params": n, "repeats": len(base), "variants": rows,
          "failed": failed}


def table(result) -> str:
  headers = ["variant", *_timing.TIMING_HEADERS, "bytes accessed",
             "bytes ratio", "fusions", "XLA temp", "page faults/step"]
  rows = []
  for name, v in result["variants"].items():
    rows.append([
        name + (" *" if v.get("note") else ""), *_timing.timing_cells(v),
        _timing.fmt_bytes(v["bytes_accessed"]),
        _timing.fmt_ratio(v["bytes_ratio"], 4),
        v["entry_fusions"], _timing.fmt_bytes(v["temp_bytes"]),
        "n/a" if v["minor_faults_per_step"] is None
        else f"{v['minor_faults_per_step']:.0f}"])
  title = (f"### {result['mode']} step, {result['n_params'] / 1e6:.2f}M params "
           f"(MLP {result['depth']} x {result['width']}x{result['width']}, "
           f"batch {result['batch']}), {result['repeats']} interleaved rounds")
  text = title + "\n\n" + _timing.markdown_table(headers, rows)
  for name, v in result["variants"].items():
    if v.get("note"):
      text += f"\n\n\\* {name}: {v['note']}"
  for name, note in result.get("failed", {}).items():
    text += f"\n\n{name}: {note}"
  return text


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default=None,
                  help=f"comma-separated parameter counts (default "
                       f"{DEFAULT_SIZES}; --quick: {QUICK_SIZES}).")
  ap.add_argument("--mode", choices=("train", "update", "both"),
                  default="train",
                  help="time the full train step, the optimizer update "
                       "alone (fixed grads), or both.")
  ap.add_argument("--variants", default=None,
                  help="comma-separated subset of: "
                       + ", ".join(variant_specs()))
  _timing.add_round_args(ap, DEFAULT_OUT, repeats=40, quick_repeats=8,
                         min_repeats=15, warmup=1,
                         quick_help="small sizes, few repeats (~10 s).")
  ap.add_argument("--dump-hlo", default=None,
                  help="directory for the optimized HLO of every variant.")
  args = ap.parse_args(argv)

  _timing.resolve_rounds(args, repeats=40, quick_repeats=8,
                         quick_min_repeats=5)
  args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
  names = _timing.select_variants(ap, args.variants, list(variant_specs()),
                                  BASELINE)
  modes = ["train", "update"] if args.mode == "both" else [args.mode]
  sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

  payload = _timing.start_report("projection_overhead", args)
  t_start = time.perf_counter()
  for mode in modes:
    for n in sizes:
      t0 = time.perf_counter()
      res = run_size(n, mode, names, args)
      res["wall_s"] = time.perf_counter() - t0
      res["loadavg_after"] = _timing.loadavg()
      payload["results"].append(res)
      print(table(res), f"\n\n({res['wall_s']:.1f} s; load average after: "
            f"{res['loadavg_after']})\n", flush=True)
      _timing.write_json(args.out, payload)  # Partial results survive.
  _timing.finish(args.out, payload, t_start)
  return 0


if __name__ == "__main__":
  sys.exit(main())
