"""Projection as the last link of an Optax chain: ``project`` and shorthands."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posconstr.sets import _constraint
from posconstr.sets import _intervals
from posconstr.sets import _landing
from posconstr.transforms import _tree_projection
from posconstr.tree import _bound_trees
from posconstr.tree import _paths
from posconstr.tree import _selection

# None | str | list[str] | bool pytree | Callable[[params], bool pytree]
Mask = Any


class ProjectionState(NamedTuple):
  """The (empty) state of a projection.

  Projection keeps no state; the type marks where the projection sits in an
  optimizer's state, which is how :func:`posconstr.check_projection_last`
  finds a projection that is not the last link.
  """


def is_plan_leaf(x) -> bool:
  return x is None or isinstance(x, _constraint.Constraint)


def require_params(params, owner: str) -> None:
  if params is None:
    raise ValueError(
        f"{owner} needs the current parameters: call "
        "`tx.update(updates, state, params)`. (It turns updates u into "
        "P(p + u) - p, which depends on p.)")


def map_plan(plan: list, fn: Callable, tree, params, owner: str):
  """``fn(constraint, leaf, param)`` on the planned leaves of ``tree``.

  Leaves whose plan entry is None are returned as they are (no work).
  """
  treedef = jax.tree.structure(params)
  leaves, param_leaves = (leaves_like(treedef, tree, owner),
                          treedef.flatten_up_to(params))
  # A None update (eqx.filter_grad's, for a non-array leaf) stays None.
  plan = [None if x is None else c for c, x in zip(plan, leaves)]
  for i, (c, x, p) in enumerate(zip(plan, leaves, param_leaves)):
    if c is not None and jnp.shape(x) != jnp.shape(p):
      try:
        ok = np.broadcast_shapes(jnp.shape(x), jnp.shape(p)) == jnp.shape(p)
      except ValueError:
        ok = False
      if not ok:
        path = _paths.shown(_paths.leaves_with_paths(params)[0][i])
        raise ValueError(
            f"{owner}: the update of parameter `{path}` has shape "
            f"{jnp.shape(x)}, which does not broadcast to the parameter's "
            f"shape {jnp.shape(p)}.")
  return treedef.unflatten(
      x if c is None else fn(c, x, p)
      for c, x, p in zip(plan, leaves, param_leaves))


def leaves_like(treedef, tree, owner: str) -> list:
  """The leaves of ``tree`` (updates) that sit where the params' are."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{owner}: the updates tree does not match the params "
                     f"tree: {e}") from e


def land(plan: list, updates, params, owner: str):
  """Updates that make ``apply_updates`` land on the projection, per plan."""
  return map_plan(plan, lambda c, u, p: _landing.landing_update(p, u, c),
                  updates, params, owner)


def projection_from_plan(make_plan: Callable[[Any], list],
                         owner: str) -> optax.GradientTransformation:
  """A projection whose per-leaf constraints come from ``make_plan(params)``.

  ``make_plan`` runs on the params' structure at ``init`` (so bad masks and
  shapes fail early) and again, at trace time, in every ``update``.
  """

  def init_fn(params):
    if not _selection.is_params_placeholder(params):
      make_plan(params)
    return ProjectionState()

  def update_fn(updates, state, params=None):
    require_params(params, owner)
    return land(make_plan(params), updates, params, owner), state

  return optax.GradientTransformation(init_fn, update_fn)


def plan_maker(constraint_or_rules, mask, owner: str) -> Callable:
  """``params -> plan`` for one set with ``mask=``, or a rules mapping."""
  if isinstance(constraint_or_rules, Mapping):
    if mask is not None:
      raise ValueError(f"{owner}: `mask` is only allowed with a single "
                       "constraint set, not with a rules mapping.")
    rules = _selection.check_rules(constraint_or_rules, owner,
                                   _constraint.Constraint, "constraint set")
    for pattern, value in rules.items():
      if value is not None:
        check_constraint_arg(value, f"rules[{pattern!r}]", owner)
    return lambda params: _selection.plan_from_rules(params, rules, owner)
  check_constraint_arg(constraint_or_rules, "constraint", owner)
  _selection.check_mask_arg(mask, owner)
  return lambda params: _selection.plan_from_mask(
      params, constraint_or_rules, mask, owner)


