"""Mixed-precision pytrees: every transform keeps every leaf's dtype.

One params tree holds float16, bfloat16, float32 and float64 leaves (float64
under a local ``jax.enable_x64(True)``: ``jax.experimental.enable_x64`` is
gone in jax 0.10, and the context manager keeps x64 from leaking into other
tests). Each transform runs a few jitted steps on it; the updates and the
new parameters must keep the leaf's dtype, and elementwise sets must hold
*exactly* (violation 0) after ``optax.apply_updates`` even in bfloat16.

Parameterizations, and reparam/unreparam on the same tree, are in
test_dtypes_parameterizations.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import DTYPES
from _reference import assert_dtypes as _assert_dtypes
from _reference import mixed_dtype_tree as _tree

import posconstr as pc

HALF = (jnp.float16, jnp.bfloat16)


# ----------------------------------------------------- projections in Optax

SETS = {
    "NonNegative(0.1)": pc.NonNegative(0.1),
    "Box(0.1,0.3)": pc.Box(0.1, 0.3),
    "Simplex": pc.Simplex(axis=0),
    "MaxNorm": pc.MaxNorm(0.5, axis=0),
    "UnitNorm": pc.UnitNorm(axis=0),
    "MinMaxNorm": pc.MinMaxNorm(0.5, 1.0, axis=0),
}


def _transforms():
  """(id, tx, constraint the result must satisfy)."""
  out = [
      ("project_nonneg", optax.chain(optax.adam(0.3), pc.project_nonneg(0.1)),
       pc.NonNegative(0.1)),
      ("project_box", optax.chain(optax.sgd(0.5, momentum=0.5),
                                  pc.project_box(0.1, 0.3)), pc.Box(0.1, 0.3)),
      ("project_box_tree", optax.chain(optax.sgd(0.5, momentum=0.5),
                                       pc.project_box(
          {k: 0.1 for k in DTYPES}, {k: 0.3 for k in DTYPES})),
       pc.Box(0.1, 0.3)),
  ]
  for name, c in SETS.items():
    if name == "NonNegative(0.1)":
      continue  # The same code path as project_nonneg.
    # One rule per leaf, so that paths are matched too.
    rules = {k: c for k in DTYPES}
    out.append((f"constrain[{name}]",
                optax.chain(optax.sgd(0.5, momentum=0.5), pc.constrain(rules)),
                c))
  for name in ("NonNegative(0.1)", "Simplex"):
    # eps=1e-4: Adam's default 1e-8 underflows to 0 in float16 (see
    # test_projected_adam_float16_with_default_eps).
    out.append((f"projected[{name}]",
                pc.projected(optax.adam(0.3, eps=1e-4), SETS[name]),
                SETS[name]))
  return out


TRANSFORMS = _transforms()


@pytest.fixture(scope="module")
def runs():
  """Two steps of every transform on the mixed tree; ONE jitted step runs
  all transforms side by side (one compile instead of one per transform).

  Returns ``{name: [(params, updates, new params, state, violations)]}``
  with numpy leaves (float64 ones made under x64).
  """
  with jax.enable_x64(True):
    params = _tree()
    _assert_dtypes(params, "init")

    @jax.jit
    def step(params, states, grads):
      out = {}
      for name, tx, _ in TRANSFORMS:
        updates, state = tx.update(grads, states[name], params[name])
        out[name] = (updates, optax.apply_updates(params[name], updates),
                     state)
      return out

    # Violations in a jit of their own, on the materialized parameters: fused
    # into the jit that computes them, XLA (CPU) may skip the rounding of
    # p + d to bfloat16 and measure the unrounded sum instead.
    violations = jax.jit(lambda news: {
        name: {k: c.violation(v) for k, v in news[name].items()}
        for name, _, c in TRANSFORMS})

    current = {name: params for name, _, _ in TRANSFORMS}
    states = {name: tx.init(params) for name, tx, _ in TRANSFORMS}
    history = {name: [] for name, _, _ in TRANSFORMS}
    for i in range(2):
      out = step(current, states, _tree(scale=3.0, seed=i + 1))
      measured = violations({name: o[1] for name, o in out.items()})
      for name, (updates, new, state) in out.items():
        history[name].append(jax.tree.map(np.asarray, (
            current[name], updates, new, state, measured[name])))
        current[name], states[name] = new, state
    return history


@pytest.mark.parametrize("name", [t[0] for t in TRANSFORMS])
def test_projection_keeps_dtypes_and_lands_in_the_set(runs, name):
  for params, updates, new, state, violations in runs[name]:
    _assert_dtypes(updates, "updates")
    _assert_dtypes(new, "params after apply_updates")
    for k in DTYPES:
      assert not np.array_equal(np.asarray(new[k], np.float64),
                                np.asarray(params[k], np.float64)), k
    # Exactly 0: elementwise sets land bit-exactly inside the bounds
    # (rounded inwards to each dtype); equality and norm sets within the
    # 2 n eps rounding tolerance of their own `violation`.
    assert {k: float(v) for k, v in violations.items()} == {
        k: 0.0 for k in DTYPES}
  # Optimizer moments (Adam's mu and nu, the momentum trace) keep the dtype
  # of their parameter.
  checked = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = getattr(path[-1], "key", None)
    if key in DTYPES and np.shape(leaf) == (4, 3):
      assert leaf.dtype == jnp.dtype(DTYPES[key]), (path, leaf.dtype)
      checked += 1
  assert checked >= 4


NORMS = ["MaxNorm", "UnitNorm", "MinMaxNorm"]
NORM_DTYPES = {"f16": jnp.float16, "bf16": jnp.bfloat16, "f32": jnp.float32}


@pytest.fixture(scope="module")
def far_out():
  """Weights (|p| ~ 30 and ~ 5, 256 columns of 6) projected onto the norm
  sets in one step, every (scale, set, dtype) in ONE jit:
  {(scale, name, dtype): (params (float64), p + u, new params, violation)}.
  """
  rng = np.random.default_rng(1)
  p64, g64 = rng.normal(size=(6, 256)), rng.normal(size=(6, 256))

  @jax.jit
  def run(p64, g64):
    out = {}
    for scale in (30, 5):
      for name in NORMS:
        tx = optax.chain(optax.sgd(1.0), pc.constrain({"w": SETS[name]}))
        for dtype_name, dtype in NORM_DTYPES.items():
          params = {"w": (scale * p64).astype(dtype)}
          updates, _ = tx.update({"w": g64.astype(dtype)}, tx.init(params),
                                 params)
          stepped = params["w"] - g64.astype(dtype)  # p + u, u = -g
          out[scale, name, dtype_name] = (
              stepped, optax.apply_updates(params, updates)["w"])
    return out

  news = run(jnp.asarray(p64, jnp.float32), jnp.asarray(g64, jnp.float32))
  # Measured on the materialized arrays (see `runs`).
  violations = jax.jit(lambda news: {key: SETS[key[1]].violation(new[1])
                                     for key, new in news.items()})(news)
  return {key: (30 * p64 if key[0] == 30 else 5 * p64,
                np.asarray(news[key][0]).astype(np.float64),
                np.asarray(news[key][1]), np.asarray(violations[key]))
          for key in news}


@pytest.mark.parametrize("dtype_name", list(NORM_DTYPES))
@pytest.mark.parametrize("name", ["MaxNorm", "MinMaxNorm"])
def test_norm_sets_land_in_the_set_from_far_outside(far_out, name,
                                                    dtype_name):
  """Balls and thick shells: each coordinate is rounded so that the norm
  lands inside even when ``p + d`` can only hit a grid of ulp(|p|)."""
  _, _, new, violation = far_out[30, name, dtype_name]
  assert new.dtype == NORM_DTYPES[dtype_name]
  assert float(violation) == 0.0


@pytest.mark.parametrize("scale", [30, 5])
@pytest.mark.parametrize("dtype_name", list(NORM_DTYPES))
def test_max_norm_lands_each_coordinate_just_inside_the_projection(
    far_out, dtype_name, scale):
  """Against the float64 projection t of p + u: |new| <= |t| with the same
  sign, within 2 eps (|p| + 2 |t|) (the landing grid is about eps |p|)."""
  params, stepped, new, _ = far_out[scale, "MaxNorm", dtype_name]
  eps = float(jnp.finfo(NORM_DTYPES[dtype_name]).eps)
  norms = np.linalg.norm(stepped, axis=0, keepdims=True)
  t = stepped * np.minimum(1, 0.5 / norms)
  new = new.astype(np.float64)
  assert (norms > 0.5).mean() > 0.9  # Most columns are projected.
  assert (np.abs(new) <= np.abs(t) * (1 + 2 ** -20)).all()
  assert (new * t >= 0).all()
  assert (np.abs(new - t) <= 2 * eps * (np.abs(params) + 2 * np.abs(t))).all()


@pytest.mark.parametrize("dtype_name", list(NORM_DTYPES))
def test_unit_norm_lands_on_the_sphere_from_moderately_outside(far_out,
                                                               dtype_name):
  _, _, new, violation = far_out[5, "UnitNorm", dtype_name]
  assert new.dtype == NORM_DTYPES[dtype_name]
  assert float(violation) == 0.0


@pytest.mark.parametrize("dtype_name", list(NORM_DTYPES))
def test_unit_norm_from_far_outside_misses_by_at_most_the_landing_grid(
    far_out, dtype_name):
  """From |p| ~ 30 the sphere's width (2 n eps) is finer than the grid
  p + d can reach (spacing <= 2 ulp(|p| + 1) per coordinate): each slice's
  norm is then within that grid's diagonal of 1, not always within 2 n eps."""
  params, _, new, _ = far_out[30, "UnitNorm", dtype_name]
  dtype = NORM_DTYPES[dtype_name]
  eps = float(jnp.finfo(dtype).eps)
  p64 = np.abs(params) + 1
  grid = 2 * eps * 2.0 ** np.floor(np.log2(p64))  # 2 ulp(|p| + 1)
  reach = np.sqrt(np.sum(grid ** 2, axis=0)) + 12 * eps
  norms = np.linalg.norm(new.astype(np.float64), axis=0)
  assert (np.abs(norms - 1) <= reach).all()


