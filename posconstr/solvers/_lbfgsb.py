"""Bounded L-BFGS: ``minimize`` (a whole solve in ``lax.while_loop``)."""

from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint
from posconstr.solvers import _dtype_groups as groups
from posconstr.solvers import _implicit as implicit
from posconstr.solvers import _lbfgsb_core as core
from posconstr.solvers import _lbfgsb_step as step_lib
from posconstr.tree import _bound_trees
from posconstr.tree import _paths


def check_options(owner: str, *, ints=(), reals=(), nonnegative=True) -> None:
  """Type checks of integer and real options, naming the argument.

  ``ints``/``reals``: ``(name, value)`` pairs. Raises ``TypeError`` for a
  value of the wrong type (``1.5`` or ``"10"`` for an int, ``"1e-3"`` for a
  real) and, with ``nonnegative``, ``ValueError`` for a concrete real that
  is negative or NaN.
  """
  for name, value in ints:
    if not _constraint.is_concrete(value):
      if jnp.issubdtype(value.dtype, jnp.integer) and not jnp.ndim(value):
        continue  # A traced int: checked where it is used.
      raise TypeError(f"{owner}: `{name}` must be an int, got a traced "
                      f"{value.dtype} of shape {jnp.shape(value)}.")
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
    if (nonnegative and _constraint.is_concrete(value)
        and not float(value) >= 0):  # NaN fails too.
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


def require_floating(x0, owner: str = "minimize", name: str = "x0",
                     advice: str = "pass jnp.asarray(x0, jnp.float32)") -> None:
  """Integer leaves have no gradient: say which one, before JAX does."""
  paths, leaves, _ = _paths.leaves_with_paths(x0)
  for path, leaf in zip(paths, leaves):
    dtype = _paths.leaf_dtype(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{owner}: `{name}` leaf {_paths.shown(path, name)!r} has dtype "
          f"{dtype}; only floating-point leaves can be optimized ({advice}).")


class LbfgsbResult(NamedTuple):
  """The outcome of :func:`minimize`.

  Attributes:
    params: the solution, within the bounds bit for bit.
    value: ``fun(params, *args)``.
    grad: the gradient at ``params``.
    projected_grad_norm: ``||params - P(params - grad)||_inf`` (0 at a KKT
      point), measured from ``grad`` itself (not rounded away where
      ``|grad|`` is below an ulp of ``params``).
    num_iter: iterations taken.
    num_fun_evals: evaluations of ``fun`` (with its gradient).
    status: why the solve stopped, a :class:`Status` code (int32).
  """

  params: Any
  value: jax.Array
  grad: Any
  projected_grad_norm: jax.Array
  num_iter: jax.Array
  num_fun_evals: jax.Array
  status: jax.Array

  @property
  def converged(self) -> jax.Array:
    """``status == Status.CONVERGED``."""
    return self.status == step_lib.Status.CONVERGED

  @property
  def linesearch_failed(self) -> jax.Array:
    """``status == Status.LINESEARCH_FAILED``."""
    return self.status == step_lib.Status.LINESEARCH_FAILED

  @property
  def stalled(self) -> jax.Array:
    """``status == Status.STALLED``."""
    return self.status == step_lib.Status.STALLED


class _Static(NamedTuple):
  memory_size: int


@dataclasses.dataclass(frozen=True)
class OnGroups:
  """``fun`` of a tree, called on its dtype groups (hashable when ``fun``
  is, so that the solve's compilation is cached)."""

  fun: Callable
  layout: groups.Layout

  def __call__(self, x, *args):
    return self.fun(groups.unflatten(x, self.layout), *args)


