r"""The math of the ready-made monotone MLP, shared by linen and NNX.

Runje & Shankaranarayana, "Constrained Monotonic Neural Networks", ICML
2023. Given a monotonicity indicator :math:`t_i \in \{-1, 0, 1\}` per input
(decreasing, free, increasing), the first layer's kernel is applied as

.. math::
  W'_{ij} = \begin{cases} g(W_{ij}) & t_i = 1 \\ -g(W_{ij}) & t_i = -1 \\
            W_{ij} & t_i = 0 \end{cases}

(:math:`g = |\cdot|` in the paper; any non-negative parameterization here,
or the weights themselves kept in that sign pattern by a projection), and
every later kernel as :math:`g(W) \ge 0`. Each hidden layer splits its units
in three groups with non-decreasing activations built from one convex,
non-decreasing :math:`\breve\rho` (``relu`` by default):

.. math::
  \breve\rho(x), \qquad \hat\rho(x) = -\breve\rho(-x), \qquad
  \tilde\rho(x) = \begin{cases} \breve\rho(x + 1) - \breve\rho(1) & x \le 0
  \\ \breve\rho(1) - \breve\rho(1 - x) & x > 0 \end{cases}

(convex, concave, saturated), in proportions ``activation_weights`` (the
paper's code uses 7 : 7 : 2). Compositions of non-decreasing maps with
non-negative weights are non-decreasing, so the output is non-decreasing in
the inputs with :math:`t_i = 1` and non-increasing in those with
:math:`t_i = -1`; the mix lets it be neither convex nor concave. The output
layer is linear. Parameters are named ``dense_0 .. dense_L`` (kernel, bias).
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, NamedTuple, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from posconstr.layers import _layer_args
from posconstr.sets import _intervals

Indicator = Union[int, Tuple[int, ...]]
Initializer = Callable[..., jax.Array]


def check_monotonicity(monotonicity, owner: str) -> Indicator:
  """One of -1, 0, 1 (every input), or a sequence of them (one per input)."""
  if isinstance(monotonicity, np.ndarray) and monotonicity.ndim == 1:
    monotonicity = monotonicity.tolist()
  scalar = isinstance(monotonicity, (numbers.Real, np.number))
  if not scalar and (isinstance(monotonicity, (str, bytes))
                     or not isinstance(monotonicity, Sequence)):
    raise TypeError(f"{owner}: `monotonicity` must be -1, 0, 1 or a flat "
                    f"sequence of them (one per input), got {monotonicity!r}.")
  values = [monotonicity] if scalar else list(monotonicity)
  if not values:
    raise ValueError(f"{owner}: `monotonicity` must not be empty; give one "
                     "of -1, 0, 1 per input feature.")
  for i, t in enumerate(values):
    if (isinstance(t, (bool, np.bool_))
        or not isinstance(t, (numbers.Real, np.number)) or t not in (-1, 0, 1)):
      where = "" if scalar else f"[{i}]"
      raise ValueError(
          f"{owner}: `monotonicity{where}` must be 1 (increasing), -1 "
          f"(decreasing) or 0 (free), got {t!r}.")
  signs = tuple(int(float(t)) for t in values)
  return signs[0] if scalar else signs


class Normalized(NamedTuple):
  """The constructor arguments that :func:`check_args` normalizes."""

  features: Tuple[int, ...]
  monotonicity: Indicator
  activation_weights: Tuple[float, float, float]


def check_args(features, monotonicity, positivity, activation,
               activation_weights, owner: str) -> Normalized:
  """Validates the constructor arguments; returns the normalized fields."""
  normalized = Normalized(
      _layer_args.check_features(features, owner),
      check_monotonicity(monotonicity, owner),
      check_activation_weights(activation_weights, owner))
  _layer_args.check_positivity(positivity, owner)
  _layer_args.check_activation(
      activation, owner, "the three activations of a monotone MLP are "
      "non-decreasing only when it is convex and non-decreasing.")
  return normalized


def expand(monotonicity: Indicator, in_features: int, owner: str
           ) -> Tuple[int, ...]:
  """The indicator as one sign per input; raises on a length mismatch."""
  if isinstance(monotonicity, int):
    return (monotonicity,) * in_features
  if len(monotonicity) != in_features:
    raise ValueError(
        f"{owner}: `monotonicity` has {len(monotonicity)} entries but the "
        f"input has {in_features} features; give one of -1, 0, 1 per input "
        "feature (or a single int for all of them).")
  return tuple(monotonicity)


def check_activation_weights(weights, owner: str
                             ) -> Tuple[float, float, float]:
  """Three non-negative proportions (convex, concave, saturated), sum > 0."""
  try:
    values = tuple(float(w) for w in weights)
  except (TypeError, ValueError):
    values = ()
  if (len(values) != 3 or not all(np.isfinite(values))
      or min(values) < 0 or sum(values) <= 0):
    raise ValueError(
        f"{owner}: `activation_weights` must be three non-negative numbers "
        "(convex, concave, saturated units) with a positive sum, such as "
        f"(7, 7, 2), got {weights!r}.")
  return values


def activation_sizes(units: int, weights: Sequence[float]
                     ) -> Tuple[int, int, int]:
  """Units per group (convex, concave, saturated), rounded, summing to units."""
  total = float(sum(weights))
  convex = int(round(units * weights[0] / total))
  concave = min(int(round(units * weights[1] / total)), units - convex)
  return convex, concave, units - convex - concave


def concave(activation: Callable) -> Callable:
  """:math:`\\hat\\rho(x) = -\\breve\\rho(-x)`."""
  return lambda x: -activation(-x)


def saturated(activation: Callable) -> Callable:
  """:math:`\\tilde\\rho`: bounded, non-decreasing, 0 at 0 (relu: ±1 clip)."""

  def rho(x):
    one = activation(jnp.ones_like(x))
    return jnp.where(x <= 0, activation(x + 1) - one, one - activation(1 - x))

  return rho


def mixed_activation(h: jax.Array, activation: Callable,
                     weights: Sequence[float]) -> jax.Array:
  """The three activations on consecutive groups of the last axis of ``h``."""
  a, b, _ = activation_sizes(h.shape[-1], weights)
  return jnp.concatenate([activation(h[..., :a]),
                          concave(activation)(h[..., a:a + b]),
                          saturated(activation)(h[..., a + b:])], axis=-1)


def first_layer_constraint(signs: Indicator):
  """The set of a projected first kernel, or None when every input is free."""
  if isinstance(signs, int):
    return {1: _intervals.NonNegative(), -1: _intervals.Box(None, 0.0),
            0: None}[signs]
  if all(t == 0 for t in signs):
    return None
  if all(t == 1 for t in signs):
    return _intervals.NonNegative()
  t = np.asarray(signs)[:, None]
  return _intervals.Box(np.where(t > 0, 0.0, -np.inf),
                        np.where(t < 0, 0.0, np.inf))


def constraint_rules(num_layers: int, signs: Indicator, path: str = ""
                     ) -> Dict[str, object]:
  """``{kernel path: set}`` of every sign-constrained kernel."""
  rules = {}
  first = first_layer_constraint(signs)
  if first is not None:
    rules[_layer_args.joined(path, "dense_0", "kernel")] = first
  for k in range(1, num_layers):
    rules[_layer_args.joined(path, f"dense_{k}", "kernel")] = (
        _intervals.NonNegative())
  return rules