def test_unit_norm_can_be_out_of_reach_for_a_single_large_bfloat16_weight():
  """The limit of one update: no bfloat16 ``d`` at all makes 300 + d land
  on the unit sphere (brute force over every bfloat16 value), so the
  landing is the best reachable point, 0 or 2, and says so via violation."""
  bf16 = jnp.bfloat16
  every = np.arange(2 ** 16, dtype=np.uint16).view(jnp.dtype(bf16))
  finite = every[np.isfinite(every.astype(np.float32))]
  landed = (np.asarray(300, bf16) + finite).astype(np.float64)
  assert not np.any(np.abs(np.abs(landed) - 1) <= 2 * 2.0 ** -7)
  params = {"w": jnp.array([300.0], bf16)}
  tx = pc.constrain({"w": pc.UnitNorm(axis=None)})
  updates, _ = tx.update({"w": jnp.zeros(1, bf16)}, tx.init(params), params)
  new = float(optax.apply_updates(params, updates)["w"][0])
  assert new in (0.0, 2.0)


def test_projected_adam_float16_with_default_eps():
  params = {"w": jnp.array([0.0, 1.0], jnp.float16)}
  grads = {"w": jnp.array([1.0, 1.0], jnp.float16)}  # Pushes w[0] out.
  tx = pc.projected(optax.adam(0.1), pc.NonNegative())
  new = jax.jit(lambda p, g: optax.apply_updates(
      p, tx.update(g, tx.init(p), p)[0]))(params, grads)["w"]
  # w[0] stays on the bound; w[1] takes Adam's first step, -lr * sign(g).
  np.testing.assert_array_equal(np.asarray(new, np.float32),
                                np.float16([0.0, 0.9]).astype(np.float32))


