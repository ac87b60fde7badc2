"""``posconstr.nnx.MonotoneMLP``: a constrained monotone network (NNX)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from posconstr.layers import _layer_args
from posconstr.layers import _monotone_math
from posconstr.layers import _nnx_signed
from posconstr.reparam import _parameterizations
from posconstr.transforms import _constrain

_OWNER = "posconstr.nnx.MonotoneMLP"


class MonotoneMLP(nnx.Module):
  r"""An MLP monotone in chosen inputs (Runje & Shankaranarayana, ICML 2023).

  The NNX twin of :class:`posconstr.linen.MonotoneMLP` (same arguments,
  formulas and param paths ``dense_k/kernel``, ``dense_k/bias``); given the
  same params both compute the same outputs.

  Args:
    in_features: the number of input features.
    features: the widths of the layers, the last one the number of outputs.
    monotonicity: one of -1, 0, 1 per input feature (``in_features`` of
      them), or a single one for all.
    rngs: the ``nnx.Rngs`` that draw the initial params.
    positivity: ``posconstr.Abs()`` (default, the paper's :math:`|W|`),
      another parameterization with a non-negative range, or ``"project"``
      (then append :meth:`projection` to the optimizer).
    activation: the convex, non-decreasing base activation (checked).
    activation_weights: proportions of convex, concave and saturated units.
    kernel_init: initializer of the applied kernels.
    bias_init: initializer of the biases.
    dtype: the computation dtype.
    param_dtype: the dtype of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from posconstr.nnx import MonotoneMLP
    >>> model = MonotoneMLP(2, (8, 1), monotonicity=(1, -1), rngs=nnx.Rngs(0))
    >>> g = jax.grad(lambda x: model(x)[0])(jnp.array([0.3, -1.0]))
    >>> bool(g[0] >= 0), bool(g[1] <= 0)
    (True, True)
  """

  def __init__(self, in_features: int, features: Sequence[int],
               monotonicity: Union[int, Sequence[int]], *, rngs: nnx.Rngs,
               positivity: _layer_args.Positivity = _parameterizations.Abs(),
               activation: Callable = jax.nn.relu,
               activation_weights: Sequence[float] = (7.0, 7.0, 2.0),
               kernel_init: Callable = nnx.initializers.lecun_normal(),
               bias_init: Callable = nnx.initializers.zeros_init(),
               dtype: Any = None, param_dtype: Any = jnp.float32):
    fields = _monotone_math.check_args(features, monotonicity, positivity,
                                       activation, activation_weights, _OWNER)
    in_features = _layer_args.check_width(in_features, "in_features", _OWNER)
    signs = _monotone_math.expand(fields.monotonicity, in_features, _OWNER)
    widths = fields.features
    for k, (n_in, n_out) in enumerate(zip((in_features,) + widths, widths)):
      setattr(self, f"dense_{k}", _nnx_signed.SignedLinear(
          n_in, n_out, signs=signs if k == 0 else 1, positivity=positivity,
          kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs))
    self.features = widths
    self.monotonicity = fields.monotonicity
    self.positivity = positivity
    self.activation = activation
    self.activation_weights = fields.activation_weights

  def __call__(self, x):
    for k in range(len(self.features)):
      if k:
        x = _monotone_math.mixed_activation(x, self.activation,
                                            self.activation_weights)
      x = getattr(self, f"dense_{k}")(x)
    return x

  def applied_kernels(self) -> Dict[str, jax.Array]:
    """``{layer name: the kernel it multiplies by}`` (signs, ``g`` applied)."""
    return {f"dense_{k}": getattr(self, f"dense_{k}").applied_kernel()
            for k in range(len(self.features))}

  def constrained_paths(self, path: str = "") -> Tuple[str, ...]:
    """The paths of the sign-constrained kernels, e.g. for ``mask=``.

    Args:
      path: where this module's params sit in the optimizer's tree: ``''``
        when it is the model, its attribute name inside a parent, ``'*'``
        anywhere.
    """
    return tuple(_monotone_math.constraint_rules(
        len(self.features), self.monotonicity,
        _layer_args.check_path(path, _OWNER)))

  def constraint_rules(self, path: str = "") -> Dict[str, Any]:
    """``{path: set}`` of the constrained kernels (``"project"`` only)."""
    _layer_args.check_projected(self.positivity, _OWNER)
    return _monotone_math.constraint_rules(
        len(self.features), self.monotonicity,
        _layer_args.check_path(path, _OWNER))

  def projection(self, path: str = "") -> optax.GradientTransformation:
    """``posconstr.constrain(self.constraint_rules(path))``: the last link."""
    return _constrain.constrain(self.constraint_rules(path))
