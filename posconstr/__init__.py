"""posconstr: keep JAX model weights non-negative, in a box, on a simplex or
under a norm while they train: by projection inside Optax, or by
reparameterization (weights = g(latent)) in Flax.

Submodules: :mod:`posconstr.initializers` (imported with the package),
:mod:`posconstr.linen` and :mod:`posconstr.nnx` (imported on first use; they
need Flax: ``pip install "posconstr[flax]"``). ``import posconstr`` alone does
not import Flax.

>>> import jax.numpy as jnp
>>> import optax
>>> import posconstr
>>> tx = optax.chain(optax.sgd(1.0), posconstr.project_nonneg())
>>> params = jnp.array([0.5, 1.0])
>>> updates, _ = tx.update(jnp.array([1.0, -0.5]), tx.init(params), params)
>>> optax.apply_updates(params, updates)
Array([0. , 1.5], dtype=float32)
>>> posconstr.nnx.NonNegLinear  # imports Flax now
<class 'posconstr.nnx.NonNegLinear'>
"""

import importlib
import typing

from posconstr import initializers
from posconstr.reparam._parameterizations import Abs
from posconstr.reparam._parameterizations import Exp
from posconstr.reparam._parameterizations import Parameterization
from posconstr.reparam._parameterizations import ReLU
from posconstr.reparam._parameterizations import Sigmoid
from posconstr.reparam._parameterizations import Softplus
from posconstr.reparam._parameterizations import Square
from posconstr.reparam._reparam import dead_fraction
from posconstr.reparam._reparam import reparam
from posconstr.reparam._reparam import unreparam
from posconstr.reparam._revive import ReviveState
from posconstr.reparam._revive import revive_dead
from posconstr.sets._constraint import Constraint
from posconstr.sets._intervals import Box
from posconstr.sets._intervals import NonNegative
from posconstr.sets._norms import MaxNorm
from posconstr.sets._norms import MinMaxNorm
from posconstr.sets._norms import UnitNorm
from posconstr.sets._simplex import Simplex
from posconstr.solvers._lbfgsb import LbfgsbResult
from posconstr.solvers._lbfgsb import minimize
from posconstr.solvers._lbfgsb_core import Memory as LbfgsbMemory
from posconstr.solvers._lbfgsb_state import LbfgsbInfo
from posconstr.solvers._lbfgsb_state import LbfgsbState
from posconstr.solvers._lbfgsb_step import SolverState as LbfgsbSolverState
from posconstr.solvers._lbfgsb_step import Status
from posconstr.solvers._lbfgsb_transform import lbfgsb
from posconstr.solvers._quadratic import QPResult
from posconstr.solvers._quadratic import box_qp
from posconstr.solvers._quadratic import nnls
from posconstr.transforms._chain_order import chain
from posconstr.transforms._chain_order import check_projection_last
from posconstr.transforms._constrain import constrain
from posconstr.transforms._exponentiated_gradient import MultiplicativeState
from posconstr.transforms._exponentiated_gradient import exponentiated_gradient
from posconstr.transforms._exponentiated_gradient import multiplicative_update
from posconstr.transforms._projected import ProjectedState
from posconstr.transforms._projected import projected
from posconstr.transforms._projection import ProjectionState
from posconstr.transforms._projection import project
from posconstr.transforms._projection import project_box
from posconstr.transforms._projection import project_nonneg
from posconstr.transforms._projection import project_params
from posconstr.transforms._report import LeafReport
from posconstr.transforms._report import constraint_report
from posconstr.transforms._report import format_report

if typing.TYPE_CHECKING:  # imported lazily at run time, see __getattr__
  from posconstr import equinox
  from posconstr import linen
  from posconstr import nnx

# The one source of the version: pyproject.toml reads it from here (it must
# stay a string literal, which setuptools reads without importing).
__version__ = "0.1.0"

# Submodules that need an optional package, imported on first attribute
# access (PEP 562): the submodule, the package it needs, and the extra.
_OPTIONAL_SUBMODULES = {"linen": ("flax", "flax"), "nnx": ("flax", "flax"),
                        "equinox": ("equinox", "equinox")}

__all__ = (
    "Abs",
    "Box",
    "Constraint",
    "Exp",
    "LbfgsbInfo",
    "LbfgsbMemory",
    "LbfgsbResult",
    "LbfgsbSolverState",
    "LbfgsbState",
    "LeafReport",
    "MaxNorm",
    "MinMaxNorm",
    "MultiplicativeState",
    "NonNegative",
    "Parameterization",
    "ProjectedState",
    "ProjectionState",
    "QPResult",
    "ReLU",
    "ReviveState",
    "Sigmoid",
    "Simplex",
    "Softplus",
    "Square",
    "Status",
    "UnitNorm",
    "box_qp",
    "chain",
    "check_projection_last",
    "constrain",
    "constraint_report",
    "dead_fraction",
    "equinox",
    "exponentiated_gradient",
    "format_report",
    "initializers",
    "lbfgsb",
    "linen",
    "minimize",
    "multiplicative_update",
    "nnls",
    "nnx",
    "project",
    "project_box",
    "project_nonneg",
    "project_params",
    "projected",
    "reparam",
    "revive_dead",
    "unreparam",
)


def __getattr__(name: str):
  """Imports ``posconstr.linen``, ``.nnx`` or ``.equinox`` on first access."""
  if name not in _OPTIONAL_SUBMODULES:
    raise AttributeError(f"module 'posconstr' has no attribute {name!r}")
  package, extra = _OPTIONAL_SUBMODULES[name]
  try:
    importlib.import_module(package)
  except ImportError as e:
    raise ImportError(
        f"posconstr.{name} needs {package}, which could not be imported "
        f'({e}). Install it with `pip install "posconstr[{extra}]"` (or '
        f"`pip install {package}`).") from e
  # Importing the submodule also binds it as an attribute of the package, so
  # this function is not called again for it.
  return importlib.import_module(f"posconstr.{name}")


def __dir__():
  return sorted(set(globals()) | set(_OPTIONAL_SUBMODULES))
