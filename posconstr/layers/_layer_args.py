"""Argument checks shared by the ready-made layers (ICNN, monotone MLP).

Each check raises at construction, naming the layer, the argument, the
value and what is allowed.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from posconstr import _adapters
from posconstr.reparam import _parameterizations
from posconstr.reparam import _reparam
from posconstr.sets import _constraint

# ``positivity=PROJECT``: the layer stores the constrained weights themselves
# and the optimizer keeps them in their set (``layer.projection()``).
PROJECT = "project"

Positivity = Union[str, _parameterizations.Parameterization]


def _is_width(width) -> bool:
  return (not isinstance(width, bool) and isinstance(width, numbers.Integral)
          and int(width) >= 1)


def check_width(width, name: str, owner: str) -> int:
  """``width`` as a positive int (``name``: the argument, for the error)."""
  if not _is_width(width):
    raise ValueError(f"{owner}: `{name}` must be a positive int, got "
                     f"{width!r}.")
  return int(width)


def check_features(features, owner: str) -> Tuple[int, ...]:
  """``features`` as a tuple of positive ints (at least one)."""
  if isinstance(features, (str, bytes)) or not isinstance(features, Sequence):
    raise TypeError(f"{owner}: `features` must be a sequence of layer widths "
                    f"such as (64, 64, 1), got {features!r}.")
  widths = tuple(features)
  if not widths:
    raise ValueError(f"{owner}: `features` must name at least one layer, "
                     "got an empty sequence.")
  for i, width in enumerate(widths):
    if not _is_width(width):
      raise ValueError(f"{owner}: `features[{i}]` must be a positive int, got "
                       f"{width!r} (features={features!r}).")
  return tuple(int(w) for w in widths)


def check_positivity(positivity, owner: str) -> Positivity:
  """``"project"`` or a parameterization whose range is non-negative."""
  if isinstance(positivity, str):
    if positivity != PROJECT:
      raise ValueError(
          f"{owner}: `positivity` must be {PROJECT!r} or a parameterization "
          f"such as posconstr.Softplus(), got {positivity!r}.")
    return positivity
  _reparam.check_parameterization_arg(positivity, "positivity", owner)
  lower = getattr(positivity.constraint, "lower", None)
  concrete = lower is not None and _constraint.is_concrete(lower)
  if not concrete or float(np.min(np.asarray(lower))) < 0:
    raise ValueError(
        f"{owner}: `positivity`={positivity!r} must map latents to "
        f"non-negative weights, but its range is {positivity.constraint!r}. "
        "Use Softplus(), Exp(), Square(), Abs(), ReLU() or Sigmoid(0, u).")
  return positivity


def check_projected(positivity, owner: str) -> None:
  """Raises unless the layer keeps its weights themselves (``"project"``)."""
  if not isinstance(positivity, str):
    raise ValueError(
        f"{owner}: `positivity` is {positivity!r}: the params hold latents "
        "and every value of them is feasible, so there is nothing to "
        f"project. Use positivity={PROJECT!r} to store the weights "
        "themselves and project them.")


def check_bool(name: str, value, owner: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{owner}: `{name}` must be a bool, got {value!r}.")
  return bool(value)


def check_path(path, owner: str) -> str:
  """The path of the layer's params in the optimizer's tree ('' for the top)."""
  if not isinstance(path, str):
    raise TypeError(f"{owner}: `path` must be a str such as '' (the layer is "
                    f"the whole model), 'ICNN_0' or '*', got {path!r}.")
  return path.rstrip("/")


def joined(path: str, *names: str) -> str:
  """``path/name/...``, or ``name/...`` for the top level (``path=''``)."""
  return "/".join(([path] if path else []) + list(names))


# The grid on which an activation is checked to be convex and non-decreasing.
_GRID = np.linspace(-8.0, 8.0, 801)


@functools.lru_cache(maxsize=128)
def _shape_of(activation: Callable) -> Tuple[bool, bool, bool]:
  """(finite, non-decreasing, convex) of ``activation`` on ``_GRID``."""
  with jax.ensure_compile_time_eval():
    y = np.asarray(activation(jnp.asarray(_GRID, jnp.float32)), np.float64)
  if y.shape != _GRID.shape or not np.all(np.isfinite(y)):
    return False, False, False
  # Tolerance: float32 rounding of values up to max|y| (a few ulps).
  tol = 1e-5 * (1.0 + np.max(np.abs(y)))
  first = np.diff(y)
  second = y[2:] - 2 * y[1:-1] + y[:-2]
  return True, bool(first.min() >= -tol), bool(second.min() >= -tol)


def check_activation(activation, owner: str, role: str) -> Callable:
  """An elementwise callable, checked convex and non-decreasing on [-8, 8].

  ``role`` says why it must be (it ends the error message).
  """
  if not callable(activation):
    raise TypeError(f"{owner}: `activation` must be a callable such as "
                    f"jax.nn.relu, got {activation!r}.")
  try:
    finite, increasing, convex = _shape_of(activation)
  except TypeError:  # An unhashable callable: check it without the cache.
    finite, increasing, convex = _shape_of.__wrapped__(activation)
  name = getattr(activation, "__name__", repr(activation))
  if not finite:
    raise ValueError(f"{owner}: `activation` {name} must map an array to a "
                     "finite array of the same shape (checked on [-8, 8]).")
  if not (increasing and convex):
    what = " and ".join(w for w, ok in (("non-decreasing", increasing),
                                        ("convex", convex)) if not ok)
    raise ValueError(f"{owner}: `activation` {name} is not {what} on [-8, 8]; "
                     f"{role} Use jax.nn.relu, jax.nn.elu, jax.nn.softplus or "
                     "jax.nn.leaky_relu.")
  return activation


def forward(positivity: Positivity, kernel: Any):
  """The applied kernel: ``g(latent)``, or the kernel itself when projected."""
  if isinstance(positivity, str):
    return kernel
  return _adapters.forward(positivity, kernel)