def test_projected_adam_float16_still_passes_nan_gradients():
  params = {"w": jnp.array([0.0, 1.0, 0.0], jnp.float16)}
  grads = {"w": jnp.array([1.0, jnp.nan, jnp.nan], jnp.float16)}
  tx = pc.projected(optax.adam(0.1), pc.NonNegative())
  new = jax.jit(lambda p, g: optax.apply_updates(
      p, tx.update(g, tx.init(p), p)[0]))(params, grads)["w"]
  assert np.isnan(np.asarray(new, np.float32)).tolist() == [False, True, True]


@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
@pytest.mark.parametrize("constraint", [pc.NonNegative(0.1), pc.Box(0.1, 0.3)],
                         ids=repr)
def test_half_precision_projection_lands_exactly_inside(constraint, dtype):
  """Far-out steps land inside the bounds rounded inwards: violation 0."""
  params = {"w": jnp.asarray(np.linspace(-3, 3, 64), dtype)}
  grads = {"w": jnp.asarray(np.linspace(50, -50, 64), dtype)}
  tx = optax.chain(optax.sgd(1.0), pc.project(constraint))

  @jax.jit
  def step(params, grads):
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates["w"], optax.apply_updates(params, updates)["w"]

  updates, new = step(params, grads)
  assert updates.dtype == new.dtype == dtype
  # On the materialized array (see `runs` for why not inside the jit).
  assert float(constraint.violation(new)) == 0.0
  lo, hi = constraint.bounds_in(dtype)
  new64 = np.asarray(new, np.float64)
  assert new64.min() >= float(lo) >= 0.1
  if hi is not None:
    assert new64.max() <= float(hi) <= 0.3
  # No float d makes p + d hit the bound exactly when the spacing of d
  # (about |p| + |bound|) exceeds the bound's: the landing point is then a
  # feasible neighbour (posconstr.sets._landing), within an ulp of the operands.
  p64 = np.asarray(params["w"], np.float64)
  want = np.asarray(constraint.project(params["w"] - grads["w"]), np.float64)
  ulp = float(jnp.finfo(dtype).eps) * (np.abs(p64) + np.abs(want))
  assert (np.abs(new64 - want) <= ulp).all()


