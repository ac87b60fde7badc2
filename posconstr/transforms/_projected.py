"""A bound-aware wrapper around any Optax optimizer: ``projected``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posconstr.sets import _constraint
from posconstr.transforms import _projection
from posconstr.tree import _selection


class ProjectedState(NamedTuple):
  """State of :func:`projected`: the wrapped optimizer's state."""

  inner_state: Any


def _dropped(constraint, grad, param):
  """Finite gradient components that point out of the set at the bound
  (None where nothing is dropped: no set, or one that is not elementwise).

  Non-finite ones are kept: ``inf`` and NaN reach the parameters, as they
  do through ``optax.chain(inner, posconstr.project(...))``.
  """
  if constraint is None or grad is None or not constraint.elementwise:
    return None
  return constraint.pushing_out(param, grad) & jnp.isfinite(grad)


def _zeroed(dropped, x):
  """``x`` with 0 where ``dropped`` (``x`` itself where it is None)."""
  if dropped is None:
    return x
  return jnp.where(dropped, jnp.zeros_like(x), x)


def projected(inner: optax.GradientTransformation, constraint,
              mask=None, nan_guard: bool = True
              ) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer so that it respects a constraint set.

  Two things happen in each ``update``:

  1. For **elementwise** sets (:class:`~posconstr.NonNegative`,
     :class:`~posconstr.Box`), the gradient components that point out of the
     set at coordinates already on the bound are zeroed *before* ``inner``
     sees them: the projected gradient of bound-constrained optimization
     (Bertsekas, "Projected Newton methods for optimization problems with
     simple constraints", 1982). Momentum then stops accumulating into the
     bound, so a weight leaves it on the first step after its gradient
     turns, instead of staying stuck while Adam's or momentum's state drains
     (6 steps for Adam, 66 for momentum 0.99 in the scenario of the tests).
  2. The step is projected exactly as :func:`posconstr.project` does: the
     new parameters are :math:`P_C(p + u)`, bit for bit.

  A set written by the user takes part through its ``elementwise`` flag and
  ``pushing_out`` (see :class:`posconstr.Constraint`). For
  **non-elementwise** sets (simplex, norm balls) only step 2 happens:
  the tangent cone of those sets is not a per-coordinate condition, and
  masking coordinates would bias the optimizer, so the gradient is passed
  through unchanged.

  Only finite components are zeroed: an infinite or NaN gradient reaches
  ``inner`` and, as through ``optax.chain(inner, posconstr.project(...))``,
  the parameters (Adam turns ``inf`` into a NaN step).

  Where step 1 zeroed a gradient, a NaN step from ``inner`` is taken as 0
  (``nan_guard``): ``optax.adam``'s default ``eps=1e-8`` is 0 in float16, so
  Adam's step for an exactly zero gradient is ``0 / 0``. NaN gradients still
  reach the parameters (plain ``optax.adam`` in float16 has the same
  ``0 / 0`` for gradients that are zero on their own: pass ``eps=1e-4``
  there). The guard needs the mask once more after ``inner``, so XLA keeps
  the mask in memory instead of fusing it into ``inner``'s own loops: with
  ``nan_guard=False`` the mask costs what it costs written by hand (see the
  benchmarks in the README). Turn it off only where ``inner``'s step for a
  zero gradient is finite (Adam's in float32 and float64 with ``eps > 0``).

  ``projected`` is a whole optimizer, not a link: use it in place of
  ``inner`` (it may itself be a chain). Nothing may come after it.

  Args:
    inner: any Optax optimizer (``optax.adam(1e-3)``, a chain, ...).
    constraint: a constraint set, or a rules mapping
      ``{pattern: constraint or None}`` as in :func:`posconstr.constrain`.
    mask: with a single set, which leaves (see :func:`posconstr.project`).
    nan_guard: whether a NaN step where the gradient was zeroed becomes 0.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ProjectedState`; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = posconstr.projected(optax.adam(0.1), posconstr.NonNegative())
    >>> params = {"w": jnp.array([0.0, 1.0])}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([1.0, 1.0])}  # pushes w[0] out of the set
    >>> updates, state = tx.update(grads, state, params)
    >>> optax.apply_updates(params, updates)["w"]
    Array([0. , 0.9], dtype=float32)
    >>> float(state.inner_state[0].mu["w"][0])  # no momentum into the bound
    0.0
  """
  owner = "projected"
  _constraint.check_optimizer_arg(inner, "inner", owner)
  if not isinstance(nan_guard, (bool, np.bool_)):
    raise TypeError(f"projected: nan_guard={nan_guard!r}; it must be True or "
                    "False.")
  make_plan = _projection.plan_maker(constraint, mask, owner)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if not _selection.is_params_placeholder(params):  # tree_map_params
      make_plan(params)
    return ProjectedState(inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _projection.require_params(params, owner)
    plan = make_plan(params)
    treedef = jax.tree.structure(params)
    dropped = [_dropped(c, g, p) for c, g, p in zip(
        plan, _projection.leaves_like(treedef, updates, owner),
        treedef.flatten_up_to(params))]
    grads = treedef.unflatten(map(_zeroed, dropped, treedef.flatten_up_to(
        updates)))
    steps, inner_state = inner.update(grads, state.inner_state, params,
                                      **extra_args)
    if nan_guard:
      # Adam's step for a zero gradient is 0 / 0 when its eps underflows
      # (1e-8 in float16); the zero was ours, and a zero gradient's step is
      # 0. A NaN gradient is never zeroed: its NaN step still reaches params.
      steps = treedef.unflatten(
          s if d is None else _zeroed(d & jnp.isnan(s), s)
          for d, s in zip(dropped, _projection.leaves_like(treedef, steps,
                                                           owner)))
    return (_projection.land(plan, steps, params, owner),
            ProjectedState(inner_state))

  update_fn.posconstr_plan = make_plan  # For posconstr.chain's checks.
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
