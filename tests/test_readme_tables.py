"""The README's generated tables agree with the committed results.

A table between ``<!-- table: NAME -->`` and ``<!-- /table -->`` is
re-rendered from ``benchmarks/results/`` by ``benchmarks.readme_tables``;
an edit by hand, or results re-measured without rewriting the README, fails
here.
"""

import os

import jax
import pytest

from benchmarks import readme_tables

README = os.path.join(readme_tables.REPO, "README.md")


def _readme():
  with open(README) as f:
    return f.read()


def test_every_generated_table_matches_its_results():
  text = _readme()
  names = [m.group("name") for m in readme_tables.BLOCK.finditer(text)]
  assert {"lbfgsb", "cutest", "nnls_batch.unmix"} <= set(names), names
  _, changed = readme_tables.regenerate(text)
  assert not changed, (f"stale README tables {changed}: run "
                       "`python -m benchmarks.readme_tables`")


def test_a_hand_edit_is_caught():
  text = _readme()
  block = next(b for b in readme_tables.BLOCK.finditer(text)
               if any(c.isdigit() for c in b.group("body")))
  body = block.group("body")
  digit = next(i for i, c in enumerate(body) if c.isdigit())
  edited = body[:digit] + str((int(body[digit]) + 1) % 10) + body[digit + 1:]
  text = text[:block.start("body")] + edited + text[block.end("body"):]
  _, changed = readme_tables.regenerate(text)
  assert changed == [block.group("name")]


def test_rendering_leaves_the_x64_flag_alone():
  before = jax.config.read("jax_enable_x64")
  for name in readme_tables.RENDERERS:
    readme_tables.render(name)
  assert jax.config.read("jax_enable_x64") == before


def test_unknown_table_name_is_an_error():
  with pytest.raises(KeyError, match="no renderer"):
    readme_tables.render("no_such_table")
