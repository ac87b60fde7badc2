"""Equinox: constrained ``eqx.Module`` models, and latent nodes.

**Paths.** posconstr selects leaves by path, and an ``eqx.Module`` is a
pytree whose paths are field names and sequence indices joined by ``/``:
``layers/0/weight`` in ``eqx.nn.MLP``. Leaves that are not arrays (the
activation functions of an unfiltered model) are never selected, and
``mask=None`` selects exactly what ``eqx.is_inexact_array`` does, so the
projection transforms accept both a whole model and the trainable part
``eqx.filter(model, eqx.is_inexact_array)``. A bool mask may itself be
shaped like the model (as in ``optax.masked``)::

  params = eqx.filter(model, eqx.is_inexact_array)
  tx = optax.chain(optax.adam(1e-3),
                   posconstr.constrain({"*weight": posconstr.NonNegative()}))
  opt_state = tx.init(params)

  @eqx.filter_jit
  def step(model, opt_state, x, y):
    grads = eqx.filter_grad(loss)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state

``posconstr.projected(optax.adam(1e-3), ...)`` is used the same way.

**Weight layout.** ``eqx.nn.Linear.weight`` is ``(out_features,
in_features)``, the transpose of a Flax kernel ``(in, out)``, and
``eqx.nn.Conv`` weights are ``(out, in, *kernel)``. The ``axis`` defaults of
:class:`~posconstr.MaxNorm`, :class:`~posconstr.UnitNorm`,
:class:`~posconstr.MinMaxNorm` and :class:`~posconstr.Simplex` (``axis=0``)
follow Flax and Keras, so for equinox pass ``axis=-1`` (a ``Linear``: each
output unit's incoming weights) or ``axis=(1, 2, 3)`` (a 2-D ``Conv``), and
``posconstr.initializers.icnn(in_axis=-1, out_axis=-2)`` for the fan-in of
a ``Linear`` weight. With ``axis=0`` the sets silently constrain each
*input's* outgoing weights instead.

**Reparameterization.** :func:`posconstr.reparam` works on a model too
(``reparam(model, {"*weight": Softplus()})`` in the loss). This module adds
a node in the style of ``paramax``: :func:`reparameterize` replaces the
matched arrays by :class:`Reparameterized` nodes that store the *latent*
and give ``g(latent)`` on :meth:`~Reparameterized.unwrap`; call
:func:`unwrap` on the model where it is used. The model then carries which
leaves are latents (``eqx.tree_at``, ``eqx.tree_serialise_leaves`` and
optimizers see the latent, at ``.../weight/latent``), the initial weights are
folded into the range and stored through the stable inverse (no rules to
pass around at every call), and reparameterizing a latent twice is refused.
The constrained value is never written back. With ``paramax`` installed,
``paramax.Parameterize(g.forward, latent)`` is the equivalent node there;
each library's ``unwrap`` unwraps only its own nodes.

>>> import equinox as eqx, jax, posconstr
>>> import posconstr.equinox as pceqx
>>> mlp = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0))
>>> model = pceqx.reparameterize(mlp, {"*weight": posconstr.Softplus()})
>>> type(model.layers[0].weight).__name__
'Reparameterized'
>>> bool((pceqx.unwrap(model).layers[0].weight >= 0).all())
True
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from posconstr import _adapters
from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam
from posconstr.tree import _paths

__all__ = ("Reparameterized", "reparameterize", "unwrap")


class Reparameterized(eqx.Module):
  """A leaf stored as its latent ``z`` and read as ``g(z)``.

  Attributes:
    latent: the unconstrained array that gradients and optimizers see.
    parameterization: ``g`` (a static field: part of the tree structure).

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> node = Reparameterized(jnp.zeros(2), posconstr.Exp())
    >>> node.unwrap()
    Array([1., 1.], dtype=float32)
  """

  latent: jax.Array
  parameterization: _parameterizations.Parameterization = eqx.field(
      static=True)

  def __init__(self, latent, parameterization):
    _reparam.check_parameterization_arg(parameterization, "parameterization",
                                        "posconstr.equinox.Reparameterized")
    self.latent = latent
    self.parameterization = parameterization

  def unwrap(self) -> jax.Array:
    """The constrained value ``g(latent)``."""
    return _adapters.forward(self.parameterization, self.latent)


def _is_node(x) -> bool:
  return isinstance(x, Reparameterized)


def unwrap(tree):
  """``tree`` with every :class:`Reparameterized` node replaced by its value.

  Call it where the model is used (inside the loss, under ``eqx.filter_grad``)
  so that gradients flow to the latents. Nodes of other libraries are left
  alone.
  """
  return jax.tree.map(lambda x: x.unwrap() if _is_node(x) else x, tree,
                      is_leaf=_is_node)


def reparameterize(tree, rules: Any, *, mask=None, from_applied: bool = True):
  """Replaces the matched arrays of ``tree`` by :class:`Reparameterized` nodes.

  Args:
    tree: an ``eqx.Module`` (or any pytree); non-array leaves are left alone.
    rules: ``{pattern: parameterization or None}`` matched against paths
      (``"*weight"``, ``"layers/0/bias"``; first match wins), or one
      parameterization for the leaves ``mask`` selects.
    mask: with a single parameterization, which leaves (as in
      :func:`posconstr.project`); ``None`` selects every float array.
    from_applied: if True (default), the current values are the applied
      weights: folded into the range (``eps + |v - eps|``) and stored as
      their latents. If False, they are stored as latents as they are.

  Returns:
    A tree like ``tree`` in which each matched array is a node.

  Raises:
    ValueError: if a matched leaf is already the latent of a node (that
      would read it as ``g(g(z))``), or a pattern matches no path.
  """
  owner = "posconstr.equinox.reparameterize"
  rules = _reparam.check_rules_arg(rules, mask, owner)
  plan = _reparam.make_plan(tree, rules, mask, owner)
  paths, leaves, treedef = _paths.leaves_with_paths(tree)
  nodes = [p for p, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_node)[0] if _is_node(x)]
  inside = {_paths.path_to_str(p) + "/latent" for p in nodes}
  twice = [p for p, g in zip(paths, plan) if g is not None and p in inside]
  if twice:
    raise ValueError(
        f"{owner}: `{twice[0]}` is already the latent of a Reparameterized "
        "node; reparameterizing it again would read it as g(g(z)). Narrow the "
        f"pattern or map it to None. Matched latents: {twice!r}.")
  out = []
  for g, leaf in zip(plan, leaves):
    if g is None:
      out.append(leaf)
    else:
      out.append(Reparameterized(
          _adapters.latent_of(g, leaf) if from_applied else leaf, g))
  return treedef.unflatten(out)
