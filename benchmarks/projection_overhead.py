"""What does projecting inside the optimizer cost? posconstr vs plain Adam.

A jitted MLP train step (MSE on random data, ``jax.value_and_grad`` + update
+ ``optax.apply_updates``; params and state donated), for several sizes, with

* ``adam``: plain ``optax.adam`` (the baseline), and chained after it
  ``project_nonneg()`` (``nonneg(all)``), ``project_nonneg(mask="*/kernel")``
  (``nonneg(kernel)``), ``project(MaxNorm(2.0, axis=0), mask="*/kernel")``
  (``maxnorm(kernel)``), ``constrain({"*/kernel": NonNegative(), "*/bias":
  Box(-1, 1)})`` and the peer ``optax.keep_params_nonnegative()``;
* ``adam; jit(max)``: then a *separate* jitted ``max(p, 0)`` (what not fusing
  costs); ``adam+max in-jit`` / ``adam+maxnorm in-jit``: ``max(p, 0)`` /
  MaxNorm of the kernels by hand inside the same step (references);
* ``projected(kernel)``: ``projected(adam, NonNegative(), mask="*/kernel")``;
  ``unitnorm``/``minmaxnorm``/``simplex(kernel)``: those sets (``axis=0``)
  chained after Adam, and ``... post``: the same sets by
  ``project_params`` after ``apply_updates`` in the same step, which XLA
  can do in place (the in-optimizer form must return an update, so Adam's
  step becomes a scratch buffer that XLA:CPU maps afresh on every call).

Per variant: median step time after compilation, paired ratio to ``adam``,
ratios of medians and of minima; XLA's bytes accessed of the very executable
that is timed, the fusions in its entry computation, its temp buffer and the
minor page faults per step (XLA:CPU maps the temp buffer afresh each run).
``--mode update`` times the optimizer update alone (fixed gradients), where
the projection's share is largest. The HLO: ``XLA_FLAGS=--xla_dump_to=DIR``.
``--huge-pages`` runs under glibc's transparent huge pages for large blocks,
where those page faults are up to 512 times fewer (Linux, with transparent
huge pages not set to ``never``; its results are ``NAME_hugetlb``).

Usage::

  python -m benchmarks.projection_overhead            # 0.2M, 3M, 12M, 40M
  python -m benchmarks.projection_overhead --quick    # ~10 s smoke run
  python -m benchmarks.projection_overhead --sizes 3M,12M --repeats 40
  python -m benchmarks.projection_overhead --mode update --sizes 100M \
      --depth 4 --variants "adam,unitnorm(kernel),unitnorm(kernel) post"
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

import posconstr
from benchmarks import _timing
from benchmarks import _xla_cost

# glibc's malloc asks for transparent huge pages for its large blocks.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
DEPTH = 3  # Dense layers of width x width: params = depth * (width^2 + width).
BATCH = 128
LEARNING_RATE = 1e-4
BASELINE = "adam"
# What the README table renders (see _timing.summary).
SUMMARY_KEYS = ("mode", "n_params", "width", "repeats", "median_s",
                "paired_ratio", "ratio_of_mins", "bytes_accessed",
                "bytes_ratio", "entry_fusions", "temp_bytes",
                "minor_faults_per_step", "failed")


def width_for(n_params: float, depth: int = DEPTH) -> int:
  """The width whose MLP has about ``n_params`` parameters."""
  return max(8, round((-1 + math.sqrt(1 + 4 * n_params / depth)) / 2))


def parse_size(text: str) -> float:
  text = text.strip().lower()
  scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:])
  return float(text[:-1]) * scale if scale else float(text)


def init_params(key, width: int, depth: int = DEPTH):
  """Linen-style params: {"Dense_i": {"kernel": (w, w), "bias": (w,)}}."""
  return {f"Dense_{i}": {"kernel": jax.random.normal(k, (width, width))
                                   / math.sqrt(width),
                         "bias": jnp.zeros((width,))}
          for i, k in enumerate(jax.random.split(key, depth))}


def loss_fn(params, x, y):
  for i in range(len(params)):
    x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
    x = jax.nn.relu(x) if i < len(params) - 1 else x
  return jnp.mean((x - y) ** 2)


def _nonneg_tree(params):
  return jax.tree.map(lambda p: jnp.maximum(p, 0), params)


def _on_kernels(fn, tree, *rest):
  """``fn`` on the kernels of ``tree`` (and the same leaves of ``rest``);
  other leaves of ``tree`` as they are."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x, *r: fn(x, *r)
      if jax.tree_util.keystr(path).endswith("['kernel']") else x,
      tree, *rest)