@pytest.mark.slow  # ~6 s of compiles; test_lbfgsb_engine covers the dtypes.
def test_lbfgsb_with_value_fn_keeps_dtypes_and_bounds():
  with jax.enable_x64(True):
    params = _tree()
    target = _tree(seed=7)

    def f(p):  # Each leaf in its own dtype; the sum promotes to float64.
      return sum(jnp.sum((p[k] - target[k]) ** 2) for k in DTYPES)

    # memory_size=1 keeps the compile small (the two-loop is unrolled).
    tx = pc.lbfgsb(memory_size=1, lower=0.1, upper=0.3)

    @jax.jit
    def step(params, state):
      value, grad = jax.value_and_grad(f)(params)
      updates, state = tx.update(grad, state, params, value=value, grad=grad,
                                 value_fn=f)
      return updates, optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(2):
      updates, new, state = step(params, state)
      _assert_dtypes(updates, "lbfgsb updates")
      _assert_dtypes(new, "lbfgsb params")
      # The memory holds one buffer per dtype (leaves grouped by dtype).
      assert sorted(str(s.dtype) for s in state.solver.memory.s) == sorted(
          str(jnp.dtype(d)) for d in DTYPES.values())
      _assert_dtypes(state.grad, "cached grad")
      assert bool(state.info.linesearch_accepted)
      for k in DTYPES:
        assert float(pc.Box(0.1, 0.3).violation(new[k])) == 0.0, k
      assert float(f(new)) < float(f(params))
      params = new
    assert state.value.dtype == jnp.float64


