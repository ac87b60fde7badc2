"""Sphinx configuration of the posconstr API reference.

Build (warnings are errors)::

  python -m pip install -e ".[docs]"
  python -m sphinx -W -b html docs docs/_build/html
"""

import os
import sys

# The package itself, also when it is not installed (`docs/..`).
sys.path.insert(0, os.path.abspath(".."))

import posconstr  # noqa: E402

project = "posconstr"
author = "the posconstr authors"
copyright = "the posconstr authors"  # noqa: A001 (Sphinx's name)
version = release = posconstr.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# autosummary writes one page per public name into _generated/ (not in git).
autosummary_generate = True
autosummary_ignore_module_all = False
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
# Type hints go into the description, as text: many are jax/optax types that
# have no page here.
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
napoleon_use_rtype = False
# `Attributes:` as fields of the class (NamedTuple fields are also members).
napoleon_use_ivar = True

# References to jax, optax, flax types are left as text (no intersphinx:
# the build works offline).
nitpicky = False

try:
  import furo  # noqa: F401
  html_theme = "furo"
except ImportError:  # the docs extra installs it; alabaster ships with Sphinx
  html_theme = "alabaster"
html_title = f"posconstr {release}"
html_static_path = []


def _skip_member(app, what, name, obj, skip, options):
  """Skips members that are not posconstr's own API.

  NamedTuple fields are documented by the class's ``Attributes:`` section;
  the default values of Flax dataclass fields (``bias_init``, ``param_dtype``)
  are jax's functions and types, documented by jax.
  """
  del app, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if doc.startswith("Alias for field number"):
    return True
  if what == "class" and (callable(obj) or isinstance(obj, type)):
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith("posconstr"):
      return True
  return skip


def _public_bases(app, name, obj, options, bases):
  """Shows the first public ancestors instead of private bases."""
  del app, name, obj, options
  public = []
  pending = list(bases)
  while pending:
    base = pending.pop(0)
    if base.__name__.startswith("_"):
      pending[:0] = [b for b in base.__bases__ if b is not object]
    elif base not in public:
      public.append(base)
  bases[:] = public


def setup(app):
  app.connect("autodoc-skip-member", _skip_member)
  app.connect("autodoc-process-bases", _public_bases)
