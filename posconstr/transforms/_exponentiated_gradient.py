r"""Exponentiated-gradient (multiplicative) updates: EGU and EGU±.

The unnormalized exponentiated gradient (EGU, Kivinen & Warmuth 1997),
:math:`w \leftarrow w \odot \exp(-\eta g)`, is mirror descent with the log
link: weights stay positive with neither a projection nor a latent. In Optax
terms the incoming update :math:`u` (already scaled and signed) is a step of
:math:`\log w`, and the link returns :math:`w \odot \mathrm{expm1}(u)`.
:func:`multiplicative_update` documents the method, its continuous-time
equivalence with gradient descent on ``Square`` (Amid & Warmuth 2020), the
signed variant and the numerics; the tests check them numerically.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posconstr.sets import _constraint as base
from posconstr.sets import _intervals
from posconstr.transforms import _projection
from posconstr.tree import _paths
from posconstr.tree import _selection

Mask = Any  # None | str | list[str] | bool pytree | Callable[[params], ...]


class MultiplicativeState(_projection.ProjectionState):
  """The (empty) state of :func:`multiplicative_update`.

  A subclass of :class:`posconstr.ProjectionState`: like a projection, the
  link turns an update into one that depends on the parameters and must be
  the **last** link of a chain, and :func:`posconstr.chain` and
  :func:`posconstr.check_projection_last` refuse links after it.
  """

  __slots__ = ()


def _positive_finite(v):
  return (v > 0) & (v < math.inf)


def _max_log_step(*dtypes) -> float:
  """``log(1 / (4 eps))`` of the coarsest dtype: 14.6 in float32, 34.7 in
  float64, 5.5 in float16, 3.5 in bfloat16.

  A factor ``exp(-L) = 4 eps`` keeps ``p + p * expm1(-L)`` positive after
  rounding (``p * expm1(-L)`` rounds to at most ``(1 - 3 eps) p``, and the
  sum is exact by Sterbenz's lemma), and ``exp(L)`` cannot overflow.
  """
  eps = max(float(jnp.finfo(d).eps) for d in dtypes)
  return math.log(1.0 / (4.0 * eps))


def _leaf_step(update, param, signed: bool, scale):
  """The update that multiplies ``param`` by ``exp(update)`` (or EGU±)."""
  update, param = jnp.asarray(update), jnp.asarray(param)
  # Half precision is computed in float32 and rounded once.
  compute = jnp.promote_types(jnp.promote_types(param.dtype, update.dtype),
                              jnp.float32)
  limit = _max_log_step(param.dtype, update.dtype)
  # Half the largest finite value: p + d then cannot round up to infinity.
  half_max = 0.5 * min(float(jnp.finfo(param.dtype).max),
                       float(jnp.finfo(update.dtype).max))
  u = jnp.clip(update.astype(compute), -limit, limit)  # NaN stays NaN.
  w = param.astype(compute)
  grow = jnp.expm1(u)
  if not signed:
    step = w * grow
  else:
    # w = p - n with p n = (scale / 2)**2: p, n from w without cancellation.
    b = jnp.asarray(scale, compute)
    big = 0.5 * (jnp.abs(w) + jnp.hypot(w, b))
    small = jnp.square(0.5 * b) / big
    pos = jnp.where(w >= 0, big, small)
    neg = jnp.where(w >= 0, small, big)
    shrink = -grow / (1.0 + grow)  # expm1(-u), without a second exp.
    step = pos * grow - neg * shrink
    step = jnp.maximum(step, jnp.minimum(-half_max - w, 0.0))
  step = jnp.minimum(step, jnp.maximum(half_max - w, 0.0))
  return step.astype(update.dtype)


def _check_leaf_dtypes(params, chosen, owner):
  paths, leaves, _ = _paths.leaves_with_paths(params)
  for path, leaf, pick in zip(paths, leaves, chosen):
    dtype = _paths.leaf_dtype(leaf)
    if pick and not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: parameter `{_paths.shown(path)}` has dtype "
          f"{np.dtype(dtype).name}; multiplicative updates need "
          "floating-point leaves (select fewer leaves with `mask=`).")


def _check_positive(params, chosen, owner):
  """Concrete selected leaves must be finite and > 0 (EGU, at ``init``)."""
  paths, leaves, _ = _paths.leaves_with_paths(params)
  for path, leaf, pick in zip(paths, leaves, chosen):
    if not pick or not base.is_concrete(leaf):
      continue
    # Concrete params closed over by a jitted function: check them now.
    with jax.ensure_compile_time_eval():
      x = jnp.asarray(leaf)
      bad = ~((x > 0) & jnp.isfinite(x))
      count = int(jnp.sum(bad))
      if not count:  # (An empty leaf has no first entry.)
        continue
      first = np.unravel_index(int(jnp.argmax(bad)), x.shape)
      value = float(x[first])
    raise ValueError(
        f"{owner}: parameter `{_paths.shown(path)}` has {count} of "
        f"{x.size} entries that are not finite and > 0 (the first: "
        f"{value!r} at index {tuple(map(int, first))}). "
        "Multiplicative updates keep a weight's sign: a weight at 0 stays "
        "0 for good and a negative one would move against its gradient. "
        "Initialize the selected leaves > 0 (e.g. the absolute value of the "
        "usual initializer), select fewer leaves with `mask=` (biases "
        "start at 0), or pass signed=True for weights of either sign.")


def multiplicative_update(mask: Mask = None, *, signed: bool = False,
                          scale: float = 1.0) -> optax.GradientTransformation:
  r"""Turns an additive update into a multiplicative one: the EGU link.

  With ``signed=False`` (EGU, Kivinen & Warmuth 1997) each selected weight
  is multiplied by the exponential of its incoming update :math:`u`:

  .. math::
    w \leftarrow w \odot e^{u}, \qquad
    \text{update} = w \odot \mathrm{expm1}(u).

  The link must come **after** the learning rate, since :math:`u` is a step
  of :math:`\log w` and :math:`e^u` is not linear in it:

  * ``optax.chain(optax.sgd(lr), multiplicative_update())`` is EGU,
    :math:`w \odot e^{-\eta g}` (also :func:`exponentiated_gradient`);
  * ``optax.chain(optax.adam(lr), multiplicative_update())`` is EGU along
    Adam's direction :math:`d`: :math:`w \odot e^{-\eta d}`, so ``lr`` bounds
    the relative change of each weight per step (about ``lr``), whatever
    the weight's size (compare Madam, Bernstein et al. 2020);
  * ``optax.chain(optax.scale_by_adam(), multiplicative_update(),
    optax.scale(-lr))`` is **wrong** (it scales :math:`w(e^d - 1)`, which
    can change signs): :func:`posconstr.chain` refuses it at ``init``, and
    :func:`posconstr.check_projection_last` finds it in any state.

  **Positive weights, no projection, no latent.** The parameters stay the
  weights themselves and stay > 0: ``init`` raises ``ValueError`` when a
  concrete selected leaf has an entry that is not finite and > 0. Under
  ``jit`` nothing is checked: a weight at exactly 0 stays 0 (zeros are
  *absorbing*), a negative one keeps its sign and moves against its
  gradient. So initialize away from 0 (e.g. ``jnp.abs`` of the usual
  initializer); weights approach 0 only geometrically, never reach it, and
  a weight that the optimum puts at 0 keeps shrinking by a factor per step
  (it is flushed to 0 only below the smallest normal number, 1e-38 in
  float32).

  **Continuous time.** EGU with rate :math:`\eta` follows the same flow as
  gradient descent on :math:`z` with :math:`w = z^2`
  (:class:`posconstr.Square`) at rate :math:`\eta / 4` (Amid & Warmuth,
  NeurIPS 2020): from
  :math:`\dot z = -\frac{\eta}{4} \nabla_z L = -\frac{\eta}{2} z \odot
  \nabla_w L` follows :math:`\dot w = 2 z \odot \dot z = -\eta\, w \odot
  \nabla_w L`, EGU's flow :math:`\frac{d}{dt} \log w = -\eta \nabla_w L`.
  With small steps the two trajectories agree to :math:`O(\eta)`. In
  practice they differ: EGU needs no latent (the model, its checkpoints and
  its initializer see :math:`w`), and its step is relative and cannot
  overshoot (:math:`\log w` moves by :math:`u`), while a discrete step of
  ``Square`` (rate :math:`\eta'`) multiplies :math:`w` by
  :math:`(1 - 2\eta' g)^2`, which passes through 0 when
  :math:`\eta' g > 1/2`. Both have 0 as an absorbing point.

  **EGU**\ :sup:`±` (``signed=True``, Kivinen & Warmuth 1997):
  weights of either sign as :math:`w = p - n` with :math:`p, n > 0` updated by
  :math:`p \leftarrow p\, e^{u}`, :math:`n \leftarrow n\, e^{-u}`. The
  product :math:`p\,n` does not change (:math:`e^{u} e^{-u} = 1`), so
  with :math:`p\, n = (\beta/2)^2` (``scale`` :math:`=\beta`) the pair is a
  function of :math:`w`, :math:`p = (w + \sqrt{w^2 + \beta^2})/2`, and is
  not stored: the state is empty, not twice the parameters, and the link
  composes with anything that changes :math:`w`. This is mirror descent
  with the hyperbolic entropy, :math:`w \leftarrow \beta \sinh(\operatorname
  {arsinh}(w/\beta) + u)` (Ghai, Hazan & Singer, ALT 2020): like
  :math:`\beta`-scaled gradient descent near 0 (:math:`|w| \ll \beta`) and
  like EGU on :math:`|w|` far from it. Initialization is free (any ``w0``;
  ``p0 - n0 = w0`` and ``p0 + n0 = sqrt(w0**2 + scale**2)``).

  **Numerics.** The exponent is clipped to :math:`\pm L`,
  :math:`L = \log(1 / (4\epsilon))` of the coarser of the parameter and
  update dtypes (14.6 in float32, 34.7 in float64, 5.5 in float16, 3.5 in
  bfloat16): one step changes a weight by at most that factor, so that
  ``optax.apply_updates`` never rounds a positive weight to 0 and
  :math:`e^u` never overflows; an infinite update is clipped like any value,
  a NaN one reaches the parameters. Weights do not grow past half the
  dtype's largest finite value. ``apply_updates`` adds in the weight's
  dtype, so a step that shrinks a weight by a factor :math:`f` lands
  within about :math:`\epsilon / f` of :math:`f w`, relatively.
  Half-precision leaves are computed in float32; the update keeps its
  dtype.

  Args:
    mask: which leaves (as :func:`posconstr.project`); unselected leaves
      keep their incoming update (additive).
    signed: EGU\ :sup:`±` for weights of either sign instead of EGU.
    scale: :math:`\beta > 0` of EGU\ :sup:`±` (``signed=True``): the
      weight size below which it behaves like gradient descent with rate
      ``lr * scale``. May be traced.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`MultiplicativeState`; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = optax.chain(optax.sgd(0.5), posconstr.multiplicative_update())
    >>> params = jnp.array([1.0, 2.0])
    >>> grads = jnp.array([2.0, -2.0])
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, updates)  # [1 e^-1, 2 e^1]
    Array([0.36787945, 5.436564  ], dtype=float32)
    >>> tx = optax.chain(optax.sgd(0.5), posconstr.multiplicative_update(
    ...     signed=True, scale=1.0))
    >>> w = jnp.array([0.0, -3.0])  # either sign
    >>> optax.apply_updates(w, tx.update(grads, tx.init(w), w)[0]).tolist()
    [-1.17520, -0.91293]
    >>> jnp.sinh(jnp.arcsinh(w) - 0.5 * grads).tolist()  # in closed form
    [-1.17520, -0.91293]
  """
  return _multiplicative(mask, signed, scale, "multiplicative_update")


def _multiplicative(mask, signed, scale, owner):
  """:func:`multiplicative_update`, naming ``owner`` in its errors."""
  if not isinstance(signed, bool):
    raise TypeError(f"{owner}: `signed` must be a bool, got {signed!r}.")
  scale = base.hyperparameter("scale", scale, owner, _positive_finite,
                              "> 0 and finite")
  _selection.check_mask_arg(mask, owner)

  def select(params):
    chosen = _selection.select(params, mask, owner)
    _check_leaf_dtypes(params, chosen, owner)
    return chosen

  def init_fn(params):
    if not _selection.is_params_placeholder(params):
      chosen = select(params)
      if not signed:
        _check_positive(params, chosen, owner)
    return MultiplicativeState()

  def update_fn(updates, state, params=None):
    _projection.require_params(params, owner)
    chosen = select(params)
    treedef = jax.tree.structure(params)
    try:
      flat_updates = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{owner}: the updates tree does not match the params "
                       f"tree: {e}") from e
    out = [_leaf_step(u, p, signed, scale) if pick else u
           for u, p, pick in zip(flat_updates, treedef.flatten_up_to(params),
                                 chosen)]
    return treedef.unflatten(out), state

  def plan(params):  # What posconstr.chain's overlap test reads: w >= 0.
    keep = None if signed else _intervals.NonNegative()
    return [keep if pick else None for pick in select(params)]

  update_fn.posconstr_plan = plan
  return optax.GradientTransformation(init_fn, update_fn)


def exponentiated_gradient(learning_rate, *, mask: Mask = None,
                           signed: bool = False,
                           scale: float = 1.0) -> optax.GradientTransformation:
  r"""Exponentiated gradient (EGU): :math:`w \leftarrow w \odot e^{-\eta g}`.

  A whole optimizer, like ``optax.sgd``: ``optax.chain(optax.sgd(
  learning_rate), multiplicative_update(mask, signed=signed, scale=scale))``.
  Selected weights stay > 0 with neither a projection nor a latent;
  unselected leaves take plain gradient steps :math:`-\eta g`. With
  ``signed=True``, EGU\ :sup:`±` for weights of either sign. See
  :func:`multiplicative_update` for the method, its relation to
  :class:`posconstr.Square` and the numerics; for a preconditioned direction
  use ``optax.chain(optax.adam(lr), posconstr.multiplicative_update())``.

  References: J. Kivinen and M. K. Warmuth, "Exponentiated gradient versus
  gradient descent for linear predictors", Information and Computation
  132(1), 1997. E. Amid and M. K. Warmuth, "Reparameterizing mirror descent
  as gradient descent", NeurIPS 2020.

  Args:
    learning_rate: :math:`\eta > 0`, or an Optax schedule. May be traced
      (``optax.inject_hyperparams``): an invalid traced value gives NaN.
    mask: which leaves get the multiplicative update (as
      :func:`posconstr.project`); ``init`` checks they are > 0 unless
      ``signed``.
    signed: EGU\ :sup:`±` instead of EGU.
    scale: :math:`\beta` of EGU\ :sup:`±`.

  Returns:
    An ``optax.GradientTransformation``; ``update`` requires ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, posconstr
    >>> tx = posconstr.exponentiated_gradient(0.1, mask="w")
    >>> params = {"w": jnp.array([1.0, 0.5]), "b": jnp.array([0.0])}
    >>> grads = {"w": jnp.array([10.0, -1.0]), "b": jnp.array([1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["w"]  # [e^-1, 0.5 e^0.1]
    Array([0.36787945, 0.5525855 ], dtype=float32)
    >>> new["b"]  # not selected: a plain step -0.1 g
    Array([-0.1], dtype=float32)
  """
  owner = "exponentiated_gradient"
  if not callable(learning_rate):
    learning_rate = base.hyperparameter(
        "learning_rate", learning_rate, owner, _positive_finite,
        "> 0 and finite (or an Optax schedule)")
  lr = typing.cast(optax.ScalarOrSchedule, learning_rate)
  return optax.chain(optax.scale_by_learning_rate(lr),
                     _multiplicative(mask, signed, scale, owner))
