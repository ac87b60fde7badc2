"""``projected``: the bound-aware optimizer wrapper, against references.

References: a weight held against a bound and then released (the momentum
stall of ANCHORS.md, measured with ``optax.keep_params_nonnegative`` too),
``scipy.optimize.nnls`` on standardized scikit-learn data, plain Optax fed
hand-masked gradients, and a bisection simplex projection in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import sklearn.datasets
from _reference import bisection_simplex

import posconstr

# ------------------------------------------------------ the stall at a bound

PUSH_STEPS = 300      # gradient pushes the weight into the bound ...
RELEASE_STEPS = 120   # ... then points back into the set for this long.

# Steps a weight stays on the bound after its gradient turns, with the
# projection as the last link of a plain chain (see ANCHORS.md).
INNERS = {
    "adam": (lambda: optax.adam(0.01), 6),
    "momentum0.9": (lambda: optax.sgd(0.01, momentum=0.9), 6),
    "momentum0.99": (lambda: optax.sgd(0.01, momentum=0.99), 66),
}


def _stuck_steps(tx, x0, push):
  """Steps the weight stays on its bound after the gradient turns.

  One float32 weight at ``x0``; gradient ``push`` for ``PUSH_STEPS`` steps,
  then ``-push``. Returns (bound reached, stuck steps, trajectory).
  """
  grads = jnp.concatenate([jnp.full((PUSH_STEPS, 1), push, jnp.float32),
                           jnp.full((RELEASE_STEPS, 1), -push, jnp.float32)])

  @jax.jit
  def run(x):
    def body(carry, g):
      x, s = carry
      u, s = tx.update(g, s, x)
      x = optax.apply_updates(x, u)
      return (x, s), x[0]
    return jax.lax.scan(body, (x, tx.init(x)), grads)[1]

  path = np.asarray(run(jnp.array([x0], jnp.float32)))
  bound = path[PUSH_STEPS - 1]
  after = path[PUSH_STEPS:]
  moved = np.nonzero(after != bound)[0]
  assert moved.size, "the weight never left the bound"
  return bound, int(moved[0]), path


# (constraint for projected, the same set as a plain projection link, start,
#  gradient sign while pushing, the bound it is pushed into)
BOUNDS = {
    "nonneg": (posconstr.NonNegative(), posconstr.project_nonneg(), 1.0, 1.0,
               0.0),
    "box_upper": (posconstr.Box(-1.0, 1.5), posconstr.project_box(-1.0, 1.5),
                  0.5, -1.0, 1.5),
    "box_lower": (posconstr.Box(-1.0, 1.5), posconstr.project_box(-1.0, 1.5),
                  0.5, 1.0, -1.0),
}


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("where", sorted(BOUNDS))
def test_projection_link_stalls_at_the_bound(inner, where):
  make, expected = INNERS[inner]
  _, link, x0, push, edge = BOUNDS[where]
  bound, stuck, path = _stuck_steps(optax.chain(make(), link), x0, push)
  assert bound == edge
  assert stuck == expected
  assert np.all(path[PUSH_STEPS:PUSH_STEPS + stuck] == edge)


@pytest.mark.parametrize("inner", sorted(INNERS))
def test_keep_params_nonnegative_stalls_the_same(inner):
  make, expected = INNERS[inner]
  tx = optax.chain(make(), optax.keep_params_nonnegative())
  bound, stuck, _ = _stuck_steps(tx, 1.0, 1.0)
  assert bound == 0.0 and stuck == expected


@pytest.mark.parametrize("inner", sorted(INNERS))
@pytest.mark.parametrize("where", sorted(BOUNDS))
def test_projected_leaves_the_bound_on_the_first_step(inner, where):
  make, _ = INNERS[inner]
  constraint, _, x0, push, edge = BOUNDS[where]
  tx = posconstr.projected(make(), constraint)
  bound, stuck, path = _stuck_steps(tx, x0, push)
  assert bound == edge
  assert stuck == 0
  # It moves back into the set, and never left it.
  assert (path[PUSH_STEPS] - edge) * push > 0
  lo, hi = (0.0, np.inf) if where == "nonneg" else (-1.0, 1.5)
  assert np.all((path >= lo) & (path <= hi))
  if inner == "momentum0.9":  # momentum drained at the bound: an SGD step
    np.testing.assert_allclose(abs(path[PUSH_STEPS] - edge), 0.01, rtol=1e-4)


# ------------------------------------------------------ NNLS against scipy

# Steps run, and from which step on every iterate must be within a relative
# objective gap of 1e-6 of scipy's optimum. Measured (jax 0.10.2, CPU, x64):
# the gap is <= 1e-6 from step 107 (diabetes) / 311 (breast cancer) for SGD
# with momentum 0.9 and lr = 1/L, and from step 107 / 490 for Adam with
# lr = 0.05 * 0.5 ** (t / 500). Final gaps: ~2e-16 (diabetes), 2.3e-12 (SGD)
# and 6.1e-12 (Adam) on breast cancer, whose A^T A has condition 1e5.
SGD_MOMENTUM = 0.9
SGD_STEPS, SGD_TAIL_FROM = 800, 500
ADAM_LR = optax.exponential_decay(0.05, transition_steps=500, decay_rate=0.5)
ADAM_STEPS, ADAM_TAIL_FROM = 1200, 800
GAP_TOL = 1e-6


def _nnls_problem(name):
  """Standardized columns and target; breast cancer's target is malignancy."""
  x, y = getattr(sklearn.datasets, name)(return_X_y=True)
  if name == "load_breast_cancer":
    y = 1.0 - y  # with benign = 1 the NNLS optimum has a single nonzero
  x = (x - x.mean(0)) / x.std(0)
  y = (y - y.mean()) / y.std()
  return x, y


