"""What the examples share: data, progress bars, tables, figures and flags.

Not an example itself. The examples import it as a sibling module, both when
run as scripts (``python examples/quickstart.py``: ``examples/`` is then on
``sys.path``) and when the tests load them from their paths (each example puts
its own folder on ``sys.path`` first).
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import os
import platform
import sys
import time
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # Headless: write figures to files, never a window.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import model_selection  # noqa: E402
from sklearn import preprocessing  # noqa: E402

import posconstr  # noqa: E402

try:  # tqdm is in the "examples" extra; a plain bar stands in without it.
  from tqdm import tqdm as _tqdm  # noqa: E402
except ImportError:  # pragma: no cover - depends on the environment.
  _tqdm = None


# ----------------------------------------------------------------- data ----

def load_digits(seed: int) -> Dict[str, jax.Array]:
  """Digits (8x8 images, 64 features), standardized on a fixed 75/25 split.

  The split is stratified and seeded; the scaler sees the training images
  only. Returns float32 ``x_train``/``x_test`` and int32 ``y_train``/``y_test``.
  """
  x, y = datasets.load_digits(return_X_y=True)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x.astype(np.float32), y, test_size=0.25, random_state=seed, stratify=y)
  scaler = preprocessing.StandardScaler().fit(x_train)
  return {
      "x_train": jnp.asarray(scaler.transform(x_train), jnp.float32),
      "y_train": jnp.asarray(y_train, jnp.int32),
      "x_test": jnp.asarray(scaler.transform(x_test), jnp.float32),
      "y_test": jnp.asarray(y_test, jnp.int32),
  }


def path_of(key_path) -> str:
  """A pytree key path joined by ``/``, as posconstr's masks see it."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                  for k in key_path)


def leaves_matching(params, pattern: str) -> Dict[str, jax.Array]:
  """``{path: leaf}`` of the leaves whose path matches the glob ``pattern``."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_of(p): leaf for p, leaf in flat
          if fnmatch.fnmatchcase(path_of(p), pattern)}


def flat_matching(params, pattern: str) -> np.ndarray:
  """The matching leaves, flattened and concatenated (numpy float64)."""
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                         for leaf in leaves_matching(params, pattern).values()])


# ----------------------------------------------------------------- model ----

class MLP(nn.Module):
  """64 -> ``hidden`` (relu) -> ``num_classes`` logits (layers of those names).

  Attributes:
    kernels: ``"free"`` (``nn.Dense``; a projecting optimizer can keep them
      >= 0) or ``"softplus"`` (``posconstr.linen.Reparameterized`` around
      ``nn.Dense``: ``params`` hold latents, the layers see their softplus).
  """
  hidden: int = 64
  num_classes: int = 10
  kernels: str = "free"

  def _dense(self, features: int, name: str) -> nn.Module:
    if self.kernels == "free":
      return nn.Dense(features, name=name)
    if self.kernels == "softplus":
      return posconstr.linen.Reparameterized(
          nn.Dense(features), kernel=posconstr.Softplus(), name=name)
    raise ValueError(f"MLP: unknown kernels {self.kernels!r}; use 'free' or "
                     "'softplus'")

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self._dense(self.hidden, "hidden")(x))
    return self._dense(self.num_classes, "logits")(x)


def identity(params):
  """The applied params of a model whose params are not latents."""
  return params


def cross_entropy(model: nn.Module, params, x, y):
  """Mean softmax cross-entropy of ``model``'s logits against labels ``y``."""
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: nn.Module, key: jax.Array, x: jax.Array):
  """``model``'s initial params (compiled once per distinct model)."""
  return model.init(key, x)["params"]


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model: nn.Module, params, data: Dict[str, jax.Array]):
  """(test accuracy, cross-entropy on the whole training set)."""
  logits = model.apply({"params": params}, data["x_test"])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == data["y_test"])
  return accuracy, cross_entropy(model, params, data["x_train"],
                                 data["y_train"])


