"""Keras-style per-parameter constraints for a pytree: ``constrain(rules)``."""

from __future__ import annotations

from typing import Mapping, Optional

import optax

from posconstr.sets import _constraint
from posconstr.transforms import _projection


def constrain(
    rules: Mapping[str, Optional[_constraint.Constraint]],
) -> optax.GradientTransformation:
  r"""Projects each parameter onto the set of the first rule matching its path.

  The Optax counterpart of Keras' ``kernel_constraint=`` /
  ``bias_constraint=``, for any pytree of parameters: paths are keys joined
  by ``/`` (``Dense_0/kernel`` in linen params, ``linear/kernel`` in the state
  of an NNX model and ``module/linear/kernel`` once it is wrapped by
  :func:`posconstr.nnx.reparameterize`, ``layers/0/weight`` in an
  ``eqx.nn.MLP``) and patterns are case-sensitive ``fnmatch`` globs, in which
  ``*`` also crosses ``/``. Only array leaves (and Python numbers) are
  matched: the functions of an unfiltered ``eqx.Module`` are left alone.
  Rules are tried in order and the first match wins; a rule mapped to
  ``None`` leaves its matches unconstrained (useful before a catch-all).
  Leaves that match no rule are returned untouched.

  Like :func:`posconstr.project`, use it as the last link of a chain.

  Args:
    rules: ``{pattern: constraint or None}``, in priority order.

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` requires ``params``.

  Raises:
    TypeError: at construction, if a rule's value is not a constraint set.
    ValueError: at ``init``, if a pattern matches no parameter path or only
      paths taken by earlier rules, or a set does not fit its leaf.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = optax.chain(optax.sgd(1.0), posconstr.constrain({
    ...     "*/kernel": posconstr.NonNegative(),
    ...     "*/bias": posconstr.Box(-1.0, 1.0)}))
    >>> params = {"Dense_0": {"kernel": jnp.array([0.5]),
    ...                       "bias": jnp.array([0.0])}}
    >>> grads = {"Dense_0": {"kernel": jnp.array([1.0]),
    ...                      "bias": jnp.array([5.0])}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["Dense_0"]["kernel"], new["Dense_0"]["bias"]
    (Array([0.], dtype=float32), Array([-1.], dtype=float32))
  """
  if not isinstance(rules, Mapping):
    raise TypeError("constrain: `rules` must be a mapping from path patterns "
                    f"to constraint sets, got {type(rules).__name__}.")
  return _projection.projection_from_plan(
      _projection.plan_maker(rules, None, "constrain"), "constrain")
