"""Per-leaf box bounds from scalars, arrays or pytree prefixes of the params."""

from __future__ import annotations

from typing import List, Optional

import jax
import numpy as np

from posconstr.sets import _intervals
from posconstr.tree import _paths


def is_bound_tree(bound) -> bool:
  """True for a pytree of bounds; False for None, scalars and arrays."""
  if bound is None or isinstance(bound, (int, float, complex, str, bytes,
                                       np.ndarray, np.generic)):
    return False
  return not hasattr(bound, "__array__") and not hasattr(bound, "shape")


def _per_leaf(bound, params, name: str, owner: str) -> list:
  count = len(jax.tree.leaves(params))
  if not is_bound_tree(bound):
    return [bound] * count
  bound_def = jax.tree.structure(bound, is_leaf=lambda x: x is None)
  try:
    subtrees = bound_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    hint = ""
    if isinstance(bound, (list, tuple)) and all(
        isinstance(v, (int, float)) for v in bound):
      # Lists are pytrees here (one bound per element of a list of params).
      hint = (f" For one bound per column, pass an array: "
              f"np.array({list(bound)!r}).")
    raise ValueError(f"{owner}: the `{name}` tree is not a prefix of the "
                     f"params tree: {e}{hint}") from e
  values = jax.tree.leaves(bound, is_leaf=lambda x: x is None)
  return [v for v, sub in zip(values, subtrees) for _ in jax.tree.leaves(sub)]


def leaf_boxes(params, lower, upper, owner: str,
               chosen=None) -> List[Optional[_intervals.Box]]:
  """One validated ``Box`` per leaf of ``params`` (None where unbounded, or
  not ``chosen``: a list of bools per leaf, as a mask selects them).

  Raises errors that name the owner and the parameter path: bounds with
  ``lower > upper``, bounds that do not broadcast to their leaf, a bound
  tree that is not a prefix of ``params``.
  """
  paths, leaves, _ = _paths.leaves_with_paths(params)
  chosen = [True] * len(leaves) if chosen is None else chosen
  boxes = []
  for path, leaf, lo, hi, pick in zip(
      paths, leaves, _per_leaf(lower, params, "lower", owner),
      _per_leaf(upper, params, "upper", owner), chosen):
    if not pick or (lo is None and hi is None):
      boxes.append(None)
      continue
    # A bare array is `x0` to minimize, `params` to the Optax transforms.
    path = _paths.shown(path, "x0" if owner == "minimize" else "params")
    try:
      box = _intervals.Box(lo, hi)
      box.check_leaf(_paths.leaf_shape(leaf), _paths.leaf_dtype(leaf), path)
    except (ValueError, TypeError) as e:
      raise type(e)(f"{owner}: bounds of parameter `{path}`: {e}") from None
    boxes.append(box)
  return boxes
