"""Ready-made constrained networks: input-convex (ICNN) and monotone MLPs.

The framework-free math (initializations, activation mixes, sign handling,
the rules an optimizer needs) lives here; the Flax classes are re-exported
by :mod:`posconstr.linen` and :mod:`posconstr.nnx`, the only modules that
import their files (``import posconstr`` does not import Flax).
"""