def kernel_stats(params, pattern: str, rules=None, projected: bool = False,
                 dead_tol: float = 1e-3) -> Dict[str, Any]:
  """Applied kernel weights and the share on the bound (or dead).

  Args:
    params: trained params (latents when ``rules`` is given).
    pattern: glob of the kernels.
    rules: ``{pattern: parameterization}`` of a reparameterized model.
    projected: whether an optimizer kept the kernels >= 0 (share == 0).
    dead_tol: a latent is dead when the derivative of its parameterization
      is below this (``posconstr.dead_fraction``).

  Returns:
    ``kernels`` (applied, flat), ``min_kernel``, ``bound_or_dead`` (the
    size-weighted share, None for free weights) and its ``kind``.
  """
  share, kind = None, "free"
  if rules is None:
    applied = params
  else:  # One compilation, not one per eager op and leaf.
    applied, fractions = jax.jit(lambda p: (
        posconstr.reparam(p, rules),
        posconstr.dead_fraction(p, rules, tol=dead_tol)))(params)
  kernels = flat_matching(applied, pattern)
  if rules is not None:
    sizes = {path: np.size(leaf) for p in rules
             for path, leaf in leaves_matching(params, p).items()}
    share = float(sum(float(f) * sizes[p] for p, f in fractions.items())
                  / sum(sizes[p] for p in fractions))
    kind = "dead"
  elif projected:
    share, kind = float(np.mean(kernels == 0.0)), "on bound"
  return {"kernels": kernels, "min_kernel": float(kernels.min()),
          "bound_or_dead": share, "kind": kind}


def share_text(stats: Dict[str, Any]) -> str:
  """``"12.3% on bound"``, ``"0.4% dead"`` or ``"n/a (free)"``."""
  if stats["bound_or_dead"] is None:
    return "n/a (free)"
  return f"{percent(stats['bound_or_dead'])} {stats['kind']}"


# -------------------------------------------------------------- progress ----

class _PlainBar:
  """The part of tqdm's interface the examples use, printed every 10%."""

  def __init__(self, iterable, total, desc, disable):
    self._iterable, self._desc, self._disable = iterable, desc, disable
    self._total = total if total is not None else len(iterable)
    self._done, self._postfix, self._shown = 0, "", -1

  def __iter__(self):
    for item in self._iterable:
      yield item
      self.update(1)
    self.close()

  def update(self, n: int = 1):
    self._done += n
    tenth = 10 * self._done // max(self._total, 1)
    if not self._disable and tenth > self._shown:
      self._shown = tenth
      print(f"{self._desc}: {self._done}/{self._total} {self._postfix}",
            file=sys.stderr, flush=True)

  def set_postfix(self, **values):
    self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

  def close(self):
    pass


def progress(iterable: Optional[Iterable] = None, *, total=None,
             desc: str = "", disable: bool = False):
  """A tqdm bar over ``iterable`` (or ``total`` updates), else a plain one."""
  if _tqdm is not None:
    return _tqdm(iterable, total=total, desc=desc, disable=disable,
                 leave=True, dynamic_ncols=True)
  return _PlainBar(iterable, total, desc, disable)


def run_steps(step: Callable, carry, steps: int, *, desc: str,
              show: bool = True, every: int = 100,
              label: str = "loss") -> Tuple[Any, np.ndarray, float]:
  """Calls ``carry, metrics = step(carry, i)`` for ``i < steps`` under a bar.

  ``metrics`` is a scalar or a tuple of scalars, kept on the device until the
  end (no host sync per step); the bar shows the first one every ``every``
  steps. Returns ``(carry, metrics as float64 (steps,) or (steps, k),
  seconds)``.
  """
  history = []
  start = time.perf_counter()
  bar = progress(range(steps), desc=desc, disable=not show)
  for i in bar:
    carry, metrics = step(carry, i)
    history.append(metrics)
    if i % every == 0 or i == steps - 1:
      first = metrics[0] if isinstance(metrics, tuple) else metrics
      bar.set_postfix(**{label: f"{float(first):.4g}"})
  history = np.asarray(jax.device_get(history), np.float64)
  return carry, history, time.perf_counter() - start


