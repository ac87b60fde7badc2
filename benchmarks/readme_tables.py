"""README tables regenerated from the committed results, never typed by hand.

Every generated table in ``README.md`` sits between ``<!-- table: NAME -->``
and ``<!-- /table -->``. ``NAME`` picks a renderer below and the results
file it reads under ``benchmarks/results/``, which the command that
measured the numbers wrote::

  python -m benchmarks.lbfgsb       # benchmarks/results/lbfgsb.json
  python -m benchmarks.nnls_batch --out benchmarks/results/nnls_batch.json
  python tests/_cutest.py benchmarks/results/cutest.json

Then ``python -m benchmarks.readme_tables`` rewrites the tables in place;
``--check`` only reports (exit status 1) tables that differ from their
results, which ``tests/test_readme_tables.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Dict, Tuple

if __package__ in (None, ""):  # Run as a script: make `benchmarks` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))))

from benchmarks import _nnls_report  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.]+) -->\n)(?P<body>.*?)"
                   r"(\n<!-- /table -->)", re.S)


def _nnls_case(case: str) -> Callable[[dict], str]:
  def render(payload: dict) -> str:
    from benchmarks import nnls_batch  # pylint: disable=g-import-not-at-top
    res = next(r for r in payload["results"] if r["case"] == case)
    return nnls_batch.table(res)
  return render


def _cutest(payload: dict) -> str:
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import _cutest  # pylint: disable=g-import-not-at-top
  return _cutest.comparison_table(payload)


# NAME: (results file, renderer of its payload).
RENDERERS: Dict[str, Tuple[str, Callable[[dict], str]]] = {
    "lbfgsb": ("lbfgsb.json",
               lambda p: _nnls_report.summary_table(p["results"])),
    "nnls_batch.batch": ("nnls_batch.json", _nnls_case("batch")),
    "nnls_batch.unmix": ("nnls_batch.json", _nnls_case("unmix")),
    "nnls_batch.large": ("nnls_batch.json", _nnls_case("large")),
    "cutest": ("cutest.json", _cutest),
}


def render(name: str) -> str:
  if name not in RENDERERS:
    raise KeyError(f"README table {name!r}: no renderer (known: "
                   f"{sorted(RENDERERS)})")
  filename, fn = RENDERERS[name]
  with open(os.path.join(RESULTS, filename)) as f:
    return fn(json.load(f)).strip()


def regenerate(text: str) -> Tuple[str, list]:
  """``text`` with every marked table re-rendered; and the names changed."""
  changed = []

  def sub(m):
    body = render(m.group("name"))
    if body != m.group("body").strip():
      changed.append(m.group("name"))
    return m.group(1) + body + m.group(4)

  return BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true",
                  help="report stale tables (exit 1), write nothing")
  ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
  args = ap.parse_args(argv)
  with open(args.readme) as f:
    text = f.read()
  new, changed = regenerate(text)
  if args.check:
    for name in changed:
      print(f"stale README table: {name}")
    return 1 if changed else 0
  if changed:
    with open(args.readme, "w") as f:
      f.write(new)
  print(f"README tables: {len(BLOCK.findall(text))}, rewritten: "
        f"{', '.join(changed) or 'none'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
