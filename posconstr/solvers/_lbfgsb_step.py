"""One iteration of bounded L-BFGS, shared by ``minimize`` and ``lbfgsb``.

The state holds the current point with its value and gradient, the
direction of the next step, the curvature memory and the bookkeeping of the
stopping tests; :func:`start` builds it at a point, :func:`advance` takes one
step (line search along the projected path, then :func:`arrive`), and
:func:`arrive` takes in a new point (from the search, or from a fixed step
whose gradient arrives at the next call of the Optax transform): it stores
the curvature pair, computes the next direction and decides the status.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from posconstr.solvers import _lbfgsb_core as core
from posconstr.solvers import _lbfgsb_search as search_lib


class Status(enum.IntEnum):
  """Why a bounded L-BFGS solve stopped (``LbfgsbResult.status``).

  Compare it with ``==`` (it is an int32 array, per lane under ``vmap``):
  ``result.status == posconstr.Status.CONVERGED``.

  Attributes:
    RUNNING: still iterating (only in the state of :func:`posconstr.lbfgsb`).
    CONVERGED: the stopping test held (see :func:`posconstr.minimize`).
    MAX_ITERATIONS: ``maxiter`` iterations without meeting it.
    LINESEARCH_FAILED: no step, not even along the scaled projected
      gradient, decreased ``fun`` (typically at the limit of precision).
    STALLED: ``stall_iters`` iterations in a row made no measurable
      progress; the point is as good as the precision of ``fun`` allows.
    NONFINITE: the value is NaN or infinite, or the gradient has a NaN, at
      the current point.
    INFEASIBLE: ``lower > upper`` somewhere (traced bounds; concrete ones
      raise a ``ValueError`` instead).
  """

  RUNNING = -1
  CONVERGED = 0
  MAX_ITERATIONS = 1
  LINESEARCH_FAILED = 2
  STALLED = 3
  NONFINITE = 4
  INFEASIBLE = 5


class Settings(NamedTuple):
  """The numeric options; each may be a Python number or a traced scalar."""

  tol: Any = 1e-8
  atol: Any = 0.0
  ftol: Any = 1e-9
  eps_active: Any = 1e-3
  max_linesearch_steps: Any = 20
  stall_iters: Any = 15
  nonmonotone: Any = 0.3


class SolverState(NamedTuple):
  """The state of one bounded L-BFGS run (``x`` inside the bounds)."""

  x: Any
  f: jax.Array  # the value at x
  g: Any  # the gradient at x
  direction: Any  # of the next step
  slope: jax.Array  # of f along the projected path of the next step, at 0
  memory: core.Memory
  num_iter: jax.Array
  num_fun_evals: jax.Array
  projected_grad_norm: jax.Array
  pg_scale: jax.Array  # the first finite projected gradient norm
  status: jax.Array
  pg_best: jax.Array  # the projected gradient when progress was last made
  stall: jax.Array  # iterations since then
  reference: jax.Array  # Zhang-Hager's weighted mean of past values, C
  reference_weight: jax.Array  # and its normalizer, Q


def _compute_dtype(value, x):
  return jnp.result_type(value, *[leaf.dtype for leaf in jax.tree.leaves(x)])


def _status(state: SolverState, failed, settings: Settings, has_value: bool,
            lower, upper):
  """The status at ``state``'s point (before ``maxiter`` is considered).

  Converged: the projected gradient is at most ``max(atol, tol * pg_scale)``
  and the quasi-Newton model of the next step predicts a decrease of at
  most ``max(ftol max(|f|, 1), 16 eps |f|)`` (as SciPy's ``ftol``, absolute
  below 1), so a point from which ``fun`` can still fall a lot is not called
  converged because the start was far away.
  """
  dtype = state.projected_grad_norm.dtype
  pg = state.projected_grad_norm
  threshold = jnp.maximum(jnp.asarray(settings.atol, dtype),
                          jnp.asarray(settings.tol, dtype) * state.pg_scale)
  converged = jnp.isfinite(pg) & (pg <= threshold)
  bad = core.tree_any_nan(state.g)
  if has_value:
    # The model's decrease along the next step (at a vertex, none).
    predicted = -0.5 * state.slope.astype(dtype)
    value = state.f.astype(dtype)
    allowed = jnp.maximum(
        jnp.asarray(settings.ftol, dtype) * jnp.maximum(jnp.abs(value), 1),
        search_lib.noise_level(value))
    converged &= ~(predicted > allowed)  # NaN-safe: no direction, no veto
    bad |= ~jnp.isfinite(state.f)
  code = jnp.where(
      bad, Status.NONFINITE, jnp.where(
          converged, Status.CONVERGED, jnp.where(
              failed, Status.LINESEARCH_FAILED, jnp.where(
                  state.stall >= settings.stall_iters, Status.STALLED,
                  Status.RUNNING))))
  return code.astype(jnp.int32)


def blank(x, value_dtype, *, memory_size: int) -> SolverState:
  """A placeholder state shaped for ``x`` (no evaluation; value ``inf``)."""
  dtype = _compute_dtype(jnp.zeros((), value_dtype), x)
  zero = jnp.zeros((), jnp.int32)
  inf = jnp.full((), jnp.inf, dtype)
  zeros = jax.tree.map(jnp.zeros_like, x)
  return SolverState(
      x, jnp.full((), jnp.inf, value_dtype), zeros, zeros, jnp.zeros((), dtype),
      core.init_memory(x, memory_size, dtype), zero, zero, inf, inf,
      zero + Status.RUNNING, inf, zero, jnp.full((), jnp.inf, value_dtype),
      jnp.ones((), dtype))


def restart(state: SolverState, x, value, grad, lower, upper,
            settings: Settings, *, keep_memory: ArrayLike = False,
            has_value: bool = True, num_evals: ArrayLike = 0) -> SolverState:
  """``state`` moved to the feasible point ``x`` with its value and gradient.

  The counters carry on; the memory is kept where ``keep_memory`` (the same
  point seen through a new mini-batch) and forgotten otherwise, and the
  relative tolerance and the non-monotone reference start afresh.
  """
  value = jnp.asarray(value).astype(state.f.dtype)
  memory = core.reset_memory(state.memory, where=~jnp.asarray(keep_memory))
  d = core.direction(memory, x, grad, lower, upper, settings.eps_active,
                     empty=keep_memory is False)
  dtype = state.projected_grad_norm.dtype
  pg = core.projected_gradient_norm(x, grad, lower, upper).astype(dtype)
  new = state._replace(
      x=x, f=value, g=grad, direction=d,
      slope=search_lib.path_slope(grad, d, x, lower, upper).astype(dtype),
      memory=memory,
      num_fun_evals=state.num_fun_evals + num_evals, projected_grad_norm=pg,
      pg_scale=jnp.where(jnp.isfinite(pg), pg, jnp.inf).astype(dtype),
      pg_best=pg, stall=jnp.zeros_like(state.stall),
      reference=value, reference_weight=jnp.ones_like(state.reference_weight))
  return new._replace(status=_status(new, False, settings, has_value, lower,
                                     upper))


def start(x, value, grad, lower, upper, settings: Settings, *,
          memory_size: int, has_value: bool = True
          ) -> SolverState:
  """The state at a feasible point ``x`` with its value and gradient, which
  count as one evaluation."""
  value = jnp.asarray(value)
  state = blank(x, value.dtype, memory_size=memory_size)
  return restart(state, x, value, grad, lower, upper, settings,
                 has_value=has_value, num_evals=1)


def arrive(state: SolverState, x, value, grad, accepted, num_evals, lower,
           upper, settings: Settings, *, has_value: bool = True,
           y=None) -> SolverState:
  """Takes in the new point (where ``accepted``; else a failed step).

  ``y``: the gradient change of the curvature pair, when it is not
  ``grad - state.g`` (multi-batch L-BFGS measures it on the overlap of two
  mini-batches, see :func:`posconstr.lbfgsb`).
  """
  s = jax.tree.map(jnp.subtract, x, state.x)
  if y is None:
    y = jax.tree.map(jnp.subtract, grad, state.g)
  memory = core.reset_memory(
      core.push_pair(state.memory, s, y, keep=accepted), where=~accepted)
  x = core.tree_where(accepted, x, state.x)
  grad = core.tree_where(accepted, grad, state.g)
  value = jnp.where(accepted, jnp.asarray(value).astype(state.f.dtype),
                    state.f)
  d = core.direction(memory, x, grad, lower, upper, settings.eps_active)
  dtype = state.projected_grad_norm.dtype
  pg = core.projected_gradient_norm(x, grad, lower, upper).astype(dtype)
  noise = search_lib.noise_level(state.f)
  if has_value:
    progress = (pg <= 0.5 * state.pg_best) | (value < state.f - noise)
  else:  # Fixed steps shrink the gradient by a constant factor at best.
    progress = pg < state.pg_best
  new = SolverState(
      x, value, grad, d,
      search_lib.path_slope(grad, d, x, lower, upper).astype(dtype),
      memory, state.num_iter + 1,
      state.num_fun_evals + num_evals, pg,
      jnp.where(jnp.isfinite(state.pg_scale), state.pg_scale,
                jnp.where(jnp.isfinite(pg), pg, jnp.inf)),
      state.status,
      jnp.where(progress, jnp.minimum(pg, state.pg_best), state.pg_best),
      jnp.where(progress, 0, state.stall + 1),
      *_next_reference(state, value, accepted, settings.nonmonotone))
  # A search fails for good when it already went along the scaled gradient.
  failed = ~accepted & (state.memory.count == 0)
  return new._replace(status=_status(new, failed, settings, has_value, lower,
                                     upper))


def _next_reference(state: SolverState, value, accepted, eta):
  r"""Zhang & Hager's reference after a step (SIAM J. Optim. 14(4), 2004):

  :math:`Q_{k+1} = \eta Q_k + 1`, :math:`C_{k+1} = (\eta Q_k C_k +
  f_{k+1}) / Q_{k+1}`, a mean of past values with weights decaying as
  :math:`\eta^j` (0: monotone). A failed search restarts it at ``f``: the
  retry along the scaled gradient is then monotone.
  """
  dtype = state.reference_weight.dtype
  eta = jnp.asarray(eta, dtype)
  weight = eta * state.reference_weight + 1
  mean = ((eta * state.reference_weight * state.reference.astype(dtype)
           + value.astype(dtype)) / weight)
  # inf * 0 at the start, or a reference that is no longer finite.
  mean = jnp.where(jnp.isfinite(mean), mean, value.astype(dtype))
  reference = jnp.where(accepted, mean.astype(value.dtype), value)
  return reference, jnp.where(accepted, weight, jnp.ones_like(weight))


def advance(state: SolverState, value_and_grad, lower, upper,
            settings: Settings):
  """One iteration: the search along ``state.direction``, then arrival.

  Returns the new state and whether the search found a step.
  """
  search = search_lib.projected_search(
      value_and_grad, state.x, state.f, state.g, state.direction,
      lower, upper, max_steps=settings.max_linesearch_steps,
      reference=state.reference, slope0=state.slope,
      first_to_vertex=state.memory.count == 0)
  return arrive(state, search.x, search.value, search.grad, search.accepted,
                search.num_evals, lower, upper, settings), search.accepted