def _run(fun, static: _Static, x0, lower, upper, args, settings, maxiter):
  """The whole solve: ``start``, then ``advance`` in a ``while_loop``."""
  value_and_grad = jax.value_and_grad(lambda x: fun(x, *args))
  infeasible = [lo > hi for lo, hi in zip(jax.tree.leaves(lower),
                                          jax.tree.leaves(upper))]
  any_infeasible = jnp.any(jnp.stack([jnp.any(b) for b in infeasible]
                                     or [jnp.zeros((), bool)]))
  x = core.clip(x0, lower, upper)
  value, grad = value_and_grad(x)
  state = step_lib.start(x, value, grad, lower, upper, settings,
                         memory_size=static.memory_size)
  state = state._replace(status=jnp.where(
      any_infeasible, step_lib.Status.INFEASIBLE, state.status))

  def cond(s: step_lib.SolverState):
    return (s.status == step_lib.Status.RUNNING) & (s.num_iter < maxiter)

  def body(s: step_lib.SolverState):
    return step_lib.advance(s, value_and_grad, lower, upper, settings)[0]

  s = jax.lax.while_loop(cond, body, state)
  status = jnp.where(s.status == step_lib.Status.RUNNING,
                     step_lib.Status.MAX_ITERATIONS, s.status)
  # An empty box has no solution: its coordinates come back NaN.
  params = jax.tree.map(
      lambda xi, bad: jnp.where(bad, jnp.full((), jnp.nan, xi.dtype), xi),
      s.x, jax.tree.unflatten(jax.tree.structure(s.x), infeasible))
  return LbfgsbResult(params, s.f, s.g, s.projected_grad_norm,
                      s.num_iter, s.num_fun_evals, status.astype(jnp.int32))


_solve = jax.custom_jvp(_run, nondiff_argnums=(0, 1))


@_solve.defjvp
def _solve_jvp(fun, static, primals, tangents):
  x0, lower, upper, args, settings, maxiter = primals
  _, dlower, dupper, dargs, _, _ = tangents
  result = _solve(fun, static, x0, lower, upper, args, settings, maxiter)
  dx = implicit.solution_tangent(jax.grad(fun), result.params, lower, upper,
                                 args, dlower, dupper, dargs,
                                 grad=result.grad)
  _, (dvalue, dgrad) = jax.jvp(
      lambda x, a: jax.value_and_grad(fun)(x, *a), (result.params, args),
      (dx, dargs))

  def no_tangent(v):
    v = jnp.asarray(v)
    if jnp.issubdtype(v.dtype, jnp.inexact):
      return jnp.zeros_like(v)
    return np.zeros(v.shape, jax.dtypes.float0)

  out_tangent = jax.tree.map(no_tangent, result)._replace(
      params=dx, value=dvalue.astype(result.value.dtype), grad=dgrad)
  return result, out_tangent


_solve_jit = jax.jit(_solve, static_argnums=(0, 1))


