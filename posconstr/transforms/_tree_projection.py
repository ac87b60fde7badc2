"""Optax's projection functions (``optax.projections.*``) as posconstr links.

Optax's projections take a whole pytree and project it as *one* vector:
``projection_simplex(tree)`` puts all the entries of all the leaves together
on a single simplex, ``projection_l2_ball(tree)`` bounds the global norm.
posconstr's sets act leaf by leaf and, for ``Simplex`` and the norm sets,
slice by slice along ``axis``. :func:`posconstr.project` accepts both; this
module handles the functions: they see the tree of the selected leaves (the
others replaced by ``optax.MaskedNode()``, as ``optax.masked`` does).
"""

from __future__ import annotations

import functools
from typing import Callable, List, TypeGuard

import jax
import jax.numpy as jnp
import optax

from posconstr.sets import _constraint
from posconstr.tree import _paths
from posconstr.tree import _selection


def _unpartial(fn):
  while isinstance(fn, functools.partial):
    fn = fn.func
  return fn


def is_tree_projection(fn) -> TypeGuard[Callable]:
  """One of Optax's projections (``optax.projections.projection_*``).

  Also with arguments bound by ``functools.partial``. Other functions are
  not accepted: a stray ``jnp.maximum`` or ``jnp.abs`` must still fail as
  "not a constraint set" (a set of one's own subclasses
  :class:`posconstr.Constraint`).

  >>> import functools, jax.numpy as jnp, optax
  >>> is_tree_projection(functools.partial(
  ...     optax.projections.projection_l2_ball, scale=2.0))
  True
  >>> is_tree_projection(jnp.maximum)
  False
  """
  inner = _unpartial(fn)
  return callable(inner) and any(
      inner is f for f in vars(optax.projections).values())


def _name(fn) -> str:
  inner = _unpartial(fn)
  return getattr(inner, "__name__", type(inner).__name__)


def _checked_selection(fn, params, mask, owner: str) -> List[bool]:
  chosen = _selection.select(params, mask, owner)
  paths, leaves, _ = _paths.leaves_with_paths(params)
  for path, leaf, pick in zip(paths, leaves, chosen):
    if pick:
      _constraint.check_float_dtype(_paths.leaf_dtype(leaf),
                                    f"{owner} ({_name(fn)})",
                                    _paths.shown(path))
  return chosen


def _projected_leaves(fn, leaves, treedef, chosen, owner: str) -> list:
  """``fn`` on the tree of chosen leaves; None where a leaf was not chosen."""
  masked = treedef.unflatten(
      [x if pick else optax.MaskedNode() for x, pick in zip(leaves, chosen)])
  out = fn(masked)
  try:
    out_leaves = treedef.flatten_up_to(out)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: the projection {_name(fn)} must return a tree shaped like "
        f"its input, got {jax.tree.structure(out)}.") from e
  result = []
  for x, y, pick in zip(leaves, out_leaves, chosen):
    if not pick:
      result.append(None)
      continue
    if jnp.shape(y) != jnp.shape(x):
      raise ValueError(
          f"{owner}: the projection {_name(fn)} changed a leaf's shape from "
          f"{jnp.shape(x)} to {jnp.shape(y)}.")
    result.append(jnp.asarray(y).astype(jnp.asarray(x).dtype))  # x: any leaf
  return result


def project_tree(params, fn, mask, owner: str):
  """``fn`` applied to the selected leaves of ``params`` as one tree."""
  chosen = _checked_selection(fn, params, mask, owner)
  leaves, treedef = jax.tree.flatten(params)
  if not any(chosen):
    return params
  targets = _projected_leaves(fn, leaves, treedef, chosen, owner)
  return treedef.unflatten(
      [x if t is None else t for x, t in zip(leaves, targets)])


def tree_projection(fn: Callable, mask, owner: str, state_type,
                    require_params: Callable) -> optax.GradientTransformation:
  """The link of :func:`posconstr.project` for a whole-tree function.

  Lands on ``t = fn(p + u)`` with the update ``t - p`` where ``t`` moved
  (exact where ``t`` is 0, e.g. ``projection_non_negative``'s clipped
  entries; otherwise up to the rounding of ``(t - p) + p``), and ``u``
  itself where it did not.
  """
  _selection.check_mask_arg(mask, owner)

  def init_fn(params):
    if not _selection.is_params_placeholder(params):
      _checked_selection(fn, params, mask, owner)
    return state_type()

  def update_fn(updates, state, params=None):
    require_params(params, owner)
    chosen = _checked_selection(fn, params, mask, owner)
    leaves, treedef = jax.tree.flatten(params)
    try:
      upd = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{owner}: the updates tree does not match the params "
                       f"tree: {e}") from e
    if not any(chosen):
      return updates, state
    stepped = [(jnp.asarray(p) + u).astype(jnp.asarray(p).dtype) if pick
               else p for p, u, pick in zip(leaves, upd, chosen)]
    targets = _projected_leaves(fn, stepped, treedef, chosen, owner)
    out = [u if t is None else jnp.where(t == s, u, t - p)
           for p, u, s, t in zip(leaves, upd, stepped, targets)]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(init_fn, update_fn)