@pytest.mark.parametrize("name", ["load_diabetes", "load_breast_cancer"])
@pytest.mark.parametrize("method", ["sgd", "adam"])
def test_nnls_matches_scipy(name, method):
  a, b = _nnls_problem(name)
  n, d = a.shape
  x_ref, residual = scipy.optimize.nnls(a, b)
  f_ref = 0.5 * residual ** 2 / n
  zeros = x_ref == 0
  assert 0 < zeros.sum() < d  # the bound is active, but not everywhere
  if method == "sgd":
    lipschitz = np.linalg.eigvalsh(a.T @ a / n)[-1]
    inner = optax.sgd(1.0 / lipschitz, momentum=SGD_MOMENTUM)
    steps, tail = SGD_STEPS, SGD_TAIL_FROM
  else:
    inner = optax.adam(ADAM_LR)
    steps, tail = ADAM_STEPS, ADAM_TAIL_FROM

  with jax.enable_x64(True):
    tx = posconstr.projected(inner, posconstr.NonNegative())
    aj, bj = jnp.asarray(a), jnp.asarray(b)

    def objective(x):
      return 0.5 * jnp.sum((aj @ x - bj) ** 2) / n

    @jax.jit
    def solve():
      def body(carry, _):
        x, s = carry
        u, s = tx.update(jax.grad(objective)(x), s, x)
        x = optax.apply_updates(x, u)
        return (x, s), (objective(x), jnp.min(x))
      x0 = jnp.zeros(d)
      return jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)

    (x, _), (values, lowest) = solve()
    assert x.dtype == jnp.float64
    x, values, lowest = np.asarray(x), np.asarray(values), np.asarray(lowest)

  gaps = (values - f_ref) / f_ref
  assert np.all(lowest >= 0), "an iterate left the non-negative orthant"
  assert gaps[tail:].max() <= GAP_TOL, (name, method, gaps[tail:].max())
  assert gaps[-1] <= 1e-10
  assert gaps[0] > 1e-2  # not already solved at the first step
  # Same support as scipy, with exact zeros where scipy has them.
  assert np.all(x[zeros] == 0)
  np.testing.assert_allclose(x, x_ref, atol=1e-4)


# ------------------------------------------------------ non-elementwise sets




def _stepper(tx):
  """A jitted ``(grads, state, params) -> (new params, updates, state)``."""

  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  return step


def _random_grads(step, params, offset=0.0):
  rng = np.random.default_rng(step)
  return jax.tree.map(
      lambda x: jnp.asarray(offset + rng.normal(size=x.shape), x.dtype), params)


@pytest.mark.parametrize("name, constraint", [
    ("simplex", posconstr.Simplex(axis=0)),
    ("maxnorm", posconstr.MaxNorm(0.8, axis=0))])
