"""Applying parameterizations to pytrees: ``reparam``, ``unreparam`` and
``dead_fraction``."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Union

import jax
import jax.numpy as jnp

from posconstr.reparam import _parameterizations
from posconstr.sets import _constraint
from posconstr.tree import _paths
from posconstr.tree import _selection

Rules = Union[_parameterizations.Parameterization,
              Mapping[str, Any]]


def check_parameterization_arg(value, name: str, owner: str) -> None:
  if not isinstance(value, _parameterizations.Parameterization):
    hint = ""
    if isinstance(value, _constraint.Constraint):
      hint = (" It is a constraint set; use a parameterization whose range "
              "lies in it (e.g. Softplus() for NonNegative(), Sigmoid(l, u) "
              "for Box(l, u)), or use it with `project`.")
    raise TypeError(
        f"{owner}: `{name}` must be a parameterization (Softplus, Exp, Square,"
        f" Abs, ReLU, Sigmoid or a posconstr.Parameterization subclass), got "
        f"{value!r} of type "
        f"{type(value).__name__}.{hint}")


def _check_leaf(parameterization, leaf, path, owner):
  dtype = _paths.leaf_dtype(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{owner}: parameter `{_paths.shown(path)}` has dtype "
                    f"{dtype}; only floating-point leaves can be "
                    "reparameterized.")


def make_plan(tree, rules: Rules, mask, owner: str) -> list:
  """One parameterization (or None) per leaf of ``tree``."""
  if isinstance(rules, _parameterizations.Parameterization):
    selected = _selection.select(tree, mask, owner)
    paths, leaves, _ = _paths.leaves_with_paths(tree)
    plan = []
    for path, leaf, pick in zip(paths, leaves, selected):
      if pick:
        _check_leaf(rules, leaf, path, owner)
      plan.append(rules if pick else None)
    return plan
  return _selection.plan_from_rules(
      tree, rules, owner,
      validate=lambda p, leaf, path: _check_leaf(p, leaf, path, owner))


def check_rules_arg(rules: Rules, mask, owner: str) -> Rules:
  if isinstance(rules, _constraint.Constraint):
    check_parameterization_arg(rules, "rules", owner)  # TypeError with a hint.
  if isinstance(rules, _parameterizations.Parameterization):
    _selection.check_mask_arg(mask, owner)
    return rules
  if mask is not None:
    raise ValueError(f"{owner}: `mask` is only allowed with a single "
                     "parameterization, not with a rules mapping.")
  if isinstance(rules, Mapping):
    for pattern, value in rules.items():
      if isinstance(value, _constraint.Constraint):
        check_parameterization_arg(value, f"rules[{pattern!r}]", owner)
  rules = _selection.check_rules(rules, owner,
                                 _parameterizations.Parameterization,
                                 "parameterization")
  for pattern, value in rules.items():
    if value is not None:
      check_parameterization_arg(value, f"rules[{pattern!r}]", owner)
  return rules


def _map(tree, rules, mask, owner, method: str):
  rules = check_rules_arg(rules, mask, owner)
  plan = make_plan(tree, rules, mask, owner)
  plan_tree = jax.tree.structure(tree).unflatten(plan)
  return jax.tree.map(
      lambda p, x: x if p is None else getattr(p, method)(x),
      plan_tree, tree,
      is_leaf=lambda x: x is None or isinstance(
          x, _parameterizations.Parameterization))


def reparam(latents, rules: Rules, mask=None):
  """The constrained values: ``forward`` applied to the matching leaves.

  Args:
    latents: a pytree of unconstrained arrays.
    rules: ``{pattern: parameterization or None}`` (first match wins, as in
      :func:`posconstr.constrain`), or one parameterization applied to the
      leaves selected by ``mask``.
    mask: with a single parameterization, which leaves (see
      :func:`posconstr.project`); ``None`` selects every float leaf.

  Returns:
    A pytree like ``latents``; unmatched leaves are returned as they are.

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> latents = {"w": jnp.array([-1.0, 0.0, 1.0]), "b": jnp.array([-1.0])}
    >>> params = posconstr.reparam(latents, {"w": posconstr.Softplus()})
    >>> [round(float(v), 4) for v in params["w"]], params["b"]
    ([0.3133, 0.6931, 1.3133], Array([-1.], dtype=float32))
  """
  return _map(latents, rules, mask, "reparam", "forward")


def unreparam(params, rules: Rules, mask=None):
  """The latents: ``inverse`` applied to the matching leaves.

  Concrete values outside a parameterization's range raise ``ValueError``;
  see :class:`posconstr.Parameterization` for what happens under ``jit``.
  """
  return _map(params, rules, mask, "unreparam", "inverse")


def dead_fraction(latents, rules: Rules, mask=None,
                  tol: float = 1e-3) -> Dict[str, jax.Array]:
  """Per matching path, the fraction of latents whose derivative is < ``tol``.

  Counts relu's dying synapses and sigmoid's saturation during training.
  Jittable: returns a dict of scalar arrays. A leaf with a NaN latent gets
  a NaN fraction, so that a diverged run does not pass for a healthy one.

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> latents = {"w": jnp.array([-2.0, -1.0, 0.5, 3.0])}
    >>> frac = posconstr.dead_fraction(latents, posconstr.ReLU())
    >>> float(frac["w"])
    0.5
  """
  _parameterizations.check_tol(tol, "dead_fraction")
  rules = check_rules_arg(rules, mask, "dead_fraction")
  plan = make_plan(latents, rules, mask, "dead_fraction")
  paths, leaves, _ = _paths.leaves_with_paths(latents)
  return {
      path: _fraction(p, jnp.asarray(leaf), tol)
      for path, leaf, p in zip(paths, leaves, plan) if p is not None
  }


def _fraction(parameterization, leaf, tol):
  if not jnp.size(leaf):  # No latent, none dead (not the mean's NaN).
    return jnp.zeros((), jnp.float32)
  frac = jnp.mean(parameterization.dead(leaf, tol).astype(jnp.float32))
  return jnp.where(jnp.any(jnp.isnan(leaf)), jnp.nan, frac)
