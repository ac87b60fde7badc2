"""The probability simplex, scaled, taken slice by slice along an axis."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from posconstr.sets import _constraint as base


def _to_last(x, axes):
  """Moves ``axes`` to the end and merges them: returns (y, undo)."""
  rest = [a for a in range(x.ndim) if a not in axes]
  perm = rest + list(axes)
  moved = jnp.transpose(x, perm)
  merged = moved.reshape(moved.shape[:len(rest)] + (-1,))
  inverse = tuple(int(i) for i in np.argsort(perm))

  def undo(y):
    return jnp.transpose(y.reshape(moved.shape), inverse)

  return merged, undo


def project_last_axis(v, scale):
  """Sort-based simplex projection along the last axis.

  Held, Wolfe and Crowder (1974); Duchi et al., "Efficient projections onto
  the l1-ball for learning in high dimensions", ICML 2008, Fig. 1.
  """
  n = v.shape[-1]
  # The projection commutes with shifts; shifting by the max keeps theta and
  # the support small, so the sum stays exact to rounding when |v| >> scale.
  v = v - jnp.max(v, axis=-1, keepdims=True)
  mu = -jnp.sort(-v, axis=-1)  # descending
  cumulative = jnp.cumsum(mu, axis=-1) - scale
  ks = jnp.arange(1, n + 1, dtype=v.dtype)
  support = mu - cumulative / ks > 0
  rho = jnp.sum(support, axis=-1, keepdims=True)  # >= 1 for finite input
  rho = jnp.maximum(rho, 1)
  theta = (jnp.take_along_axis(cumulative, rho - 1, axis=-1)
           / rho.astype(v.dtype))
  return jnp.maximum(v - theta, 0)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Simplex(base.Constraint):
  r"""Non-negative slices summing to ``scale``.

  .. math::
    \Delta_s = \{x : x \ge 0,\ \textstyle\sum_{i \in \text{axis}} x_i = s\}

  The projection is the sort-based algorithm of Held et al. (1974) / Duchi
  et al. (2008), :math:`O(n \log n)` per slice. Every slice along ``axis`` is
  projected independently; ``axis=None`` projects the whole leaf as one
  vector and a tuple of axes treats those axes jointly. For a Flax ``Dense``
  kernel of shape ``(in, out)``, ``axis=0`` makes each output unit's incoming
  weights a convex combination.

  The sum constraint holds up to rounding: ``violation`` accepts
  :math:`|\sum x - s| \le 2 n \varepsilon s`, the worst-case error of an
  ``n``-term sum in the leaf's dtype. Non-negativity is exact.

  Slices are those of the leaves Optax passes: inside ``optax.flatten``
  every parameter is one vector. An empty slice cannot sum to ``scale``:
  ``check_leaf`` refuses such leaves and their ``violation`` is positive.

  Args:
    scale: the sum of each slice, ``> 0``. It may be traced
      (``optax.inject_hyperparams``); a traced ``scale <= 0`` is NaN, and so
      is every result.
    axis: the axis or axes along which slices sum to ``scale``.

  Example:
    >>> import jax.numpy as jnp
    >>> from posconstr import Simplex
    >>> x = jnp.array([0.5, 0.5, 1.0])
    >>> [round(float(v), 4) for v in Simplex().project(x)]
    [0.1667, 0.1667, 0.6667]
  """

  scale: float = 1.0
  axis: base.Axis = 0

  def __post_init__(self):
    object.__setattr__(self, "scale", base.hyperparameter(
        "scale", self.scale, "Simplex", lambda v: v > 0, "> 0"))
    object.__setattr__(self, "axis", base.check_axis(self.axis, "Simplex"))

  def check_leaf(self, shape, dtype, path="x"):
    base.check_float_dtype(dtype, repr(self), path)
    axes = base.normalize_axes(self.axis, len(shape), repr(self), path)
    if base.slice_size(shape, axes) == 0:
      raise ValueError(f"{self!r}: parameter `{path}` of shape {tuple(shape)}"
                       " has empty slices, which cannot sum to `scale`.")

  def _input(self, x, method, name="x"):
    return base.float_input(x, f"{self!r}.{method}", name)

  def _axes(self, x):
    return base.normalize_axes(self.axis, x.ndim, repr(self), "x")

  def project(self, x):
    x = self._input(x, "project")
    axes = self._axes(x)
    if x.size == 0:
      return x  # No coordinates to move (empty slices stay infeasible).
    acc = base.accumulation_dtype(x.dtype)
    flat, undo = _to_last(x.astype(acc), axes)
    return undo(project_last_axis(flat, self.scale)).astype(x.dtype)

  def active(self, x):
    return self._input(x, "active") <= 0

  def pushing_out(self, x, grad):
    """Zero coordinates whose gradient exceeds the slice's multiplier.

    On the simplex, mass moves into coordinate ``i`` only if its gradient is
    below the common gradient ``lambda`` of the support (the KKT
    multiplier, estimated as the mean gradient over ``x > 0``).
    """
    x = self._input(x, "pushing_out")
    grad = self._input(grad, "pushing_out", "grad")
    grad = grad.astype(base.accumulation_dtype(x.dtype))
    axes = self._axes(x)
    support = x > 0
    count = jnp.maximum(jnp.sum(support, axis=axes, keepdims=True), 1)
    multiplier = jnp.sum(jnp.where(support, grad, 0), axis=axes,
                         keepdims=True) / count
    return (~support) & (grad > multiplier)

  def violation(self, x):
    x = self._input(x, "violation")
    axes = self._axes(x)
    acc = base.accumulation_dtype(x.dtype)
    xs = x.astype(acc)
    n = base.slice_size(x.shape, axes)
    tol = base.rounding_tolerance(x.dtype, n) * self.scale
    # Per slice, also when the slices are empty (their sum is 0).
    sum_error = jnp.abs(jnp.sum(xs, axis=axes) - self.scale) - tol
    return jnp.maximum(base.max_or_zero(-xs), base.max_or_zero(sum_error))
