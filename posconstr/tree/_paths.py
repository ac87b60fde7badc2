"""Parameter paths as strings: ``Dense_0/kernel``, alike in linen and NNX."""

from __future__ import annotations

import fnmatch
import numbers
from typing import Any, List, Sequence, Tuple

import jax
import numpy as np
from jax import tree_util as jtu


def key_to_str(key) -> str:
  if isinstance(key, jtu.DictKey):
    return str(key.key)
  if isinstance(key, jtu.GetAttrKey):
    return key.name
  if isinstance(key, jtu.SequenceKey):
    return str(key.idx)
  if isinstance(key, jtu.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_to_str(path: Sequence[Any]) -> str:
  """Joins a key path with ``/``."""
  return "/".join(key_to_str(k) for k in path)


def _is_nnx_variable(x) -> bool:
  """An ``nnx.Variable`` (recognised without importing flax)."""
  return any(c.__name__ == "Variable" and c.__module__.startswith("flax.nnx")
             for c in type(x).__mro__)


def _variable_paths(tree) -> set:
  """The key paths of the ``nnx.Variable`` nodes of ``tree``."""
  pairs, _ = jtu.tree_flatten_with_path(tree, is_leaf=_is_nnx_variable)
  return {tuple(p) for p, x in pairs if _is_nnx_variable(x)}


def shown(path: str, root: str = "params") -> str:
  """``path`` for messages; the root itself (a bare array) is named ``root``.

  >>> shown("Dense_0/kernel"), shown("")
  ('Dense_0/kernel', 'params')
  """
  return path if path else root


def leaves_with_paths(tree) -> Tuple[List[str], List[Any], Any]:
  """Returns (paths, leaves, treedef) of ``tree``.

  An ``nnx.Variable``'s own ``.value`` key is left out of its path: so
  ``nnx.state(model)`` (Variables) and its pure form (arrays, as
  ``nnx.Optimizer`` passes to Optax) give the same paths. An attribute named
  ``value`` of anything else stays in.
  """
  pairs, treedef = jtu.tree_flatten_with_path(tree)
  value = jtu.GetAttrKey("value")
  ends_in_value = [bool(p) and p[-1] == value for p, _ in pairs]
  held = _variable_paths(tree) if any(ends_in_value) else set()
  paths = [path_to_str(p[:-1] if end and tuple(p[:-1]) in held else p)
           for (p, _), end in zip(pairs, ends_in_value)]
  leaves = [leaf for _, leaf in pairs]
  return paths, leaves, treedef


def matches(pattern: str, path: str) -> bool:
  """Case-sensitive glob match (``fnmatch``: ``*`` also crosses ``/``)."""
  return fnmatch.fnmatchcase(path, pattern)


def describe_paths(paths: Sequence[str], limit: int = 8) -> str:
  shown = ", ".join(repr(p) for p in paths[:limit])
  more = f", ... ({len(paths)} in all)" if len(paths) > limit else ""
  return f"[{shown}{more}]" if paths else "[] (the tree has no leaves)"


def is_array(leaf) -> bool:
  """An array-like leaf: it has a ``shape`` and a ``dtype``.

  Arrays, tracers, NumPy scalars and ``jax.ShapeDtypeStruct``; not Python
  numbers, functions or other objects (``eqx.is_array``'s notion, plus
  abstract leaves).
  """
  return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def is_parameter(leaf) -> bool:
  """A leaf that a mask or rule can select: an array or a Python number.

  Functions, strings, Python bools (flags such as ``eqx.nn.Dropout``'s
  ``inference``) and other objects in a tree (the activation of an
  unfiltered ``eqx.Module``) are never parameters: every mask and rule
  leaves them alone, and paths listed in error messages omit them.
  """
  return is_array(leaf) or (isinstance(leaf, numbers.Number)
                            and not isinstance(leaf, bool))


def is_float_array(leaf) -> bool:
  """What ``mask=None`` selects: a floating-point array-like leaf.

  Like ``eqx.is_inexact_array`` (without complex dtypes, which no set
  supports): Python floats and non-array leaves are left alone.

  >>> import jax.numpy as jnp
  >>> [is_float_array(x) for x in (jnp.ones(2), jnp.arange(2), 1.0, print)]
  [True, False, False, False]
  """
  return is_array(leaf) and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)


def leaf_dtype(leaf):
  """The dtype of a leaf (array, tracer, ShapeDtypeStruct or Python scalar).

  ``object`` for a leaf that has none (a function, a string), so that dtype
  checks report it by path instead of failing inside JAX.
  """
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None:
    return dtype
  try:
    return jax.numpy.result_type(leaf)
  except (TypeError, ValueError):
    return np.dtype(object)


def leaf_shape(leaf):
  shape = getattr(leaf, "shape", None)
  return tuple(shape) if shape is not None else ()
