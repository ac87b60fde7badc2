"""Flax NNX: modules whose ``nnx.Param``s hold latents, read as ``g(latent)``.

The latents are what ``nnx.state``, ``nnx.split``/``nnx.merge``,
``nnx.Optimizer`` and checkpoints see; the wrapped layers see
``forward(latent)`` while they run. Nothing is ever written back into the
Params (unlike ``nnx.WeightNorm``, whose write-back is only right for
idempotent maps).

Ready-made networks: :class:`ICNN` and :class:`MonotoneMLP`, the twins of
:class:`posconstr.linen.ICNN` and :class:`posconstr.linen.MonotoneMLP`
(same param paths and outputs).

**Paths.** :func:`reparameterize` returns a :class:`Reparameterized` that
holds the model in its attribute ``module``, so the model's state, the
optimizer (``nnx.Optimizer``, :func:`posconstr.constrain` rules) and
:meth:`Reparameterized.applied_state` all show paths with a ``module/``
prefix (``module/l1/kernel``). Only the ``rules`` of :func:`reparameterize`
are relative to the model being wrapped (``l1/kernel``), since they are
given before it is wrapped; patterns that start with ``*`` (``"*kernel"``,
``"*/kernel"``) match both forms. Rules may also be keyed by NNX filters
(``nnx.PathContains("kernel")``, a ``Variable`` type, ``nnx.All(...)``).

**Speed.** An eager call swaps ``g(latent)`` into the matched Params for
the duration of the call and restores the latents after it (also when the
call raises), which costs one walk over the module's graph on top of the
module's own call. Train under ``nnx.jit``: the walk then happens once, at
trace time. (A call that cannot mutate the Params, such as a closed-over
module inside ``jax.jit``, runs on a functional copy instead.) The swap
makes a wrapped model unsafe to call from several threads at once.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
from flax import errors as _flax_errors
from flax import nnx as _nnx
from flax.nnx.nn import dtypes as _nnx_dtypes

from posconstr import _adapters
from posconstr.layers import _nnx_signed
from posconstr.layers._nnx_icnn import ICNN
from posconstr.layers._nnx_monotone import MonotoneMLP
from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam
from posconstr.tree import _paths
from posconstr.tree import _selection

__all__ = ("ICNN", "MonotoneMLP", "NonNegLinear", "Reparameterized",
           "reparameterize")

Rules = Union[_parameterizations.Parameterization, Mapping[Any, Any]]
_OWNER = "posconstr.nnx.reparameterize"


class _StaticRules:
  """Rules as a hashable, non-pytree attribute (NNX filters as keys)."""

  def __init__(self, rules):
    self.value = rules
    self._key = (tuple(rules.items()) if isinstance(rules, Mapping)
                 else (rules,))

  def __eq__(self, other):
    return isinstance(other, _StaticRules) and self._key == other._key

  def __hash__(self):
    return hash(self._key)


def _resolved(rules, lookup):
  """NNX-filter keys as ``PathFilter``s over ``{path: (key, Variable)}``."""
  if not isinstance(rules, Mapping):
    return rules
  out = {}
  for key, value in rules.items():
    if not isinstance(key, str):
      try:
        predicate = _nnx.filterlib.to_predicate(key)
      except (TypeError, ValueError) as e:  # flax raises either
        raise TypeError(
            f"{_OWNER}: rule keys must be glob patterns (str) or NNX filters "
            f"(a Variable type, nnx.PathContains(...), nnx.All(...), a "
            f"predicate), got {key!r} of type {type(key).__name__}.") from e
      key = _selection.PathFilter(
          lambda path, _, p=predicate: path in lookup and p(*lookup[path]),
          repr(key))
    out[key] = value
  return out


def _param_targets(module: _nnx.Module, rules) -> tuple:
  """(paths, Variables, plan) of the module's Params, plan aligned with them."""
  state = _nnx.state(module, _nnx.Param)
  pairs, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, _nnx.Variable))
  paths = [_paths.path_to_str(p) for p, _ in pairs]
  variables = [v for _, v in pairs]
  lookup = {path: (tuple(getattr(k, "key", k) for k in p), v)
            for path, (p, v) in zip(paths, pairs)}
  plan = _reparam.make_plan(state, _resolved(rules, lookup), None, _OWNER)
  if len(plan) != len(variables):  # a Param holding a pytree of arrays
    return paths, None, plan
  return paths, variables, plan


def _swap(variables, values, latents) -> bool:
  """Puts ``values`` into ``variables``; False, changing nothing, if it cannot.

  It cannot when the Variables belong to another trace (a module closed over
  by ``jax.jit``): NNX refuses the mutation.
  """
  done = 0
  try:
    for var, value in zip(variables, values):
      var.set_raw_value(value)
      done += 1
    return True
  except _flax_errors.TraceContextError:
    return False
  finally:
    if done < len(variables):
      for var, z in zip(variables[:done], latents[:done]):
        var.set_raw_value(z)


