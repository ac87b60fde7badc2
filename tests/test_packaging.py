"""Packaging: Flax is optional and lazy, the version has one source, and the
public namespaces list exactly the names they define.

The import checks run in fresh interpreters (``subprocess``): this process
has long imported Flax through the other tests.
"""

import importlib
import importlib.metadata
import importlib.resources
import pathlib
import re
import subprocess
import sys
import textwrap
import types
import typing

import pytest

import posconstr
from posconstr import initializers

_HEAVY = ("flax", "orbax", "tensorstore", "treescope")

# A finder placed first on sys.meta_path that makes Flax unimportable, as if
# it were not installed.
_BLOCK_FLAX = textwrap.dedent("""
    import importlib.abc
    import sys

    class _NoFlax(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "flax" or name.startswith("flax."):
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, _NoFlax())
""")


def _run(code: str) -> str:
  """Runs ``code`` in a fresh interpreter; returns its stdout."""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, (
      f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\n"
      f"stderr:\n{proc.stderr}")
  return proc.stdout


def test_import_does_not_import_flax_then_submodules_do():
  out = _run(textwrap.dedent(f"""
      import sys
      import posconstr
      heavy = {_HEAVY!r}
      loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
      print("after import:", loaded)
      assert not loaded, loaded
      assert "posconstr.linen" not in sys.modules
      assert "posconstr.nnx" not in sys.modules
      assert {{"linen", "nnx"}} <= set(dir(posconstr))
      from flax import nnx
      layer = posconstr.nnx.NonNegLinear(3, 2, rngs=nnx.Rngs(0))
      assert layer.kernel.value.shape == (3, 2)
      assert sys.modules["posconstr.nnx"] is posconstr.nnx
      from posconstr import linen
      assert linen is posconstr.linen
      assert isinstance(linen.NonNegDense, type)
      print("ok")
  """))
  assert out.strip().endswith("ok"), out


@pytest.mark.parametrize("access", [
    "posconstr.linen",
    pytest.param("posconstr.nnx", marks=pytest.mark.slow),  # A subprocess
    pytest.param("__import__('posconstr', fromlist=['nnx'])",  # each: ~2.5 s.
                 marks=pytest.mark.slow),
])
def test_missing_flax_raises_a_clear_import_error(access):
  out = _run(_BLOCK_FLAX + textwrap.dedent(f"""
      import jax.numpy as jnp
      import posconstr
      # Everything that does not need Flax works.
      params = posconstr.reparam(jnp.zeros(2), posconstr.Softplus())
      assert posconstr.NonNegative().violation(params) == 0
      assert posconstr.initializers.icnn()
      try:
        {access}
      except ImportError as e:
        message = str(e)
      else:
        raise AssertionError("no ImportError")
      print(message)
  """))
  assert 'pip install "posconstr[flax]"' in out, out
  assert "flax" in out.lower(), out


def test_unknown_attribute_is_an_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    _ = posconstr.no_such_name  # pytype: disable=module-attr
  assert not hasattr(posconstr, "linenn")


def test_version_has_one_source():
  assert posconstr.__version__ == importlib.metadata.version("posconstr")


def test_layer_folders_have_no_public_names():
  """Each folder's ``__init__`` only documents it.

  The API lives in posconstr.
  """
  for folder in _IMPLEMENTATION_FOLDERS:
    package = importlib.import_module(f"posconstr.{folder}")
    assert package.__doc__, folder
    public = [n for n in vars(package) if not n.startswith("_")
              and not isinstance(getattr(package, n), types.ModuleType)]
    assert not public, (folder, public)


def test_py_typed_is_shipped():
  assert importlib.resources.files("posconstr").joinpath("py.typed").is_file()


# The layer folders hold the implementation; their names are re-exported by
# ``posconstr`` itself, so the folders are not API of their own.
_IMPLEMENTATION_FOLDERS = ("sets", "tree", "transforms", "reparam", "solvers",
                           "layers")


def _defined_here(module: types.ModuleType, name: str) -> bool:
  """Whether ``name`` is public API of ``module`` (not an imported helper)."""
  if name.startswith("_"):
    return False
  value = getattr(module, name)
  if isinstance(value, types.ModuleType):
    folder = value.__name__.split(".")[1:] == [name] and name in (
        _IMPLEMENTATION_FOLDERS)
    return value.__name__.startswith("posconstr.") and not folder
  return getattr(value, "__module__", "").startswith("posconstr")


def _check_all(module: types.ModuleType):
  names = module.__all__
  assert len(set(names)) == len(names), f"{module.__name__}: duplicates"
  missing = [n for n in names if not hasattr(module, n)]
  assert not missing, f"{module.__name__}.__all__ names missing: {missing}"
  unlisted = sorted(n for n in dir(module)
                    if _defined_here(module, n) and n not in names)
  assert not unlisted, f"{module.__name__}: public but not in __all__: " \
                       f"{unlisted}"


@pytest.mark.parametrize("name", ["posconstr", "posconstr.initializers",
                                  "posconstr.linen", "posconstr.nnx",
                                  "posconstr.equinox"])
def test_all_lists_exactly_the_public_names(name):
  module = importlib.import_module(name)
  if not hasattr(module, "__all__"):
    pytest.skip(f"{name} has no __all__ yet")
  _check_all(module)


def test_public_types_are_exported():
  """Classes in public results and states are reachable from the package."""
  exported = {getattr(posconstr, n) for n in posconstr.__all__}
  for cls in (posconstr.LbfgsbResult, posconstr.LbfgsbState,
              posconstr.LbfgsbSolverState, posconstr.QPResult,
              posconstr.LeafReport):
    hints = typing.get_type_hints(cls)
    assert hints, cls
    for field, annotation in hints.items():
      if isinstance(annotation, type) and annotation.__module__.startswith(
          "posconstr"):
        assert annotation in exported, f"{cls.__name__}.{field}"
  assert initializers.icnn_moments(4).__class__ is initializers.ICNNMoments


def _public_names(module: types.ModuleType):
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [n for n in dir(module) if _defined_here(module, n)]


@pytest.mark.parametrize("name", ["posconstr", "posconstr.initializers",
                                  "posconstr.linen", "posconstr.nnx",
                                  "posconstr.equinox"])
def test_api_reference_lists_every_public_name(name):
  """docs/api.rst has an entry for each name (its own section per module)."""
  api = pathlib.Path(__file__).resolve().parent.parent / "docs" / "api.rst"
  text = api.read_text()
  module = importlib.import_module(name)
  start = text.index(f".. currentmodule:: {name}\n")
  following = text.find(".. currentmodule::", start + 1)
  section = text[start:following if following >= 0 else len(text)]
  entries = set(re.findall(r"^   (\w+)$", section, flags=re.MULTILINE))
  submodules = {n for n in _public_names(module)
                if isinstance(getattr(module, n), types.ModuleType)}
  missing = sorted(set(_public_names(module)) - submodules - entries)
  assert not missing, f"docs/api.rst lacks {name}: {missing}"
  unknown = sorted(n for n in entries if not hasattr(module, n))
  assert not unknown, f"docs/api.rst lists unknown {name} names: {unknown}"