def check_constraint_arg(constraint, name: str, owner: str) -> None:
  if not isinstance(constraint, _constraint.Constraint):
    hint = ""
    if hasattr(constraint, "forward") and hasattr(constraint, "inverse"):
      hint = (" It looks like a parameterization; pass its `.constraint`, "
              "or use it with `reparam` instead.")
    elif callable(constraint) and not isinstance(constraint, type):
      hint = (" Of functions, `project` and `project_params` accept Optax's "
              "whole-tree projections (optax.projections.projection_*); for "
              "a set of your own, subclass posconstr.Constraint.")
    raise TypeError(
        f"{owner}: `{name}` must be a constraint set (NonNegative, Box, "
        f"Simplex, MaxNorm, UnitNorm, MinMaxNorm or a posconstr.Constraint "
        f"subclass), got {constraint!r} of type "
        f"{type(constraint).__name__}.{hint}")


def project_params(params, constraint, mask: Mask = None):
  """Projects a whole pytree of parameters onto its sets: a pure function.

  The same selection as :func:`project` (``mask=``) or :func:`constrain`
  (a rules mapping). Use it to make initial parameters feasible (Keras never
  applies constraints at initialization), or to project after
  ``optax.apply_updates`` inside the same jitted step. The result there is
  :math:`P_C(p + u)` itself; :func:`project` reaches the same point (for
  elementwise sets, bit for bit wherever some update lands on it), or a
  feasible one next to it, through a landing step in every leaf. Without
  that step each leaf's program is smaller, and for norm sets on XLA:CPU
  the step needs no scratch buffers.

  ``constraint`` may also be one of Optax's whole-tree projections, such as
  ``optax.projections.projection_simplex`` (see :func:`project`).

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> params = {"kernel": jnp.array([-1.0, 2.0]), "bias": jnp.array([-3.0])}
    >>> new = posconstr.project_params(params, posconstr.NonNegative(),
    ...                                mask="kernel")
    >>> new["kernel"], new["bias"]
    (Array([0., 2.], dtype=float32), Array([-3.], dtype=float32))
  """
  if _tree_projection.is_tree_projection(constraint):
    _selection.check_mask_arg(mask, "project_params")
    return _tree_projection.project_tree(params, constraint, mask,
                                         "project_params")
  plan = plan_maker(constraint, mask, "project_params")(params)
  return map_plan(plan, lambda c, x, _: c.project(x), params, params,
                  "project_params")


