"""Which leaf gets which constraint: masks and path rules.

Every transform resolves its ``mask=`` or ``rules`` into a *plan*: one entry
per leaf of the params tree, either a constraint object or ``None``. Plans are
computed from the tree's structure, shapes and dtypes only, so they cost
nothing inside ``jit``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, List, Mapping, Optional, Sequence

import jax
import jax.core  # Explicit: `jax.core.Tracer` below.
import numpy as np

from posconstr.tree import _paths

Plan = List[Optional[Any]]

try:  # The tree ``optax.tree_utils.tree_map_params`` passes to ``init``.
  from optax.tree_utils._state_utils import _ParamsPlaceholder
except ImportError:  # pragma: no cover (an Optax without it)
  _ParamsPlaceholder = ()


def is_params_placeholder(tree) -> bool:
  """True for the leafless stand-in ``optax.tree_utils.tree_map_params`` uses.

  It calls ``init`` on a placeholder to find where the optimizer state holds
  copies of the params; masks and rules cannot apply to it (it has no paths),
  so plans for it are empty, as ``optax.masked`` does.
  """
  return isinstance(tree, _ParamsPlaceholder)


class PathFilter:
  """A rule key that is not a glob: ``fn(path, leaf) -> bool``.

  Built by adapters (NNX filters in :mod:`posconstr.nnx`); ``label`` names
  it in error messages.
  """

  def __init__(self, fn: Callable[[str, Any], bool], label: str):
    self.fn = fn
    self.label = label

  def __call__(self, path: str, leaf) -> bool:
    return bool(self.fn(path, leaf))

  def __repr__(self):
    return self.label


def rule_matches(key, path: str, leaf) -> bool:
  """Does a rule key (glob pattern or :class:`PathFilter`) select a leaf?"""
  if isinstance(key, PathFilter):
    return key(path, leaf)
  return _paths.matches(key, path)


def is_mask_function(mask) -> bool:
  """``optax.masked``'s rule: a mask is a function unless it is a pytree.

  A callable counts as a function only if its leaves are callables too (a
  plain function is its own leaf). An ``eqx.Module`` of booleans is callable
  but is a bool pytree, so it is a mask *tree*.
  """
  if not callable(mask):
    return False
  leaves = jax.tree.leaves(mask)
  return not leaves or all(callable(leaf) for leaf in leaves)


def is_pattern_list(mask) -> bool:
  return (isinstance(mask, (list, tuple)) and len(mask) > 0
          and all(isinstance(m, str) for m in mask))


def check_mask_arg(mask, owner: str) -> None:
  """Construction-time checks of a ``mask=`` argument."""
  if isinstance(mask, (list, tuple)) and any(isinstance(m, str) for m in mask):
    if not is_pattern_list(mask):
      raise TypeError(
          f"{owner}: a `mask` list must hold only pattern strings or only "
          f"booleans, got {mask!r}.")
  if isinstance(mask, str) and not mask:
    raise ValueError(f"{owner}: `mask` pattern must not be empty.")
  if ((isinstance(mask, numbers.Number) or hasattr(mask, "shape"))
      and not _is_scalar_bool(mask)):
    shape = getattr(mask, "shape", ())
    got = repr(mask) if not shape else f"an array of shape {tuple(shape)}"
    raise TypeError(
        f"{owner}: `mask` must be None, a glob pattern, a list of patterns, a "
        f"callable or a bool pytree (True/False for the whole tree), got "
        f"{got} of type {type(mask).__name__}. A mask selects whole leaves; "
        "for a per-element choice use Box bounds.")


def _is_scalar_bool(value) -> bool:
  if isinstance(value, (bool, np.bool_)):
    return True
  return hasattr(value, "dtype") and np.ndim(value) == 0 and (
      value.dtype == bool)


def _unmatched_patterns_error(owner, patterns, paths):
  return ValueError(
      f"{owner}: pattern(s) {patterns!r} match no parameter path. Paths are "
      f"keys joined by '/', matched with fnmatch (case-sensitive); this tree "
      f"has {_paths.describe_paths(paths)}.")


def _as_static_bool(value, path: str, owner: str) -> bool:
  where = _paths.shown(path, "mask")
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{owner}: the mask entry for `{where}` is traced; masks must be "
        "static Python booleans (computed from the tree's structure, not its "
        "values).")
  if _is_scalar_bool(value):
    return bool(value)
  raise TypeError(
      f"{owner}: mask entries must be booleans, got {value!r} at `{where}`.")


def _prefix_mismatch(mask_paths, param_paths) -> str:
  for mp in mask_paths:
    if not any(p == mp or p.startswith(mp + "/") or mp == ""
               for p in param_paths):
      return f"the mask has `{mp}`, which is not a path of params"
  for p in param_paths:
    if not any(p == mp or p.startswith(mp + "/") or mp == ""
               for mp in mask_paths):
      return f"params have `{p}`, which the mask does not cover"
  return "their structures differ"


def _bool_tree_selection(mask, params, owner) -> List[bool]:
  """One bool per leaf of ``params`` from a bool tree that is a prefix."""
  mask_paths, mask_leaves, mask_def = _paths.leaves_with_paths(mask)
  param_paths = _paths.leaves_with_paths(params)[0]
  try:
    subtrees = mask_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{owner}: the `mask` tree does not match the params tree (it must "
        f"be a prefix of it): {_prefix_mismatch(mask_paths, param_paths)}."
    ) from e
  selected = []
  for path, value, sub in zip(mask_paths, mask_leaves, subtrees):
    flag = _as_static_bool(value, path, owner)
    selected.extend([flag] * len(jax.tree.leaves(sub)))
  return selected


def select(params, mask, owner: str) -> List[bool]:
  """Resolves ``mask`` into one bool per leaf of ``params``.

  Only parameters are ever selected: array leaves and Python numbers. Other
  leaves (functions, strings, objects) are left alone whatever the mask, and
  ``None`` selects only floating-point arrays, as ``eqx.is_inexact_array``
  does (Python floats and integer arrays stay unselected).

  Args:
    params: the params tree.
    mask: None (every floating-point array), a glob pattern or list of them,
      a function ``params -> bool tree``, or a bool tree that is a prefix of
      ``params`` (an ``eqx.Module`` of bools included; see
      :func:`is_mask_function`).
    owner: the transform's name, for error messages.

  Example:
    >>> import jax.numpy as jnp
    >>> tree = {"w": jnp.ones(2), "n": jnp.arange(2), "act": jnp.tanh}
    >>> select(tree, None, "demo")  # leaves in key order: act, n, w
    [False, False, True]
  """
  if is_params_placeholder(params):
    return []
  paths, leaves, _ = _paths.leaves_with_paths(params)
  if mask is None:
    return [_paths.is_float_array(x) for x in leaves]
  usable = [_paths.is_parameter(x) for x in leaves]
  if isinstance(mask, str) or is_pattern_list(mask):
    patterns = [mask] if isinstance(mask, str) else list(mask)
    paths = [p if ok else None for p, ok in zip(paths, usable)]
    selected = [p is not None
                and any(_paths.matches(pat, p) for pat in patterns)
                for p in paths]
    unmatched = [pat for pat in patterns
                 if not any(p is not None and _paths.matches(pat, p)
                            for p in paths)]
    if unmatched:
      raise _unmatched_patterns_error(
          owner, unmatched, [p for p in paths if p is not None])
    return selected
  if is_mask_function(mask):
    mask = mask(params)
    if is_mask_function(mask):
      raise TypeError(f"{owner}: a callable `mask` must return a bool tree, "
                      f"got {mask!r}.")
  chosen = _bool_tree_selection(mask, params, owner)
  return [pick and ok for pick, ok in zip(chosen, usable)]


def plan_from_mask(params, constraint, mask, owner: str) -> Plan:
  """One constraint per selected leaf, validated against its shape and dtype."""
  if is_params_placeholder(params):
    return []
  paths, leaves, _ = _paths.leaves_with_paths(params)
  plan = []
  for path, leaf, chosen in zip(paths, leaves, select(params, mask, owner)):
    if chosen:
      _check_leaf(constraint, leaf, path)
    plan.append(constraint if chosen else None)
  return plan


def check_rules(rules, owner: str, expected_type, kind: str) -> dict:
  """Construction-time checks of a ``{pattern: object-or-None}`` mapping.

  Keys are glob patterns, or :class:`PathFilter` objects from an adapter.
  """
  if not isinstance(rules, Mapping):
    raise TypeError(f"{owner}: `rules` must be a mapping from path patterns to "
                    f"{kind}s, got {type(rules).__name__}.")
  if not rules:
    raise ValueError(f"{owner}: `rules` must not be empty.")
  for pattern, value in rules.items():
    if not isinstance(pattern, PathFilter) and (
        not isinstance(pattern, str) or not pattern):
      raise TypeError(f"{owner}: rule keys must be non-empty path patterns "
                      f"(str), got {pattern!r}.")
    if value is not None and not isinstance(value, expected_type):
      hint = ""
      if hasattr(value, "forward") and hasattr(value, "inverse"):
        hint = (" It is a parameterization: reparameterize with "
                "`posconstr.reparam` (or the linen/nnx wrappers), or project "
                "onto its range with its `.constraint`.")
      raise TypeError(
          f"{owner}: the rule for {pattern!r} must be a {kind} or None, got "
          f"{value!r} of type {type(value).__name__}.{hint}")
  return dict(rules)


def _check_leaf(constraint, leaf, path):
  constraint.check_leaf(_paths.leaf_shape(leaf), _paths.leaf_dtype(leaf),
                        _paths.shown(path))


def plan_from_rules(params, rules: Mapping[Any, Any], owner: str,
                    validate: Callable = _check_leaf) -> Plan:
  """The first rule whose key matches a leaf's path decides its entry.

  Keys are glob patterns or :class:`PathFilter` objects. Only parameters
  (see :func:`select`) are matched. A rule that matches no path, or only
  paths that earlier rules took, is an error: it is almost always a typo or
  a rule in the wrong order.
  """
  if is_params_placeholder(params):
    return []
  paths, leaves, _ = _paths.leaves_with_paths(params)
  matched, winners = set(), set()
  plan = []
  for path, leaf in zip(paths, leaves):
    entry, won = None, False
    if _paths.is_parameter(leaf):
      for key, value in rules.items():
        if rule_matches(key, path, leaf):
          matched.add(key)
          if not won:
            winners.add(key)
            entry, won = value, True
    if entry is not None:
      validate(entry, leaf, path)
    plan.append(entry)
  unmatched = [key for key in rules if key not in matched]
  if unmatched:
    raise _unmatched_patterns_error(
        owner, unmatched,
        [p for p, x in zip(paths, leaves) if _paths.is_parameter(x)])
  shadowed = [key for key in rules if key not in winners]
  if shadowed:
    raise ValueError(
        f"{owner}: rule(s) {shadowed!r} only match paths that earlier rules "
        "already took (the first matching rule wins); reorder or remove them.")
  return plan


def used_leaves(plan: Sequence[Optional[Any]]) -> int:
  return sum(entry is not None for entry in plan)
