"""Reductions down the columns of one kernel on XLA:CPU: posconstr's slice
sums (``posconstr/sets/_slice_sums.py``) against ``jnp.sum``/``jnp.max``.

Per kernel of about 25M float32 weights, ``rows x columns``: a norm's sum of
squares (``MaxNorm``, ``UnitNorm``), the count and sum over ``w > theta`` of
one Newton pass of ``Simplex``, and the maximum that starts it (with the two
sums of the mean start, in the same pass). Each pair is timed in one
process, interleaved, after compilation; the ratio is the median over
rounds of posconstr's time / ``jnp``'s. It runs on whatever backend jax
picks (other backends than the CPU get ``jnp``'s reductions in both
columns).

Usage::

  python -m benchmarks.column_sums            # 25M weights
  python -m benchmarks.column_sums --quick    # 2M, a smoke run
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks import _timing
from posconstr.sets import _slice_sums

COLUMNS = (1_000, 5_000, 10_000, 12_500, 20_000)
SUMMARY_KEYS = ("rows", "columns", "median_s", "paired_ratio")


def _pairs(theta):
  """name -> (the jnp reduction, posconstr's), each of one kernel."""
  def above(p):
    return p > theta

  return {
      "sum of squares": (
          lambda p: jnp.sum(p * p, axis=0, keepdims=True),
          lambda p: _slice_sums.sum_of_squares(p, (0,))),
      "count, sum over w > theta": (
          lambda p: (jnp.sum(above(p), axis=0, dtype=jnp.int32),
                     jnp.sum(jnp.where(above(p), p, 0), axis=0)),
          lambda p: _slice_sums.slice_sums(
              lambda b: (above(b).astype(jnp.int32), jnp.where(above(b), b,
                                                                0)),
              [p], (0,))),
      "max (and the sums of v, abs(v))": (
          lambda p: jnp.max(p, axis=0, keepdims=True),
          lambda p: _slice_sums.slice_sums(
              lambda b: (b, b, jnp.abs(b)), [p], (0,),
              ("max", "sum", "sum"))),
  }


def run_shape(n, columns, args):
  rows = max(1, round(n / columns))
  p = jax.random.normal(jax.random.key(0), (rows, columns))
  theta = jnp.full((1, columns), 1.0)
  fns = {}
  for name, (peer, ours) in _pairs(theta).items():
    for side, fn in (("jnp", peer), ("posconstr", ours)):
      jitted = jax.jit(fn)
      fns[f"{name} | {side}"] = lambda f=jitted: f(p)
  times = _timing.interleaved_times(fns, repeats=args.repeats,
                                    warmup=args.warmup, budget_s=args.budget_s,
                                    min_repeats=args.min_repeats)
  pairs = {}
  for name in _pairs(theta):
    peer, ours = times[f"{name} | jnp"], times[f"{name} | posconstr"]
    pairs[name] = {"jnp": {"times_s": peer, **_timing.summarize(peer)},
                   "posconstr": _timing.timing_row(ours, peer)}
  return {"rows": rows, "columns": columns, "pairs": pairs}


def table(results) -> str:
  rows = [[name, f"{r['rows']:,} x {r['columns']:,}",
           _timing.fmt_time(v["jnp"]["median_s"]),
           _timing.fmt_time(v["posconstr"]["median_s"]),
           _timing.fmt_ratio(v["posconstr"]["paired_ratio"]["median"], 2)]
          for r in results for name, v in r["pairs"].items()]
  return _timing.markdown_table(
      ["reduction down the columns", "kernel", "jnp", "posconstr",
       "posconstr / jnp"], rows)


def readme_table(payload) -> str:
  return table(payload["results"])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                               allow_abbrev=False)
  ap.add_argument("--columns", default=None,
                  help="comma-separated column counts (default "
                       f"{','.join(map(str, COLUMNS))}; --quick 1000,12500).")
  args = _timing.parse_args(ap, argv, "column_sums", repeats=15,
                            min_repeats=5, warmup=1,
                            quick={"repeats": 3, "min_repeats": 2})
  n = 2e6 if args.quick else 25e6
  columns = args.columns or ("1000,12500" if args.quick else
                             ",".join(map(str, COLUMNS)))
  report = _timing.Report("column_sums", args)
  for c in columns.split(","):
    result = run_shape(n, int(c), args)
    report.add(result, table([result]))
  return report.finish(SUMMARY_KEYS)


if __name__ == "__main__":
  sys.exit(main())