def test_non_elementwise_sets_pass_gradients_through(name, constraint):
  rng = np.random.default_rng(0)
  w0 = constraint.project(jnp.asarray(rng.uniform(size=(5, 3)), jnp.float32))
  grads = jnp.asarray(0.3 + rng.normal(size=(30, 5, 3)), jnp.float32)
  tx = posconstr.projected(optax.adam(0.05), constraint)
  ref = optax.chain(optax.adam(0.05), posconstr.project(constraint))

  @jax.jit
  def run(w0):
    def body(carry, g):
      p, s, q, r = carry
      u, s = tx.update(g, s, p)
      v, r = ref.update(g, r, q)
      p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
      return (p, s, q, r), (p, s.inner_state, q, r[0])
    return jax.lax.scan(body, (w0, tx.init(w0), w0, ref.init(w0)), grads)[1]

  ps, states, qs, ref_states = run(w0)
  # Same gradients reached Adam on both sides: identical moments, params.
  for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(ref_states)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(ps), np.asarray(qs))
  # In the set at every step (checked by hand, columns as slices), and on
  # its boundary at some steps.
  w = np.asarray(ps, np.float64)  # (steps, 5, 3)
  if name == "simplex":
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    assert np.sum(w == 0) > 0
  else:
    norms = np.linalg.norm(w, axis=1)
    assert np.all(norms <= 0.8 * (1 + 1e-5))
    assert np.sum(np.isclose(norms, 0.8, rtol=1e-5)) > 0


def test_mixed_rules_mask_only_the_elementwise_leaf():
  rules = {"a": posconstr.NonNegative(), "b": posconstr.Simplex()}
  lr = 0.1
  tx = posconstr.projected(optax.sgd(lr, momentum=0.9), rules)
  ref = optax.sgd(lr, momentum=0.9)  # fed hand-masked gradients
  params = {"a": jnp.array([0.3, 0.0, 0.2, 0.0]),
            "b": jnp.array([0.5, 0.0, 0.5, 0.0])}
  p, s, r = params, tx.init(params), ref.init(params)
  step, ref_update = _stepper(tx), jax.jit(ref.update)
  masked_total = 0
  for i in range(25):
    g = _random_grads(i, p, offset=0.5)
    new, _, s = step(g, s, p)
    # Reference: zero a's components with x_i == 0 and g_i > 0; b untouched.
    out = (np.asarray(p["a"]) <= 0) & (np.asarray(g["a"]) > 0)
    masked_total += int(out.sum())
    g_ref = {"a": jnp.where(out, 0.0, g["a"]), "b": g["b"]}
    v, r = ref_update(g_ref, r, p)
    for a, b in zip(jax.tree.leaves(s.inner_state), jax.tree.leaves(r)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-7)
    stepped = {k: np.asarray(p[k], np.float64) + np.asarray(v[k]) for k in p}
    q = {"a": np.maximum(stepped["a"], 0), "b": bisection_simplex(stepped["b"])}
    np.testing.assert_allclose(np.asarray(new["a"]), q["a"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["b"]), q["b"], atol=1e-6)
    assert float(jnp.min(new["a"])) >= 0 and float(jnp.min(new["b"])) >= 0
    p = new
  assert masked_total > 5  # the mask was exercised on "a"
  assert int(jnp.sum(p["b"] == 0)) > 0  # and b sat on its boundary too


def test_mask_selects_which_leaves_are_masked():
  tx = posconstr.projected(optax.sgd(0.1, momentum=0.9),
                           posconstr.NonNegative(), mask="a")
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
  u, s = jax.jit(tx.update)(grads, tx.init(params), params)
  trace = s.inner_state[0].trace
  np.testing.assert_array_equal(trace["a"], [0.0, 0.0])
  np.testing.assert_array_equal(trace["b"], [1.0, 1.0])
  new = optax.apply_updates(params, u)
  np.testing.assert_array_equal(new["a"], [0.0, 0.0])
  np.testing.assert_allclose(new["b"], [-0.1, -0.1])


# ------------------------------------------------------ Optax compatibility


def _nonneg_problem():
  params = {"w": jnp.array([0.5, 0.0, 1.0]), "v": jnp.array([[0.2, 0.0]])}
  grads = {"w": jnp.array([1.0, 2.0, -1.0]), "v": jnp.array([[1.0, 1.0]])}
  return params, grads


