"""Bounded L-BFGS: ``minimize`` (a whole solve in ``lax.while_loop``)."""

from __future__ import annotations

import numbers
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from posconstr import _bound_trees
from posconstr import _constraint
from posconstr import _lbfgsb_core as core
from posconstr import _lbfgsb_search as search_lib
from posconstr import _paths


def check_options(owner: str, *, ints=(), reals=(), nonnegative=True) -> None:
  """Type checks of integer and real options, naming the argument.

  ``ints``/``reals``: ``(name, value)`` pairs. Raises ``TypeError`` for a
  value of the wrong type (``1.5`` or ``"10"`` for an int, ``"1e-3"`` for a
  real) and, with ``nonnegative``, ``ValueError`` for a concrete real that
  is negative or NaN.
  """
  for name, value in ints:
    try:
      operator.index(value)
    except TypeError:
      raise TypeError(f"{owner}: `{name}` must be an int, got {value!r} of "
                      f"type {type(value).__name__}.") from None
  for name, value in reals:
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real)
        or (hasattr(value, "dtype") and np.ndim(value) == 0
            and jnp.issubdtype(value.dtype, jnp.number))):
      raise TypeError(f"{owner}: `{name}` must be a real number, got "
                      f"{value!r} of type {type(value).__name__}.")
    if nonnegative and _constraint.is_concrete(value) and not value >= 0:
      raise ValueError(f"{owner}: `{name}` must be >= 0, got {value!r}.")


def prepare_bounds(params, lower, upper, owner: str):
  """Per-leaf bounds in each leaf's dtype (rounded inwards), +-inf if None.

  ``lower``/``upper``: None, a scalar, or a pytree prefix of ``params``
  whose leaves are None, scalars or arrays broadcastable to the leaf.
  """
  los, his = [], []
  boxes = _bound_trees.leaf_boxes(params, lower, upper, owner)
  for leaf, box in zip(jax.tree.leaves(params), boxes):
    dtype = _paths.leaf_dtype(leaf)
    lo, hi = (None, None) if box is None else box.bounds_in(dtype)
    los.append(jnp.full((), -jnp.inf, dtype) if lo is None else lo)
    his.append(jnp.full((), jnp.inf, dtype) if hi is None else hi)
  treedef = jax.tree.structure(params)
  return treedef.unflatten(los), treedef.unflatten(his)


def _require_floating(x0) -> None:
  """Integer leaves have no gradient: say which one, before JAX does."""
  paths, leaves, _ = _paths.leaves_with_paths(x0)
  for path, leaf in zip(paths, leaves):
    dtype = _paths.leaf_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"minimize: `x0` leaf {_paths.shown(path, 'x0')!r} has dtype "
          f"{dtype}; only floating-point leaves can be optimized (e.g. "
          f"pass jnp.asarray(x0, jnp.float32)).")


class LbfgsbResult(NamedTuple):
  """The outcome of :func:`minimize`.

  Attributes:
    params: the solution, within the bounds bit for bit.
    value: ``fun(params)``.
    grad: the gradient at ``params``.
    projected_grad_norm: ``||params - P(params - grad)||_inf`` (0 at a KKT
      point).
    num_iter: iterations taken.
    num_fun_evals: evaluations of ``fun`` (with its gradient).
    converged: whether the stopping test held.
    linesearch_failed: whether the solve stopped because no step, not even
      along the scaled projected gradient, decreased ``fun`` (typically at
      the limit of floating-point precision).
    stalled: whether the solve stopped because ``stall_iters`` iterations
      in a row made no measurable progress: ``fun`` fell by no more than its
      rounding noise and the projected gradient did not halve. The point is
      then as good as the precision of ``fun`` allows; ``tol`` was tighter.
  """

  params: Any
  value: jax.Array
  grad: Any
  projected_grad_norm: jax.Array
  num_iter: jax.Array
  num_fun_evals: jax.Array
  converged: jax.Array
  linesearch_failed: jax.Array
  stalled: jax.Array


class _Carry(NamedTuple):
  x: Any
  value: jax.Array
  grad: Any
  memory: core.Memory
  num_iter: jax.Array
  num_evals: jax.Array
  pg_norm: jax.Array
  converged: jax.Array
  failed: jax.Array
  pg_ref: jax.Array  # the projected gradient when progress was last made
  stall: jax.Array  # iterations since then
  recent: jax.Array  # the last `nonmonotone_window` values, for the search


