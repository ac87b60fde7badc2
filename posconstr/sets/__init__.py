"""Constraint sets: the `Constraint` protocol, boxes, norm balls, the simplex,
and the rounding-aware landing of updates on a bound.

Implementation modules; the public names are imported from ``posconstr``.
"""