def test_state_is_a_namedtuple_and_update_jits():
  params, grads = _nonneg_problem()
  tx = posconstr.projected(optax.adam(0.1), posconstr.NonNegative())
  state = tx.init(params)
  assert isinstance(state, posconstr.ProjectedState)
  assert state._fields == ("inner_state",)
  jit_u, jit_s = jax.jit(tx.update)(grads, state, params)
  # Adam's first step is -lr * sign(g), except where it would leave the set.
  np.testing.assert_allclose(jit_u["w"], [-0.1, 0.0, 0.1], rtol=1e-5)
  np.testing.assert_allclose(jit_u["v"], [[-0.1, 0.0]], rtol=1e-5)
  assert isinstance(jit_s, posconstr.ProjectedState)
  assert jax.tree.structure(jit_s) == jax.tree.structure(state)
  # w[1] is at 0 with g > 0: no momentum, no move.
  assert float(jit_s.inner_state[0].mu["w"][1]) == 0.0
  assert float(jit_s.inner_state[0].mu["v"][0, 1]) == 0.0
  assert float(jit_s.inner_state[0].mu["v"][0, 0]) != 0.0
  with pytest.raises(ValueError, match="needs the current parameters"):
    tx.update(grads, state)


def test_last_link_of_optax_chain():
  params, _ = _nonneg_problem()
  tx = optax.chain(optax.clip_by_global_norm(0.5),
                   posconstr.projected(optax.adam(0.1),
                                       posconstr.NonNegative()))
  state = tx.init(params)
  posconstr.check_projection_last(state)
  step = _stepper(tx)
  for i in range(20):
    params, _, state = step(_random_grads(i, params, 0.5), state, params)
    assert all(float(jnp.min(x)) >= 0 for x in jax.tree.leaves(params))
  assert sum(int(jnp.sum(x == 0)) for x in jax.tree.leaves(params)) > 0


def test_inside_multisteps_matches_averaged_gradients():
  k = 3
  params, _ = _nonneg_problem()
  tx = optax.MultiSteps(
      posconstr.projected(optax.sgd(0.1, momentum=0.9),
                          posconstr.NonNegative()), every_k_schedule=k)
  ref = posconstr.projected(optax.sgd(0.1, momentum=0.9),
                            posconstr.NonNegative())
  p, s = params, tx.init(params)
  q, r = params, ref.init(params)
  posconstr.check_projection_last(s)
  step, ref_step = _stepper(tx), _stepper(ref)
  for outer in range(8):
    gs = [_random_grads(10 * outer + j, params, 0.4) for j in range(k)]
    for j, g in enumerate(gs):
      new, _, s = step(g, s, p)
      if j < k - 1:
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(p)):
          np.testing.assert_array_equal(a, b)
      p = new
    mean = jax.tree.map(lambda *x: sum(x) / k, *gs)
    q, _, r = ref_step(mean, r, q)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
      assert float(jnp.min(a)) >= 0


def test_inject_hyperparams_inner_learning_rate_is_live():
  params, grads = _nonneg_problem()
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
  tx = posconstr.projected(inner, posconstr.NonNegative())
  state = tx.init(params)
  u, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(new["w"], [0.4, 0.0, 1.1], rtol=1e-5)
  assert float(state.inner_state.inner_state[0].mu["w"][1]) == 0.0
  state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u, state = jax.jit(tx.update)(grads, state, new)
  for a in jax.tree.leaves(u):
    np.testing.assert_array_equal(a, np.zeros_like(a))


def test_extra_args_reach_the_inner_optimizer():
  params, grads = _nonneg_problem()
  # An inner optimizer that needs an extra argument: u = -value * g.
  scale_by_value = optax.GradientTransformationExtraArgs(
      lambda p: optax.EmptyState(),
      lambda u, s, p=None, *, value, **kw: (
          jax.tree.map(lambda g: -value * g, u), s))
  tx = posconstr.projected(scale_by_value, posconstr.NonNegative())
  state = tx.init(params)
  u, _ = jax.jit(tx.update)(grads, state, params, value=jnp.asarray(0.25))
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(new["w"], [0.25, 0.0, 1.25])
  np.testing.assert_allclose(new["v"], [[0.0, 0.0]])
  with pytest.raises(TypeError):
    tx.update(grads, state, params)  # value is required by the inner
  # An inner optimizer without extra args ignores them.
  plain = posconstr.projected(optax.sgd(0.1), posconstr.NonNegative())
  u, _ = plain.update(grads, plain.init(params), params, value=1.0)
  np.testing.assert_allclose(optax.apply_updates(params, u)["w"],
                             [0.4, 0.0, 1.1], rtol=1e-6)


