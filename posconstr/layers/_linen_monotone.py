"""``posconstr.linen.MonotoneMLP``: a constrained monotone network (linen)."""

from __future__ import annotations

import typing
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posconstr.layers import _layer_args
from posconstr.layers import _linen_signed
from posconstr.layers import _monotone_math
from posconstr.layers import _signed_math
from posconstr.reparam import _parameterizations
from posconstr.transforms import _constrain

_OWNER = "posconstr.linen.MonotoneMLP"


class MonotoneMLP(nn.Module):
  r"""An MLP monotone in chosen inputs (Runje & Shankaranarayana, ICML 2023).

  ``monotonicity[i]`` is :math:`t_i = 1` (non-decreasing in input ``i``),
  -1 (non-increasing) or 0 (free). The first kernel is :math:`t_i g(W_{ij})`
  on the constrained rows and :math:`W_{ij}` on the free ones, every later
  kernel :math:`g(W) \ge 0`; the output layer is linear. Each hidden layer
  splits its units, in proportions ``activation_weights``, among three
  non-decreasing activations built from the convex, non-decreasing
  :math:`\breve\rho` = ``activation``:

  .. math::
    \breve\rho(x), \qquad \hat\rho(x) = -\breve\rho(-x), \qquad
    \tilde\rho(x) = \begin{cases} \breve\rho(x + 1) - \breve\rho(1)
    & x \le 0 \\ \breve\rho(1) - \breve\rho(1 - x) & x > 0 \end{cases}

  (convex, concave, saturated; for ``relu``: ``relu``, ``min(x, 0)``,
  ``clip(x, -1, 1)``), so that the network is monotone without being forced
  to be convex or concave.

  The sign constraints hold by ``positivity``, a parameterization (``Abs()``
  by default, the paper's :math:`|W|`: the params hold latents, monotone at
  every moment, with any optimizer), or by ``positivity="project"`` (the
  params are the weights; append :meth:`projection` to the optimizer).

  Parameters: ``dense_k/kernel`` and ``dense_k/bias`` for each layer ``k``;
  the same paths as :class:`posconstr.nnx.MonotoneMLP`.

  Attributes:
    features: the widths of the layers, the last one the number of outputs,
      e.g. ``(32, 32, 1)``.
    monotonicity: one of -1, 0, 1 per input feature, or a single one for
      all of them.
    positivity: ``posconstr.Abs()`` (default), another parameterization
      with a non-negative range (``Softplus()``, ...), or ``"project"``.
    activation: the convex, non-decreasing base activation (checked);
      ``jax.nn.relu`` by default.
    activation_weights: proportions of convex, concave and saturated units
      in each hidden layer; ``(1, 0, 0)`` makes the network convex in the
      monotone inputs, ``(0, 1, 0)`` concave.
    kernel_init: initializer of the applied kernels (folded to ``|w|`` on
      the constrained rows).
    bias_init: initializer of the biases.
    dtype: the computation dtype (default: promoted from input and params).
    param_dtype: the dtype of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from posconstr.linen import MonotoneMLP
    >>> model = MonotoneMLP(features=(16, 16, 1), monotonicity=(1, -1, 0))
    >>> x = jax.random.normal(jax.random.key(1), (5, 3))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> f = lambda row: model.apply({"params": params}, row)[0]
    >>> grads = jax.vmap(jax.grad(f))(x)
    >>> bool((grads[:, 0] >= 0).all()), bool((grads[:, 1] <= 0).all())
    (True, True)
    >>> MonotoneMLP((16, 1), (1, -1, 0), positivity="project"
    ...             ).constrained_paths()
    ('dense_0/kernel', 'dense_1/kernel')
  """

  features: Sequence[int]
  monotonicity: Union[int, Sequence[int]]
  positivity: _layer_args.Positivity = _parameterizations.Abs()
  activation: Callable = jax.nn.relu
  activation_weights: Sequence[float] = (7.0, 7.0, 2.0)
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    fields = _monotone_math.check_args(
        self.features, self.monotonicity, self.positivity, self.activation,
        self.activation_weights, _OWNER)
    for name, value in fields._asdict().items():
      object.__setattr__(self, name, value)
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    signs = _monotone_math.expand(self._signs, jnp.shape(x)[-1], _OWNER)
    for k, width in enumerate(self.features):
      if k:
        x = _monotone_math.mixed_activation(x, self.activation,
                                            self.activation_weights)
      x = _linen_signed.SignedDense(
          width, signs=signs if k == 0 else 1, positivity=self.positivity,
          kernel_init=self.kernel_init, bias_init=self.bias_init,
          dtype=self.dtype, param_dtype=self.param_dtype,
          name=f"dense_{k}")(x)
    return x

  @property
  def _signs(self) -> _monotone_math.Indicator:
    """``monotonicity`` as normalized at construction."""
    return typing.cast(_monotone_math.Indicator, self.monotonicity)

  def applied_kernels(self) -> Dict[str, jax.Array]:
    """``{layer name: the kernel it multiplies by}`` (signs and ``g`` applied).

    Call it through ``model.apply(variables, method="applied_kernels")``.
    """
    params = self.variables["params"]
    first = params["dense_0"]["kernel"]
    signs = _monotone_math.expand(self._signs, first.shape[0], _OWNER)
    return {name: _signed_math.signed_kernel(
        self.positivity, p["kernel"], signs if name == "dense_0" else 1)
            for name, p in params.items()}

  @nn.nowrap
  def constrained_paths(self, path: str = "") -> Tuple[str, ...]:
    """The paths of the sign-constrained kernels, e.g. for ``mask=``.

    Args:
      path: where this module's params sit in the optimizer's tree: ``''``
        when it is the whole model, ``'MonotoneMLP_0'`` inside a parent,
        ``'*'`` anywhere.
    """
    return tuple(_monotone_math.constraint_rules(
        len(self.features), self._signs,
        _layer_args.check_path(path, _OWNER)))

  @nn.nowrap
  def constraint_rules(self, path: str = "") -> Dict[str, Any]:
    """``{path: set}`` of the constrained kernels, for ``positivity="project"``.

    ``NonNegative()`` for the later kernels; for the first one
    ``NonNegative()``, ``Box(None, 0)`` or a ``Box`` with one bound per
    input row. For :func:`posconstr.constrain` or
    :func:`posconstr.projected`; ``path`` as in :meth:`constrained_paths`.
    """
    _layer_args.check_projected(self.positivity, _OWNER)
    return _monotone_math.constraint_rules(
        len(self.features), self._signs,
        _layer_args.check_path(path, _OWNER))

  @nn.nowrap
  def projection(self, path: str = "") -> optax.GradientTransformation:
    """``posconstr.constrain(self.constraint_rules(path))``: the last link."""
    return _constrain.constrain(self.constraint_rules(path))