def _maxnorm_kernels(params, max_value=2.0):
  """Keras-style MaxNorm(axis=0) of the kernels, by hand (a reference)."""
  def one(p):
    norm = jnp.sqrt(jnp.sum(p * p, axis=0, keepdims=True))
    return p * jnp.where(norm <= max_value, 1.0,
                         max_value / jnp.where(norm > 0, norm, 1.0))
  return _on_kernels(one, params)


def _unitnorm_kernels(params):
  """UnitNorm(axis=0) of the kernels, by hand (a reference)."""
  return _on_kernels(
      lambda p: p / jnp.sqrt(jnp.sum(p * p, axis=0, keepdims=True)), params)


def _mask_by_hand() -> optax.GradientTransformation:
  """The projected gradient at 0 by hand, for the kernels (the floor of
  ``projected``: what its mask costs at the least)."""
  return optax.stateless(lambda grads, params: _on_kernels(
      lambda g, p: jnp.where((p <= 0) & (g > 0), 0, g), grads, params))


def maxnorm_update_by_hand() -> optax.GradientTransformation:
  """``MaxNorm(2, axis=0)(p + u) - p`` for the kernels, by hand (the floor of
  the optimizer form, without posconstr's exact landing)."""
  def update(updates, params):
    stepped = jax.tree.map(jnp.add, params, updates)
    return jax.tree.map(jnp.subtract, _maxnorm_kernels(stepped), params)
  return optax.stateless(update)


def variant_specs() -> Dict[str, Dict[str, Any]]:
  """name -> {"tx": optax transform, "post": in-jit fn, "separate": fn}."""
  adam = lambda: optax.adam(LEARNING_RATE)  # noqa: E731
  with_adam = lambda tx: {"tx": optax.chain(adam(), tx)}  # noqa: E731
  return {
      "adam": {"tx": adam()},
      "nonneg(all)": with_adam(posconstr.project_nonneg()),
      "nonneg(kernel)": with_adam(posconstr.project_nonneg(mask="*/kernel")),
      "maxnorm(kernel)": with_adam(posconstr.project(
          posconstr.MaxNorm(2.0, axis=0), mask="*/kernel")),
      "constrain": with_adam(posconstr.constrain({
          "*/kernel": posconstr.NonNegative(),
          "*/bias": posconstr.Box(-1.0, 1.0)})),
      "optax keep_nonneg": with_adam(optax.keep_params_nonnegative()),
      "projected(kernel)": {"tx": posconstr.projected(
          adam(), posconstr.NonNegative(), mask="*/kernel")},
      "projected(kernel) unguarded": {"tx": posconstr.projected(
          adam(), posconstr.NonNegative(), mask="*/kernel",
          nan_guard=False)},
      "unitnorm(kernel)": with_adam(posconstr.project(
          posconstr.UnitNorm(axis=0), mask="*/kernel")),
      "minmaxnorm(kernel)": with_adam(posconstr.project(
          posconstr.MinMaxNorm(0.5, 2.0, axis=0), mask="*/kernel")),
      "simplex(kernel)": with_adam(posconstr.project(
          posconstr.Simplex(axis=0), mask="*/kernel")),
      # The same sets by posconstr.project_params after apply_updates.
      **{f"{name}(kernel) post": {"tx": adam(), "post": functools.partial(
          posconstr.project_params, constraint=c, mask="*/kernel")}
         for name, c in (("unitnorm", posconstr.UnitNorm(axis=0)),
                         ("maxnorm", posconstr.MaxNorm(2.0, axis=0)),
                         ("simplex", posconstr.Simplex(axis=0)))},
      "mask by hand+adam": {
          "tx": optax.chain(_mask_by_hand(), adam()),
          "post": functools.partial(_on_kernels,
                                    lambda p: jnp.maximum(p, 0))},
      "adam+maxnorm update by hand": with_adam(maxnorm_update_by_hand()),
      "adam; jit(max)": {"tx": adam(), "separate": _nonneg_tree},
      "adam+max in-jit": {"tx": adam(), "post": _nonneg_tree},
      "adam+maxnorm in-jit": {"tx": adam(), "post": _maxnorm_kernels},
      "adam+unitnorm in-jit": {"tx": adam(), "post": _unitnorm_kernels},
  }


def build_step(mode: str, tx, post: Optional[Callable]):
  """The jitted step: ``(params, opt_state, *data) -> (params, opt_state,
  ...)``; data is ``(x, y)`` for ``train``, ``(grads,)`` for ``update``."""
  def step(params, opt_state, *data):
    if mode == "train":
      loss, grads = jax.value_and_grad(loss_fn)(params, *data)
    else:
      loss, grads = (), data[0]
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (post(params) if post else params), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


