"""The state of the Optax-style ``lbfgsb``, and how it recognizes a point."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from posconstr.solvers import _lbfgsb_step as step_lib


class LbfgsbInfo(NamedTuple):
  """Diagnostics of the last update.

  Attributes:
    num_fun_evals: evaluations of ``value_fn`` in the last update.
    linesearch_accepted: whether the last update's search found a step
      (always True with a fixed ``learning_rate``).
    projected_grad_norm: ``||x - P(x - grad)||_inf`` at the point the last
      update moved to (with a fixed ``learning_rate``: at the params it was
      given, whose gradient it had).
  """

  num_fun_evals: jax.Array
  linesearch_accepted: jax.Array
  projected_grad_norm: jax.Array


class LbfgsbState(NamedTuple):
  """State of :func:`lbfgsb`.

  ``value`` and ``grad`` (shaped like the params) are those of the point the
  last update moved to (within the bounds), so
  ``optax.value_and_grad_from_state`` reuses them instead of evaluating the
  function again; before the first update, and with a fixed learning rate,
  ``value`` is ``inf`` and they are recomputed. ``solver`` is the state of
  the bounded L-BFGS iteration shared with :func:`posconstr.minimize` (on
  the dtype groups of the params, see ``group_leaves``). ``status`` (a
  :class:`posconstr.Status`) is ``RUNNING`` until the stopping test of
  :func:`posconstr.minimize` holds; from then on updates are zero and cost
  no evaluation.
  """

  count: jax.Array
  value: jax.Array
  grad: Any
  solver: step_lib.SolverState
  info: LbfgsbInfo

  @property
  def status(self) -> jax.Array:
    """The solver's status, a :class:`posconstr.Status` code."""
    return self.solver.status


def strong(tree):
  """Leaves as strongly typed arrays (the state's types must not drift)."""
  return jax.tree.map(lambda v: jnp.asarray(v).astype(jnp.asarray(v).dtype),
                      tree)


def all_equal(a, b) -> jax.Array:
  parts = [jnp.all(x == y) for x, y in zip(jax.tree.leaves(a),
                                          jax.tree.leaves(b))]
  return jnp.all(jnp.stack(parts)) if parts else jnp.ones((), bool)


def dtype_of(tree):
  return jnp.result_type(*jax.tree.leaves(tree))


def landed(x, target, step) -> jax.Array:
  """Whether ``x`` is ``target`` up to the rounding of landing on it.

  ``optax.apply_updates`` adds ``target - params`` to ``params``: two
  roundings, each within ``eps`` of ``|target|`` or of the step. Where no
  float update lands exactly (a step much longer than the target), the
  params end a few ulps off; they are still the point the last update moved
  to, and must not restart the iteration (which forgets the memory).
  """
  def close(a, t, d):
    eps = jnp.finfo(t.dtype).eps
    return jnp.all(jnp.abs(a - t) <= 4 * eps * (jnp.abs(t) + jnp.abs(d)))

  parts = [close(a, t, d) for a, t, d in zip(
      jax.tree.leaves(x), jax.tree.leaves(target), jax.tree.leaves(step))]
  return jnp.all(jnp.stack(parts)) if parts else jnp.ones((), bool)
