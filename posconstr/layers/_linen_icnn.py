"""``posconstr.linen.ICNN``: a fully input-convex network (linen)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from posconstr.layers import _icnn_math
from posconstr.layers import _layer_args
from posconstr.layers import _linen_signed
from posconstr.layers import _signed_math
from posconstr.reparam import _parameterizations
from posconstr.transforms import _constrain

_OWNER = "posconstr.linen.ICNN"


class ICNN(nn.Module):
  r"""A fully input-convex network: every output is convex in the input.

  .. math::
    z_0 = W^x_0 x + b_0, \qquad
    z_k = W^z_k\, \phi(z_{k-1}) + W^x_k x + b_k, \qquad
    W^z_k \ge 0,

  the output is :math:`z_L` (Amos, Xu & Kolter, ICML 2017). The ``z``
  kernels are kept non-negative either by ``positivity``, a
  parameterization (the param ``z_k/kernel`` holds latents, the layer uses
  ``g(latent)``: convex at every moment, with any optimizer), or by
  ``positivity="project"`` (the param holds the weights; append
  :meth:`projection` to the optimizer).

  **Initialization** (Hoedt & Klambauer, "Principled Weight Initialisation
  for Input-Convex Neural Networks", NeurIPS 2023): the applied
  :math:`W^z_k` are log-normal with the moments
  :math:`\mu, \sigma^2` of :func:`posconstr.initializers.icnn_moments`
  for their fan-in, the biases :math:`b_k` the matching constant
  (:func:`posconstr.initializers.icnn_bias`). A parameterized layer stores
  the stable inverse of those draws, which is the matched variant: under
  ``Exp`` normal latents :math:`\mathcal N(\log\mu - s^2/2,\ s^2)`,
  :math:`s^2 = \log(1 + \sigma^2/\mu^2)` (the closed form of an earlier
  ``ExponentialPositivity`` of the authors, whose variance term there,
  :math:`\log(10 + t)`, should read :math:`\log(10\pi + t)` to give
  those moments); under ``ReLU`` the log-normal draws themselves (no latent
  starts dead). Their repository's earlier uniform-latent variant for
  ``ReLU``, which ignores the correlation between units and which they
  describe as working less well, is not offered. The scheme is derived for
  ReLU activations without skip connections.

  Parameters: ``x_0/kernel``, ``x_0/bias``, then for ``k >= 1``
  ``z_k/kernel``, ``z_k/bias`` and (with ``skip``) ``x_k/kernel``; the
  same paths as :class:`posconstr.nnx.ICNN`.

  Attributes:
    features: the widths of the layers, the last one the number of outputs,
      e.g. ``(64, 64, 1)``; at least two (one ``z`` layer).
    positivity: ``posconstr.Softplus()`` (default), another parameterization
      with a non-negative range (``Exp()``, ``ReLU()``, ...), or
      ``"project"``.
    activation: :math:`\phi`, convex and non-decreasing (checked); the
      default initialization assumes ``jax.nn.relu``.
    skip: whether the input also enters every layer after the first
      (``W^x_k``, free weights); Hoedt & Klambauer train without them.
    rho: the correlation fixed point of the initialization, in (0, 1).
    z_kernel_init: initializer of the applied ``z`` kernels; None for
      ``initializers.icnn(rho)``. A zero-mean one is folded to ``|w|``.
    z_bias_init: initializer of the ``z`` biases; None for the one matching
      the default kernels (``initializers.icnn_bias``), zeros otherwise.
    x_kernel_init: initializer of the free passthrough kernels.
    dtype: the computation dtype (default: promoted from input and params).
    param_dtype: the dtype of the parameters.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from posconstr.linen import ICNN
    >>> model = ICNN(features=(16, 16, 1))
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> sorted(params)
    ['x_0', 'x_1', 'x_2', 'z_1', 'z_2']
    >>> f = lambda x: model.apply({"params": params}, x)[..., 0]
    >>> a, b = jnp.full(3, -4.0), jnp.array([5.0, 0.0, 2.0])
    >>> bool(f((a + b) / 2) <= (f(a) + f(b)) / 2)
    True
    >>> projected = ICNN(features=(16, 16, 1), positivity="project")
    >>> projected.constrained_paths()
    ('z_1/kernel', 'z_2/kernel')
    >>> tx = optax.chain(optax.adam(1e-3), projected.projection())
  """

  features: Sequence[int]
  positivity: _layer_args.Positivity = _parameterizations.Softplus()
  activation: Callable = jax.nn.relu
  skip: bool = True
  rho: float = 0.5
  z_kernel_init: Optional[Callable] = None
  z_bias_init: Optional[Callable] = None
  x_kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _icnn_math.check_args(self.features, self.positivity, self.activation,
                          self.skip, self.rho, _OWNER)
    object.__setattr__(self, "features", tuple(self.features))
    super().__post_init__()

  @nn.compact
  def __call__(self, x):
    widths = self.features

    def dense(features, signs, name, **kw):
      return _linen_signed.SignedDense(
          features, signs=signs, positivity=self.positivity, dtype=self.dtype,
          param_dtype=self.param_dtype, name=name, **kw)

    z = dense(widths[0], 0, "x_0", kernel_init=self.x_kernel_init)(x)
    for k in range(1, len(widths)):
      kernel_init, bias_init = _icnn_math.z_initializers(
          widths[k - 1], self.rho, self.z_kernel_init, self.z_bias_init)
      h = dense(widths[k], 1, f"z_{k}", kernel_init=kernel_init,
                bias_init=bias_init)(self.activation(z))
      if self.skip:
        h = h + dense(widths[k], 0, f"x_{k}", kernel_init=self.x_kernel_init,
                      use_bias=False)(x)
      z = h
    return z

  def applied_kernels(self) -> Dict[str, jax.Array]:
    """``{layer name: the kernel it multiplies by}`` (``g`` applied).

    Call it through ``model.apply(variables, method="applied_kernels")``.
    """
    return {name: _signed_math.signed_kernel(
        self.positivity, p["kernel"], 1 if name.startswith("z_") else 0)
            for name, p in self.variables["params"].items()}

  @nn.nowrap
  def constrained_paths(self, path: str = "") -> Tuple[str, ...]:
    """The paths of the ``z`` kernels, e.g. for ``mask=``.

    Args:
      path: where this module's params sit in the optimizer's tree: ``''``
        when it is the whole model, ``'ICNN_0'`` inside a parent, ``'*'``
        anywhere.
    """
    return _icnn_math.constrained_paths(
        len(self.features), _layer_args.check_path(path, _OWNER))

  @nn.nowrap
  def constraint_rules(self, path: str = "") -> Dict[str, Any]:
    """``{path: NonNegative()}`` of the ``z`` kernels (``"project"`` only).

    For :func:`posconstr.constrain` or :func:`posconstr.projected`; ``path``
    as in :meth:`constrained_paths`.
    """
    _layer_args.check_projected(self.positivity, _OWNER)
    return _icnn_math.constraint_rules(
        len(self.features), _layer_args.check_path(path, _OWNER))

  @nn.nowrap
  def projection(self, path: str = "") -> optax.GradientTransformation:
    """``posconstr.constrain(self.constraint_rules(path))``: the last link."""
    return _constrain.constrain(self.constraint_rules(path))

