"""Selecting leaves of a pytree by path, mask or rules (shared by the
transforms and the reparameterizations).

Implementation modules; the public names are imported from ``posconstr``.
"""
