"""Parameterizations (weights = g(latent)) and the pytree reparameterization.

Implementation modules; the public names are imported from ``posconstr``.
"""