def minimize(fun: Callable[[Any], jax.Array], x0, lower=None, upper=None, *,
             maxiter: int = 500, tol: float = 1e-8, atol: float = 0.0,
             memory_size: int = 10, max_linesearch_steps: int = 20,
             eps_active: float = 1e-3, stall_iters: int = 15,
             nonmonotone_window: int = 10) -> LbfgsbResult:
  r"""Minimizes ``fun`` subject to ``lower <= x <= upper`` by bounded L-BFGS.

  The two-metric projected quasi-Newton method described in
  ``posconstr._lbfgsb_core``: L-BFGS curvature on the free variables, the
  epsilon-active set handled by a diagonal metric, and a backtracking Armijo
  search along the projected path, so ``fun`` is only ever evaluated inside
  the bounds. The Armijo test is non-monotone: it compares with the largest
  of the last ``nonmonotone_window`` values (Grippo, Lampariello & Lucidi,
  SIAM J. Numer. Anal. 23(4), 1986), which spares backtracking where a
  unit quasi-Newton step overshoots a little (on NNLS of digits, 10% fewer
  evaluations than the monotone test). Where the Armijo test drowns in
  rounding (the decrease it asks for is below ``16 eps |f|``), a step is
  accepted on the gradient's evidence instead (an approximate Wolfe test),
  so the projected gradient keeps falling after ``f`` has run out of
  digits. The whole solve is one ``lax.while_loop``: jittable, and
  vmappable over a batch of problems. Pytrees are handled leaf by leaf
  (leaves may have different dtypes).

  Stops when :math:`\|x - P(x - \nabla f(x))\|_\infty \le
  \max(\mathrm{atol}, \mathrm{tol} \cdot \|x_0 - P(x_0 - \nabla f(x_0))\|_\infty)`,
  after ``maxiter`` iterations, when the line search fails twice in a row
  (``linesearch_failed``), or when ``stall_iters`` iterations in a row make
  no measurable progress (``stalled``: ``fun`` fell by at most
  ``16 eps |f|`` and the projected gradient did not halve). The last two
  mean ``tol`` is below what the precision of ``fun`` allows; ``converged``
  is then False. In float64 ``tol=1e-10`` is reachable on well-posed
  problems; in float32 use ``tol`` around ``1e-4`` (tighter, the solve
  usually ends ``stalled`` a few iterations after the float32 floor, at a
  point as good as float32 allows).

  Args:
    fun: scalar function of a pytree ``x``, differentiable with
      ``jax.value_and_grad``.
    x0: starting point; projected onto the bounds first (it need not be
      feasible).
    lower: None, a scalar, or a pytree prefix of ``x0`` of scalars/arrays.
    upper: as ``lower``.
    maxiter: maximum number of iterations.
    tol: relative projected-gradient tolerance (see above).
    atol: absolute projected-gradient tolerance.
    memory_size: number of curvature pairs kept.
    max_linesearch_steps: maximum function evaluations per line search.
    eps_active: the largest distance to a bound at which a coordinate can be
      held by the active set (the width used is the smaller of this and
      ``||x - P(x - gamma grad)||_inf``, gamma the L-BFGS scaling).
    stall_iters: iterations without measurable progress after which the
      solve stops (see above).
    nonmonotone_window: how many recent values the Armijo test may compare
      with; 1 makes the search monotone. With more, ``value`` never exceeds
      ``fun(x0)`` but may exceed the lowest value seen by what the window
      allowed (when the solve stops on ``maxiter`` or ``stalled``).

  Returns:
    A :class:`LbfgsbResult`.

  Raises:
    ValueError: ``lower > upper`` somewhere, bounds that do not broadcast
      to their leaf or whose tree does not match ``x0``, or bad options.

  Example:
    >>> import jax.numpy as jnp, posconstr
    >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> b = jnp.array([1.0, -1.0, 1.0])
    >>> result = posconstr.minimize(lambda x: 0.5 * jnp.sum((A @ x - b) ** 2),
    ...                             jnp.ones(2), lower=0.0)
    >>> [round(float(v), 4) for v in result.params], bool(result.converged)
    ([0.0, 0.0714], True)
  """
  if not callable(fun):
    raise TypeError(f"minimize: `fun` must be callable, got {fun!r} of type "
                    f"{type(fun).__name__}.")
  check_options("minimize", ints=(
      ("maxiter", maxiter), ("memory_size", memory_size),
      ("max_linesearch_steps", max_linesearch_steps),
      ("stall_iters", stall_iters),
      ("nonmonotone_window", nonmonotone_window)), reals=(
          ("tol", tol), ("atol", atol), ("eps_active", eps_active)))
  if (int(maxiter) < 0 or int(memory_size) < 1
      or int(max_linesearch_steps) < 1 or int(stall_iters) < 1
      or int(nonmonotone_window) < 1):
    raise ValueError(
        f"minimize: need maxiter >= 0, memory_size >= 1, "
        f"max_linesearch_steps >= 1, stall_iters >= 1 and "
        f"nonmonotone_window >= 1, got maxiter={maxiter!r}, memory_size="
        f"{memory_size!r}, max_linesearch_steps={max_linesearch_steps!r}, "
        f"stall_iters={stall_iters!r}, nonmonotone_window="
        f"{nonmonotone_window!r}.")
  if not (tol >= 0 and atol >= 0):
    raise ValueError(f"minimize: `tol` and `atol` must be >= 0, got "
                     f"tol={tol!r}, atol={atol!r}.")
  _require_floating(x0)
  lower, upper = prepare_bounds(x0, lower, upper, "minimize")
  value_and_grad = jax.value_and_grad(fun)
  x = core.clip(jax.tree.map(jnp.asarray, x0), lower, upper)
  value, grad = value_and_grad(x)
  pg0 = core.projected_gradient_norm(x, grad, lower, upper)
  threshold = jnp.maximum(atol, tol * pg0)
  memory = core.init_memory(x, memory_size, jnp.result_type(value))

  def cond(c: _Carry):
    return ((c.num_iter < maxiter) & ~c.converged & ~c.failed
            & (c.stall < stall_iters))

  def body(c: _Carry) -> _Carry:
    d = core.direction(c.memory, c.x, c.grad, lower, upper, eps_active)
    search = search_lib.projected_backtracking(
        value_and_grad, c.x, c.value, c.grad, d, lower, upper,
        max_steps=max_linesearch_steps, reference=jnp.max(c.recent))
    ok = search.accepted
    s = jax.tree.map(jnp.subtract, search.x, c.x)
    y = jax.tree.map(jnp.subtract, search.grad, c.grad)
    memory = core.reset_memory(core.push_pair(c.memory, s, y, keep=ok),
                               where=~ok)
    x = core.tree_where(ok, search.x, c.x)
    grad = core.tree_where(ok, search.grad, c.grad)
    value = jnp.where(ok, search.value, c.value)
    pg = core.projected_gradient_norm(x, grad, lower, upper)
    progress = ((value < c.value - search_lib.noise_level(c.value))
                | (pg <= 0.5 * c.pg_ref))
    return _Carry(x, value, grad, memory, c.num_iter + 1,
                  c.num_evals + search.num_evals, pg, pg <= threshold,
                  ~ok & (c.memory.count == 0),
                  jnp.where(progress, jnp.minimum(pg, c.pg_ref), c.pg_ref),
                  jnp.where(progress, 0, c.stall + 1),
                  # A failed search restarts the window: the retry, along
                  # the scaled gradient, is then monotone.
                  jnp.where(ok, jnp.roll(c.recent, 1).at[0].set(value),
                            jnp.full_like(c.recent, value)))

  zero = jnp.zeros((), jnp.int32)
  init = _Carry(x, value, grad, memory, zero, zero + 1, pg0, pg0 <= threshold,
                jnp.zeros((), bool), pg0, zero,
                jnp.full((int(nonmonotone_window),), value))
  c = jax.lax.while_loop(cond, body, init)
  return LbfgsbResult(c.x, c.value, c.grad, c.pg_norm, c.num_iter,
                      c.num_evals, c.converged, c.failed,
                      ~c.converged & (c.stall >= stall_iters))
