"""posconstr: keep JAX model weights non-negative, in a box, on a simplex or
under a norm while they train, by projection inside Optax."""

from posconstr._chain_order import chain
from posconstr._chain_order import check_projection_last
from posconstr._constrain import constrain
from posconstr._constraint import Constraint
from posconstr._intervals import Box
from posconstr._intervals import NonNegative
from posconstr._norms import MaxNorm
from posconstr._norms import MinMaxNorm
from posconstr._norms import UnitNorm
from posconstr._projection import ProjectionState
from posconstr._projection import project
from posconstr._projection import project_box
from posconstr._projection import project_nonneg
from posconstr._simplex import Simplex

__version__ = "0.1.0"

__all__ = (
    "Box",
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNegative",
    "ProjectionState",
    "Simplex",
    "UnitNorm",
    "chain",
    "check_projection_last",
    "constrain",
    "project",
    "project_box",
    "project_nonneg",
)
