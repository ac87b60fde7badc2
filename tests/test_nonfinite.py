"""NaN and inf in gradients: never hidden by a projection, skipped by
``optax.apply_if_finite``.

The README promises "NaN is never hidden": a projection passes NaN in the
updates through to the parameters. Checked for every transform
(``project``/``project_nonneg``/``project_box``, ``constrain``, ``projected``,
``lbfgsb``). Infinite updates are documented to be "projected like any other
value": the result must be exactly P(p + u), clipped where the set bounds
that side. Then ``optax.apply_if_finite`` around each transform must skip a
NaN step bit for bit (params and state unchanged, as if the step never
happened) and let the next finite step through.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr as pc

SETS = {
    "NonNegative": pc.NonNegative(),
    "Box": pc.Box(0.0, 1.0),
    "Simplex": pc.Simplex(axis=0),
    "MaxNorm": pc.MaxNorm(1.0, axis=0),
    "UnitNorm": pc.UnitNorm(axis=0),
    "MinMaxNorm": pc.MinMaxNorm(0.5, 1.0, axis=0),
}
ELEMENTWISE = ("NonNegative", "Box")


def _params():
  # w[0, 0] sits on the lower bound 0; every column of "w" is a point of
  # the simplex, with norm 0.6 to 0.8.
  w = jnp.array([[0.0, 0.5, 0.2], [0.6, 0.5, 0.3], [0.4, 0.0, 0.5]])
  return {"w": w, "b": jnp.array([0.25, 0.0, 0.75])}


def _grads(bad, at):
  """Finite gradients except ``bad`` at w[at]; ``at`` is on the bound when
  it is (0, 0) and free when it is (1, 0)."""
  g = jnp.full((3, 3), 0.1).at[at].set(bad)
  return {"w": g, "b": jnp.full((3,), 0.1)}


def _transform(kind, name, inner):
  c = SETS[name]
  if kind == "project":
    return optax.chain(inner, pc.project(c))
  if kind == "constrain":
    return optax.chain(inner, pc.constrain({"w": c, "b": pc.Box(0.0, 1.0)}))
  return pc.projected(inner, c)


def _cases():
  return [(kind, name) for kind in ("project", "constrain", "projected")
          for name in SETS]


def _step(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


# ------------------------------------------------------------------- NaN


INNERS = {"project": "sgd", "constrain": "sgd", "projected": "adam"}


@pytest.fixture(scope="module")
def nan_results():
  """Every (kind, set, where) NaN step, in ONE jit. A NaN gradient makes
  Adam's and SGD's update NaN alike; Adam is used under ``projected``, whose
  gradient masking sits in front of the inner optimizer."""
  params = _params()
  wheres = {"free": (1, 0), "bound": (0, 0)}
  inners = {"sgd": optax.sgd(0.1), "adam": optax.adam(0.1)}

  @jax.jit
  def run(params):
    out = {}
    for kind, name in _cases():
      for where, at in wheres.items():
        tx = _transform(kind, name, inners[INNERS[kind]])
        out[kind, name, where] = _step(tx, params, _grads(jnp.nan, at))
    return out

  return wheres, jax.tree.map(np.asarray, run(params))


@pytest.mark.parametrize("kind,name", _cases())
def test_nan_gradient_reaches_the_parameters(nan_results, kind, name):
  wheres, results = nan_results
  for where, at in wheres.items():
    new = results[kind, name, where]
    w = new["w"]
    assert np.isnan(w[at]), (where, w)
    # The NaN stays in its slice (column 0): other columns and the other
    # leaf are finite and feasible.
    assert np.isfinite(w[:, 1:]).all() and np.isfinite(new["b"]).all()
    assert float(SETS[name].violation(w[:, 1:])) == 0
    if name in ELEMENTWISE:  # Coordinate by coordinate: only w[at].
      others = np.ones_like(w, bool)
      others[at] = False
      assert np.isfinite(w[others]).all()
      assert float(SETS[name].violation(w[others])) == 0


def test_nan_gradient_reaches_the_parameters_through_project_box_bound_tree():
  params = _params()
  tx = optax.chain(optax.sgd(0.1),
                   pc.project_box({"w": 0.0, "b": None}, {"w": 1.0, "b": 0.5}))
  new = jax.jit(lambda p: _step(tx, p, _grads(jnp.nan, (0, 0))))(params)
  assert np.isnan(new["w"][0, 0])
  assert np.isfinite(np.asarray(new["w"]).ravel()[1:]).all()


def test_lbfgsb_line_search_nan_gradient_is_visible():
  """With a line search a NaN gradient gives no direction to search along:
  the status says NONFINITE and the updates are NaN, as optax.lbfgs's (so
  ``optax.apply_if_finite`` can skip the step)."""
  params = _params()
  def f(p):
    return jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
  tx = pc.lbfgsb(memory_size=1, lower=0.0, upper=1.0)
  grads = _grads(jnp.nan, (1, 0))

  @jax.jit
  def step(params):
    updates, state = tx.update(grads, tx.init(params), params,
                               value=f(params), grad=grads, value_fn=f)
    return updates, state

  updates, state = step(params)
  assert int(state.status) == pc.Status.NONFINITE
  assert int(state.info.num_fun_evals) == 0
  for leaf in jax.tree.leaves(updates):
    assert np.isnan(np.asarray(leaf)).all()


# ------------------------------------------------------------------- inf
#
# Documented (README, project()): "An infinite update is projected like any
# other value, so -inf towards a lower bound lands on the bound". So the new
# parameters are exactly P(p + u), inf and NaN included: finite where the
# set clips the infinite coordinate, non-finite where it cannot.


@pytest.fixture(scope="module")
def inf_results():
  params = _params()

  @jax.jit
  def run(params):
    out = {}
    for name, c in SETS.items():
      for sign in (1, -1):
        tx = optax.chain(optax.sgd(1.0), pc.project(c))
        grads = _grads(sign * jnp.inf, (1, 0))
        by_hand = c.project(params["w"] - grads["w"])
        out[name, sign] = (_step(tx, params, grads)["w"], by_hand)
    return out

  return jax.tree.map(np.asarray, run(params))


# Where P(p + u) is finite although u is infinite: the set clips that side.
INF_CLIPPED = {("NonNegative", 1): 0.0, ("Box", 1): 0.0, ("Box", -1): 1.0,
               ("Simplex", 1): 0.0}


@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("name", list(SETS))
def test_inf_update_is_projected_like_any_value(inf_results, name, sign):
  new, by_hand = inf_results[name, sign]
  np.testing.assert_array_equal(new, by_hand)  # NaN == NaN here.
  if (name, sign) in INF_CLIPPED:  # Lands on the bound, exactly.
    assert new[1, 0] == INF_CLIPPED[name, sign]
    assert float(SETS[name].violation(new)) == 0
  else:  # Nothing to clip it to: it reaches the parameter.
    assert not np.isfinite(new[1, 0])


@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
def test_projected_passes_an_inf_gradient_at_the_bound_as_chain_does(sign):
  """``projected`` zeroes only *finite* gradient components that push out of
  the set at the bound: an infinite one reaches Adam (whose step is then
  inf / inf = NaN) and the parameters, bit for bit as through
  ``chain(adam, project_nonneg())``. (It used to be dropped, turning a
  diverged gradient into a finite step at the bound.)"""
  params = _params()
  txs = {"projected": pc.projected(optax.adam(0.1), pc.NonNegative()),
         "chain": optax.chain(optax.adam(0.1), pc.project_nonneg())}

  @jax.jit
  def run(params):
    out = {}
    for name, tx in txs.items():
      for where, at in (("bound", (0, 0)), ("free", (1, 0))):
        out[name, where] = _step(tx, params, _grads(sign * jnp.inf, at))["w"]
    return out

  out = jax.tree.map(np.asarray, run(params))
  for where, at in (("bound", (0, 0)), ("free", (1, 0))):
    np.testing.assert_array_equal(out["projected", where], out["chain", where])
    assert np.isnan(out["projected", where][at])
    rest = np.ones((3, 3), bool)
    rest[at] = False
    assert np.isfinite(out["projected", where][rest]).all()


def test_projected_still_drops_a_finite_gradient_pushing_out_at_the_bound():
  params = _params()
  tx = pc.projected(optax.adam(0.1), pc.NonNegative())
  updates, state = tx.update(_grads(1e30, (0, 0)), tx.init(params), params)
  assert float(optax.apply_updates(params, updates)["w"][0, 0]) == 0
  assert float(state.inner_state[0].mu["w"][0, 0]) == 0


# ------------------------------------------------------ optax.apply_if_finite

CURVATURE = jnp.arange(1.0, 10.0).reshape(3, 3)


def F(p):  # Distinct curvatures: L-BFGS needs many steps, not one or two.
  return (jnp.sum(CURVATURE * (p["w"] - 0.3) ** 2)
          + jnp.sum(jnp.array([1.0, 2.0, 3.0]) * (p["b"] + 1.0) ** 2))


FINITE_SAFE = {
    "project_nonneg": lambda: optax.chain(optax.adam(0.1), pc.project_nonneg()),
    "constrain": lambda: optax.chain(optax.adam(0.1), pc.constrain(
        {"w": pc.Simplex(axis=0), "b": pc.Box(0.0, 1.0)})),
    "projected": lambda: pc.projected(optax.adam(0.1), pc.NonNegative()),
    "lbfgsb_fixed_lr": lambda: pc.lbfgsb(0.1, memory_size=1, lower=0.0),
}
FEASIBLE = {
    "project_nonneg": {"w": pc.NonNegative(), "b": pc.NonNegative()},
    "constrain": {"w": pc.Simplex(axis=0), "b": pc.Box(0.0, 1.0)},
    "projected": {"w": pc.NonNegative(), "b": pc.NonNegative()},
    "lbfgsb_fixed_lr": {"w": pc.NonNegative(), "b": pc.NonNegative()},
}


@functools.lru_cache(maxsize=None)
def _wrapped(name):
  """``apply_if_finite(tx, max_consecutive_errors=1)`` and its jitted step.

  One compile per transform serves every test below: the reference run
  (finite gradients only) goes through the same wrapped step, which for
  finite gradients is the bare transform.
  """
  tx = optax.apply_if_finite(FINITE_SAFE[name](), max_consecutive_errors=1)

  @jax.jit
  def step(params, state, grads):
    # value/grad/value_fn reach lbfgsb through apply_if_finite's extra
    # arguments; the other transforms take none.
    extra = {}
    if isinstance(state.inner_state, pc.LbfgsbState):
      extra = dict(value=F(params), grad=grads, value_fn=F)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return tx, step


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _moved(a, b):
  return not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                      jax.tree.leaves(b)))


GRAD = jax.jit(jax.grad(F))
NAN_GRADS = _grads(jnp.nan, (1, 0))


@pytest.mark.parametrize("name", list(FINITE_SAFE))
def test_apply_if_finite_skips_a_nan_step_and_resumes(name):
  tx, step = _wrapped(name)
  params = _params()
  state = tx.init(params)
  # Reference: the same optimizer on the finite steps only.
  ref_params, ref_state = params, tx.init(params)

  for i in range(4):  # Steps 0, 2 and 3 are finite; 2 must still move.
    if i == 1:  # The NaN step: skipped, nothing moves.
      new, new_state = step(params, state, NAN_GRADS)
      _assert_same(new, params)
      _assert_same(new_state.inner_state, state.inner_state)
      assert int(new_state.notfinite_count) == 1
      assert not bool(new_state.last_finite)
    else:
      g = GRAD(params)
      new, new_state = step(params, state, g)
      ref_params, ref_state = step(ref_params, ref_state, g)
      # Bit for bit the run without the NaN step.
      _assert_same(new, ref_params)
      _assert_same(new_state.inner_state, ref_state.inner_state)
      assert int(new_state.notfinite_count) == 0
      assert i == 3 or _moved(new, params)
    for k, c in FEASIBLE[name].items():
      assert np.isfinite(np.asarray(new[k])).all()
      assert float(c.violation(new[k])) == 0, (i, k)
    params, state = new, new_state
  assert int(state.total_notfinite) == 1
  assert int(ref_state.total_notfinite) == 0


@pytest.mark.parametrize("name", list(FINITE_SAFE))
def test_apply_if_finite_gives_up_after_max_errors_and_nan_shows(name):
  """Past ``max_consecutive_errors`` the NaN step is applied, and no
  transform clips the NaN away."""
  tx, step = _wrapped(name)
  params = _params()
  state = tx.init(params)
  new, state = step(params, state, NAN_GRADS)
  _assert_same(new, params)
  new, state = step(new, state, NAN_GRADS)  # 2 > 1 errors: applied.
  assert int(state.notfinite_count) == 2
  w = np.asarray(new["w"])
  if name == "lbfgsb_fixed_lr":
    # The quasi-Newton direction mixes coordinates (the first step scales
    # by 1 / max|g|): every parameter becomes NaN, none is clipped.
    assert np.isnan(w).all() and np.isnan(np.asarray(new["b"])).all()
  else:
    assert np.isnan(w[1, 0])


@pytest.mark.parametrize("sign", [1, -1], ids=["+inf", "-inf"])
@pytest.mark.parametrize("where", ["free", "bound"])
def test_lbfgsb_fixed_step_with_an_inf_gradient(where, sign):
  """A fixed step cannot check an infinite gradient by evaluating: it is
  treated like NaN (status NONFINITE, NaN updates), so apply_if_finite
  skips it, and past its limit every parameter shows NaN."""
  tx, step = _wrapped("lbfgsb_fixed_lr")  # Applied after 1 skipped error.
  at = {"free": (1, 0), "bound": (0, 0)}[where]
  params = _params()
  grads = _grads(sign * jnp.inf, at)
  new, state = step(params, tx.init(params), grads)
  _assert_same(new, params)  # Skipped: the state is the one before.
  new, state = step(new, state, grads)
  assert int(state.inner_state.status) == pc.Status.NONFINITE
  assert int(state.notfinite_count) == 2
  assert np.isnan(np.asarray(new["w"])).all()