def test_lbfgsb_float32_value_with_float64_leaf():
  with jax.enable_x64(True):
    params = {"s": jnp.ones(3, jnp.float32), "d": jnp.ones(3, jnp.float64)}

    def f(p):
      return jnp.sum(p["s"] ** 2) + jnp.sum(p["d"] ** 2).astype(jnp.float32)

    tx = pc.lbfgsb(memory_size=1, lower=0.1)

    @jax.jit  # Used to fail while tracing (float32 step, float64 slope).
    def step(params, state):
      value, grad = jax.value_and_grad(f)(params)
      updates, state = tx.update(grad, state, params, value=value, grad=grad,
                                 value_fn=f)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(3):
      params, state = step(params, state)
    assert params["s"].dtype == jnp.float32
    assert params["d"].dtype == jnp.float64
    # min of sum(x^2) over x >= 0.1 is the bound, reached exactly.
    for leaf in params.values():
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(
          jnp.full(3, 0.1, leaf.dtype)))
    assert float(state.value) == float(f(params))


@pytest.mark.parametrize("name", [
    "UnitNorm", pytest.param("MinMaxNorm", marks=pytest.mark.slow)])
def test_shells_round_to_nearest_when_p_is_near_and_still_land(name):
  """Slices of 64 with |p| ~ 2: nearest rounding provably lands in the
  shell (|p| <= (n - 5) min_value), the bisection is skipped and each
  coordinate is within the nearest-rounding bound u (|p| + 2 |t|) of the
  float64 target. One slice far out (|p| = 80 > 59) sends the whole leaf
  through the bisection, and it still lands."""
  rng = np.random.default_rng(4)
  p64 = rng.normal(size=(64, 32)) * 2 / 8  # |p| ~ 2 per column
  u64 = rng.normal(size=(64, 32)) * 0.1
  c = SETS[name]
  land = jax.jit(lambda p, u: p + c.landing_update(p, u))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    p, u = jnp.asarray(p64, dtype), jnp.asarray(u64, dtype)
    new = land(p, u)
    assert float(c.violation(new)) == 0.0, dtype
    stepped = np.asarray((p + u).astype(jnp.float32), np.float64)
    norms = np.linalg.norm(stepped, axis=0, keepdims=True)
    target = stepped * np.clip(norms, c.min_value, c.max_value) / norms
    unit = float(jnp.finfo(dtype).eps) / 2
    params = np.asarray(p.astype(jnp.float32), np.float64)
    miss = np.abs(np.asarray(new.astype(jnp.float32), np.float64) - target)
    assert (miss <= 1.01 * unit * (np.abs(params) + 2 * np.abs(target))
            + 1e-7 * np.abs(target)).all(), dtype
    new = land(p.at[0, 0].set(80.0), u)
    assert float(c.violation(new)) == 0.0, dtype


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("constraint", [
    pc.NonNegative(), pc.Box(-1.0, 1.0), pc.Simplex(axis=0),
    pc.MaxNorm(1.0, axis=0), pc.UnitNorm(axis=0),
    pc.MinMaxNorm(0.5, 1.0, axis=0)], ids=repr)
def test_float8_leaves_are_projected_and_land_in_the_set(constraint, dtype):
  # The sets reduce and land in float32 for leaves narrower than that.
  x = jnp.array([[-1.0, 2.0, 0.5], [3.0, -0.25, 1.0]], dtype)
  y = constraint.project(x)
  assert y.dtype == dtype
  assert float(constraint.violation(y)) == 0
  np.testing.assert_array_equal(np.asarray(constraint.project(y), np.float32),
                                np.asarray(y, np.float32))
  if constraint.elementwise:  # Exact bounds in float8: the clip itself.
    lo, hi = (0, np.inf) if isinstance(constraint, pc.NonNegative) else (-1, 1)
    np.testing.assert_array_equal(
        np.asarray(y, np.float32), np.clip(np.asarray(x, np.float32), lo, hi))
  tx = optax.chain(optax.sgd(0.1), pc.project(constraint))
  params = {"w": x}
  step = jax.jit(lambda p, s: tx.update({"w": jnp.ones_like(x)}, s, p))
  updates, _ = step(params, tx.init(params))
  new = optax.apply_updates(params, updates)["w"]
  assert new.dtype == dtype and float(constraint.violation(new)) == 0
