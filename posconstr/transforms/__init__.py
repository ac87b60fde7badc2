"""Optax gradient transformations that keep parameters in a set, and the
diagnostics that report on them.

Implementation modules; the public names are imported from ``posconstr``.
"""