# --------------------------------------------------------------- reports ----

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                   align: Optional[str] = None) -> str:
  """A markdown table; ``align`` has one of ``l``, ``r``, ``c`` per column.

  The default aligns the first column left and the others right.
  """
  align = align or "l" + "r" * (len(header) - 1)
  if len(align) != len(header) or any(len(r) != len(header) for r in rows):
    raise ValueError(f"markdown_table: {len(header)} columns in the header, "
                     f"align {align!r}, row lengths {[len(r) for r in rows]}")
  rule = {"l": "---", "r": "---:", "c": ":---:"}
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(rule[a] for a in align) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def save_figure(fig, out_dir: str, filename: str, dpi: int = 80) -> str:
  """Saves ``fig`` as ``out_dir/filename`` (folders made), closes it."""
  path = os.path.join(out_dir, filename)
  os.makedirs(out_dir or ".", exist_ok=True)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path


def machine_line() -> str:
  """Where the times in a table were taken: CPU, cores, backend and load."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f
                 if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"Times: {cpu}, {os.cpu_count()} cores, JAX {jax.__version__} on "
          f"{jax.default_backend()}, load average {load:.1f} at the end.")


def report(table: str, figure: str, *notes: str) -> None:
  """Prints the summary table and notes, and saves them beside the figure.

  ``figure``'s folder gets ``<name>.md`` with the same text: the README's
  gallery tables are rendered from those files
  (``python -m benchmarks.readme_tables --examples``), never typed.
  """
  text = "\n\n".join((table,) + notes + (machine_line(),))
  print()
  print(text)
  summary = os.path.splitext(figure)[0] + ".md"
  with open(summary, "w") as f:
    f.write(text + "\n")
  print(f"\nSaved figure: {figure}\nSaved table:  {summary}")


# ----------------------------------------------------------------- flags ----

def parser(doc: str, figure: str, steps: int,
           steps_help: str = "optimizer steps per variant",
           lr: Optional[float] = None, lr_help: str = "learning rate",
           seed_help: str = "seed of the split, the init and the sampling",
           l2: Optional[float] = None) -> argparse.ArgumentParser:
  """The flags every example has: ``--steps --out --seed --no-progress``.

  ``--lr`` too when ``lr`` is given, ``--l2`` (a penalty) when ``l2`` is.
  ``doc`` is the example's docstring (its first line describes the script),
  ``figure`` the name of its figure.
  """
  result = argparse.ArgumentParser(description=doc.splitlines()[0])
  result.add_argument("--steps", type=int, default=steps,
                      help=f"{steps_help} (default %(default)s)")
  result.add_argument("--out", default="out",
                      help=f"folder for {figure} (default %(default)s/)")
  result.add_argument("--seed", type=int, default=0,
                      help=seed_help)
  if lr is not None:
    result.add_argument("--lr", type=float, default=lr,
                        help=f"{lr_help} (default %(default)s)")
  if l2 is not None:
    result.add_argument("--l2", type=float, default=l2,
                        help="penalty on the squared applied kernels "
                        "(default %(default)s)")
  result.add_argument("--no-progress", action="store_true",
                      help="hide the progress bars")
  return result


def parse(parser_: argparse.ArgumentParser, argv: Optional[Sequence[str]],
          positive: Sequence[str] = ("steps",)) -> argparse.Namespace:
  """Parses ``argv``; the integer flags named in ``positive`` must be >= 1."""
  args = parser_.parse_args(argv)
  for flag in positive:
    if getattr(args, flag) < 1:
      parser_.error(f"--{flag.replace('_', '-')} must be >= 1")
  return args


def percent(fraction: float) -> str:
  return f"{100 * fraction:.1f}%"
