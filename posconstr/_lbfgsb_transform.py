"""Bounded L-BFGS as an Optax optimizer: ``lbfgsb``."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from posconstr import _landing
from posconstr import _lbfgsb
from posconstr import _lbfgsb_core as core
from posconstr import _lbfgsb_search as search_lib


class LbfgsbInfo(NamedTuple):
  """Diagnostics of the last step."""

  num_fun_evals: jax.Array
  linesearch_accepted: jax.Array
  projected_grad_norm: jax.Array


class LbfgsbState(NamedTuple):
  """State of :func:`lbfgsb`.

  ``value`` and ``grad`` are those of the point the last update moves to
  (within the bounds), so ``optax.value_and_grad_from_state`` reuses them
  instead of evaluating the function again; before the first step, and in
  fixed-step mode, ``value`` is ``inf`` and they are recomputed.
  """

  count: jax.Array
  memory: core.Memory
  prev_params: Any
  prev_grad: Any
  value: jax.Array
  grad: Any
  info: LbfgsbInfo


def lbfgsb(learning_rate: Optional[float] = None, memory_size: int = 10,
           lower=None, upper=None, *, max_linesearch_steps: int = 20,
           eps_active: float = 1e-3) -> optax.GradientTransformationExtraArgs:
  r"""Bounded L-BFGS in the style of ``optax.lbfgs``.

  Each update takes a projected quasi-Newton step (see
  :func:`posconstr.minimize` for the method) and returns the update that
  lands *exactly* on the new point: ``optax.apply_updates`` gives parameters
  within ``[lower, upper]`` bit for bit. Clipping after ``optax.lbfgs``
  instead stalls or diverges, because the curvature pairs and the line
  search then see points that are not the iterates.

  With ``learning_rate=None`` (default) a backtracking Armijo search along
  the projected path (monotone: unlike :func:`posconstr.minimize`, the
  transform keeps no window of past values) needs ``value``, ``grad`` and ``value_fn`` (extra
  arguments of ``update`` are passed on to ``value_fn``), exactly like
  ``optax.lbfgs``; the function is only evaluated inside the bounds. Use
  ``optax.value_and_grad_from_state`` to reuse the value and gradient the
  search already computed. With a ``learning_rate`` the step is
  ``P(x + lr d)`` without a search.

  Only full-batch (deterministic) objectives are supported in the sense of
  a convergence guarantee. Stochastic (mini-batch) L-BFGS with bounds has no
  established convergence theory, and posconstr does not claim one: with
  mini-batches the curvature pairs and the line search see a different
  function at every step, and nothing here corrects for that.

  Args:
    learning_rate: None for the line search, or a fixed step size.
    memory_size: number of curvature pairs kept.
    lower: None, a scalar, or a pytree prefix of the params.
    upper: as ``lower``.
    max_linesearch_steps: maximum function evaluations per step.
    eps_active: the largest distance to a bound at which a coordinate can
      be held by the active set.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`LbfgsbState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, posconstr
    >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> b = jnp.array([1.0, -1.0, 1.0])
    >>> f = lambda x: 0.5 * jnp.sum((A @ x - b) ** 2)
    >>> opt = posconstr.lbfgsb(lower=0.0)
    >>> x = jnp.ones(2)
    >>> state = opt.init(x)
    >>> value_and_grad = optax.value_and_grad_from_state(f)
    >>> for _ in range(10):
    ...   value, grad = value_and_grad(x, state=state)
    ...   updates, state = opt.update(grad, state, x, value=value, grad=grad,
    ...                               value_fn=f)
    ...   x = optax.apply_updates(x, updates)
    >>> [round(float(v), 4) for v in x]
    [0.0, 0.0714]
  """
  _lbfgsb.check_options("lbfgsb", ints=(
      ("memory_size", memory_size),
      ("max_linesearch_steps", max_linesearch_steps)),
      reals=(("eps_active", eps_active),))
  if learning_rate is not None and not callable(learning_rate):
    _lbfgsb.check_options("lbfgsb", reals=(("learning_rate", learning_rate),),
                          nonnegative=False)
  if int(memory_size) < 1 or int(max_linesearch_steps) < 1:
    raise ValueError(f"lbfgsb: need memory_size >= 1 and "
                     f"max_linesearch_steps >= 1, got memory_size="
                     f"{memory_size!r}, max_linesearch_steps="
                     f"{max_linesearch_steps!r}.")
  if learning_rate is not None and not callable(learning_rate) and not (
      float(learning_rate) > 0):
    raise ValueError(f"lbfgsb: `learning_rate` must be > 0 or None, got "
                     f"{learning_rate!r}.")

  def init_fn(params):
    lo, hi = _lbfgsb.prepare_bounds(params, lower, upper, "lbfgsb")
    del lo, hi  # Validated now; rebuilt (at trace time) in each update.
    dtype = jnp.result_type(*jax.tree.leaves(params), jnp.float32)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return LbfgsbState(
        count=jnp.zeros((), jnp.int32),
        memory=core.init_memory(params, memory_size, dtype),
        prev_params=zeros, prev_grad=zeros,
        value=jnp.asarray(jnp.inf, dtype), grad=zeros,
        info=LbfgsbInfo(jnp.zeros((), jnp.int32), jnp.ones((), bool),
                        jnp.asarray(jnp.inf, dtype)))

  def update_fn(updates, state: LbfgsbState, params=None, *, value=None,
                grad=None, value_fn: Optional[Callable] = None, **extra_args):
    if params is None:
      raise ValueError("lbfgsb needs the current parameters: call "
                       "`opt.update(grad, state, params, ...)`.")
    lo, hi = _lbfgsb.prepare_bounds(params, lower, upper, "lbfgsb")
    g = updates if grad is None else grad
    x = core.clip(params, lo, hi)
    memory = state.memory
    # The pair of the previous step (skipped on the first call).
    s = jax.tree.map(jnp.subtract, x, state.prev_params)
    y = jax.tree.map(jnp.subtract, g, state.prev_grad)
    memory = core.push_pair(memory, s, y, keep=state.count > 0)
    d = core.direction(memory, x, g, lo, hi, eps_active)
    if learning_rate is None:
      if value is None or value_fn is None:
        raise ValueError("lbfgsb with a line search needs `value=` and "
                         "`value_fn=` in `update` (as optax.lbfgs); or give "
                         "a fixed `learning_rate`.")
      value_and_grad = jax.value_and_grad(
          lambda p: value_fn(p, **extra_args))
      search = search_lib.projected_backtracking(
          value_and_grad, x, jnp.asarray(value), g, d, lo, hi,
          max_steps=max_linesearch_steps)
      ok = search.accepted
      new_x = core.tree_where(ok, search.x, x)
      new_value = jnp.where(ok, search.value, value).astype(state.value.dtype)
      new_grad = core.tree_where(ok, search.grad, g)
      memory = core.reset_memory(memory, where=~ok)
      evals = search.num_evals
    else:
      step = (learning_rate(state.count) if callable(learning_rate)
              else learning_rate)
      new_x = core.clip(core.tree_axpy(step, d, x), lo, hi)
      new_value = jnp.asarray(jnp.inf, state.value.dtype)
      new_grad = jax.tree.map(jnp.zeros_like, g)
      ok, evals = jnp.ones((), bool), jnp.zeros((), jnp.int32)
    pg = core.projected_gradient_norm(new_x, new_grad, lo, hi)
    deltas = jax.tree.map(_landing.delta_to, params, new_x, lo, hi)
    new_state = LbfgsbState(state.count + 1, memory, x, g, new_value,
                            new_grad, LbfgsbInfo(evals, ok, pg))
    return deltas, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
