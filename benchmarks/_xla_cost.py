"""XLA's own account of a compiled step (``jax.stages.Compiled``): bytes
accessed, flops, transcendentals, the temp buffer, fusions, page faults per
call. Each is ``None`` where a backend does not report it (CPU, GPU, TPU)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import jax

COST_KEYS = ("bytes accessed", "flops", "transcendentals")


def cost_summary(compiled) -> Dict[str, Optional[float]]:
  """:data:`COST_KEYS` of ``cost_analysis()``, which has returned a dict, a
  list of dicts (one per program: added up) or ``None`` across versions."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    cost = None
  dicts = [c for c in ([cost] if isinstance(cost, Mapping) else cost or ())
           if isinstance(c, Mapping)]
  out = {}
  for key in COST_KEYS:
    values = [d[key] for d in dicts if isinstance(d.get(key), (int, float))]
    out[key] = float(sum(values)) if values else None
  return out


def temp_bytes(compiled) -> Optional[float]:
  """Scratch memory XLA allocates for one run (``memory_analysis()``)."""
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return None


def fusion_counts(compiled) -> Dict[str, Optional[int]]:
  """``entry_fusions`` and ``fusions_total`` in the optimized HLO text."""
  try:
    lines = compiled.as_text().splitlines()
  except Exception:  # pylint: disable=broad-except
    return {"entry_fusions": None, "fusions_total": None}
  entry, inside = [], False
  for line in lines:
    if line.startswith("ENTRY"):
      inside = True
    elif inside and line.startswith("}"):
      break
    elif inside:
      entry.append(line)
  return {"entry_fusions": sum("fusion(" in line for line in entry),
          "fusions_total": sum(" fusion(" in line for line in lines)}


def minor_faults_per_call(fn: Callable[[], Any], calls: int = 3
                          ) -> Optional[float]:
  """Minor page faults of this process per call of ``fn`` (Unix only).

  XLA:CPU maps a fresh temp buffer for each run of an executable, so every
  page of it faults on first touch, each step: a cost that "bytes accessed"
  does not show.
  """
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # Not Unix.
    return None
  jax.block_until_ready(fn())
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(calls):
    jax.block_until_ready(fn())
  after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  return (after - before) / calls
