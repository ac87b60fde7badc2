r"""Reviving stalled latents of a reparameterization: ``revive_dead``.

A latent :math:`z` of :math:`w = g(z)` is *dead* when :math:`|g'(z)|` is
below ``tol`` (:meth:`posconstr.Parameterization.dead`): the gradient
:math:`\partial L / \partial z = g'(z)\, \partial L / \partial w` is scaled
down so far that the optimizer barely moves it (Adam's step shrinks by
:math:`|\nabla| / (|\nabla| + \epsilon)` once the gradient falls below its
``eps``). Of the dead latents, two kinds sit at a bound of the range:

* **pinned**: the loss wants the weight *on* the bound
  (:math:`\partial L/\partial w > 0` at a lower bound). Nothing is wrong:
  this is an active constraint, as for a projected weight on 0.
* **stalled**: the loss wants the weight *away* from the bound, but
  :math:`g' \approx 0` starves the step. With the gradient of a weight
  the optimizer would move it out; through :math:`g` it cannot.

:func:`revive_dead` moves a latent that has been stalled for ``patience``
consecutive steps to where :math:`g'` is healthy again, and leaves pinned
ones alone. Only the gradient's sign is needed, and :math:`g' > 0` keeps it
(``Softplus`` at :math:`z = -30` has :math:`g' \approx 10^{-13}`, not 0).
ReLU's :math:`g'` is exactly 0 below 0, so its dead latents have no sign:
see ``probe``.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam
from posconstr.sets import _constraint as base
from posconstr.sets import _intervals
from posconstr.sets import _landing
from posconstr.transforms import _projection
from posconstr.tree import _selection


class ReviveState(NamedTuple):
  """State of :func:`revive_dead`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    stalled_steps: a tree like the params: for each selected leaf an int32
      array of its shape, the number of consecutive steps each latent has
      been stalled (reset to 0 when it is not, and when it is revived);
      ``optax.MaskedNode()`` for the other leaves.
    revivals: int32 scalar, how many latents have been revived so far.
  """

  inner_state: Any
  stalled_steps: Any
  revivals: jax.Array


class _Leaf(NamedTuple):
  """One leaf's result in ``update``: its step, counter and revivals."""

  step: Any
  count: Any
  revived: jax.Array


def _is_plan_leaf(x) -> bool:
  return x is None or isinstance(x, _parameterizations.Parameterization)


def _plan_tree(params, plan):
  return jax.tree.structure(params).unflatten(plan)


def _check_patience(patience: Any, owner: str):
  """An int >= 1; a traced integer is taken as at least 1."""
  dtype = getattr(patience, "dtype", None)
  is_int = (dtype is not None and np.ndim(patience) == 0
            and jnp.issubdtype(dtype, jnp.integer)) or (
                type(patience) is not bool
                and isinstance(patience, numbers.Integral))
  if not is_int:
    raise TypeError(f"{owner}: `patience` must be an int >= 1 (steps), got "
                    f"{patience!r} of type {type(patience).__name__}.")
  if not base.is_concrete(patience):
    return jnp.maximum(cast(jax.Array, patience), 1)
  if int(patience) < 1:
    raise ValueError(f"{owner}: `patience` must be >= 1 (steps), got "
                     f"{patience!r}.")
  return int(patience)


def _ends(parameterization, owner: str, name: str):
  """``(lower, upper)`` of the range (either may be None); ValueError if
  the range is not an interval with a finite bound."""
  c = parameterization.constraint
  lower = getattr(c, "lower", None)
  upper = getattr(c, "upper", None)
  if not isinstance(c, (_intervals.NonNegative, _intervals.Box)) or (
      lower is None and upper is None):
    raise ValueError(
        f"{owner}: {name} {parameterization!r} has the range {c!r}; reviving "
        "needs an interval range with a finite bound (NonNegative or Box), "
        "where dead latents sit at a bound.")
  return lower, upper


