"""Catching the most common silent mistake: a projection that is not last."""

from __future__ import annotations

import collections
from typing import Any, List

import optax

from posconstr import _projected
from posconstr import _projection


def _contains_projection(state) -> bool:
  if isinstance(state, (_projection.ProjectionState,
                        _projected.ProjectedState)):
    return True
  if isinstance(state, dict):
    return any(_contains_projection(v) for v in state.values())
  if isinstance(state, (tuple, list)):
    return any(_contains_projection(v) for v in state)
  return False


def _only_projections(state) -> bool:
  """True when every transform in ``state`` is a plain projection.

  Wrappers are looked through (chains, ``masked`` and ``inject_hyperparams``
  via their ``inner_state``, ``multi_transform``'s per-label dict). A
  ``projected`` optimizer is not a plain projection: its inner optimizer
  would read the previous projection's displacement as a gradient.
  """
  if isinstance(state, _projection.ProjectionState):
    return True
  links = _chain_links(state)
  if links is None and isinstance(state, dict):
    links = list(state.items())
  if links is not None:
    return bool(links) and all(_only_projections(link) for _, link in links)
  if isinstance(state, tuple) and "inner_state" in getattr(state, "_fields",
                                                           ()):
    if isinstance(state, _projected.ProjectedState):
      return False
    return _only_projections(state.inner_state)
  return False


def _chain_links(state):
  """The links of a chain state (plain tuple or named_chain dict), else None."""
  if type(state) is tuple:  # optax.chain's state; NamedTuples are not chains.
    return list(enumerate(state))
  if type(state) is collections.OrderedDict:  # optax.named_chain's state.
    return list(state.items())
  return None


def _misplaced(state, where: str) -> List[str]:
  problems = []
  links = _chain_links(state)
  if links is not None:
    seen = None
    for name, link in links:
      if seen is None:
        if _contains_projection(link):
          seen = name
      elif not _only_projections(link):
        # Also a link that ends in a projection of its own, as in
        # chain(project_a, chain(adam, project_b)): adam reads project_a's
        # displacement as a gradient, and project_b need not cover a's leaves.
        problems.append(
            f"{where}: the projection in link {seen!r} is followed by link "
            f"{name!r} ({type(link).__name__}), which changes the updates "
            "after the projection, so the parameters leave the set")
        break
    children = [(f"{where}[{name!r}]", link) for name, link in links]
  elif isinstance(state, tuple) and hasattr(state, "_fields"):
    children = [(f"{where}.{f}", getattr(state, f)) for f in state._fields]
  elif isinstance(state, dict):
    # Not a chain (e.g. optax.multi_transform's inner_states, one per label,
    # applied to disjoint leaves): no order to check, but look inside.
    children = [(f"{where}[{k!r}]", v) for k, v in state.items()]
  else:
    children = []
  for child_where, child in children:
    problems.extend(_misplaced(child, child_where))
  return problems


def check_projection_last(opt_state: Any) -> None:
  """Raises ``ValueError`` if a posconstr projection is not the last link.

  Inspects the structure of an optimizer state (the output of ``tx.init``),
  through ``optax.chain``, ``optax.named_chain``, ``optax.masked``,
  ``optax.inject_hyperparams`` and ``optax.MultiSteps``. A projection may be
  followed only by other projections; any link after it is flagged, even a
  stateless one (its ``EmptyState`` still has a place in the chain) and one
  that ends in a projection of its own (``chain(project_a, chain(adam,
  project_b))``), or a :func:`posconstr.projected`. It
  cannot recognise ``optax.keep_params_nonnegative`` as a projection, since
  its state is a plain ``EmptyState``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> params = {"w": jnp.ones(2)}
    >>> good = optax.chain(optax.adam(1e-3), posconstr.project_nonneg())
    >>> posconstr.check_projection_last(good.init(params))
    >>> bad = optax.chain(posconstr.project_nonneg(), optax.adam(1e-3))
    >>> posconstr.check_projection_last(bad.init(params))
    Traceback (most recent call last):
    ...
    ValueError: opt_state: the projection in link 0 is followed by link 1 ...
  """
  problems = _misplaced(opt_state, "opt_state")
  if problems:
    raise ValueError(problems[0] + ". Put posconstr projections at the end "
                     "of the chain.")


def chain(*transforms: optax.GradientTransformation
          ) -> optax.GradientTransformationExtraArgs:
  """``optax.chain`` that refuses, at ``init``, a projection not at the end.

  Args:
    *transforms: the links, as for ``optax.chain``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = posconstr.chain(posconstr.project_nonneg(), optax.sgd(0.1))
    >>> tx.init({"w": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    ValueError: opt_state: the projection in link 0 is followed by link 1 ...
  """
  inner = optax.chain(*transforms)

  def init_fn(params):
    state = inner.init(params)
    check_projection_last(state)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)
