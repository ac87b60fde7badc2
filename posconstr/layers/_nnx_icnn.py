"""``posconstr.nnx.ICNN``: a fully input-convex network (NNX)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from posconstr.layers import _icnn_math
from posconstr.layers import _layer_args
from posconstr.layers import _nnx_signed
from posconstr.reparam import _parameterizations
from posconstr.transforms import _constrain

_OWNER = "posconstr.nnx.ICNN"


class ICNN(nnx.Module):
  r"""A fully input-convex network: every output is convex in the input.

  The NNX twin of :class:`posconstr.linen.ICNN` (same arguments, formulas,
  initialization and param paths: ``x_0``, ``z_k``, ``x_k``), built
  eagerly from ``in_features``; given the same params both compute the same
  outputs.

  .. math::
    z_0 = W^x_0 x + b_0, \qquad
    z_k = W^z_k\, \phi(z_{k-1}) + W^x_k x + b_k, \qquad
    W^z_k \ge 0.

  Args:
    in_features: the number of input features.
    features: the widths of the layers, the last one the number of outputs,
      e.g. ``(64, 64, 1)``; at least two.
    rngs: the ``nnx.Rngs`` that draw the initial params.
    positivity: ``posconstr.Softplus()`` (default), another parameterization
      with a non-negative range, or ``"project"`` (then append
      :meth:`projection` to the optimizer).
    activation: convex and non-decreasing (checked); ``jax.nn.relu``.
    skip: whether the input also enters every layer after the first.
    rho: the correlation fixed point of the initialization, in (0, 1).
    z_kernel_init: initializer of the applied ``z`` kernels; None for
      Hoedt & Klambauer's (``initializers.icnn(rho)``).
    z_bias_init: initializer of the ``z`` biases; None for the matching one.
    x_kernel_init: initializer of the free passthrough kernels.
    dtype: the computation dtype.
    param_dtype: the dtype of the parameters.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from posconstr.nnx import ICNN
    >>> model = ICNN(3, (16, 16, 1), positivity="project", rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 3))).shape
    (2, 1)
    >>> tx = optax.chain(optax.adam(1e-3), model.projection())
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  """

  def __init__(self, in_features: int, features: Sequence[int], *,
               rngs: nnx.Rngs,
               positivity: _layer_args.Positivity = (
                   _parameterizations.Softplus()),
               activation: Callable = jax.nn.relu, skip: bool = True,
               rho: float = 0.5, z_kernel_init: Optional[Callable] = None,
               z_bias_init: Optional[Callable] = None,
               x_kernel_init: Callable = nnx.initializers.lecun_normal(),
               dtype: Any = None, param_dtype: Any = jnp.float32):
    _icnn_math.check_args(features, positivity, activation, skip, rho,
                          _OWNER)
    in_features = _layer_args.check_width(in_features, "in_features", _OWNER)
    widths = tuple(features)

    def linear(n_in, n_out, signs, **kw):
      return _nnx_signed.SignedLinear(
          n_in, n_out, signs=signs, positivity=positivity, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs, **kw)

    self.x_0 = linear(in_features, widths[0], 0, kernel_init=x_kernel_init)
    for k in range(1, len(widths)):
      kernel_init, bias_init = _icnn_math.z_initializers(
          widths[k - 1], rho, z_kernel_init, z_bias_init)
      setattr(self, f"z_{k}", linear(widths[k - 1], widths[k], 1,
                                     kernel_init=kernel_init,
                                     bias_init=bias_init))
      if skip:
        setattr(self, f"x_{k}", linear(in_features, widths[k], 0,
                                       kernel_init=x_kernel_init,
                                       use_bias=False))
    self.features = widths
    self.positivity = positivity
    self.activation = activation
    self.skip = skip

  def __call__(self, x):
    z = self.x_0(x)
    for k in range(1, len(self.features)):
      h = getattr(self, f"z_{k}")(self.activation(z))
      if self.skip:
        h = h + getattr(self, f"x_{k}")(x)
      z = h
    return z

  def applied_kernels(self) -> Dict[str, jax.Array]:
    """``{layer name: the kernel it multiplies by}`` (``g`` applied)."""
    names = ["x_0"] + [f"{p}_{k}" for k in range(1, len(self.features))
                       for p in (("z", "x") if self.skip else ("z",))]
    return {name: getattr(self, name).applied_kernel() for name in names}

  def constrained_paths(self, path: str = "") -> Tuple[str, ...]:
    """The paths of the ``z`` kernels, e.g. for ``mask=``.

    Args:
      path: where this module's params sit in the optimizer's tree: ``''``
        when it is the model, its attribute name inside a parent, ``'*'``
        anywhere.
    """
    return _icnn_math.constrained_paths(
        len(self.features), _layer_args.check_path(path, _OWNER))

  def constraint_rules(self, path: str = "") -> Dict[str, Any]:
    """``{path: NonNegative()}`` of the ``z`` kernels (``"project"`` only)."""
    _layer_args.check_projected(self.positivity, _OWNER)
    return _icnn_math.constraint_rules(
        len(self.features), _layer_args.check_path(path, _OWNER))

  def projection(self, path: str = "") -> optax.GradientTransformation:
    """``posconstr.constrain(self.constraint_rules(path))``: the last link."""
    return _constrain.constrain(self.constraint_rules(path))