def project(constraint: _constraint.Constraint,
            mask: Mask = None) -> optax.GradientTransformation:
  r"""Projects the parameters onto ``constraint`` after the step.

  Turns updates :math:`u` into :math:`P_C(p + u) - p`, so that
  ``optax.apply_updates(params, updates)`` lands on :math:`P_C(p + u)`:
  bit for bit what projecting after the step by hand gives whenever
  ``p + d`` can equal that point in floating point; otherwise on the nearest
  such point that is still in the set (never outside it; see
  ``posconstr.sets._landing`` for how rounding is handled).

  .. warning::
    Use it as the **last** link of a chain. Any link after it moves the
    parameters off the set again (``optax.chain(project_nonneg(),
    optax.adam(1e-3))`` is *not* non-negative). :func:`posconstr.chain`
    refuses such chains and :func:`posconstr.check_projection_last` checks an
    optimizer state. NaN in the updates is never hidden: it reaches the
    parameters. An infinite update is projected like any other value, so
    ``-inf`` towards a lower bound lands on the bound; compose with
    ``optax.apply_if_finite`` to skip non-finite steps instead.

  **Optax's projection functions.** ``constraint`` may also be one of
  Optax's projections, ``optax.projections.projection_*`` (bind extra
  arguments with ``functools.partial``). It receives the *whole tree*
  of selected leaves at once (unselected ones are ``optax.MaskedNode()``),
  whereas posconstr's sets act leaf by leaf and, for ``Simplex`` and the
  norm sets, slice by slice along ``axis``: ``Simplex(axis=0)`` makes each
  column of each kernel a distribution, ``projection_simplex`` makes all
  the selected entries together one distribution. The landing is ``t - p``
  where the point moved: exact for bounds at 0, within rounding otherwise
  (posconstr's sets land bit for bit).

  >>> import jax.numpy as jnp, optax, posconstr
  >>> w = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
  >>> posconstr.project_params(w, posconstr.Simplex(axis=0))["w"]  # per column
  Array([[1., 0.],
         [0., 1.]], dtype=float32)
  >>> posconstr.project_params(w, optax.projections.projection_simplex)["w"]
  Array([[1., 0.],
         [0., 0.]], dtype=float32)

  Args:
    constraint: the set, e.g. :class:`posconstr.NonNegative`, or one of
      Optax's whole-tree projections (above).
    mask: which leaves to project. ``None``: every floating-point array leaf
      (as ``eqx.is_inexact_array``; Python scalars, functions and other
      objects in the tree are left alone); a glob pattern or a list of them,
      matched case-sensitively against paths with keys joined by ``/``
      (``"*/kernel"`` matches ``Dense_0/kernel`` in linen params and
      ``linear/kernel`` in NNX state); a bool pytree that is a prefix of the
      params (an ``eqx.Module`` of bools too); or a function
      ``params -> bool pytree``. As in ``optax.masked``, a mask is a function
      only if it is callable and not a pytree of bools. A pattern that matches
      no path is an error. Unselected leaves are returned as they are.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = optax.chain(optax.sgd(1.0), posconstr.project_nonneg())
    >>> params = {"w": jnp.array([0.5, 2.0])}
    >>> grads = {"w": jnp.array([1.0, 1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0., 1.], dtype=float32)
  """
  if _tree_projection.is_tree_projection(constraint):
    return _tree_projection.tree_projection(
        constraint, mask, f"project({_tree_projection._name(constraint)})",
        ProjectionState, require_params)
  check_constraint_arg(constraint, "constraint", "project")
  owner = f"project({constraint!r})"
  return projection_from_plan(plan_maker(constraint, mask, owner), owner)


def project_nonneg(eps: float = 0.0,
                   mask: Mask = None) -> optax.GradientTransformation:
  r"""Keeps parameters :math:`\ge \epsilon`: ``project(NonNegative(eps))``.

  Unlike ``optax.keep_params_nonnegative`` it takes ``eps`` and a mask. The
  new parameters are always ``>= eps`` in every dtype, and equal to
  ``max(p + u, eps)`` bit for bit whenever ``apply_updates`` can reach that
  value from ``p``. When it cannot (``eps`` is finer than the float grid
  around ``p``) they land on the nearest reachable feasible value: from
  ``p = 1`` with ``eps = 1e-8`` that is 5.96e-8 in float32 and 0.0039 in
  bfloat16 (see ``posconstr.sets._landing``).

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = optax.chain(optax.adam(0.1), posconstr.project_nonneg(mask="*/w"))
    >>> params = {"layer": {"w": jnp.zeros(2), "b": jnp.zeros(2)}}
    >>> grads = {"layer": {"w": jnp.ones(2), "b": jnp.ones(2)}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["layer"]["w"], new["layer"]["b"]
    (Array([0., 0.], dtype=float32), Array([-0.1, -0.1], dtype=float32))
  """
  return project(_intervals.NonNegative(eps), mask)


def project_box(lower=None, upper=None,
                mask: Mask = None) -> optax.GradientTransformation:
  r"""Clips parameters into :math:`[l, u]`: ``project(Box(lower, upper))``.

  Each bound is a scalar, an array broadcastable to every selected leaf,
  ``None`` (unbounded), or a pytree prefix of the params holding one such
  bound per subtree (per-leaf bounds, as in ``optax.projections``).

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = optax.chain(optax.sgd(1.0), posconstr.project_box(0.0, 1.0))
    >>> params = {"w": jnp.array([0.5, 0.5])}
    >>> grads = {"w": jnp.array([1.0, -1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0., 1.], dtype=float32)
  """
  if not (_bound_trees.is_bound_tree(lower)
          or _bound_trees.is_bound_tree(upper)):
    return project(_intervals.Box(lower, upper), mask)
  owner = "project_box"
  _selection.check_mask_arg(mask, owner)

  def make_plan(params):
    chosen = _selection.select(params, mask, owner)
    return _bound_trees.leaf_boxes(params, lower, upper, owner, chosen)

  return projection_from_plan(make_plan, owner)
