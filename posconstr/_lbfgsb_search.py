"""The line search of bounded L-BFGS: backtracking along the projected path.

Every trial point is ``P(x + a d)``, inside the bounds bit for bit, so the
function is never evaluated outside them. The acceptance test is Armijo's,
optionally non-monotone, with a fallback for when f has run out of digits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from posconstr import _lbfgsb_core as core


class SearchResult(NamedTuple):
  x: Any
  value: jax.Array
  grad: Any
  accepted: jax.Array
  num_evals: jax.Array


# Precision of f, in ulps of |f|: a decrease smaller than this is noise.
NOISE_ULPS = 16


def noise_level(value) -> jax.Array:
  """``NOISE_ULPS * eps * |f|``: changes of f below this are rounding."""
  return NOISE_ULPS * jnp.finfo(value.dtype).eps * jnp.abs(value)


def projected_backtracking(value_and_grad, x, value, g, d, lower, upper, *,
                           max_steps: int = 20, c1: float = 1e-4,
                           initial_step=1.0, reference=None) -> SearchResult:
  """Backtracking along ``P(x + a d)``; trial points stay in bounds.

  With ``s = x(a) - x``, accepts the Armijo test ``f(x(a)) <= f_ref + c1
  <g, s>``, ``f_ref = max(f(x), reference)`` (``reference`` None: ``f(x)``;
  the largest of the last few values makes it the non-monotone test of
  Grippo, Lampariello & Lucidi, SIAM J. Numer. Anal. 23(4), 1986), or,
  once that test is below f's precision, its noise-floor version (the
  approximate Wolfe test of Hager & Zhang, SIAM J. Optim.
  16(1), 2005): the predicted decrease ``-<g, s>`` is under ``100 noise``,
  ``f(x(a)) <= f(x) + noise`` (``noise = NOISE_ULPS eps |f(x)|``) and the
  slope at the trial is still at most ``0.8 |<g, s>|`` (``<g(x(a)), s> <=
  -0.8 <g, s>``), so the step did not overshoot. The gradient stays
  informative where f has no digits left. Backtracks by safeguarded
  quadratic interpolation within ``[0.1 a, 0.5 a]``.

  ``16 eps |f|`` understates f's rounding where f is a small remainder of
  large terms (a least-squares residual near a good fit). A trial whose
  predicted change ``|<g, s>|`` is under the noise, yet moved f by more,
  has measured that rounding: the noise is raised to it for the rest of
  the search, so backtracking does not go on drawing lots on f's last bits.
  """
  # Scalars in one dtype: that of the value or the widest leaf.
  dtype = jnp.result_type(value, *jax.tree.leaves(x))
  value = jnp.asarray(value)
  f0 = value.astype(dtype)
  noise = noise_level(value).astype(dtype)
  f_ref = f0 if reference is None else jnp.maximum(
      f0, jnp.asarray(reference).astype(dtype))

  def trial(step, noise):
    xt = core.clip(core.tree_axpy(step, d, x), lower, upper)
    ft, gt = value_and_grad(xt)
    s = jax.tree.map(jnp.subtract, xt, x)
    decrease = core.tree_vdot(g, s).astype(dtype)
    f = ft.astype(dtype)
    armijo = f <= f_ref + c1 * decrease
    floor = ((-decrease <= 100 * noise) & (f <= f0 + noise)
             & (core.tree_vdot(gt, s).astype(dtype) <= -0.8 * decrease))
    ok = jnp.isfinite(f) & (decrease < 0) & (armijo | floor)
    return xt, ft, gt, decrease, ok

  def measured(noise, ft, dec):
    # The change of f where the model predicts none is rounding.
    change = jnp.abs(ft.astype(dtype) - f0)
    return jnp.where((-dec <= noise) & jnp.isfinite(change),
                     jnp.maximum(noise, change), noise)

  def cond(carry):
    _, _, _, _, ok, n, (_, dec, _) = carry
    # Stop when accepted, out of steps, or the path no longer descends
    # (the step became too small to move any coordinate).
    return (~ok) & (n < max_steps) & (dec < 0)

  def body(carry):
    step, _, _, _, _, n, last = carry
    f_last, dec_last, noise = last
    # Quadratic model through f(0), its slope ~ dec/step, and f(step).
    slope = dec_last / step
    curvature = f_last.astype(dtype) - f0 - slope * step
    fit = jnp.where(curvature > 0, -slope * step**2 / (2 * curvature),
                    0.5 * step)
    fit = jnp.where(jnp.isfinite(fit), fit, 0.5 * step)
    step = jnp.clip(fit, 0.1 * step, 0.5 * step)
    xt, ft, gt, dec, ok = trial(step, noise)
    return step, xt, ft, gt, ok, n + 1, (ft, dec, measured(noise, ft, dec))

  step0 = jnp.asarray(initial_step, dtype)
  xt, ft, gt, dec, ok = trial(step0, noise)
  carry = (step0, xt, ft, gt, ok, jnp.ones((), jnp.int32),
           (ft, dec, measured(noise, ft, dec)))
  _, xt, ft, gt, ok, n, _ = jax.lax.while_loop(cond, body, carry)
  return SearchResult(xt, ft, gt, ok, n)
