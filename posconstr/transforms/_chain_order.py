"""Catching the most common silent mistakes: a projection that is not last,
and two projections of one leaf onto sets that do not nest."""

from __future__ import annotations

import collections
import warnings
from typing import Any, List

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posconstr.transforms import _exponentiated_gradient
from posconstr.transforms import _projected
from posconstr.transforms import _projection
from posconstr.tree import _paths
from posconstr.tree import _selection


def _contains(state, kinds) -> bool:
  if isinstance(state, kinds):
    return True
  if isinstance(state, dict):
    return any(_contains(v, kinds) for v in state.values())
  if isinstance(state, (tuple, list)):
    return any(_contains(v, kinds) for v in state)
  return False


def _contains_projection(state) -> bool:
  """A projection or a link that must come last like one (``projected``,
  ``multiplicative_update``)."""
  return _contains(state, (_projection.ProjectionState,
                           _projected.ProjectedState))


def _is_multiplicative(state) -> bool:
  return _contains(state, _exponentiated_gradient.MultiplicativeState)


def _only_projections(state) -> bool:
  """True when every transform in ``state`` is a plain projection.

  Wrappers are looked through (chains, ``masked`` and ``inject_hyperparams``
  via their ``inner_state``, ``multi_transform``'s per-label dict). A
  ``projected`` optimizer is not a plain projection: its inner optimizer
  would read the previous projection's displacement as a gradient, and
  neither is ``multiplicative_update``, which reads it as a log-step.
  """
  if isinstance(state, _exponentiated_gradient.MultiplicativeState):
    return False
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
    return _only_projections(getattr(state, "inner_state"))
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
    children = [(f"{where}.{f}", getattr(state, f))
                for f in getattr(state, "_fields")]
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
  its state is a plain ``EmptyState``. It sees states, not leaves: a link
  after the projection that changes only other leaves (``optax.masked``) is
  flagged too; :func:`posconstr.chain` looks at the leaves and accepts it.

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


_SUFFIX = ". Put posconstr projections at the end of the chain."


def chain(*transforms: optax.GradientTransformation,
          allow_overlap: bool = False) -> optax.GradientTransformationExtraArgs:
  """``optax.chain`` that checks, at ``init``, what the projections promise.

  Per parameter leaf, ``init`` refuses (``ValueError``):

  * a link after a projection of the leaf that changes the leaf's updates
    (``chain(project_nonneg(), adam)``); links that change only other leaves
    (``optax.masked(optax.add_decayed_weights(1e-4), biases)`` after
    ``project_nonneg(mask=kernels)``) are accepted;
  * two projections of the leaf where the later one moves it out of the
    earlier set (``project(Simplex())`` then ``project_box(0, 0.4)``: the
    clip breaks the sum), tested on probe points. Nested sets pass
    (``project_nonneg()`` then ``project(MaxNorm())``: rescaling keeps the
    signs). ``allow_overlap=True`` skips this test.

  Inside a link (a nested ``optax.chain``) the order is checked as by
  :func:`check_projection_last`, from the states. Not caught: projections
  inside ``optax.flatten``, which sees all parameters as one vector, so that
  ``MaxNorm(axis=0)`` or ``Simplex`` there constrain one global vector; a
  ``UserWarning`` says so. Keep per-slice sets outside ``optax.flatten``.

  Args:
    *transforms: the links, as for ``optax.chain``.
    allow_overlap: accept two projections of one leaf without the probe test.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = posconstr.chain(posconstr.project_nonneg(), optax.sgd(0.1))
    >>> tx.init({"w": jnp.ones(2)})
    Traceback (most recent call last):
    ...
    ValueError: opt_state: the projection in link 0 is followed by link 1 ...
    >>> tx = posconstr.chain(optax.sgd(0.1), posconstr.project(
    ...     posconstr.Simplex()), posconstr.project_box(0.0, 0.4))
    >>> tx.init({"w": jnp.ones(3)})
    Traceback (most recent call last):
    ...
    ValueError: parameter `w` is projected by link 1 and again by link 2: ...
  """
  if not isinstance(allow_overlap, bool):
    raise TypeError(f"chain: `allow_overlap` must be a bool, got "
                    f"{allow_overlap!r}.")
  inner = optax.chain(*transforms)

  def init_fn(params):
    state = inner.init(params)
    if _selection.is_params_placeholder(params):
      check_projection_last(state)
    else:
      _check_leaves(transforms, state, params, allow_overlap)
    return state

  return optax.GradientTransformationExtraArgs(init_fn, inner.update)