def _check_floor(parameterization, floor, tol, owner: str, name: str):
  """``floor`` must put a revived latent where it is no longer dead."""
  lower, upper = _ends(parameterization, owner, name)
  fields = list(getattr(parameterization, "__dict__", {}).values())
  if not all(base.is_concrete(v) for v in [floor, tol, lower, upper, *fields]):
    return  # Traced: checked, if at all, by the NaN that bad values give.
  if lower is not None and upper is not None and not floor < 0.5:
    raise ValueError(
        f"{owner}: `floor` must be < 0.5 for {name} {parameterization!r} (a "
        f"fraction of the range's width, from the saturated end), got "
        f"{floor!r}.")
  with jax.ensure_compile_time_eval():
    unit = jnp.asarray(parameterization.derivative_unit(), jnp.float32)
    for bound, side in ((lower, 1.0), (upper, -1.0)):
      if bound is None:
        continue
      target = jnp.asarray(bound, jnp.float32) + side * floor * unit
      latent = parameterization.inverse(target)
      if bool(jnp.any(parameterization.dead(latent, tol))):
        slope = float(jnp.min(jnp.abs(parameterization.derivative(latent))))
        raise ValueError(
            f"{owner}: `floor`={floor!r} is too small for {name} "
            f"{parameterization!r}: a latent revived to the value "
            f"{float(jnp.ravel(target)[0]):.4g} would still be dead "
            f"(derivative {slope:.3g} < tol * unit = "
            f"{tol * float(jnp.max(unit)):.3g}). Use a larger `floor` or a "
            "smaller `tol`.")


def _revive_leaf(g, grad, step, latent, count, patience, floor, tol, probe):
  """One leaf: ``(step, count, revived)`` after this step's test."""
  z = jnp.asarray(latent)
  acc = base.accumulation_dtype(z.dtype)
  slope = g.derivative(z)
  w = g.forward(z).astype(acc)
  lower, upper = g.constraint.lower, g.constraint.upper
  margin = jnp.asarray(floor * g.derivative_unit(), acc)
  inf = jnp.asarray(math.inf, acc)
  below = inf if lower is None else w - jnp.asarray(lower, acc)
  above = inf if upper is None else jnp.asarray(upper, acc) - w
  at_lower = below <= above
  near = jnp.where(at_lower, below, above) < margin  # NaN: False.
  # The sign of dL/dw is sign(dL/dz) * sign(g'): kept while g' != 0.
  # Leaving a lower bound means w grows; leaving an upper one, w shrinks.
  loss_sign = jnp.sign(jnp.asarray(grad).astype(acc)) * jnp.sign(slope)
  wants_out = jnp.where(at_lower, loss_sign < 0, loss_sign > 0)
  unknown = loss_sign == 0  # ReLU below 0, Square at 0, underflow.
  stalled = g.dead(z, tol) & near & (wants_out | (probe & unknown))
  count = jnp.where(stalled, count + 1, 0).astype(jnp.int32)
  revive = count >= patience
  count = jnp.where(revive, 0, count)

  # The latents of the targets, once per leaf (not per coordinate).
  def latent_of(bound, offset):
    return g.inverse((jnp.asarray(bound, acc) + offset).astype(z.dtype))

  if upper is None:
    target = latent_of(lower, margin)
  elif lower is None:
    target = latent_of(upper, -margin)
  else:
    target = jnp.where(at_lower, latent_of(lower, margin),
                       latent_of(upper, -margin))
  target = jnp.broadcast_to(target, z.shape)
  # Lands exactly on the target where a float step can (else an ulp of z
  # away); bounds [target, target] make the nudge aim at the target itself.
  moved = _landing.delta_to(z, target, target, target).astype(step.dtype)
  step = jnp.where(revive, moved, step)
  return step, count, jnp.sum(revive, dtype=jnp.int32)


