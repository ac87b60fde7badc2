"""The line search of bounded L-BFGS: along the projected path ``P(x + a d)``.

Every trial point is ``P(x + a d)``, inside the bounds bit for bit, so the
function is never evaluated outside them. The acceptance test is Armijo's,
optionally non-monotone, with a fallback for when f has run out of digits.
A first step that is accepted but far too short (the slope has hardly
changed) is extrapolated, up to the last breakpoint of the path.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from posconstr.solvers import _lbfgsb_core as core


class SearchResult(NamedTuple):
  x: Any
  value: jax.Array
  grad: Any
  accepted: jax.Array
  num_evals: jax.Array


# Precision of f, in ulps of |f|: a decrease smaller than this is noise.
NOISE_ULPS = 16
# Extrapolate while the slope at the trial is below CURVATURE x the slope
# at 0 (the weak Wolfe curvature test fails), by a factor in [2, 10].
CURVATURE = 0.9
# A bracket narrower than this, relative to the step, is not refined
# further (as the ``xtol`` of Moré & Thuente's search in SciPy).
XTOL = 0.1
MIN_GROWTH, MAX_GROWTH = 2.0, 100.0


def noise_level(value) -> jax.Array:
  """``NOISE_ULPS * eps * |f|``: changes of f below this are rounding."""
  return NOISE_ULPS * jnp.finfo(value.dtype).eps * jnp.abs(value)


def last_breakpoint(x, d, lower, upper) -> jax.Array:
  """The step beyond which ``P(x + a d)`` no longer moves (inf if never)."""
  def leaf(xi, di, lo, hi):
    t = jnp.where(di > 0, (hi - xi) / jnp.where(di > 0, di, 1),
                  jnp.where(di < 0, (lo - xi) / jnp.where(di < 0, di, 1), 0))
    return jnp.max(t.astype(jnp.float32 if t.dtype.itemsize < 4 else t.dtype),
                   initial=0)
  parts = [leaf(*a) for a in zip(*(jax.tree.leaves(t) for t in
                                   (x, d, lower, upper)))]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return jnp.max(jnp.stack([p.astype(dtype) for p in parts]))


def _interpolate(a, fa, da, b, fb, db, noise):
  """A trial inside ``[a, b]``: the minimizer of the cubic through two
  points and slopes (Nocedal & Wright eq. 3.59); where the two values
  differ by no more than f's rounding, the zero of the secant of the
  slopes (the values carry no information there); the midpoint where
  neither exists. Kept 10% inside the interval."""
  d1 = da + db - 3 * (fa - fb) / (a - b)
  disc = d1 * d1 - da * db
  d2 = jnp.sign(b - a) * jnp.sqrt(jnp.maximum(disc, 0))
  cubic = b - (b - a) * (db + d2 - d1) / (db - da + 2 * d2)
  cubic = jnp.where(disc >= 0, cubic, jnp.nan)
  secant = a - da * (b - a) / (db - da)
  t = jnp.where(jnp.abs(fa - fb) <= noise, secant, cubic)
  t = jnp.where(jnp.isfinite(t), t, 0.5 * (a + b))
  low, high = jnp.minimum(a, b), jnp.maximum(a, b)
  margin = 0.1 * (high - low)
  return jnp.clip(t, low + margin, high - margin)


class _End(NamedTuple):
  """One end of the bracket: step, value and path slope there."""

  t: jax.Array
  f: jax.Array
  slope: jax.Array


def path_slope(g, d, x, lower, upper) -> jax.Array:
  """The slope of ``a -> f(P(x + a d))`` just past the point ``x`` of the
  path: ``<g, d>`` over the coordinates that still move (not on the bound
  ``d`` points at). NaN where ``g`` has a NaN, even where ``d`` is masked;
  an infinite ``g`` where nothing moves counts 0."""
  def leaf(gi, di, xi, lo, hi):
    moving = ((di > 0) & (xi < hi)) | ((di < 0) & (xi > lo))
    zero = jnp.zeros((), jnp.result_type(gi, di))
    return jnp.sum(jnp.where(moving, gi * di,
                             jnp.where(jnp.isnan(gi), gi.astype(zero.dtype),
                                       zero)))
  parts = [leaf(*a) for a in zip(*(jax.tree.leaves(t) for t in
                                   (g, d, x, lower, upper)))]
  if not parts:
    return jnp.zeros(())
  dtype = jnp.result_type(*parts)
  return functools.reduce(jnp.add, [p.astype(dtype) for p in parts])


def projected_search(value_and_grad, x, value, g, d, lower, upper, *,
                     max_steps=20, c1: float = 1e-4, c2: float = 0.9,
                     c3: float = 1.5, initial_step=1.0, reference=None,
                     slope0=None,
                     first_to_vertex: ArrayLike = False) -> SearchResult:
  """A Wolfe line search along the projected path ``P(x + a d)``.

  ``phi(a) = f(P(x + a d))`` is searched for a step that satisfies the
  Armijo test ``phi(a) <= f_ref + c1 <g, s>`` (``s = P(x + a d) - x``;
  ``f_ref = max(f(x), reference)``, the largest of the last few values
  for the non-monotone test of Grippo, Lampariello & Lucidi, SIAM J.
  Numer. Anal. 23(4), 1986) and the curvature test ``c2 phi'(0) <=
  phi'(a) <= c3 |phi'(0)|``, ``phi'`` the slope along the coordinates
  still moving at ``a``: the weak Wolfe test, with overshooting bounded
  (``c3 = c2`` is the strong Wolfe test; ``c3 = 1.5`` lets a quasi-Newton
  step that overshoots the minimum along the path a little through at one
  evaluation, which spares a second one under ``vmap`` where every lane
  pays for the slowest). The bracketing and zoom of Nocedal & Wright,
  Algorithms 3.5 and 3.6 (after Moré & Thuente, ACM TOMS 20(3), 1994),
  with safeguarded cubic interpolation, and extrapolation by a secant on
  the slopes (2 to 100 times, or straight to the last breakpoint of the
  path when no curvature is seen, so a linear objective reaches its vertex
  at once).
  A bracket narrowed to ``XTOL`` of the step, or the steps running out,
  end the search at the best point that passed the Armijo test.

  With ``first_to_vertex`` (no curvature pairs yet, so the step length is
  a guess) the first trial is the end of the path, where every coordinate
  that moves has reached its bound, if that end is finite: on a box, the
  corner SciPy's first generalized Cauchy point lands on.

  Where the Armijo test asks for less than f's precision, a step is
  accepted on the gradient's evidence instead (the approximate Wolfe test
  of Hager & Zhang, SIAM J. Optim. 16(1), 2005): the predicted decrease
  ``-<g, s>`` is under ``100 noise``, ``f(x(a)) <= f(x) + noise`` (``noise
  = NOISE_ULPS eps |f(x)|``) and ``a phi'(a) <= -0.8 <g, s>``.
  ``16 eps |f|`` understates f's rounding where f is a small remainder of
  large terms: a trial whose predicted change is under the noise, yet moved
  f by more, has measured that rounding, and the noise is raised to it.

  ``slope0``, ``phi'(0)``, if the caller has it (:func:`path_slope`). A
  trial whose value is not finite or whose gradient has a NaN is treated as
  too long; with an infinite slope (an infinite gradient
  component) any decrease of f is accepted. Every trial point is inside
  the bounds bit for bit.
  """
  # Scalars in one dtype: that of the value or the widest leaf.
  dtype = jnp.result_type(value, *jax.tree.leaves(x))
  value = jnp.asarray(value)
  f0 = value.astype(dtype)
  noise0 = noise_level(value).astype(dtype)
  f_ref = f0 if reference is None else jnp.maximum(
      f0, jnp.asarray(reference).astype(dtype))

  if slope0 is None:
    slope0 = path_slope(g, d, x, lower, upper)
  slope0 = jnp.asarray(slope0).astype(dtype)
  t_max = last_breakpoint(x, d, lower, upper).astype(dtype)

  def trial(t, noise):
    xt = core.clip(core.tree_axpy(t, d, x), lower, upper)
    # At the end of the path every moving coordinate is on its bound:
    # exactly, though x + t d may round to an ulp short of it.
    xt = jax.tree.map(
        lambda xi, di, lo, hi: jnp.where(
            t >= t_max, jnp.where(di > 0, hi,
                                  jnp.where(di < 0, lo, xi)), xi).astype(
                                      xi.dtype), xt, d, lower, upper)
    ft, gt = value_and_grad(xt)
    s = jax.tree.map(jnp.subtract, xt, x)
    decrease = core.slope(g, s).astype(dtype)
    f = ft.astype(dtype)
    # NaN if gt has a NaN anywhere: such a trial is not usable.
    slope_t = path_slope(gt, d, xt, lower, upper).astype(dtype)
    usable = jnp.isfinite(f) & ~jnp.isnan(slope_t) & (decrease < 0)
    floor = ((-decrease <= 100 * noise) & (f <= f0 + noise)
             & (t * slope_t <= -0.8 * decrease))
    steep = (decrease == -jnp.inf) & (f < f0)
    armijo = usable & (f <= f_ref + c1 * decrease)
    # The change of f where the model predicts none is rounding.
    change = jnp.abs(f - f0)
    noise = jnp.where((-decrease <= noise) & jnp.isfinite(change),
                      jnp.maximum(noise, change), noise)
    return (xt, ft, gt), f, slope_t, armijo, usable & (floor | steep), \
        decrease, noise

  class Carry(NamedTuple):
    lo: _End  # the best step that passed Armijo (t = 0: none yet)
    hi: _End  # the other end of the bracket (t = inf: not bracketed)
    prev: _End  # lo before the last trial, for the extrapolation's secant
    best: Any  # (x, f, g) at lo
    n: jax.Array
    done: jax.Array
    accepted: jax.Array
    noise: jax.Array
    moves: jax.Array  # the path still descends

  def cond(c: Carry):
    return ~c.done & (c.n < max_steps) & c.moves

  def update(c: Carry, t) -> Carry:
    """Evaluates the trial ``t`` and updates the bracket."""
    point, f, slope_t, armijo, fallback, decrease, noise = trial(t, c.noise)
    here = _End(t, f, slope_t)
    too_long = ~armijo | ((c.lo.t > 0) & (f >= c.lo.f))
    curvature = (slope_t >= c2 * slope0) & (slope_t <= -c3 * slope0)
    accept = fallback | (~too_long & curvature)
    # Past a minimum along the path: the bracket is [t, previous lo].
    turn = ~too_long & ~curvature & (slope_t * (c.hi.t - t) >= 0)
    lo = jax.tree.map(lambda a, b: jnp.where(~too_long, a, b), here, c.lo)
    hi = jax.tree.map(
        lambda a, b, e: jnp.where(too_long, a, jnp.where(turn, b, e)),
        here, c.lo, c.hi)
    best = core.tree_where(~too_long | accept, point, c.best)
    bracketed = jnp.isfinite(hi.t)
    # At the end of the path an Armijo point cannot be improved on; nor,
    # in practice, inside a bracket narrowed to XTOL of the step.
    accept |= ~bracketed & ~too_long & (t >= t_max)
    accept |= (bracketed & (lo.t > 0)
               & (jnp.abs(hi.t - lo.t) <= XTOL * jnp.maximum(lo.t, hi.t)))
    return Carry(lo, hi, c.lo, best, c.n + 1, accept, accept | (lo.t > 0),
                 noise, decrease < 0)

  def next_trial(c: Carry):
    """Inside a bracket, interpolate; else extrapolate from ``lo``."""
    inside = _interpolate(c.lo.t, c.lo.f, c.lo.slope, c.hi.t, c.hi.f,
                          c.hi.slope, c.noise)
    t, slope_t, prev = c.lo.t, c.lo.slope, c.prev
    secant = jnp.where(slope_t > prev.slope,
                       t + (t - prev.t) * slope_t / (prev.slope - slope_t),
                       jnp.inf)
    grown = jnp.clip(secant, MIN_GROWTH * t, MAX_GROWTH * t)
    grown = jnp.where((slope_t <= prev.slope) & jnp.isfinite(t_max), t_max,
                      grown)
    return jnp.where(jnp.isfinite(c.hi.t), inside, jnp.minimum(grown, t_max))

  first = jnp.where(first_to_vertex & jnp.isfinite(t_max) & (t_max > 0),
                    t_max, jnp.asarray(initial_step, dtype))
  origin = _End(jnp.zeros((), dtype), f0, slope0)
  # ``moves`` starts True: the first trial is always evaluated, even where
  # ``slope0`` says the path does not descend (it decides from the trial).
  start = Carry(origin, _End(jnp.full((), jnp.inf, dtype), f0, slope0),
                origin, (x, value, g), jnp.zeros((), jnp.int32),
                jnp.zeros((), bool), jnp.zeros((), bool), noise0,
                jnp.ones((), bool))
  # The first trial inside the loop too: f is then inlined at one place in
  # the program, not two (its compile time grows with f's leaves).
  c = jax.lax.while_loop(
      cond, lambda c: update(c, jnp.where(c.n == 0, first, next_trial(c))),
      start)
  xt, ft, gt = c.best
  return SearchResult(xt, ft, gt, c.accepted, c.n)
