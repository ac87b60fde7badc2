"""posconstr: keep JAX model weights non-negative, in a box, on a simplex or
under a norm while they train: by projection inside Optax, or by
reparameterization (weights = g(latent)) in Flax.

Submodules: :mod:`posconstr.linen`, :mod:`posconstr.nnx`,
:mod:`posconstr.initializers` (imported with the package).
"""

from posconstr._chain_order import chain
from posconstr._chain_order import check_projection_last
from posconstr._constrain import constrain
from posconstr._constraint import Constraint
from posconstr._intervals import Box
from posconstr._intervals import NonNegative
from posconstr._lbfgsb import LbfgsbResult
from posconstr._lbfgsb import minimize
from posconstr._lbfgsb_step import Status
from posconstr._lbfgsb_transform import LbfgsbInfo
from posconstr._lbfgsb_transform import LbfgsbState
from posconstr._lbfgsb_transform import lbfgsb
from posconstr._norms import MaxNorm
from posconstr._norms import MinMaxNorm
from posconstr._norms import UnitNorm
from posconstr._parameterizations import Abs
from posconstr._parameterizations import Exp
from posconstr._parameterizations import Parameterization
from posconstr._parameterizations import ReLU
from posconstr._parameterizations import Sigmoid
from posconstr._parameterizations import Softplus
from posconstr._parameterizations import Square
from posconstr._projected import ProjectedState
from posconstr._projected import projected
from posconstr._projection import ProjectionState
from posconstr._quadratic import QPResult
from posconstr._quadratic import box_qp
from posconstr._quadratic import nnls
from posconstr._projection import project
from posconstr._projection import project_box
from posconstr._projection import project_nonneg
from posconstr._projection import project_params
from posconstr._report import LeafReport
from posconstr._report import constraint_report
from posconstr._report import format_report
from posconstr._reparam import dead_fraction
from posconstr._reparam import reparam
from posconstr._reparam import unreparam
from posconstr._simplex import Simplex
from posconstr import initializers
from posconstr import linen
from posconstr import nnx

__version__ = "0.1.0"

__all__ = (
    "Abs",
    "Box",
    "Constraint",
    "MaxNorm",
    "Exp",
    "LbfgsbInfo",
    "LbfgsbResult",
    "LbfgsbState",
    "LeafReport",
    "MinMaxNorm",
    "NonNegative",
    "Parameterization",
    "ProjectedState",
    "ProjectionState",
    "QPResult",
    "ReLU",
    "Sigmoid",
    "Simplex",
    "Softplus",
    "Square",
    "Status",
    "UnitNorm",
    "chain",
    "box_qp",
    "check_projection_last",
    "constrain",
    "constraint_report",
    "dead_fraction",
    "format_report",
    "initializers",
    "lbfgsb",
    "linen",
    "minimize",
    "nnls",
    "nnx",
    "project",
    "project_box",
    "project_nonneg",
    "project_params",
    "projected",
    "reparam",
    "unreparam",
)