class Reparameterized(_nnx.Module):
  """An NNX module whose matched Params are ``g(latent)`` when it runs.

  Build it with :func:`reparameterize`. Attribute ``module`` is the wrapped
  module, holding the latents; see the module docstring for paths and speed.
  """

  def __init__(self, module: _nnx.Module, rules: Rules):
    self.module = module
    self._rules = _StaticRules(rules)

  @property
  def rules(self) -> Rules:
    """The ``rules`` given to :func:`reparameterize`."""
    return self._rules.value

  def applied_state(self):
    """This wrapper's Param state with its own ``forward`` maps applied (a
    copy).

    The same paths as ``nnx.state(model, nnx.Param)`` and the optimizer:
    ``module/...``. ``nnx.update(plain_twin, model.applied_state()["module"])``
    loads the constrained weights into an unwrapped copy of the model.
    Params that hold latents of something inside the module (an inner
    ``Reparameterized``, a :class:`NonNegLinear`, the layers of
    :class:`ICNN`/:class:`MonotoneMLP`) stay latents here, as that inner
    part of a twin reads them; an inner wrapper's own ``applied_state()``
    applies its maps.
    """
    _, _, plan = _param_targets(self.module, self.rules)
    return _adapters.forward_tree(_nnx.state(self, _nnx.Param), plan)

  def __call__(self, *args, **kwargs):
    _, variables, plan = _param_targets(self.module, self.rules)
    targets = ([] if variables is None else
               [(v, p) for v, p in zip(variables, plan) if p is not None])
    latents = [v.get_raw_value() for v, _ in targets]
    if (variables is None
        or not all(isinstance(z, jax.Array) for z in latents)
        or not _swap([v for v, _ in targets],
                     [_adapters.forward(p, z)
                      for (_, p), z in zip(targets, latents)],
                     latents)):
      return self._functional_call(plan, args, kwargs)
    try:
      return self.module(*args, **kwargs)
    finally:
      for (var, _), z in zip(targets, latents):
        var.set_raw_value(z)

  def _functional_call(self, plan, args, kwargs):
    graphdef, params, rest = _nnx.split(self.module, _nnx.Param, ...)
    view = _nnx.merge(graphdef, _adapters.forward_tree(params, plan), rest)
    out = view(*args, **kwargs)
    # Carry back what the call changed besides the Params (RNG counters,
    # batch statistics, caches); the latents are never written. A call that
    # changed nothing writes nothing (a closed-over module in eval mode
    # under jax.jit, whose variables this trace may not set).
    after = _nnx.state(view, _nnx.Not(_nnx.Param))
    before, after_leaves = jax.tree.leaves(rest), jax.tree.leaves(after)
    if len(before) != len(after_leaves) or any(
        a is not b for a, b in zip(before, after_leaves)):
      _nnx.update(self.module, after)
    return out


def _join(*parts) -> str:
  return "/".join(str(p) for p in parts if p != "")


def _latent_params(module: _nnx.Module) -> dict:
  """``{Param path: where it became a latent}`` for the wrappers inside."""
  found = {}
  for path, node in _nnx.iter_graph(module):
    prefix = _join(*path)
    if isinstance(node, Reparameterized):
      paths, _, plan = _param_targets(node.module, node.rules)
      where = f"a posconstr.nnx.Reparameterized at `{prefix or 'module'}`"
      found.update({_join(prefix, "module", p): where
                    for p, g in zip(paths, plan) if g is not None})
    elif isinstance(node, NonNegLinear):
      found[_join(prefix, "kernel")] = (
          f"a posconstr.nnx.NonNegLinear at `{prefix or 'module'}`")
    elif isinstance(node, _nnx_signed.SignedLinear) and node.holds_latent:
      found[_join(prefix, "kernel")] = (
          f"a layer of posconstr.nnx.ICNN/MonotoneMLP at `{prefix}`")
  return found


