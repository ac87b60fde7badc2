"""README tables rendered from the committed summaries, never typed by hand.

A generated table in ``README.md`` sits between ``<!-- table: NAME -->`` and
``<!-- /table -->``; ``NAME`` picks a renderer in :data:`RENDERERS` and the
summary it reads from ``benchmarks/results/``, which the measuring command
wrote (``python -m benchmarks.NAME --summary``, see ``_timing``; CUTEst:
``python tests/_cutest.py benchmarks/results/cutest.json``). Then ``python -m
benchmarks.readme_tables`` rewrites the tables in place; ``--check`` only
reports (exit status 1) tables that differ from their summaries, which
``tests/test_readme_tables.py`` runs.

``gallery.EXAMPLE`` tables are the examples' own output: ``python
examples/EXAMPLE.py --out docs/gallery`` saves its figure and the table it
prints (``EXAMPLE.md``) there. ``--examples`` first runs every example that
way (several minutes), so that one command regenerates every README table
and gallery figure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from typing import Callable, Dict, Tuple

from benchmarks import _timing

REPO = _timing.REPO
RESULTS = _timing.SUMMARY_DIR
# The body may be empty (a new table): then it must not reach the next block.
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w.]+) -->\n)(?P<body>.*?)"
                   r"\n?<!-- /table -->", re.S)


def _nnls_case(case: str) -> Callable[[dict], str]:
  def render(payload: dict) -> str:
    from benchmarks import nnls_batch  # pylint: disable=g-import-not-at-top
    res = next(r for r in payload["results"] if r["case"] == case)
    return nnls_batch.readme_table(res)
  return render


def _script(name: str) -> Callable[[dict], str]:
  def render(payload: dict) -> str:  # Imported on use only.
    return importlib.import_module(f"benchmarks.{name}").readme_table(payload)
  return render


def _cutest(payload: dict) -> str:
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import _cutest  # pylint: disable=g-import-not-at-top
  return _cutest.comparison_table(payload)


# NAME: (results file, renderer of its payload).
RENDERERS: Dict[str, Tuple[str, Callable[[dict], str]]] = {
    "lbfgsb": ("lbfgsb.json", _script("lbfgsb")),
    "nnls_batch.batch": ("nnls_batch.json", _nnls_case("batch")),
    "nnls_batch.unmix": ("nnls_batch.json", _nnls_case("unmix")),
    "nnls_batch.large": ("nnls_batch.json", _nnls_case("large")),
    "cutest": ("cutest.json", _cutest),
    "projection_overhead": ("projection_overhead.json",
                            _script("projection_overhead")),
    "reparam_overhead": ("reparam_overhead.json", _script("reparam_overhead")),
    "compile_cost": ("compile_cost.json", _script("compile_cost")),
    "compile_cost_10k": ("compile_cost_10k.json", _script("compile_cost")),
    "compile_cost_floors": ("compile_cost_floors.json",
                            _script("compile_cost")),
    "compile_cost_10k_post": ("compile_cost_10k_post.json",
                              _script("compile_cost")),
    "compile_cost_projected": ("compile_cost_projected.json",
                               _script("compile_cost")),
    "projection_scale": ("projection_scale.json", _script("projection_scale")),
    "projection_scale_hugetlb": ("projection_scale_hugetlb.json",
                                 _script("projection_scale")),
    "exponentiated_gradient": ("exponentiated_gradient.json",
                               _script("exponentiated_gradient")),
    "column_sums": ("column_sums.json", _script("column_sums")),
}


GALLERY = os.path.join(REPO, "docs", "gallery")
EXAMPLES = ("quickstart", "lbfgs_network", "stochastic_lbfgs", "icnn",
            "monotone", "nmf", "coding_layer")


def run_examples(names=EXAMPLES) -> None:
  """Runs each example at its defaults, writing into ``docs/gallery``."""
  for name in names:
    print(f"running examples/{name}.py", flush=True)
    subprocess.run([sys.executable, os.path.join(REPO, "examples",
                                                 f"{name}.py"),
                    "--out", GALLERY, "--no-progress"], check=True)


def render(name: str) -> str:
  if name.startswith("gallery."):
    example = name.split(".", 1)[1]
    if example not in EXAMPLES:
      raise KeyError(f"README table {name!r}: no example {example!r} (known: "
                     f"{list(EXAMPLES)})")
    with open(os.path.join(GALLERY, f"{example}.md")) as f:
      return f.read().strip()
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
    return m.group(1) + body + "\n<!-- /table -->"

  return BLOCK.sub(sub, text), changed


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--check", action="store_true",
                  help="report stale tables (exit 1), write nothing")
  ap.add_argument("--examples", action="store_true",
                  help="first run every example into docs/gallery (figures "
                  "and tables; several minutes)")
  ap.add_argument("--readme", default=os.path.join(REPO, "README.md"))
  args = ap.parse_args(argv)
  if args.examples and args.check:
    ap.error("--examples rewrites the gallery; it cannot be a --check")
  if args.examples:
    run_examples()
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
