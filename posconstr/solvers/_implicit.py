r"""Derivatives of a bound-constrained minimizer (implicit function theorem).

For :math:`x^\star(\theta) = \arg\min_{l \le x \le u} f(x, \theta)` the
optimality condition is the fixed point :math:`x = P(x - \nabla_x f(x,
\theta))`. Split the coordinates into the *active* set :math:`A` (those on
a bound, :math:`x_i = l_i` or :math:`x_i = u_i`) and the *free* set
:math:`F` (strictly inside). Where the active set does not change under a
small perturbation (strict complementarity), active coordinates follow their
bound, :math:`dx_A = dl_A` or :math:`du_A`, and the free ones keep the
gradient at zero, :math:`\nabla_F f(x, \theta) = 0`, so

.. math::

  H_{FF}\, dx_F = -\big(\partial_\theta \nabla_F f\; d\theta
                       + H_{FA}\, dx_A\big),

with :math:`H` the Hessian of :math:`f` in :math:`x`. The system is solved by
conjugate gradients on Hessian-vector products restricted to :math:`F`
(never a dense Hessian), inside ``jax.lax.custom_linear_solve`` so that the
tangent can be transposed: reverse mode (``jax.grad``, ``jax.vjp``) solves the
same symmetric system with the cotangent. This is the reduced-space implicit
differentiation of Blondel et al., "Efficient and modular implicit
differentiation", NeurIPS 2022, restricted to the free variables as in
Amos & Kolter, "OptNet", ICML 2017.

Degenerate points (a coordinate on its bound with zero gradient, where the
active set may change) have no derivative; the one given is the one-sided
derivative in which the coordinate stays on its bound. It is always finite:
where the reduced Hessian is singular (no curvature along a free
direction), conjugate gradients stop at the last finite iterate.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from posconstr.solvers import _lbfgsb_core as core


def free_mask(x, lower, upper, grad=None):
  """The free coordinates: strictly inside their bounds, and, given the
  gradient, not held by a bound (:func:`active_masks`)."""
  if grad is None:
    return jax.tree.map(lambda xi, lo, hi: (xi > lo) & (xi < hi),
                        x, lower, upper)
  at_lower, at_upper = active_masks(x, grad, lower, upper)
  return jax.tree.map(lambda a, b: ~a & ~b, at_lower, at_upper)


def active_masks(x, g, lower, upper):
  """Where a solution is held on a bound.

  A coordinate is at its lower bound where ``x <= lo``, whatever ``g``, or
  where ``g > 0`` pushes it out and it lies within a few ulps of ``lo``
  (a solution that rounding left just short of its bound); likewise at its
  upper bound. The width is in units of ``x`` alone: a test against the
  gradient (``x - lo <= g``, the fixed point of ``P(x - g)``) would mix
  units, and hold free coordinates of badly scaled problems, whose
  gradient rounding dwarfs them. Returns two boolean trees like ``x``.
  """
  def near(xi, bound):  # 0 for an infinite bound (never near)
    finfo = jnp.finfo(xi.dtype)
    size = jnp.maximum(jnp.maximum(jnp.abs(xi), jnp.abs(bound)), finfo.tiny)
    return jnp.where(jnp.isfinite(bound), 8 * finfo.eps * size, -jnp.inf)

  at_lower = jax.tree.map(
      lambda xi, gi, lo: (xi <= lo) | ((gi > 0) & (xi - lo <= near(xi, lo))),
      x, g, lower)
  at_upper = jax.tree.map(
      lambda xi, gi, hi, a: ~a & ((xi >= hi) | (
          (gi < 0) & (hi - xi <= near(xi, hi)))),
      x, g, upper, at_lower)
  return at_lower, at_upper


def _default_tol(x) -> float:
  dtype = jnp.result_type(*jax.tree.leaves(x), jnp.float16)
  return float(jnp.finfo(dtype).eps) ** 0.7


def conjugate_gradient(matvec: Callable, b, *, tol: Optional[float] = None,
                       maxiter: Optional[int] = None):
  """Solves ``matvec(v) = b`` for a symmetric positive (semi)definite map.

  Each leaf keeps its dtype (scalars in the widest one), so mixed-precision
  trees work; stops at ``||r|| <= tol ||b||`` or after ``maxiter``
  iterations (default: the number of unknowns), and stops early, with a
  finite answer, where the curvature ``p^T A p`` is not positive (a singular
  or indefinite system).
  """
  size = sum(leaf.size for leaf in jax.tree.leaves(b))
  maxiter = size if maxiter is None else maxiter
  tol = _default_tol(b) if tol is None else tol
  bb = core.tree_vdot(b, b)
  limit = (tol ** 2) * bb

  def cond(c):
    _, r, _, rr, k, stop = c
    return (k < maxiter) & (rr > limit) & ~stop

  def body(c):
    v, r, p, rr, k, _ = c
    ap = matvec(p)
    pap = core.tree_vdot(p, ap)
    stop = ~(pap > 0) | ~jnp.isfinite(pap)
    alpha = jnp.where(stop, 0, rr / jnp.where(stop, 1, pap))
    v = core.tree_axpy(alpha, p, v)
    r = core.tree_axpy(-alpha, ap, r)
    rr_new = core.tree_vdot(r, r)
    beta = jnp.where(stop, 0, rr_new / jnp.where(rr > 0, rr, 1))
    p = jax.tree.map(lambda ri, pi: ri + (beta * pi).astype(ri.dtype), r, p)
    return v, r, p, jnp.where(stop, rr, rr_new), k + 1, stop

  zeros = jax.tree.map(jnp.zeros_like, b)
  init = (zeros, b, b, bb, jnp.zeros((), jnp.int32), jnp.zeros((), bool))
  return jax.lax.while_loop(cond, body, init)[0]


def solution_tangent(grad_fn: Callable, x, lower, upper, args: tuple,
                     dlower, dupper, dargs: tuple, *, grad=None,
                     solve: Optional[Callable] = None):
  r"""The tangent :math:`dx` of :math:`x^\star(l, u, \theta)` (module doc).

  Args:
    grad_fn: ``grad_fn(x, *args)``, the gradient of ``f`` in ``x`` (a tree
      like ``x``).
    x: the solution.
    lower, upper: trees like ``x`` of bounds (leaves broadcastable to the
      leaf of ``x``, ``-inf``/``inf`` where unbounded).
    args: the primal extra arguments of ``grad_fn``.
    dlower, dupper: tangents of the bounds (None: zero).
    dargs: tangents of ``args`` (float0 zeros for non-float leaves).
    grad: ``grad_fn(x, *args)`` if the caller has it (else computed), to
      tell the active coordinates (:func:`active_masks`).
    solve: ``solve(matvec, b)`` for the reduced system (``H_FF`` on the free
      set, the identity on the active one), as in
      ``jax.lax.custom_linear_solve``; default :func:`conjugate_gradient`.

  Returns:
    ``dx``, a tree like ``x``: the bound's tangent on the active set, the
    solution of the reduced system on the free set.
  """
  if grad is None:
    grad = grad_fn(x, *args)
  at_lower, at_upper = active_masks(x, grad, lower, upper)
  free = jax.tree.map(lambda a, b: ~a & ~b, at_lower, at_upper)
  if dlower is None:
    dlower = jax.tree.map(jnp.zeros_like, lower)
  if dupper is None:
    dupper = jax.tree.map(jnp.zeros_like, upper)

  def follow(xi, dlo, dhi, lo_on, hi_on):
    zero = jnp.zeros(xi.shape, xi.dtype)
    dlo = jnp.broadcast_to(dlo, xi.shape).astype(xi.dtype)
    dhi = jnp.broadcast_to(dhi, xi.shape).astype(xi.dtype)
    return jnp.where(lo_on, dlo, jnp.where(hi_on, dhi, zero))

  dx_active = jax.tree.map(follow, x, dlower, dupper, at_lower, at_upper)

  def at(z, a):
    return grad_fn(z, *a)

  _, mixed = jax.jvp(at, (x, tuple(args)), (dx_active, tuple(dargs)))
  rhs = jax.tree.map(lambda r, f: jnp.where(f, -r, jnp.zeros((), r.dtype)),
                     mixed, free)

  def matvec(v):
    v_free = jax.tree.map(
        lambda vi, f: jnp.where(f, vi, jnp.zeros((), vi.dtype)), v, free)
    hv = jax.jvp(lambda z: grad_fn(z, *args), (x,), (v_free,))[1]
    return jax.tree.map(lambda h, vi, f: jnp.where(f, h.astype(vi.dtype), vi),
                        hv, v, free)

  if solve is None:
    solve = lambda mv, b: conjugate_gradient(mv, b)  # noqa: E731
  dx_free = jax.lax.custom_linear_solve(matvec, rhs, solve, symmetric=True)
  return jax.tree.map(lambda f, a, b: jnp.where(f, a, b), free, dx_free,
                      dx_active)