class Runner:
  """One variant: compiled executables plus its own (donated) buffers."""

  def __init__(self, spec, mode, params, data):
    self.params = jax.tree.map(lambda a: jnp.array(a, copy=True), params)
    self.opt_state = spec["tx"].init(self.params)
    self.data = data
    self.step, self.compile_s = _timing.compile_timed(
        build_step(mode, spec["tx"], spec.get("post")), self.params,
        self.opt_state, *data)
    self.compiled, self.proj = [self.step], None
    if "separate" in spec:
      self.proj, t = _timing.compile_timed(
          jax.jit(spec["separate"], donate_argnums=0), self.params)
      self.compiled.append(self.proj)
      self.compile_s += t

  def __call__(self):
    self.params, self.opt_state, loss = self.step(self.params, self.opt_state,
                                                  *self.data)
    if self.proj is not None:
      self.params = self.proj(self.params)
    return self.params, self.opt_state, loss

  def costs(self) -> Dict[str, Any]:
    """XLA's account, added up over the executables of one step."""
    parts = [{**_xla_cost.cost_summary(c), **_xla_cost.fusion_counts(c),
              "temp_bytes": _xla_cost.temp_bytes(c)} for c in self.compiled]
    return {k: None if any(p[k] is None for p in parts)
            else sum(p[k] for p in parts) for k in parts[0]}

  def min_kernel(self) -> float:
    """The smallest kernel entry now (sanity: the variant did its job)."""
    return min(float(jnp.min(layer["kernel"]))
               for layer in self.params.values())


