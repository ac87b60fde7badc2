"""XLA's own account of a compiled benchmark step (``jax.stages.Compiled``).

* :func:`cost_summary`: flops, bytes accessed, ... from ``cost_analysis()``,
  whatever shape it returns on this jax version and backend.
* :func:`temp_bytes`: the scratch buffer from ``memory_analysis()``.
* :func:`hlo_stats`: fusion and instruction counts of the optimized HLO.
* :func:`minor_faults_per_call`: page faults per call (what a fresh temp
  buffer per run costs on XLA:CPU).

Every function returns ``None`` (or ``{}``) where the backend does not
report the quantity, so that the benchmarks run unchanged on CPU, GPU, TPU.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax


def _first_cost_dict(cost) -> Optional[Mapping[str, Any]]:
  if cost is None:
    return None
  if isinstance(cost, Mapping):
    return cost
  if isinstance(cost, (list, tuple)):
    dicts = [c for c in cost if isinstance(c, Mapping)]
    if not dicts:
      return None
    if len(dicts) == 1:
      return dicts[0]
    merged: Dict[str, float] = {}
    for d in dicts:  # One per partition/program: add them up.
      for k, v in d.items():
        if isinstance(v, (int, float)):
          merged[k] = merged.get(k, 0.0) + float(v)
    return merged
  return None


def cost_summary(compiled) -> Dict[str, Optional[float]]:
  """``flops``, ``bytes accessed`` etc. of a ``jax.stages.Compiled``.

  ``cost_analysis()`` has returned a dict, a list of dicts (one per
  program), or ``None`` across jax versions and backends; missing keys give
  ``None``.
  """
  try:
    cost = _first_cost_dict(compiled.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    cost = None
  keys = ("bytes accessed", "flops", "transcendentals",
          "bytes accessedout{}", "optimal_seconds")
  if cost is None:
    return {k: None for k in keys}
  out = {}
  for k in keys:
    v = cost.get(k)
    out[k] = float(v) if isinstance(v, (int, float)) else None
  return out


def temp_bytes(compiled) -> Optional[float]:
  """Scratch memory XLA allocates for one run (``memory_analysis()``)."""
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def minor_faults_per_call(fn: Callable[[], Any], calls: int = 3
                          ) -> Optional[float]:
  """Minor page faults of this process per call of ``fn`` (Unix only).

  XLA:CPU maps a fresh temp buffer for each run of an executable, so every
  page of it faults on first touch, each step: a cost that "bytes accessed"
  does not show.
  """
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return None
  jax.block_until_ready(fn())
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(fn())
  after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  return (after - before) / calls


def hlo_stats(compiled) -> Dict[str, int]:
  """Rough counts from the optimized HLO text of a compiled computation."""
  try:
    text = compiled.as_text()
  except Exception:  # pylint: disable=broad-except
    return {}
  lines = text.splitlines()
  entry = _entry_lines(lines)
  return {
      "fusions_total": sum(1 for l in lines if " fusion(" in l
                           or "= fusion(" in l),
      "entry_fusions": sum(1 for l in entry if "fusion(" in l),
      "entry_instructions": sum(1 for l in entry if " = " in l),
      "hlo_lines": len(lines),
  }


def _entry_lines(lines: Sequence[str]) -> List[str]:
  out, inside = [], False
  for l in lines:
    if l.startswith("ENTRY"):
      inside = True
      continue
    if inside:
      if l.startswith("}"):
        break
      out.append(l)
  return out