def reparameterize(module: _nnx.Module, rules: Rules, *,
                   from_applied: bool = True) -> Reparameterized:
  """Makes the matched ``nnx.Param``s of ``module`` hold latents.

  Args:
    module: an NNX module, already initialized.
    rules: ``{key: parameterization or None}`` matched against the module's
      Param paths (first match wins), where a key is a glob pattern
      (``"*kernel"``, ``"l1/kernel"``) or an NNX filter
      (``nnx.PathContains("kernel")``, a ``Variable`` subclass); or one
      parameterization for every float Param. Paths are relative to
      ``module``: see the module docstring.
    from_applied: if True (default), the current values are taken as the
      applied weights: folded into the range (``eps + |v - eps|``) and
      replaced in place by their latents, through the stable inverse. If
      False, the current values are kept as latents. Values exactly on an
      open bound (a zero bias under ``Softplus``) get the latent of the
      smallest normal number and effectively never train: exclude them or
      initialize them above the bound first.

  Returns:
    A :class:`Reparameterized` module that owns ``module``.

  Raises:
    ValueError: if a rule matches no Param, or a matched Param already holds
      a latent (inside a :class:`Reparameterized` or a
      :class:`NonNegLinear`): that would read it as ``g(g(z))``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import posconstr
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> model = posconstr.nnx.reparameterize(
    ...     layer, {nnx.PathContains("kernel"): posconstr.Softplus()})
    >>> sorted(nnx.to_pure_dict(nnx.state(model, nnx.Param))["module"])
    ['bias', 'kernel']
    >>> bool((model.applied_state()["module"]["kernel"][...] >= 0).all())
    True
  """
  if isinstance(rules, Mapping):
    _reparam.check_rules_arg(_resolved(rules, {}), None, _OWNER)
    rules = dict(rules)
  else:
    rules = _reparam.check_rules_arg(rules, None, _OWNER)
  paths, _, plan = _param_targets(module, rules)
  latent = _latent_params(module)
  twice = [p for p, g in zip(paths, plan) if g is not None and p in latent]
  if twice:
    raise ValueError(
        f"{_OWNER}: Param `{twice[0]}` already holds a latent (of "
        f"{latent[twice[0]]}); reparameterizing it again would read it as "
        "g(g(z)). Map it to None in `rules` (before a catch-all) or narrow "
        f"the pattern. Matched latents: {twice!r}.")
  if from_applied:
    state = _nnx.state(module, _nnx.Param)
    leaves, treedef = jax.tree.flatten(_nnx.as_pure(state))
    latents = [x if p is None else _adapters.latent_of(p, x)
               for p, x in zip(plan, leaves)]
    _nnx.update(module, jax.tree.unflatten(treedef, latents))
  return Reparameterized(module, rules)


def _latent_of(value, g):
  """``inverse(fold(v))`` of an initializer's output, metadata kept."""
  if isinstance(value, _nnx.VariableMetadata):
    return dataclasses.replace(
        value, raw_value=_adapters.latent_of(g, value.raw_value))
  return _adapters.latent_of(g, value)


class NonNegLinear(_nnx.Module):
  """``nnx.Linear`` with weights ``g(latent) >= eps`` (softplus by default).

  The arguments of ``nnx.Linear`` (``precision``, ``dot_general``,
  ``promote_dtype``, ``preferred_element_type``, ``kernel_metadata``,
  ``bias_metadata``, and initializers wrapped by ``nnx.with_partitioning``)
  plus ``parameterization``. Given the same latents, it computes what
  :class:`posconstr.linen.NonNegDense` does. ``kernel_init`` draws the
  applied weights (default ``|lecun_normal|``); the Param ``kernel`` holds
  latents (so never :func:`reparameterize` it again).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from posconstr.nnx import NonNegLinear
    >>> layer = NonNegLinear(4, 3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 4))).shape
    (2, 3)
  """

  def __init__(self, in_features: int, out_features: int, *,
               rngs: _nnx.Rngs, use_bias: bool = True,
               parameterization: _parameterizations.Parameterization = (
                   _parameterizations.Softplus()),
               kernel_init: Callable = _nnx.initializers.lecun_normal(),
               bias_init: Callable = _nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32,
               precision: Any = None,
               dot_general: Callable = jax.lax.dot_general,
               promote_dtype: Callable = _nnx_dtypes.promote_dtype,
               preferred_element_type: Any = None,
               kernel_metadata: Mapping[str, Any] = types.MappingProxyType({}),
               bias_metadata: Mapping[str, Any] = types.MappingProxyType({})):
    _reparam.check_parameterization_arg(parameterization, "parameterization",
                                        "NonNegLinear")
    applied = kernel_init(rngs.params(), (in_features, out_features),
                          param_dtype)
    self.kernel = _nnx.Param(_latent_of(applied, parameterization),
                             **kernel_metadata)
    self.bias = (_nnx.Param(bias_init(rngs.params(), (out_features,),
                                      param_dtype), **bias_metadata)
                 if use_bias else _nnx.data(None))
    self.in_features = in_features
    self.out_features = out_features
    self.use_bias = use_bias
    self.parameterization = parameterization
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.dot_general = dot_general
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    kernel = _adapters.forward(self.parameterization, self.kernel[...])
    bias = self.bias[...] if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    extra = {"out_sharding": out_sharding}
    if self.preferred_element_type is not None:
      extra["preferred_element_type"] = self.preferred_element_type
    y = self.dot_general(inputs, kernel,
                         (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision, **extra)
    if bias is not None:
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y