def _check_leaves(transforms, states, params, allow_overlap: bool) -> None:
  paths, leaves, _ = _paths.leaves_with_paths(params)
  covering = [[] for _ in leaves]  # per leaf: the links that project it
  for k, (tx, state) in enumerate(zip(transforms, states)):
    problems = _misplaced(state, f"opt_state[{k!r}]")
    if problems:
      raise ValueError(problems[0] + _SUFFIX)
    projects = _contains_projection(state)
    if projects and _is_flatten(tx):
      warnings.warn(
          f"posconstr.chain: link {k} is an optax.flatten holding a "
          "projection: it sees all parameters as one vector, so per-slice "
          "sets (Simplex, MaxNorm, ...) constrain that vector as a whole. "
          "Put the projection outside optax.flatten.", stacklevel=3)
    if any(covering) and not _only_projections(state):
      touched = _touched(tx, state, params)
      hit = [i for i, c in enumerate(covering) if c and touched[i]]
      if hit:
        names = ", ".join(f"`{_paths.shown(paths[i])}`" for i in hit[:3])
        raise ValueError(
            f"opt_state: the projection in link {covering[hit[0]][-1]!r} is "
            f"followed by link {k!r} ({type(state).__name__}), which changes "
            f"the updates of {names} after the projection, so the parameters "
            "leave the set" + _SUFFIX)
    if projects:
      for i, t in enumerate(_touched(tx, state, params)):
        if t:
          covering[i].append(k)
  if not allow_overlap and any(len(c) > 1 for c in covering):
    _check_overlaps(transforms, [_is_multiplicative(s) for s in states],
                    covering, params, paths)


def _touched(tx, state, params) -> List[bool]:
  """Per leaf of ``params``, whether ``tx.update`` can change its update:
  False where the traced program returns the incoming update itself. All
  True when the update cannot be traced alone (it needs extra arguments)."""
  leaves, treedef = jax.tree.flatten(params)
  update = optax.with_extra_args_support(tx).update

  def fn(*u):
    out, _ = update(treedef.unflatten(list(u)), state, params)
    return treedef.flatten_up_to(out)

  specs = [jax.ShapeDtypeStruct(jnp.shape(x), _paths.leaf_dtype(x))
           for x in leaves]
  try:
    jaxpr = jax.make_jaxpr(fn)(*specs).jaxpr
  except Exception:  # pylint: disable=broad-except
    return [True] * len(leaves)  # Unknown: assume it changes every leaf.
  return [o is not i for i, o in zip(jaxpr.invars, jaxpr.outvars)]


def _probe(leaf):
  """Deterministic points around 0 at the scale of most bounds, so that
  sets' projections move them."""
  shape, dtype = jnp.shape(leaf), _paths.leaf_dtype(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.zeros(shape, dtype)
  return jnp.asarray(3 * np.random.default_rng(0).normal(size=shape), dtype)


def _check_overlaps(transforms, multiplicative, covering, params,
                    paths) -> None:
  """Raises if a later projection of a leaf moves it out of an earlier set
  (for a ``multiplicative_update``, the positive weights), checked on one
  probe step from zero parameters (from ones when a multiplicative update
  is among the links, which needs positive ones)."""
  first = min(c[0] for c in covering if len(c) > 1)
  with jax.ensure_compile_time_eval():
    fill = jnp.ones if any(multiplicative[first:]) else jnp.zeros
    start = jax.tree.map(lambda x: fill(jnp.shape(x), _paths.leaf_dtype(x)),
                         params)
    zeros = jax.tree.map(jnp.zeros_like, start)
    tail = optax.with_extra_args_support(optax.chain(*transforms[first:]))
    try:
      steps, _ = tail.update(jax.tree.map(_probe, params), tail.init(start),
                             start)
    except Exception:  # pylint: disable=broad-except
      return  # Needs extra arguments: cannot probe.
    # The landing point, as an update from zero parameters.
    final = optax.apply_updates(start, steps)
    for j in sorted({k for c in covering if len(c) > 1 for k in c[:-1]}):
      moved = ([bool(jnp.any(x <= 0)) for x in jax.tree.leaves(final)]
               if multiplicative[j] else _moves(transforms[j], zeros, final))
      for i, c in enumerate(covering):
        if j in c[:-1] and moved is not None and moved[i]:
          later = c[c.index(j) + 1:]
          where = f"parameter `{_paths.shown(paths[i])}`"
          if multiplicative[j]:
            raise ValueError(
                f"{where} is updated multiplicatively by link {j} and "
                f"projected by link {later[-1]}: the projection moves it to "
                "weights <= 0 (found on a probe point), which a "
                "multiplicative update cannot move again. Project it onto a "
                "set of positive weights, or pass allow_overlap=True.")
          raise ValueError(
              f"{where} is projected by link {j} "
              f"and again by link {later[-1]}: the later projection moves it "
              f"out of link {j}'s set (found on a probe point), so the "
              "parameters leave that set. Project each "
              "leaf onto one set (posconstr.constrain rules, or masks), or "
              "pass allow_overlap=True if the later set keeps the earlier one.")


def _moves(tx, zeros, point):
  """Per leaf, whether link ``tx`` moves ``point`` (from zero parameters)."""
  plan_maker = getattr(tx.update, "posconstr_plan", None)
  leaves = jax.tree.leaves(point)
  if plan_maker is not None:  # posconstr.projected: project by its plan.
    return [c is not None and not _same(c.project(x), x)
            for c, x in zip(plan_maker(zeros), leaves)]
  try:
    out, _ = optax.with_extra_args_support(tx).update(point, tx.init(zeros),
                                                      zeros)
  except Exception:  # pylint: disable=broad-except
    return None
  return [not _same(a, b) for a, b in zip(jax.tree.leaves(out), leaves)]


def _same(a, b) -> bool:
  return bool(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True))


def _is_flatten(tx) -> bool:
  init = getattr(tx, "init", None)
  return (getattr(init, "__qualname__", "") == "flatten.<locals>.init_fn"
          and getattr(init, "__module__", "").startswith("optax"))
