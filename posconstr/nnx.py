"""Flax NNX: modules whose ``nnx.Param``s hold latents, read as ``g(latent)``.

The latents are what ``nnx.state``, ``nnx.split``/``nnx.merge``,
``nnx.Optimizer`` and checkpoints see; the wrapped layers see
``forward(latent)`` on every call, computed on the fly from a functional copy
of the module. Nothing is ever written back into the Params (unlike
``nnx.WeightNorm``, whose write-back is only right for idempotent maps).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
from flax import nnx as _nnx

from posconstr import _parameterizations
from posconstr import _paths
from posconstr import _reparam

Rules = Union[_parameterizations.Parameterization, Mapping[str, Any]]


def _param_plan(module: _nnx.Module, rules) -> tuple:
  state = _nnx.state(module, _nnx.Param)
  plan = _reparam.make_plan(state, rules, None, "posconstr.nnx.reparameterize")
  return state, plan


class Reparameterized(_nnx.Module):
  """An NNX module whose matched Params are ``g(latent)`` when it runs.

  Build it with :func:`reparameterize`. Attribute ``module`` is the wrapped
  module, holding the latents; ``applied_state()`` returns its Param state
  with constrained values, for inspection.
  """

  def __init__(self, module: _nnx.Module, rules: Rules):
    self.module = module
    self.rules = rules

  def applied_state(self):
    """The wrapped module's Param state with ``forward`` applied (a copy)."""
    state, plan = _param_plan(self.module, self.rules)
    paths, leaves, treedef = _paths.leaves_with_paths(state)
    out = [leaf if p is None else p.forward(leaf) for p, leaf in zip(plan, leaves)]
    return jax.tree.unflatten(treedef, out)

  def __call__(self, *args, **kwargs):
    graphdef, params, rest = _nnx.split(self.module, _nnx.Param, ...)
    _, plan = _param_plan(self.module, self.rules)
    leaves, treedef = jax.tree.flatten(params)
    applied = jax.tree.unflatten(
        treedef, [x if p is None else p.forward(x) for p, x in zip(plan, leaves)])
    view = _nnx.merge(graphdef, applied, rest)
    out = view(*args, **kwargs)
    # Carry back what the call changed besides the Params (RNG counters,
    # batch statistics, caches); the latents are never written.
    _nnx.update(self.module, _nnx.state(view, _nnx.Not(_nnx.Param)))
    return out


def reparameterize(module: _nnx.Module, rules: Rules, *,
                   from_applied: bool = True) -> Reparameterized:
  """Makes the matched ``nnx.Param``s of ``module`` hold latents.

  Args:
    module: an NNX module, already initialized.
    rules: ``{pattern: parameterization}`` matched against the module's Param
      paths (``"*kernel"``, ``"linear/kernel"``; first match wins), or one
      parameterization for every float Param.
    from_applied: if True (default), the current values are taken as the
      applied weights: folded into the range (``eps + |v - eps|``) and
      replaced in place by their latents, through the stable inverse. If
      False, the current values are kept as latents. Values exactly on an
      open bound (a zero bias under ``Softplus``) get the latent of the
      smallest normal number and effectively never train: exclude them or
      initialize them above the bound first.

  Returns:
    A :class:`Reparameterized` module that owns ``module``.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import posconstr
    >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    >>> model = posconstr.nnx.reparameterize(layer, {"kernel": posconstr.Softplus()})
    >>> bool((model.applied_state()["kernel"][...] >= 0).all())
    True
  """
  rules = _reparam.check_rules_arg(rules, None, "posconstr.nnx.reparameterize")
  state, plan = _param_plan(module, rules)
  if from_applied:
    pure = _nnx.as_pure(state)
    leaves, treedef = jax.tree.flatten(pure)
    latents = [x if p is None else p.inverse(p.fold(x)) for p, x in zip(plan, leaves)]
    _nnx.update(module, jax.tree.unflatten(treedef, latents))
  return Reparameterized(module, rules)


class NonNegLinear(_nnx.Module):
  """A linear layer with weights ``g(latent) >= eps`` (softplus by default).

  The same computation as :class:`posconstr.linen.NonNegDense`: given the
  same latents, both give the same output. ``kernel_init`` draws the applied
  weights (default ``|lecun_normal|``); the Param ``kernel`` holds latents.

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
               dtype: Any = None, param_dtype: Any = jnp.float32):
    _reparam.check_parameterization_arg(parameterization, "parameterization",
                                        "NonNegLinear")
    g = parameterization
    applied = kernel_init(rngs.params(), (in_features, out_features),
                          param_dtype)
    self.kernel = _nnx.Param(g.inverse(g.fold(applied)))
    self.bias = (_nnx.Param(bias_init(rngs.params(), (out_features,),
                                      param_dtype)) if use_bias else None)
    self.parameterization = parameterization
    self.dtype = dtype

  def __call__(self, x):
    kernel = self.parameterization.forward(self.kernel[...])
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y
