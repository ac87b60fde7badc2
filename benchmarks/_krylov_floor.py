"""How few evaluations any gradient method could need: CG with an oracle.

Once the active set of an NNLS problem is known, what is left is the
unconstrained least-squares problem on the free columns, and conjugate
gradients is optimal on it among methods whose steps lie in the span of the
gradients seen (each CG iteration is one product with ``A_F^T A_F``, i.e. one
evaluation of the gradient). CG started at ``x0 = 0`` with the *final* free
set handed to it, stopped at the same relative projected-gradient tolerance,
thus needs about the fewest evaluations any gradient method can (CG is
optimal in the energy norm, the test is on the gradient's max norm), and an
L-BFGS-B-type solver must also find the active set. Times it by the measured cost of one
evaluation to see what ratio against SciPy is reachable at all.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np


def cg_oracle_evaluations(A: np.ndarray, b: np.ndarray, x_star: np.ndarray,
                          tol: float, max_iter: int = 10_000) -> Dict[str, Any]:
  """Evaluations CG needs on the free columns of ``x_star`` (``x_star > 0``).

  Stops when ``||A_F^T (A_F z - b)||_inf <= tol * max(A^T b, 0)`` (the
  projected gradient of the full problem at ``x0 = 0``). Counts the initial
  gradient as one evaluation, as the solvers do.
  """
  free = x_star > 0
  a_free = A[:, free]
  threshold = tol * max(float(np.max(A.T @ b)), 0.0)
  z = np.zeros(a_free.shape[1])
  residual = a_free.T @ b  # -gradient at z = 0
  direction = residual.copy()
  rr = residual @ residual
  evals = 1
  while np.max(np.abs(residual), initial=0.0) > threshold and evals < max_iter:
    hd = a_free.T @ (a_free @ direction)
    evals += 1
    step = rr / (direction @ hd)
    z += step * direction
    residual = residual - step * hd
    rr_new = residual @ residual
    direction = residual + (rr_new / rr) * direction
    rr = rr_new
  return {"cg_evals": evals, "free": int(free.sum()),
          "converged": bool(np.max(np.abs(residual), initial=0.0)
                            <= threshold)}
