"""Bounded L-BFGS as an Optax optimizer: ``lbfgsb``."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from posconstr.sets import _constraint
from posconstr.sets import _landing
from posconstr.solvers import _dtype_groups as groups
from posconstr.solvers import _lbfgsb
from posconstr.solvers import _lbfgsb_core as core
from posconstr.solvers import _lbfgsb_state as state_lib
from posconstr.solvers import _lbfgsb_step as step_lib

LbfgsbInfo = state_lib.LbfgsbInfo
LbfgsbState = state_lib.LbfgsbState


def lbfgsb(learning_rate: Optional[optax.ScalarOrSchedule] = None,
           memory_size: int = 10, lower=None, upper=None, *,
           max_linesearch_steps: int = 20, eps_active: float = 1e-3,
           tol: float = 1e-8, atol: float = 0.0, ftol: float = 1e-9,
           stall_iters: int = 15, nonmonotone: float = 0.3,
           group_leaves: bool = True, min_overlap_curvature: float = 1e-2
           ) -> optax.GradientTransformationExtraArgs:
  r"""Bounded L-BFGS in the style of ``optax.lbfgs``.

  Each update takes one iteration of :func:`posconstr.minimize` (the same
  code: direction, search along the projected path, curvature memory and
  stopping tests) and returns the update that lands on the new point:
  ``optax.apply_updates`` gives parameters within ``[lower, upper]`` bit for
  bit, and the new point itself up to the rounding of ``params + update``
  where no float update hits it exactly (which does not restart the
  iteration). Clipping after ``optax.lbfgs`` instead stalls or diverges,
  because the curvature pairs and the line search then see points that are
  not the iterates.

  With ``learning_rate=None`` (default) the line search needs ``value``,
  ``grad`` and ``value_fn`` (extra arguments of ``update`` are passed on to
  ``value_fn``), exactly like ``optax.lbfgs``; the function is only
  evaluated inside the bounds. Use ``optax.value_and_grad_from_state`` to
  reuse the value and gradient the search already computed. Params that
  are not where the last update put them (the first update, params changed
  by hand by more than rounding) restart the iteration there. Params
  outside the bounds are only projected by that update (no evaluation, a
  zero-length iteration, ``state.value`` inf so that
  ``value_and_grad_from_state`` evaluates the projected point next): the
  state never holds the value of an unprojected point, and ``value_fn`` is
  inlined at one place in the program, the search. A ``value`` or
  ``grad`` that differs from the stored one at the same point (a new
  mini-batch) replaces it, keeping the curvature memory.

  Once the stopping test holds (``state.status`` is no longer ``RUNNING``)
  the updates are zero and no evaluation is made. A NaN value or gradient
  makes ``status`` ``NONFINITE`` and the updates NaN, as in
  ``optax.lbfgs``: wrap the optimizer in ``optax.apply_if_finite`` to skip
  such steps instead.

  With a ``learning_rate`` (a float or schedule) the step is ``P(x + lr d)``
  without a search; the gradient at the new point arrives with the next
  update, which then stores the curvature pair. A gradient with an infinite
  component then also gives NaN updates (with a search, as in
  :func:`posconstr.minimize`, it gives a unit step along its sign, which
  the search checks).

  **Mini-batches** (measured in ``examples/stochastic_lbfgs.py`` and the
  README section "Stochastic (mini-batch) L-BFGS with bounds"; there is no
  convergence guarantee). The curvature pair must see *one* batch at both
  points. With the line search it does: call ``update`` with the new
  batch's value and gradient and a ``value_fn`` of that batch; the search
  and the pair then use it (about two evaluations per step). With a fixed
  ``learning_rate`` the pair would mix two batches,
  ``y = g_{B_{k+1}}(x_{k+1}) - g_{B_k}(x_k)``, whose difference is mostly
  sampling noise: that diverges. Pass ``overlap_grads`` instead, the
  multi-batch L-BFGS of Berahas, Nocedal & Takac (NeurIPS 2016):
  consecutive batches ``S_k``, ``S_{k+1}`` share examples ``O_k``; the step
  uses the gradient on ``S_{k+1}`` and the pair

  .. math::
    s_k = x_{k+1} - x_k, \qquad
    y_k = \nabla f_{O_k}(x_{k+1}) - \nabla f_{O_k}(x_k),

  skipped when :math:`s_k^\top y_k \le \epsilon \|s_k\|^2`
  (``min_overlap_curvature``; without the skip a pair of little curvature
  makes a long step now and then, which no search rejects). Both overlap
  gradients are parts of the two batch gradients, so they cost no extra
  evaluation. With a fixed step on mini-batches, set ``stall_iters`` large:
  a noisy projected gradient stops improving on its best and would stop
  the iteration.

  Args:
    learning_rate: None for the line search, or a fixed step size or
      schedule.
    memory_size: number of curvature pairs kept.
    lower: None, a scalar, or a pytree prefix of the params.
    upper: as ``lower``.
    max_linesearch_steps: maximum function evaluations per step.
    eps_active: the largest distance to a bound at which a coordinate can
      be held by the active set.
    tol, atol, ftol, stall_iters, nonmonotone: the stopping tests and the
      search, as in :func:`posconstr.minimize`.
    min_overlap_curvature: :math:`\epsilon` of the skip test of pairs given
      by ``overlap_grads`` (in units of the curvature of the loss).
    group_leaves: iterate on one vector per dtype (the leaves of each dtype
      concatenated), so the solver's own operations do not grow with the
      number of leaves (``value_fn`` and its gradient, inlined once, in
      the search, still do); False keeps the leaves apart (parameters
      sharded across devices, which concatenation would gather).

  ``update`` takes ``overlap_grads=(g_old, g_new)`` (fixed
  ``learning_rate`` only): the gradients on the overlap ``O_k`` at the
  params of the previous update and at these params, shaped like them.

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
    >>> state.status == posconstr.Status.CONVERGED
    Array(True, dtype=bool)
  """
  _lbfgsb.check_options("lbfgsb", ints=(
      ("memory_size", memory_size),
      ("max_linesearch_steps", max_linesearch_steps),
      ("stall_iters", stall_iters)),
      reals=(("eps_active", eps_active), ("tol", tol), ("atol", atol),
             ("ftol", ftol), ("nonmonotone", nonmonotone),
             ("min_overlap_curvature", min_overlap_curvature)))
  if _constraint.is_concrete(nonmonotone) and not nonmonotone <= 1:
    raise ValueError(f"lbfgsb: `nonmonotone` must be in [0, 1], got "
                     f"{nonmonotone!r}.")
  if learning_rate is not None and not callable(learning_rate):
    _lbfgsb.check_options("lbfgsb", reals=(("learning_rate", learning_rate),),
                          nonnegative=False)
    if _constraint.is_concrete(learning_rate) and not learning_rate > 0:
      raise ValueError(f"lbfgsb: `learning_rate` must be > 0 or None, got "
                       f"{learning_rate!r}.")
  if not _constraint.is_concrete(memory_size):
    raise TypeError("lbfgsb: `memory_size` sets array shapes and must be a "
                    "Python int, not a traced value (with "
                    "optax.inject_hyperparams, list it in static_args).")
  for name, value, least in (("memory_size", memory_size, 1),
                             ("max_linesearch_steps", max_linesearch_steps, 1),
                             ("stall_iters", stall_iters, 1)):
    if _constraint.is_concrete(value) and int(value) < least:
      raise ValueError(f"lbfgsb: `{name}` must be >= {least}, got "
                       f"{value!r}.")
  settings = step_lib.Settings(tol, atol, ftol, eps_active,
                               max_linesearch_steps, stall_iters, nonmonotone)
  sizes = dict(memory_size=int(memory_size))
  fixed = learning_rate is not None

  def step_size(count):
    return learning_rate(count) if callable(learning_rate) else learning_rate

  def init_fn(params):
    _lbfgsb.require_floating(
        params, "lbfgsb", "params", "keep integer state such as step "
        "counters out of the params lbfgsb updates, e.g. with "
        "optax.multi_transform")
    _lbfgsb.prepare_bounds(params, lower, upper, "lbfgsb")  # Validate now.
    params = state_lib.strong(params)
    leaves = jax.tree.leaves(params)
    # The dtype of `value`: the widest leaf's, as a strong type (a weakly
    # typed float64 leaf must not give float32), as optax.lbfgs does.
    value_dtype = jnp.result_type(*[v.dtype for v in leaves] or [jnp.float32])
    lay = groups.layout(params, grouped=bool(group_leaves))
    solver = step_lib.blank(groups.flatten(params, lay), value_dtype, **sizes)
    info = LbfgsbInfo(jnp.zeros((), jnp.int32), jnp.ones((), bool),
                      solver.projected_grad_norm)
    return LbfgsbState(jnp.zeros((), jnp.int32), solver.f,
                       jax.tree.map(jnp.zeros_like, params), solver, info)

  def update_fn(updates, state, params=None, *, value=None,
                grad=None, value_fn: Optional[Callable] = None,
                overlap_grads=None, **extra_args):
    if params is None:
      raise ValueError("lbfgsb needs the current parameters: call "
                       "`opt.update(grad, state, params, ...)`.")
    if overlap_grads is not None:
      _check_overlap_grads(overlap_grads, params)
    if not fixed and (value is None or value_fn is None):
      raise ValueError("lbfgsb with a line search needs `value=` and "
                       "`value_fn=` in `update` (as optax.lbfgs); or give "
                       "a fixed `learning_rate`.")
    _lbfgsb.prepare_bounds(params, lower, upper, "lbfgsb")  # Errors here.
    try:
      hash(value_fn)
    except TypeError:  # Cannot key the cache: run it as it is.
      return update(value_fn, updates, state, params, value, grad,
                    overlap_grads, extra_args)
    # Compiled once per value_fn (and shapes): eager loops stay cheap, and
    # under the caller's jit this inlines.
    return update_jit(value_fn, updates, state, params, value, grad,
                      overlap_grads, extra_args)

  def _check_overlap_grads(overlap_grads, params):
    if not fixed:
      raise ValueError("lbfgsb: `overlap_grads` (multi-batch curvature "
                       "pairs) needs a fixed `learning_rate`; with a line "
                       "search the pair is already measured on one batch.")
    if not (isinstance(overlap_grads, (tuple, list))
            and len(overlap_grads) == 2):
      raise TypeError("lbfgsb: `overlap_grads` must be a pair (gradient at "
                      "the previous params, gradient at these params), got "
                      f"{type(overlap_grads).__name__}.")
    want = jax.tree.structure(params)
    for name, tree in zip(("previous", "current"), overlap_grads):
      if jax.tree.structure(tree) != want:
        raise ValueError(f"lbfgsb: the {name} gradient in `overlap_grads` "
                         f"has structure {jax.tree.structure(tree)}; the "
                         f"params have {want}.")

  def update(value_fn, updates, state, params, value, grad, overlap_grads,
             extra_args):
    lo, hi = _lbfgsb.prepare_bounds(params, lower, upper, "lbfgsb")
    lay = groups.layout(params, grouped=bool(group_leaves))
    flat = lambda tree: groups.flatten(tree, lay)  # noqa: E731
    lo_g, hi_g = (groups.flatten_bounds(lo, lay),
                  groups.flatten_bounds(hi, lay))
    g = updates if grad is None else grad
    g = jax.tree.map(lambda gi, p: jnp.asarray(gi).astype(jnp.result_type(p)),
                     g, params)
    g = flat(g)
    params_g = flat(state_lib.strong(params))
    x = core.clip(params_g, lo_g, hi_g)
    solver = state.solver
    if fixed:
      y = None
      if overlap_grads is not None:  # The pair sees the overlap only.
        old, new = (flat(jax.tree.map(
            lambda gi, p: jnp.asarray(gi).astype(jnp.result_type(p)), t,
            params)) for t in overlap_grads)
        y = jax.tree.map(jnp.subtract, new, old)
        # Berahas et al.'s skip: an overlap pair with little curvature
        # along s makes a long step that a fixed step cannot reject.
        s = jax.tree.map(jnp.subtract, x, solver.x)
        flat_enough = core.tree_vdot(s, y) <= (
            jnp.asarray(min_overlap_curvature, state_lib.dtype_of(s))
            * core.tree_vdot(s, s))
        y = jax.tree.map(lambda v: jnp.where(flat_enough, 0, v), y)
      solver, evals = _take_gradient(solver, x, params_g, g, state.count,
                                     lo_g, hi_g, y)
      moved = core.clip(core.tree_axpy(step_size(state.count),
                                       solver.direction, x), lo_g, hi_g)
      new_x = core.tree_where(solver.status == step_lib.Status.RUNNING,
                              moved, x)
      accepted = jnp.ones((), bool)
    else:
      value_and_grad = jax.value_and_grad(
          lambda p: value_fn(groups.unflatten(p, lay), **extra_args))
      # Infeasible params: their value and gradient are not those of x, so
      # this update only projects them (the search, the one place f is
      # inlined, is skipped), as a fixed step does; the next update brings
      # the value and gradient at x.
      feasible = state_lib.all_equal(x, params_g)
      solver = _take_value(solver, x, value, g, state.count, feasible,
                           lo_g, hi_g)
      before = solver.num_fun_evals
      solver, accepted = jax.lax.cond(
          feasible & (solver.status == step_lib.Status.RUNNING),
          lambda s: step_lib.advance(s, value_and_grad, lo_g, hi_g, settings),
          lambda s: (s, jnp.ones((), bool)), solver)
      evals = solver.num_fun_evals - before
      new_x = core.tree_where(feasible, solver.x, x)
    deltas = jax.tree.map(_landing.delta_to, params,
                          groups.unflatten(new_x, lay), lo, hi)
    # A NaN value or gradient is made visible, as optax.lbfgs does; so is
    # an infinite gradient in a fixed step, which no evaluation can check.
    nonfinite = solver.status == step_lib.Status.NONFINITE
    if not fixed:
      nonfinite &= feasible  # A projecting update evaluated nothing.
    else:
      nonfinite |= ~jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                                       for v in jax.tree.leaves(g)]))
      solver = solver._replace(status=jnp.where(
          nonfinite, step_lib.Status.NONFINITE, solver.status).astype(
              solver.status.dtype))
    deltas = jax.tree.map(
        lambda u: jnp.where(nonfinite, jnp.full((), jnp.nan, u.dtype), u),
        deltas)
    pg_norm = solver.projected_grad_norm
    # With a fixed step (or a projecting update) the state's value and
    # gradient are not of the new point: inf makes
    # value_and_grad_from_state recompute them.
    value_out = jnp.full_like(solver.f, jnp.inf)
    if not fixed:
      value_out = jnp.where(feasible, solver.f, value_out)
      pg_norm = jnp.where(feasible, pg_norm, jnp.full_like(pg_norm, jnp.inf))
    info = LbfgsbInfo(evals.astype(jnp.int32), accepted, pg_norm)
    return deltas, LbfgsbState(state.count + 1, value_out,
                               groups.unflatten(solver.g, lay), solver, info)

  update_jit = jax.jit(update, static_argnums=0)

  def _take_value(solver, x, value, g, count, feasible, lo, hi):
    """The solver state at ``x``, given the caller's value and gradient
    there (unchanged where the params were infeasible: ``x`` is not theirs).
    """
    value = jnp.asarray(value).astype(solver.f.dtype)
    # The last step, to size the rounding of the landing (its pair's s).
    last_step = jax.tree.map(lambda s: s[0], solver.memory.s)
    same_point = (count > 0) & state_lib.landed(x, solver.x, last_step)
    same_data = (value == solver.f) & state_lib.all_equal(g, solver.g)
    return jax.lax.cond(
        ~feasible | (same_point & same_data), lambda s: s,
        lambda s: step_lib.restart(s, x, value, g, lo, hi, settings,
                                   keep_memory=same_point), solver)

  def _take_gradient(solver, x, params, g, count, lo, hi, y=None):
    """Fixed step: the gradient at ``x`` completes the last step's pair.

    ``y`` replaces ``g - solver.g`` as the pair's gradient change.

    Infeasible params have a gradient that is not ``x``'s and nothing to
    evaluate with: this update only projects them (direction 0).
    """
    # Where the last update moved to (nowhere once it had stopped).
    last = core.tree_where(
        solver.status == step_lib.Status.RUNNING,
        core.clip(core.tree_axpy(step_size(jnp.maximum(count - 1, 0)),
                                 solver.direction, solver.x), lo, hi),
        solver.x)
    continues = (count > 0) & state_lib.landed(
        x, last, jax.tree.map(jnp.subtract, last, solver.x))
    inf = jnp.full((), jnp.inf, solver.f.dtype)
    solver = jax.lax.cond(
        continues,
        lambda s: step_lib.arrive(s, x, inf, g, jnp.ones((), bool), 0, lo,
                                  hi, settings, has_value=False, y=y),
        lambda s: step_lib.restart(s, x, inf, g, lo, hi, settings,
                                   has_value=False), solver)
    solver = jax.lax.cond(
        state_lib.all_equal(x, params), lambda s: s,
        lambda s: s._replace(
            direction=jax.tree.map(jnp.zeros_like, s.direction),
            pg_best=jnp.full_like(s.pg_best, jnp.inf),
            pg_scale=jnp.full_like(s.pg_scale, jnp.inf),
            status=jnp.full_like(s.status, step_lib.Status.RUNNING)), solver)
    return solver, jnp.zeros((), jnp.int32)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
