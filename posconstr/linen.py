"""Flax linen layers whose weights are ``g(latent)``, and ready-made networks.

``params`` hold the unconstrained latents; the wrapped module sees
``forward(latent)``. Initialization draws the *applied* weights and stores
their latents through the parameterization's stable inverse, so the forward
map is never applied twice (the trap of a bare ``nn.map_variables``).

Ready-made networks: :class:`ICNN` (input-convex) and :class:`MonotoneMLP`
(monotone in chosen inputs), whose sign constraints hold by a
parameterization or, with ``positivity="project"``, by the projection their
``projection()`` method gives the optimizer.

**Paths.** A :class:`Reparameterized` adds no level of its own: inside it,
the wrapped module's variables have the paths that module gives them when
it is initialized on its own (``kernel`` for ``nn.Dense``, ``layers_0/kernel``
for ``nn.Sequential([nn.Dense(...), ...])``), under the wrapper's name in a
parent (``Reparameterized_0/layers_0/kernel``). ``rules`` match those
relative paths; optimizers and :func:`posconstr.constrain` see the full ones.
Submodules of the wrapped module always live inside the wrapper, even when
they were constructed in a parent's ``@nn.compact`` method.

>>> import jax, jax.numpy as jnp, flax.linen as nn, posconstr
>>> from posconstr.linen import Reparameterized
>>> seq = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
>>> layer = Reparameterized(seq, kernel=None,
...                         rules={"*/kernel": posconstr.Softplus()})
>>> params = layer.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
>>> sorted(params), sorted(params["layers_0"])
(['layers_0', 'layers_2'], ['bias', 'kernel'])

A variable is reparameterized at most once: a wrapper inside a wrapper, or a
:class:`NonNegDense` inside one, whose latents the outer rules also match,
raises ``ValueError`` instead of computing ``g(g(z))``.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posconstr import _adapters
from posconstr.layers._linen_icnn import ICNN
from posconstr.layers._linen_monotone import MonotoneMLP
from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam
from posconstr.tree import _paths

__all__ = ("ICNN", "MonotoneMLP", "NonNegDense", "Reparameterized")

Initializer = Callable[..., jax.Array]

# The Reparameterized wrappers whose module is running: (scope path, rules).
# (scope path, rules) of each Reparameterized being applied, outermost first.
_ACTIVE: contextvars.ContextVar[Tuple[Tuple[Tuple[str, ...], Any], ...]] = (
    contextvars.ContextVar("posconstr_linen_active", default=()))


def _module_fields(module: nn.Module) -> dict:
  """The constructor arguments of an unbound deep copy of ``module``.

  Submodules (``nn.Sequential``'s layers) are copied unbound and unnamed, so
  the wrapped copy adopts them: their variables live in the wrapper's scope
  under the names the module gives them on its own.
  """
  module = module.clone(parent=None, _deep_clone=True, _reset_names=True)
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.init and f.name not in ("parent", "name")}


def _scope_path(module: nn.Module) -> Tuple[str, ...]:
  if module.scope is None:  # Flax binds every module it runs or initializes.
    raise ValueError(f"{type(module).__name__} is not bound to a scope: call "
                     "it through `init`/`apply`.")
  return tuple(module.scope.path)


def _check_once(scope_path: Sequence[str], paths: Sequence[str], what: str,
                own_rules=None) -> None:
  """Raises if an enclosing wrapper also reparameterizes one of ``paths``.

  ``paths`` are relative to ``scope_path``, the scope of ``what`` (the
  wrapper or layer whose variables hold latents).
  """
  for outer_path, rules in _ACTIVE.get():
    if rules is own_rules or tuple(scope_path[:len(outer_path)]) != outer_path:
      continue
    rel = tuple(scope_path[len(outer_path):])
    for path in paths:
      full = "/".join(rel + (path,))
      hit = next((k for k in rules if _paths.matches(k, full)), None)
      if hit is not None and rules[hit] is not None:
        where = "/".join(outer_path) or "the top-level module"
        raise ValueError(
            f"Reparameterized: variable `{full}` already holds a latent of "
            f"{what}, and the Reparameterized at `{where}` matches it again "
            f"(rule {hit!r}: {rules[hit]!r}); that would read it as g(g(z)). "
            "Reparameterize each variable once: drop the outer rule, map the "
            "path to None there, or wrap a plain module.")


def _check_not_reparameterized(module: nn.Module, path: str, what: str):
  """Raises if an enclosing :class:`Reparameterized` matches ``path`` of
  ``module``, whose own variable already holds a latent (a layer that
  applies its parameterization itself)."""
  _check_once(_scope_path(module), [path], what)


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

  ``rules`` and ``kernel=``/``bias=`` match paths relative to the wrapped
  module, as ``module.init(...)["params"]`` shows them (see the module
  docstring): ``Reparameterized(nn.Sequential([...]), kernel=None,
  rules={"*/kernel": Softplus()})`` matches ``layers_0/kernel``.

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
    rules: more ``{pattern: parameterization}`` for other variables, tried
      after ``kernel=``/``bias=`` (first match wins): ``rules={"*": Exp()}``
      leaves the kernel to ``kernel=`` (pass ``kernel=None`` to let the
      rule take it), and a rule keyed exactly ``"kernel"`` or ``"bias"``
      replaces ``kernel=``/``bias=``.
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
    if isinstance(self.module, Reparameterized):
      inner = self.module.module
      raise ValueError(
          "Reparameterized: `module` is already a Reparameterized (of "
          f"{type(inner).__name__}); wrapping it again would read its latents "
          "as g(g(z)). Give all the parameterizations to one wrapper: "
          f"Reparameterized({type(inner).__name__}(...), kernel=..., "
          "bias=..., rules=...).")
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
    # During init, flax's map_variables first runs the module on the stored
    # variables and maps its output out, then maps the result in (our
    # applied view) and runs it again. In that first pass only the leaves
    # the call creates are applied values; those an earlier call of this
    # wrapper stored (weight tying) are latents already.
    call = {"stored": frozenset(), "viewed": False}

    def begin_call():
      params = self.variables.get("params", {}) if initializing else {}
      call["stored"] = frozenset(_paths.leaves_with_paths(params)[0]
                                 if params else ())
      call["viewed"] = False

    def planned(params):
      plan = _reparam.make_plan(params, rules, None, "Reparameterized")
      paths = _paths.leaves_with_paths(params)[0]
      _check_once(_scope_path(self),
                  [p for p, g in zip(paths, plan) if g is not None],
                  "an inner Reparameterized", own_rules=self._rules)
      return plan

    def to_applied(variables):
      call["viewed"] = True
      params = variables.get("params", {})
      if not params:
        return variables
      applied = _adapters.forward_tree(params, planned(params))
      return {**variables, "params": applied}

    def to_latent(variables):
      params = variables.get("params", {})
      if not params or not initializing:
        return variables
      # The fresh values and (at the end of init) the applied view come
      # through here: folding is the identity on the range, so the round
      # trip stores inverse(forward(latent)) ~= latent, never g(g(.)).
      plan = planned(params)
      if not call["viewed"]:  # The first pass: stored latents stay.
        plan = [None if path in call["stored"] else g for path, g in zip(
            _paths.leaves_with_paths(params)[0], plan)]
      return {**variables, "params": _adapters.latent_tree(params, plan)}

    mapped = nn.map_variables(type(self.module), "params", to_applied,
                              to_latent, init=initializing)
    self.wrapped = mapped(**fields)
    nn.share_scope(self, self.wrapped)
    self._rules = rules
    self._begin_call = begin_call

  def __call__(self, *args, **kwargs):
    token = _ACTIVE.set(_ACTIVE.get() + ((tuple(_scope_path(self)),
                                          self._rules),))
    try:
      self._begin_call()
      return self.wrapped(*args, **kwargs)
    finally:
      _ACTIVE.reset(token)

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

    _check_once(_scope_path(self), ["kernel"], "a NonNegDense")

    def latent_init(key, shape, dtype):
      return _adapters.latent_of(g, self.kernel_init(key, shape, dtype))

    shape = (jnp.shape(x)[-1], self.features)
    latent = self.param("kernel", latent_init, shape, self.param_dtype)
    kernel = _adapters.forward(g, latent)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y
