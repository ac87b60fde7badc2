"""Leaves grouped by dtype: one flat vector per dtype, and back.

Bounded L-BFGS does the same few operations on every leaf; on a model with
hundreds of leaves, doing them leaf by leaf makes a program (and a compile
time) that grows with the number of leaves. Concatenating the leaves of
each dtype into one vector makes it constant. Leaves of different dtypes
are never mixed (no float32 leaf is widened, no float64 one rounded).
Concatenation moves data, so parameters sharded across devices should stay
leaf by leaf (``Layout.identity``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint


class Layout(NamedTuple):
  """Where each leaf lives in its dtype's vector (hashable, static)."""

  treedef: Any
  # Per leaf: (group, offset, shape); per group: (dtype name, size).
  leaves: Tuple[Tuple[int, int, Tuple[int, ...]], ...]
  groups: Tuple[Tuple[str, int], ...]
  identity: bool  # leaf by leaf: flatten and unflatten do nothing


def layout(tree, grouped: bool = True) -> Layout:
  """The layout of ``tree``'s leaves (arrays or shape-dtype structs)."""
  leaves, treedef = jax.tree.flatten(tree)
  order, sizes, placed = {}, [], []
  for leaf in leaves:
    name = jnp.dtype(leaf.dtype).name
    if name not in order:
      order[name] = len(order)
      sizes.append(0)
    group = order[name]
    shape = tuple(int(d) for d in jnp.shape(leaf))
    placed.append((group, sizes[group], shape))
    sizes[group] += int(np.prod(shape, dtype=np.int64))
  return Layout(treedef, tuple(placed),
                tuple((name, sizes[i]) for name, i in order.items()),
                not grouped)


def flatten(tree, lay: Layout):
  """``tree`` as a tuple of 1-D arrays, one per dtype (or ``tree`` itself)."""
  if lay.identity:
    return tree
  parts = [[] for _ in lay.groups]
  for leaf, (group, _, _) in zip(jax.tree.leaves(tree), lay.leaves):
    parts[group].append(jnp.ravel(leaf))
  return tuple(p[0] if len(p) == 1 else jnp.concatenate(p) for p in parts)


def unflatten(groups, lay: Layout):
  """The inverse of :func:`flatten`."""
  if lay.identity:
    return groups
  leaves = [jax.lax.slice_in_dim(groups[group], offset,
                                 offset + int(np.prod(shape, dtype=np.int64))
                                 ).reshape(shape)
            for group, offset, shape in lay.leaves]
  return jax.tree.unflatten(lay.treedef, leaves)


def flatten_bounds(bounds, lay: Layout):
  """Per-leaf bounds (scalars or arrays broadcastable to their leaf) as one
  bound per group: a scalar where every leaf of the group has the same
  concrete scalar (no memory), else the bounds broadcast and concatenated."""
  if lay.identity:
    return bounds
  per_group = [[] for _ in lay.groups]
  for bound, (group, _, shape) in zip(jax.tree.leaves(bounds), lay.leaves):
    per_group[group].append((bound, shape))
  out = []
  for (name, _), items in zip(lay.groups, per_group):
    scalars = [b for b, _ in items
               if jnp.ndim(b) == 0 and _constraint.is_concrete(b)]
    if len(scalars) == len(items) and len({float(b) for b in scalars}) == 1:
      out.append(jnp.asarray(scalars[0], name))
    else:
      out.append(jnp.concatenate([jnp.ravel(jnp.broadcast_to(b, shape))
                                  for b, shape in items]).astype(name))
  return tuple(out)