def minimize(fun: Callable[..., jax.Array], x0, lower=None, upper=None, *,
             args: tuple = (), maxiter: int = 500, tol: float = 1e-8,
             atol: float = 0.0, ftol: float = 1e-9, memory_size: int = 10,
             max_linesearch_steps: int = 20, eps_active: float = 1e-3,
             stall_iters: int = 15, nonmonotone: float = 0.3,
             group_leaves: bool = True) -> LbfgsbResult:
  r"""Minimizes ``fun(x, *args)`` subject to ``lower <= x <= upper``.

  **Method.** A two-metric projected quasi-Newton method (Bertsekas,
  "Projected Newton methods for optimization problems with simple
  constraints", SIAM J. Control Optim. 20(2), 1982; the projected
  quasi-Newton family of Schmidt, Kim & Sra, "Projected Newton-type methods
  in machine learning", 2011, and Kim, Sra & Dhillon, SIAM J. Sci. Comput.
  2010): the L-BFGS inverse Hessian on the free variables, a diagonal
  metric on the epsilon-active set (coordinates at a bound whose gradient
  points out), and a search along the projected path ``P(x + a d)``, so
  ``fun`` is only ever evaluated inside the bounds. It is *not* the
  L-BFGS-B of Byrd, Lu, Nocedal & Zhu (1995) that SciPy wraps: that method
  finds a generalized Cauchy point by a sequential scan over the sorted
  breakpoints of the path and then minimizes a subspace model, which is a
  data-dependent serial loop; the two-metric step is elementwise work plus
  L-BFGS products of fixed shape, so it runs the same under ``jit``,
  ``vmap`` and on accelerators, leaf by leaf on pytrees of mixed dtypes.

  The search along the path is a Wolfe search (Armijo's decrease test and
  a curvature test that bounds overshooting, bracketing and cubic zoom as
  Moré & Thuente's,
  with extrapolation up to the last breakpoint, so a linear objective
  reaches its vertex in one step). Its decrease test is non-monotone: it
  compares with Zhang & Hager's mean of past values (SIAM J. Optim. 14(4),
  2004) with weight ``nonmonotone``. Where ``f`` has run out of digits it
  accepts a step on the gradient's evidence (an approximate Wolfe test),
  so the projected gradient keeps falling. With no curvature pair yet (the
  first step, or after a failed search), the first trial is the end of the
  projected path, as SciPy's first Cauchy point on a box.

  **Stopping.** ``status`` (a :class:`Status`) says why the solve stopped:

  * ``CONVERGED`` when :math:`\|x - P(x - \nabla f(x))\|_\infty \le
    \max(\mathrm{atol}, \mathrm{tol} \cdot g_0)`, :math:`g_0` that norm at
    the start (the first finite one), *and* the quasi-Newton model predicts
    that the next step would lower ``f`` by at most :math:`\max(\mathrm{ftol}
    \max(|f|, 1), 16 \epsilon |f|)` (like SciPy's ``ftol``: relative, and
    absolute below 1). The relative gradient test alone would call a point
    converged whose gradient is small only compared with a huge one at a
    far-away start; the second test keeps going while ``f`` can still fall.
  * ``MAX_ITERATIONS`` after ``maxiter`` iterations.
  * ``LINESEARCH_FAILED`` when no step, not even along the scaled projected
    gradient, decreased ``fun``; ``STALLED`` when ``stall_iters`` iterations
    in a row made no measurable progress (``fun`` fell by at most ``16 eps
    |f|`` and the projected gradient did not halve). Both mean ``tol`` is
    below what the precision of ``fun`` allows: in float64 ``tol=1e-10`` is
    reachable on well-posed problems; in float32 use ``tol`` around
    ``1e-4``.
  * ``NONFINITE`` when the value or the gradient is NaN (an infinite
    gradient component, as of ``sqrt`` at 0, is fine), ``INFEASIBLE`` when
    traced bounds have ``lower > upper`` (those coordinates come back NaN).

  **Derivatives.** The solution is differentiable in ``args`` and in the
  bounds (``jax.grad``, ``jax.vjp``, ``jax.jvp``, under ``jit`` and
  ``vmap``) by the implicit function theorem on its fixed point: active
  coordinates follow their bound, free ones solve :math:`H_{FF}\, dx_F =
  -(\partial_\theta \nabla_F f\, d\theta + H_{FA}\, dx_A)` by conjugate
  gradients on Hessian-vector products (``posconstr.solvers._implicit``).
  ``value`` and ``grad`` get the matching tangents; ``x0`` has none. At a
  degenerate point (a coordinate on its bound with zero gradient) the
  derivative is the one-sided one that keeps it on the bound. Data must
  come in through ``args`` (or the bounds) to be differentiated: values
  that ``fun`` closes over are constants to the solve.

  **Compilation.** The solve is compiled once per ``fun``, ``memory_size``
  and argument shapes and dtypes; every other option
  may change (or be traced) without recompiling. In a Python loop pass the
  same ``fun`` and put what changes in ``args``: a new ``lambda`` per call
  compiles anew every time.

  Args:
    fun: scalar function ``fun(x, *args)`` of a pytree ``x``,
      differentiable with ``jax.value_and_grad``.
    x0: starting point; projected onto the bounds first (it need not be
      feasible).
    lower: None, a scalar, or a pytree prefix of ``x0`` of scalars/arrays.
    upper: as ``lower``.
    args: extra arguments of ``fun``, a tuple of pytrees.
    maxiter: maximum number of iterations.
    tol: relative projected-gradient tolerance (see above).
    atol: absolute projected-gradient tolerance.
    ftol: relative tolerance on the decrease the model still predicts.
    memory_size: number of curvature pairs kept.
    max_linesearch_steps: maximum function evaluations per line search.
    eps_active: the largest distance to a bound at which a coordinate can be
      held by the active set (the width used is the smaller of this and
      ``||x - P(x - gamma grad)||_inf``, gamma the L-BFGS scaling).
    stall_iters: iterations without measurable progress after which the
      solve stops (see above).
    group_leaves: solve on one vector per dtype (the leaves of each dtype
      concatenated), so the solver's own operations do not grow with the
      number of leaves (``fun`` and its gradient, inlined twice, at
      ``x0`` and in the search, still do); False keeps the leaves apart
      (for parameters sharded across devices, which concatenation would
      gather).
    nonmonotone: the weight ``eta`` in ``[0, 1]`` of past values in the
      reference of the decrease test (0: monotone). With ``eta > 0``,
      ``value`` never exceeds ``fun(x0)`` but may exceed the lowest value
      seen (when the solve stops on ``maxiter`` or ``stalled``).

  Returns:
    A :class:`LbfgsbResult`.

  Raises:
    ValueError: concrete bounds with ``lower > upper`` somewhere, bounds
      that do not broadcast to their leaf or whose tree does not match
      ``x0``, or bad options.
    TypeError: a non-callable ``fun``, non-float ``x0`` leaves, options of
      the wrong type.

  Example:
    >>> import jax, jax.numpy as jnp, posconstr
    >>> A = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    >>> b = jnp.array([1.0, -1.0, 1.0])
    >>> def lsq(x, A, b):
    ...   return 0.5 * jnp.sum((A @ x - b) ** 2)
    >>> result = posconstr.minimize(lsq, jnp.ones(2), lower=0.0, args=(A, b))
    >>> [round(float(v), 4) for v in result.params]
    [0.0, 0.0714]
    >>> result.status == posconstr.Status.CONVERGED
    Array(True, dtype=bool)
    >>> db = jax.grad(lambda b: posconstr.minimize(
    ...     lsq, jnp.ones(2), lower=0.0, args=(A, b)).params[1])(b)
    >>> [round(float(v), 4) for v in db]  # (A_F^T A_F)^-1 A_F^T, F = {1}
    [0.0357, 0.0714, 0.1071]
  """
  if not callable(fun):
    raise TypeError(f"minimize: `fun` must be callable, got {fun!r} of type "
                    f"{type(fun).__name__}.")
  if not isinstance(args, tuple):
    raise TypeError(f"minimize: `args` must be a tuple (of the extra "
                    f"arguments of `fun`), got {type(args).__name__}.")
  check_options("minimize", ints=(
      ("maxiter", maxiter), ("memory_size", memory_size),
      ("max_linesearch_steps", max_linesearch_steps),
      ("stall_iters", stall_iters)), reals=(
          ("tol", tol), ("atol", atol), ("ftol", ftol),
          ("eps_active", eps_active), ("nonmonotone", nonmonotone)))
  if _constraint.is_concrete(nonmonotone) and not nonmonotone <= 1:
    raise ValueError(f"minimize: `nonmonotone` must be in [0, 1], got "
                     f"{nonmonotone!r}.")
  concrete = [(n, v) for n, v in (
      ("maxiter", maxiter), ("max_linesearch_steps", max_linesearch_steps),
      ("stall_iters", stall_iters)) if _constraint.is_concrete(v)]
  smallest = {"maxiter": 0, "max_linesearch_steps": 1, "stall_iters": 1}
  for name, value in concrete:
    if int(value) < smallest[name]:
      raise ValueError(f"minimize: `{name}` must be >= {smallest[name]}, "
                       f"got {value!r}.")
  if not _constraint.is_concrete(memory_size):
    raise TypeError("minimize: `memory_size` sets array shapes and must be "
                    "a Python int, not a traced value.")
  if int(memory_size) < 1:
    raise ValueError(f"minimize: `memory_size` must be >= 1, got "
                     f"{memory_size!r}.")
  x0 = jax.tree.map(jnp.asarray, x0)  # Bounds are rounded in these dtypes.
  require_floating(x0)
  lower, upper = prepare_bounds(x0, lower, upper, "minimize")
  settings = step_lib.Settings(tol, atol, ftol, eps_active,
                               max_linesearch_steps, stall_iters, nonmonotone)
  static = _Static(int(memory_size))
  lay = groups.layout(x0, grouped=bool(group_leaves))
  on_groups = OnGroups(fun, lay)
  try:
    hash(on_groups)
    solve = _solve_jit
  except TypeError:  # An unhashable callable cannot key the cache.
    solve = _solve
  try:
    result = solve(on_groups, static, groups.flatten(x0, lay),
                   groups.flatten_bounds(lower, lay),
                   groups.flatten_bounds(upper, lay), args, settings, maxiter)
  except (TypeError, jax.errors.UnexpectedTracerError) as e:
    if "Tracer" not in str(e):
      raise
    # A value `fun` closes over is being differentiated: the solve cannot
    # see it (closed-over values are constants to it).
    raise TypeError(
        "minimize: `fun` closes over a value that an enclosing jax.grad (or "
        "jvp) differentiates; pass it through `args=` to differentiate the "
        "solution in it: minimize(lambda x, c: ..., x0, args=(c,)).") from e
  return result._replace(params=groups.unflatten(result.params, lay),
                         grad=groups.unflatten(result.grad, lay))
