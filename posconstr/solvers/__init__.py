"""Bounded solvers: one L-BFGS-B step behind `minimize` and the `lbfgsb`
transform, implicit differentiation, and the NNLS / box-QP solvers.

Implementation modules; the public names are imported from ``posconstr``.
"""