def revive_dead(inner: optax.GradientTransformation, rules, mask=None, *,
                patience: int = 100, floor: float = 1e-2, tol: float = 1e-3,
                probe: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""Wraps the optimizer of the latents so that stalled latents come back.

  Use it in place of the optimizer that trains the latents ``z`` of
  ``w = g(z)`` (``revive_dead(optax.adam(lr), rules)``). In each ``update``,
  per selected latent, before ``inner``'s step:

  1. The latent is **stalled** when it is dead
     (``g.dead(z, tol)``: :math:`|g'(z)| <` ``tol`` in units of the range),
     its weight lies within ``floor`` of a bound of the range, and the
     gradient says the loss falls if the weight moves away from that bound
     (at a lower bound :math:`\partial L/\partial w < 0`, read off the sign
     of :math:`\partial L / \partial z = g'(z)\,\partial L/\partial w`).
     A dead latent whose loss wants it *on* the bound is **pinned**, like
     an active constraint, and is left alone. At a lower bound :math:`\ell`:

     .. math::
       \text{stalled} = \bigl[|g'(z)| < \text{tol}\bigr] \wedge
       \bigl[g(z) - \ell < \text{floor}\bigr] \wedge
       \bigl[\operatorname{sign}(\partial L/\partial z)\,
       \operatorname{sign}(g'(z)) < 0\bigr].

     Pinned and stalled are the two sides of the KKT sign condition at an
     active bound (the projected gradient of Bertsekas 1982, which
     :func:`posconstr.projected` applies to projected weights).
  2. A counter per latent counts consecutive stalled steps (any other step
     resets it). When it reaches ``patience``, the latent is set to
     :math:`g^{-1}(\ell + \text{floor})` (``upper - floor`` at an upper
     bound): the applied weight moves by at most ``floor`` (up to the
     rounding of the latent) to where :math:`g'` is healthy, and the
     counter restarts. Elsewhere the step is ``inner``'s.

  Softplus (:math:`g' = \sigma(z)`, :math:`10^{-13}` at :math:`z=-30`), Exp
  and Sigmoid (saturated at either end) keep the sign of the gradient as
  long as :math:`g'\,\partial L/\partial w` does not underflow (float32:
  about :math:`10^{-38}`), and are handled by 1. and 2. This is the
  per-weight, gradient-gated analogue of recycling dormant units
  (Sokar et al., "The Dormant Neuron Phenomenon in Deep Reinforcement
  Learning", ICML 2023), which re-initializes every unit that stays
  inactive, whatever the loss wants.

  **ReLU** has :math:`g'(z) = 0` for :math:`z \le 0`: its dead latents get an
  exactly zero gradient (the dying ReLU of Lu et al., "Dying ReLU and
  Initialization", 2019, here on weights), and whether the loss wants them
  back cannot be known. ``probe=True`` revives every latent whose gradient
  has been exactly 0 for ``patience`` steps, as a probe: a weight the loss
  wants at 0 is pushed back and dies again, one that it wants larger
  stays. Without it such latents (also ``Square`` at exactly 0, and latents
  so deep that the gradient underflows, such as Softplus's latent of 0,
  about -87) are never revived, and a rule with :class:`~posconstr.ReLU`
  raises ``ValueError``.

  **The inner state is kept.** ``inner`` sees every gradient unchanged; only
  the step of a revived coordinate is replaced. Its moments were built from
  the stalled gradients, :math:`g'` (below ``tol``) times
  :math:`\partial L/\partial w`; the first gradient after the revival is
  larger by :math:`g'(\text{revived}) / g'(\text{stalled})` and outweighs
  them at once (Adam's first step is then at most
  :math:`(1-\beta_1)/\sqrt{1-\beta_2} \approx 3.2` times ``lr``, its usual
  bound), which is what resetting them would give. Resetting is not done:
  ``inner``'s state layout is not known here, and Adam's step count is
  shared by all coordinates.

  **Measured** (``python examples/quickstart.py``, the README's quickstart
  table): on that MLP the dead softplus latents are mostly pinned and few
  stall, so reviving them changes neither loss nor accuracy; ReLU latents,
  more than half of them dead without it, are probed far more often than
  there are latents (most die again), yet far fewer end dead and the
  training loss ends a little lower, at the same test accuracy.

  The sign is that of this step's gradient: with minibatches, noise resets
  the counter of a latent whose gradient changes sign, so only latents
  stalled consistently for ``patience`` steps are revived. ``revive_dead`` is
  a whole optimizer, like :func:`posconstr.projected`: nothing may come
  after it. It works on latents, so use it with ``params`` that hold
  latents (a :func:`posconstr.linen.Reparameterized` model's ``params``,
  the latents of :func:`posconstr.reparam`).

  Args:
    inner: any Optax optimizer of the latents (``optax.adam(1e-3)``, ...).
    rules: ``{pattern: parameterization or None}`` as in
      :func:`posconstr.reparam`, or one parameterization applied to the
      leaves selected by ``mask``. Their ranges must be intervals with a
      finite bound (every built-in parameterization but ``Abs`` qualifies;
      ``Abs`` is never dead).
    mask: with a single parameterization, which leaves (see
      :func:`posconstr.project`).
    patience: consecutive stalled steps before a latent is revived, an
      int >= 1 (a traced one is taken as at least 1).
    floor: how far from the bound a revived weight lands, > 0, in units of
      the range (the width of a ``Sigmoid``'s box, < 0.5 there; 1
      otherwise), as ``tol``. The revived latent must not be dead: checked
      at construction (``Exp`` needs ``floor >= tol``).
    tol: the threshold of :meth:`~posconstr.Parameterization.dead`, > 0.
    probe: also revive latents whose gradient is exactly 0 (above).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`ReviveState`; ``update`` requires ``params`` (the latents).

  Raises:
    TypeError: if ``inner`` is not an Optax optimizer, ``rules`` holds no
      parameterizations, or ``patience`` is not an int.
    ValueError: for ``patience < 1``, ``floor <= 0``, ``tol <= 0``, a
      ``floor`` that leaves revived latents dead, a range without a finite
      bound, or ReLU without ``probe=True``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, posconstr
    >>> g = posconstr.Softplus()
    >>> loss = lambda z: (g.forward(z) - 1.0) ** 2  # wants w = 1
    >>> tx = posconstr.revive_dead(optax.adam(0.1), g, patience=5)
    >>> z = jnp.array([-30.0])  # w = 9e-14: dead, and stalled
    >>> state = tx.init(z)
    >>> @jax.jit
    ... def step(z, state):
    ...   updates, state = tx.update(jax.grad(lambda z: loss(z).sum())(z),
    ...                              state, z)
    ...   return optax.apply_updates(z, updates), state
    >>> for _ in range(5):
    ...   z, state = step(z, state)
    >>> round(float(g.forward(z)[0]), 4), int(state.revivals)
    (0.01, 1)
  """
  owner = "revive_dead"
  base.check_optimizer_arg(inner, "inner", owner)
  rules = _reparam.check_rules_arg(rules, mask, owner)
  patience_ = _check_patience(patience, owner)
  tol_ = base.hyperparameter("tol", tol, owner, lambda v: v > 0, "> 0")
  floor_ = base.hyperparameter("floor", floor, owner, lambda v: v > 0, "> 0")
  if not isinstance(probe, bool):
    raise TypeError(f"{owner}: `probe` must be True or False, got {probe!r}.")
  named = ({"`rules`": rules}
           if isinstance(rules, _parameterizations.Parameterization)
           else {f"rules[{k!r}]": v for k, v in rules.items() if v is not None})
  for name, g in named.items():
    _check_floor(g, floor_, tol_, owner, name)
    if isinstance(g, _parameterizations.ReLU) and not probe:
      raise ValueError(
          f"{owner}: {name} is ReLU(), whose dead latents have a gradient of "
          "exactly 0, so whether the loss wants them back is unknown. Pass "
          "probe=True to revive them after `patience` steps all the same "
          "(a weight the loss wants at 0 dies again), or use Softplus().")
  inner = optax.with_extra_args_support(inner)

  def counters(params, plan):
    return jax.tree.map(
        lambda g, x: (optax.MaskedNode() if g is None
                      else jnp.zeros(jnp.shape(x), jnp.int32)),
        _plan_tree(params, plan), params, is_leaf=_is_plan_leaf)

  def init_fn(params):
    zero = jnp.zeros((), jnp.int32)
    if _selection.is_params_placeholder(params):  # tree_map_params
      return ReviveState(inner.init(params), params, zero)
    plan = _reparam.make_plan(params, rules, mask, owner)
    return ReviveState(inner.init(params), counters(params, plan), zero)

  def update_fn(updates, state, params=None, **extra_args):
    _projection.require_params(params, owner)
    plan = _reparam.make_plan(params, rules, mask, owner)
    steps, inner_state = inner.update(updates, state.inner_state, params,
                                      **extra_args)

    def leaf(g, grad, step, z, count):
      if g is None:
        return _Leaf(step, count, jnp.zeros((), jnp.int32))
      return _Leaf(*_revive_leaf(g, grad, step, z, count, patience_, floor_,
                                 tol_, probe))

    done = jax.tree.map(leaf, _plan_tree(params, plan), updates, steps,
                        params, state.stalled_steps, is_leaf=_is_plan_leaf)

    def field(i):
      return jax.tree.map(lambda r: r[i], done,
                          is_leaf=lambda x: isinstance(x, _Leaf))

    revived = jax.tree.reduce(operator.add, field(2), state.revivals)
    return field(0), ReviveState(inner_state, field(1), revived)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