def run_size(n_target, mode, names, args) -> Dict[str, Any]:
  width = width_for(n_target, args.depth)
  kp, kx, ky, kg = jax.random.split(jax.random.key(0), 4)
  params = init_params(kp, width, args.depth)
  if mode == "train":
    data = (jax.random.normal(kx, (BATCH, width)),
            jax.random.normal(ky, (BATCH, width)))
  else:
    data = (jax.tree.map(lambda p: 1e-2 * jax.random.normal(kg, p.shape),
                         params),)
  specs = variant_specs()
  runners, notes = {}, {}
  for name in names:
    try:
      runners[name] = Runner(specs[name], mode, params, data)
    except Exception as e:  # pylint: disable=broad-except
      notes[name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"
      _timing.eprint(f"  [{name}] {notes[name]}")
  del params
  times = _timing.interleaved_times(
      runners, repeats=args.repeats, warmup=args.warmup,
      budget_s=args.budget_s, min_repeats=args.min_repeats)
  base_bytes = runners[BASELINE].costs()["bytes accessed"]
  rows = {}
  for name, r in runners.items():
    costs = r.costs()
    b = costs.pop("bytes accessed")
    rows[name] = {
        **_timing.timing_row(times[name], times[BASELINE]),
        "bytes_accessed": b,
        "bytes_ratio": b / base_bytes if b is not None and base_bytes else None,
        **costs, "executables": len(r.compiled),
        "minor_faults_per_step": _xla_cost.minor_faults_per_call(r),
        "compile_s": r.compile_s, "min_kernel": r.min_kernel()}
  return {"mode": mode, "width": width, "depth": args.depth, "batch": BATCH,
          "n_params": args.depth * (width * width + width),
          "repeats": len(times[BASELINE]), "variants": rows,
          "failed": notes}


def table(result) -> str:
  rows = []
  for name, v in result["variants"].items():
    faults = v.get("minor_faults_per_step")
    rows.append([
        name, *_timing.timing_cells(v),
        _timing.fmt_bytes(v["bytes_accessed"]),
        _timing.fmt_ratio(v["bytes_ratio"], 4), v["entry_fusions"],
        _timing.fmt_bytes(v["temp_bytes"]),
        "n/a" if faults is None else f"{faults:.0f}"])
  text = (f"### {result['mode']} step, {result['n_params'] / 1e6:.2f}M params "
          f"(MLP {result['depth']} x {result['width']}x{result['width']}, "
          f"batch {result['batch']}), {result['repeats']} interleaved rounds"
          "\n\n" + _timing.markdown_table(
              ["variant", *_timing.TIMING_HEADERS, "bytes accessed",
               "bytes ratio", "fusions", "XLA temp", "page faults/step"],
              rows))
  return text + "".join(f"\n\n{k}: {v}" for k, v in result["failed"].items())


# The README's table: its label -> variant; train step, from 1M parameters up
# (at 0.2M, the --quick size, dispatch dominates).
README_ROWS = {
    "`project_nonneg()`": "nonneg(all)",
    '`project_nonneg(mask="*/kernel")`': "nonneg(kernel)",
    "`constrain({kernel: NonNegative, bias: Box})`": "constrain",
    "`optax.keep_params_nonnegative` (peer)": "optax keep_nonneg",
    '`projected(adam, NonNegative(), mask="*/kernel")`': "projected(kernel)",
    "the same, `nan_guard=False`": "projected(kernel) unguarded",
    "their floor: the same mask by hand before Adam": "mask by hand+adam",
    "`project(MaxNorm(2, axis=0))`": "maxnorm(kernel)",
    "its floor: `P(p + u) - p` by hand after Adam":
        "adam+maxnorm update by hand",
    "`project_params(MaxNorm(2, axis=0))` after `apply_updates`":
        "maxnorm(kernel) post",
    "MaxNorm by hand after `apply_updates`, same jit": "adam+maxnorm in-jit",
    "Adam, then a separate jitted projection pass": "adam; jit(max)",
}


def readme_table(payload) -> str:
  """Paired time ratios to Adam per size, and the range of bytes ratios."""
  results = [r for r in payload["results"]
             if r["mode"] == "train" and r["n_params"] >= 1e6]
  rows = []
  for label, name in README_ROWS.items():
    v = [r["variants"][name] for r in results]
    lo, hi = (f(x["bytes_ratio"] for x in v) for f in (min, max))
    rows.append([label, *(f"{x['paired_ratio']['median']:.2f}x" for x in v),
                 f"{lo:.3f}x" if f"{lo:.3f}" == f"{hi:.3f}"
                 else f"{lo:.2f}–{hi:.2f}x"])
  return _timing.markdown_table(
      ["variant", *(f"{r['n_params'] / 1e6:.2g}M params" for r in results),
       "bytes"], rows)


def main(argv=None, name: str = "projection_overhead",
         sizes: tuple[str, str] = ("0.2M,3M,12M,40M", "0.2M"),
         **defaults) -> int:
  """Runs the benchmark; ``name`` names its results, ``sizes`` are the
  default sizes (full, ``--quick``) and ``defaults`` the other options'
  defaults (``benchmarks.projection_scale`` presets them)."""
  # No abbreviations: --huge-pages is read before parsing, to name the results.
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               allow_abbrev=False)
  ap.add_argument("--sizes", default=None,
                  help=f"comma-separated parameter counts (default "
                       f"{sizes[0]}; --quick: {sizes[1]}).")
  ap.add_argument("--mode", choices=("train", "update", "both"),
                  default="train",
                  help="time the full train step, the optimizer update "
                       "alone (fixed grads), or both.")
  ap.add_argument("--depth", type=int, default=DEPTH,
                  help="Dense layers of width x width (default %(default)s).")
  ap.add_argument("--variants", default=None,
                  help="comma-separated subset of: "
                       + ", ".join(variant_specs()))
  ap.add_argument("--huge-pages", action="store_true",
                  help="rerun this command under GLIBC_TUNABLES="
                       f"{HUGE_PAGES} (glibc >= 2.35) and name the results "
                       "NAME_hugetlb: XLA's scratch then faults in 2 MB "
                       "pages instead of 4 kB ones.")
  ap.set_defaults(**defaults)
  argv = sys.argv[1:] if argv is None else list(argv)
  module = f"benchmarks.{name}"
  if _timing.option(argv, "--huge-pages", action="store_true"):
    name += "_hugetlb"
  args = _timing.parse_args(ap, argv, name, repeats=40,
                            min_repeats=15, warmup=1,
                            quick={"repeats": 8, "min_repeats": 5})
  if args.huge_pages and "glibc.malloc.hugetlb=" not in os.environ.get(
      "GLIBC_TUNABLES", ""):
    # glibc reads its tunables at start-up only: start again with them (a
    # hugetlb setting of the caller's own, e.g. =2, is kept as it is).
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [
        os.environ.get("GLIBC_TUNABLES"), HUGE_PAGES])))
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
  names = _timing.select_variants(ap, args.variants, list(variant_specs()),
                                  BASELINE)
  report = _timing.Report(name, args)
  for mode in ["train", "update"] if args.mode == "both" else [args.mode]:
    for size in (args.sizes or sizes[args.quick]).split(","):
      t0 = time.perf_counter()
      res = run_size(parse_size(size), mode, names, args)
      res["wall_s"] = time.perf_counter() - t0
      report.add(res, table(res) + f"\n\n({res['wall_s']:.1f} s)")
  return report.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