def test_lbfgs_inner_gets_value_and_grad_and_stays_feasible():
  target = jnp.array([1.0, -2.0, 0.5])

  def f(x):
    return 0.5 * jnp.sum((x - target) ** 2)

  tx = posconstr.projected(optax.lbfgs(), posconstr.NonNegative())

  def body(carry, _):  # lbfgs needs value, grad and value_fn passed through
    x, state = carry
    value, grad = jax.value_and_grad(f)(x)
    u, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=f)
    return (optax.apply_updates(x, u), state), jnp.min(x)

  x0 = jnp.array([2.0, 2.0, 2.0])
  (x, _), lowest = jax.jit(lambda: jax.lax.scan(
      body, (x0, tx.init(x0)), None, length=10))()
  assert float(jnp.min(lowest)) >= 0 and float(jnp.min(x)) >= 0
  np.testing.assert_allclose(x, [1.0, 0.0, 0.5], atol=1e-4)


# ------------------------------------------------------ chain order checks


def test_chain_accepts_projected_as_last():
  params, _ = _nonneg_problem()
  proj = posconstr.projected(optax.adam(0.1), posconstr.NonNegative())
  posconstr.chain(optax.clip(1.0), proj).init(params)
  posconstr.chain(proj, posconstr.project_nonneg()).init(params)
  posconstr.check_projection_last(proj.init(params))


def test_chain_rejects_a_link_after_projected():
  params, _ = _nonneg_problem()
  assert isinstance(optax.scale(2.0).init(params), optax.EmptyState)
  proj = posconstr.projected(optax.adam(0.1), posconstr.NonNegative())
  with pytest.raises(ValueError, match="link 0 is followed by link 1"):
    posconstr.chain(proj, optax.scale(2.0)).init(params)
  with pytest.raises(ValueError, match="link 1 is followed by link 2"):
    posconstr.chain(optax.clip(1.0), proj, optax.adam(0.1)).init(params)
  bad = optax.MultiSteps(optax.chain(proj, optax.scale(2.0)), 2)
  with pytest.raises(ValueError, match="followed by"):
    posconstr.check_projection_last(bad.init(params))
  # And the scale after it really does leave the set.
  proj = posconstr.projected(optax.adam(0.4), posconstr.NonNegative())
  tx = optax.chain(proj, optax.scale(2.0))
  u, _ = tx.update({"w": jnp.array([1.0, 1.0, 1.0]), "v": jnp.ones((1, 2))},
                   tx.init(params), params)
  assert float(jnp.min(optax.apply_updates(params, u)["w"])) < 0


def test_chain_rejects_projection_first_inside_projected():
  params, _ = _nonneg_problem()
  inner = optax.chain(posconstr.project_nonneg(), optax.adam(0.1))
  tx = posconstr.projected(inner, posconstr.NonNegative())
  with pytest.raises(ValueError, match="inner_state"):
    posconstr.check_projection_last(tx.init(params))


def test_projected_without_its_nan_guard():
  # float32 Adam (eps > 0): the same steps, bit for bit, as with the guard.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(np.maximum(rng.normal(size=(6, 5)), 0),
                             jnp.float32)}
  guarded = posconstr.projected(optax.adam(0.1), posconstr.NonNegative())
  bare = posconstr.projected(optax.adam(0.1), posconstr.NonNegative(),
                             nan_guard=False)

  @jax.jit
  def run(p, grads):
    out = []
    for tx in (guarded, bare):
      q, state = p, tx.init(p)
      for g in grads:
        updates, state = tx.update({"w": g}, state, q)
        q = optax.apply_updates(q, updates)
      out.append(q["w"])
    return out

  grads = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  with_guard, without = run(params, grads)
  np.testing.assert_array_equal(np.asarray(with_guard), np.asarray(without))
  assert (np.asarray(without) == 0).any()  # Some weights sat on the bound.
  # float16 Adam, whose eps is 0 there: the zeroed gradient's step is 0 / 0.
  params = {"w": jnp.array([0.0, 1.0], jnp.float16)}
  updates, _ = bare.update({"w": jnp.array([1.0, 1.0], jnp.float16)},
                           bare.init(params), params)
  assert np.isnan(np.asarray(updates["w"], np.float32)).tolist() == [
      True, False]
  posconstr.projected(optax.adam(0.1), posconstr.NonNegative(),
                      nan_guard=np.bool_(False))  # NumPy's bools are bools.
  with pytest.raises(TypeError, match="nan_guard=1"):
    posconstr.projected(optax.adam(0.1), posconstr.NonNegative(),
                        nan_guard=1)
