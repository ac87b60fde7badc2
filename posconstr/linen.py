"""Flax linen layers whose weights are ``g(latent)``: ``Reparameterized``, ``NonNegDense``.

``params`` hold the unconstrained latents; the wrapped module sees
``forward(latent)``. Initialization draws the *applied* weights and stores
their latents through the parameterization's stable inverse, so the forward
map is never applied twice (the trap of a bare ``nn.map_variables``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from posconstr import _parameterizations
from posconstr import _reparam

Initializer = Callable[..., jax.Array]


def _module_fields(module: nn.Module) -> dict:
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in ("parent", "name")}


def _rules_of(kernel, bias, rules) -> dict:
  """The ``{relative path pattern: parameterization}`` of a wrapper."""
  merged = {}
  for name, value in (("kernel", kernel), ("bias", bias)):
    if value is not None:
      _reparam.check_parameterization_arg(value, name, "Reparameterized")
      merged[name] = value
  for pattern, value in (rules or {}).items():
    _reparam.check_parameterization_arg(value, f"rules[{pattern!r}]",
                                        "Reparameterized")
    merged[pattern] = value
  if not merged:
    raise ValueError("Reparameterized: nothing to reparameterize; give "
                     "`kernel=`, `bias=` or `rules=`.")
  return merged


class Reparameterized(nn.Module):
  """Wraps a linen module so that named variables are ``g(latent)``.

  ``params`` store latents; the module sees ``forward(latent)`` on every
  call. At ``init`` the wrapped module's own initializer (or ``kernel_init``
  / ``bias_init`` given here, which draw the *applied* weights, e.g.
  :func:`posconstr.initializers.icnn`) produces values that are folded into
  the range (``eps + |v - eps|``: a half-normal for a zero-mean normal) and
  stored as ``inverse(value)``. Works for any module whose variables are
  named by ``kernel=``/``bias=`` or matched by ``rules`` (relative paths
  inside the module): ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``...

  .. warning::
    A value exactly on an open bound has no finite latent: a zero-initialized
    bias under ``Softplus``/``Exp`` is stored as the latent of the smallest
    normal number (about -87 in float32), whose gradient factor is ~1e-38,
    so it never trains (``posconstr.dead_fraction`` reports it). Give such
    variables a positive ``bias_init``, or leave them unconstrained.

  Attributes:
    module: the linen module to wrap (unbound, e.g. ``nn.Dense(16)``).
    kernel: parameterization of the variable ``kernel``, or None.
    bias: parameterization of the variable ``bias``, or None.
    rules: more ``{pattern: parameterization}`` for other variables.
    kernel_init: initializer of the applied kernel (overrides the module's).
    bias_init: initializer of the applied bias (overrides the module's).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> from posconstr.linen import Reparameterized
    >>> layer = Reparameterized(nn.Dense(3))
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> kernel = layer.apply(variables, method=layer.applied)["kernel"]
    >>> bool((kernel >= 0).all())
    True
  """

  module: nn.Module
  kernel: Optional[_parameterizations.Parameterization] = (
      _parameterizations.Softplus())
  bias: Optional[_parameterizations.Parameterization] = None
  rules: Optional[Mapping[str, Any]] = None
  kernel_init: Optional[Initializer] = None
  bias_init: Optional[Initializer] = None

  def setup(self):
    rules = _rules_of(self.kernel, self.bias, self.rules)
    fields = _module_fields(self.module)
    for name, init in (("kernel_init", self.kernel_init),
                       ("bias_init", self.bias_init)):
      if init is not None:
        if name not in fields:
          raise TypeError(f"Reparameterized: `{name}` given, but "
                          f"{type(self.module).__name__} has no `{name}` "
                          "attribute to override.")
        fields[name] = init
    initializing = self.is_initializing()

    def to_applied(variables):
      params = variables.get("params", {})
      if not params:
        return variables
      return {**variables, "params": _reparam.reparam(params, rules)}

    def to_latent(variables):
      params = variables.get("params", {})
      if not params or not initializing:
        return variables
      # Both the fresh values and (at the end of init) the applied view come
      # through here: folding is the identity on the range, so the round
      # trip stores inverse(forward(latent)) ~= latent, never g(g(.)).
      plan = _reparam.make_plan(params, rules, None, "Reparameterized")
      folded = jax.tree.map(
          lambda p, v: v if p is None else p.fold(v),
          jax.tree.structure(params).unflatten(plan), params,
          is_leaf=lambda x: x is None or isinstance(
              x, _parameterizations.Parameterization))
      return {**variables, "params": _reparam.unreparam(folded, rules)}

    mapped = nn.map_variables(type(self.module), "params", to_applied,
                              to_latent, init=initializing)
    self.wrapped = mapped(**fields)
    nn.share_scope(self, self.wrapped)
    self._rules = rules

  def __call__(self, *args, **kwargs):
    return self.wrapped(*args, **kwargs)

  def applied(self):
    """The applied (constrained) params of the wrapped module."""
    return _reparam.reparam(self.variables["params"], self._rules)


class NonNegDense(nn.Module):
  """A dense layer with weights ``g(latent) >= eps`` (softplus by default).

  ``y = x @ g(kernel_latent) + bias``. The kernel initializer draws the
  applied weights (default: half-normal LeCun scaling, i.e. ``|lecun_normal|``);
  pass :func:`posconstr.initializers.icnn` for input-convex networks.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from posconstr.linen import NonNegDense
    >>> layer = NonNegDense(3)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> layer.apply(variables, jnp.ones((1, 4))).shape
    (1, 3)
  """

  features: int
  use_bias: bool = True
  parameterization: _parameterizations.Parameterization = (
      _parameterizations.Softplus())
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    g = self.parameterization
    _reparam.check_parameterization_arg(g, "parameterization", "NonNegDense")

    def latent_init(key, shape, dtype):
      return g.inverse(g.fold(self.kernel_init(key, shape, dtype)))

    latent = self.param("kernel", latent_init, (jnp.shape(x)[-1], self.features),
                        self.param_dtype)
    kernel = g.forward(latent)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
