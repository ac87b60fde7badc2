"""The constraint sets that are not elementwise, at 100M parameters.

``benchmarks.projection_overhead``'s optimizer update alone (fixed
gradients, donated buffers) on four 5000x5000 kernels and their biases:
Adam, then ``project_nonneg``, ``projected``, and per-axis ``MaxNorm``,
``UnitNorm``, ``MinMaxNorm`` and ``Simplex``, each both as the Optax
transform and by ``project_params`` after ``apply_updates`` (``... post``).
Its results are ``projection_scale.json`` (``projection_scale_hugetlb.json``
under ``--huge-pages``); the README's tables are :func:`readme_table`.

The reductions down the columns that these sets make are timed on their
own, against ``jnp.sum``, by ``benchmarks.column_sums``.

Usage::

  python -m benchmarks.projection_scale            # 100M parameters
  python -m benchmarks.projection_scale --quick    # 3M, a smoke run
  python -m benchmarks.projection_scale --huge-pages  # glibc huge pages
"""

from __future__ import annotations

import sys

from benchmarks import _timing
from benchmarks import projection_overhead

# The README's table: its label -> variant.
ROWS = {
    "`project_nonneg()`": "nonneg(all)",
    '`projected(adam, NonNegative(), mask="*/kernel")`': "projected(kernel)",
    "`project(MaxNorm(2, axis=0))`": "maxnorm(kernel)",
    "`project_params(MaxNorm(2, axis=0))` after `apply_updates`":
        "maxnorm(kernel) post",
    "`project(UnitNorm(axis=0))`": "unitnorm(kernel)",
    "`project(MinMaxNorm(0.5, 2, axis=0))`": "minmaxnorm(kernel)",
    "`project_params(UnitNorm(axis=0))` after `apply_updates`":
        "unitnorm(kernel) post",
    "the same by hand, `p / norm(p)`, after `apply_updates`":
        "adam+unitnorm in-jit",
    "`project(Simplex(axis=0))`": "simplex(kernel)",
    "`project_params(Simplex(axis=0))` after `apply_updates`":
        "simplex(kernel) post",
}


def readme_table(payload) -> str:
  """Per variant: step time, paired ratio to Adam, bytes, XLA scratch and the
  page faults per step."""
  (res,) = payload["results"]
  variants = res["variants"]
  rows = []
  for label, name in {"Adam alone": projection_overhead.BASELINE,
                      **ROWS}.items():
    v = variants[name]
    faults = v.get("minor_faults_per_step")
    rows.append([label, f"{v['median_s'] * 1e3:.0f} ms",
                 f"{v['paired_ratio']['median']:.2f}x",
                 f"{v['bytes_ratio']:.2f}x", _timing.fmt_bytes(v["temp_bytes"]),
                 "n/a" if faults is None else f"{faults:,.0f}"])
  return _timing.markdown_table(
      ["after Adam", "step", "time ratio", "bytes ratio", "XLA scratch",
       "page faults"], rows)


def main(argv=None) -> int:
  return projection_overhead.main(
      argv, name="projection_scale", sizes=("100M", "3M"), mode="update",
      depth=4,
      variants=",".join([projection_overhead.BASELINE, *ROWS.values()]))


if __name__ == "__main__":
  sys.exit(main())
