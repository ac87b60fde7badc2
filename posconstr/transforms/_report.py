"""Constraint diagnostics: how many weights sit on a bound, and are stuck
there."""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp

from posconstr.transforms import _projection
from posconstr.tree import _paths


class LeafReport(NamedTuple):
  """Diagnostics of one constrained parameter (all scalar arrays).

  Attributes:
    size: number of coordinates.
    on_bound: fraction of coordinates on the set's boundary (``active``).
    stuck: fraction on the boundary with the descent direction ``-grad``
      pointing out of the set (NaN when no gradients were given).
    violation: the set's ``violation`` (0 iff feasible).
  """

  size: jax.Array
  on_bound: jax.Array
  stuck: jax.Array
  violation: jax.Array


def constraint_report(params, constraint, grads=None, *,
                      mask=None) -> Dict[str, LeafReport]:
  """Per parameter path, how the parameters sit in their constraint sets.

  Jittable: returns a dict of :class:`LeafReport` of scalar arrays, one
  entry per constrained leaf, computed in one pass over each leaf. Use
  :func:`format_report` for a readable table.

  Args:
    params: the parameters.
    constraint: a constraint set, or a rules mapping as in
      :func:`posconstr.constrain`.
    grads: optional gradients (same tree as ``params``) for ``stuck``.
    mask: with a single set, which leaves (see :func:`posconstr.project`).

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> params = {"w": jnp.array([0.0, 0.0, 1.0, 2.0])}
    >>> grads = {"w": jnp.array([1.0, -1.0, 1.0, 1.0])}
    >>> report = posconstr.constraint_report(params, posconstr.NonNegative(),
    ...                                      grads)
    >>> float(report["w"].on_bound), float(report["w"].stuck)
    (0.5, 0.25)
  """
  owner = "constraint_report"
  plan = _projection.plan_maker(constraint, mask, owner)(params)
  paths, leaves, treedef = _paths.leaves_with_paths(params)
  if grads is None:
    grad_leaves = [None] * len(leaves)
  else:
    try:
      grad_leaves = treedef.flatten_up_to(grads)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{owner}: the `grads` tree does not match the params "
                       f"tree: {e}") from e
  report = {}
  for path, c, x, g in zip(paths, plan, leaves, grad_leaves):
    if c is None:
      continue
    x = jnp.asarray(x)
    n = max(x.size, 1)
    on_bound = jnp.sum(c.active(x)) / n
    stuck = (jnp.asarray(jnp.nan, jnp.float32) if g is None
             else jnp.sum(c.pushing_out(x, jnp.asarray(g))) / n)
    report[path] = LeafReport(jnp.asarray(x.size), on_bound.astype(jnp.float32),
                              jnp.asarray(stuck, jnp.float32), c.violation(x))
  return report


def format_report(report: Dict[str, LeafReport],
                  title: Optional[str] = None) -> str:
  """A markdown table of a :func:`constraint_report`, for logs.

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> report = posconstr.constraint_report(
    ...     {"w": jnp.array([0.0, 1.0])}, posconstr.NonNegative())
    >>> print(posconstr.format_report(report))
    | parameter | size | on bound | stuck | max violation |
    |---|---:|---:|---:|---:|
    | w | 2 | 50.00% | - | 0 |
  """
  if not isinstance(report, Mapping):
    raise TypeError(
        "format_report: `report` must be the dict that constraint_report "
        f"returns ({{path: LeafReport}}), got {type(report).__name__}.")
  for path, r in report.items():
    if not isinstance(r, LeafReport):
      raise TypeError(
          f"format_report: `report[{path!r}]` must be a LeafReport (from "
          f"constraint_report), got {r!r} of type {type(r).__name__}.")
  lines = [] if title is None else [f"**{title}**", ""]
  lines += ["| parameter | size | on bound | stuck | max violation |",
            "|---|---:|---:|---:|---:|"]
  for path, r in report.items():
    stuck = float(r.stuck)
    stuck_text = "-" if stuck != stuck else f"{100 * stuck:.2f}%"
    lines.append(f"| {path} | {int(r.size)} | {100 * float(r.on_bound):.2f}% "
                 f"| {stuck_text} | {float(r.violation):.3g} |")
  return "\n".join(lines)
