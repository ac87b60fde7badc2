"""Run in its own process by tests/test_sharding.py (needs 8 host devices).

For each transform: outputs keep the input sharding, elementwise constraints
compile to zero collectives, per-axis norm and simplex projections move
data between devices only when their reduction axis is sharded, and results
match an unsharded run. (The simplex's Newton loop and the shell's rounding
check agree on one scalar flag across devices: a one-element all-reduce.)
Prints one JSON line per case.
"""

import os

if __name__ == "__main__":  # Not when imported (pytest given this file).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")

import json  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import posconstr  # noqa: E402
from posconstr.sets import _slice_sums  # noqa: E402

COLLECTIVES = re.compile(
    r"= (\S+) (all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(-start)?\(")


def count_collectives(compiled) -> int:
  """Collectives that move arrays (not one-element flags or counts)."""
  shapes = [m.group(1) for m in COLLECTIVES.finditer(compiled.as_text())]
  return sum(not re.fullmatch(r"\w+\[\](\{\})?", s) for s in shapes)


def main():
  assert len(jax.devices()) == 8, jax.devices()
  # Small kernels take the CPU path of the simplex's slice sums too.
  _slice_sums._MIN_ELEMENTS = 0
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  params = {"layer": {"kernel": jax.random.normal(k1, (64, 48)),
                      "bias": jax.random.normal(k2, (48,))}}
  grads = jax.tree.map(lambda x: jax.random.normal(k3, x.shape), params)
  # The kernel's columns (axis 1) are sharded 8 ways; axis 0 is not.
  shardings = {"layer": {"kernel": NamedSharding(mesh,
                                                 P(None, ("data", "model"))),
                         "bias": NamedSharding(mesh, P(("data", "model")))}}
  sharded_params = jax.device_put(params, shardings)
  sharded_grads = jax.device_put(grads, shardings)

  cases = {
      "project_nonneg": (posconstr.project_nonneg(), True),
      "project_box": (posconstr.project_box(-0.5, 0.5), True),
      "constrain_elementwise": (posconstr.constrain({
          "*/kernel": posconstr.NonNegative(0.01),
          "*/bias": posconstr.Box(-1.0, 1.0)}), True),
      "projected_adam": (posconstr.projected(optax.adam(1e-2),
                                             posconstr.NonNegative()), True),
      "maxnorm_axis0_unsharded": (posconstr.project(
          posconstr.MaxNorm(1.0, axis=0), mask="*/kernel"), True),
      "simplex_axis0_unsharded": (posconstr.project(
          posconstr.Simplex(axis=0), mask="*/kernel"), True),
      "unitnorm_axis0_unsharded": (posconstr.project(
          posconstr.UnitNorm(axis=0), mask="*/kernel"), True),
      "maxnorm_axis1_sharded": (posconstr.project(
          posconstr.MaxNorm(1.0, axis=1), mask="*/kernel"), False),
      "simplex_axis1_sharded": (posconstr.project(
          posconstr.Simplex(axis=1), mask="*/kernel"), False),
  }
  for name, (tx, local) in cases.items():
    if name != "projected_adam":
      tx = optax.chain(optax.adam(1e-2), tx)

    def step(p, g, s, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step)
    state = tx.init(sharded_params)
    compiled = jitted.lower(sharded_params, sharded_grads, state).compile()
    out, _ = jitted(sharded_params, sharded_grads, state)
    ref, _ = jax.jit(step)(params, grads, tx.init(params))
    same_sharding = all(
        o.sharding.is_equivalent_to(s, o.ndim)
        for o, s in zip(jax.tree.leaves(out), jax.tree.leaves(shardings)))
    max_diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    print(json.dumps({"case": name, "local": local,
                      "collectives": count_collectives(compiled),
                      "same_sharding": bool(same_sharding),
                      "max_diff": max_diff}), flush=True)

  # The reparameterization and the constraint report are elementwise too.
  g = posconstr.Softplus()
  f = jax.jit(lambda p: posconstr.reparam(p, {"*/kernel": g}))
  compiled = f.lower(sharded_params).compile()
  out = f(sharded_params)
  print(json.dumps({
      "case": "reparam_softplus", "local": True,
      "collectives": count_collectives(compiled),
      "same_sharding": bool(out["layer"]["kernel"].sharding.is_equivalent_to(
          shardings["layer"]["kernel"], 2)),
      "max_diff": float(jnp.max(jnp.abs(
          out["layer"]["kernel"] - jax.nn.softplus(params["layer"]["kernel"]))))
  }), flush=True)


if __name__ == "__main__":
  main()
