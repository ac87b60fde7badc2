"""Which leaves a projection touches: masks, path patterns and ``constrain``.

The reference for a selected leaf is ``max(p + u, 0)`` computed by hand (for
``eps = 0`` the landing is always exact); an unselected leaf must come back as
the very same update object.
"""

from typing import NamedTuple

import _models
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr


def _params():
  rng = np.random.default_rng(0)
  def f32(*s):
    return jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "Dense_0": {"kernel": f32(4, 4), "bias": f32(4)},
      "Dense_1": {"kernel": f32(4, 4), "bias": f32(4)},
      "step": jnp.array([3, -4], jnp.int32),
      "flag": jnp.array([True, False]),
  }


def _updates(params):
  """Large negative float updates; the int/bool leaves get their own arrays."""
  return {k: (jax.tree.map(lambda x: -2.0 - jnp.abs(x), v) if k.startswith("D")
              else jnp.zeros_like(v)) for k, v in params.items()}


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_selection(tx, expected):
  """Runs ``tx`` once; checks exactly the paths in ``expected`` moved."""
  params = _params()
  updates = _updates(params)
  out, _ = tx.update(updates, tx.init(params), params)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  p, u, o = _flat(params), _flat(updates), _flat(out)
  for path in p:
    if path in expected:
      assert o[path] is not u[path], path
      new = np.asarray(optax.apply_updates(p[path], o[path]))
      ref = np.maximum(np.asarray(p[path]) + np.asarray(u[path]), 0.0)
      np.testing.assert_array_equal(new, ref, err_msg=path)
      assert np.all(new == 0.0), path  # The updates push every entry below 0.
    else:
      assert o[path] is u[path], path  # Returned as is: no copy, no work.


_KERNELS = {"Dense_0/kernel", "Dense_1/kernel"}
_FLOATS = _KERNELS | {"Dense_0/bias", "Dense_1/bias"}


def _is_kernel(path, _):
  return path[-1].key == "kernel"


@pytest.mark.parametrize("mask", [
    "*/kernel",
    "Dense_?/kernel",
    "*kernel",  # `*` also crosses '/'.
    ["Dense_0/kernel", "Dense_1/kernel"],
    ("Dense_1/kernel", "Dense_0/k*"),
    {"Dense_0": {"kernel": True, "bias": False},
     "Dense_1": {"kernel": True, "bias": False}, "step": False, "flag": False},
    {"Dense_0": {"kernel": np.bool_(True), "bias": jnp.array(False)},
     "Dense_1": {"kernel": True, "bias": False}, "step": False, "flag": False},
    lambda p: jax.tree_util.tree_map_with_path(_is_kernel, p),
], ids=["glob", "question-mark", "star-crosses-slash", "list", "tuple",
        "bool-tree", "numpy-and-jax-bools", "callable"])
def test_every_mask_form_selects_the_kernels(mask):
  _check_selection(posconstr.project_nonneg(mask=mask), _KERNELS)


@pytest.mark.parametrize("mask", [
    ["Dense_0/*", "Dense_1/kernel"],
    {"Dense_0": True, "Dense_1": {"kernel": True, "bias": False},
     "step": False, "flag": False},
    lambda p: {"Dense_0": True, "Dense_1": {"kernel": True, "bias": False},
               "step": False, "flag": False},
], ids=["patterns", "bool-prefix", "callable-prefix"])
def test_prefix_masks_select_whole_subtrees(mask):
  _check_selection(posconstr.project_nonneg(mask=mask),
                   _KERNELS | {"Dense_0/bias"})


def test_mask_none_selects_every_float_leaf_and_leaves_ints_alone():
  _check_selection(posconstr.project_nonneg(), _FLOATS)
  _check_selection(posconstr.project_box(0.0, None), _FLOATS)


def test_all_false_mask_is_the_identity():
  params = _params()
  mask = jax.tree.map(lambda _: False, params)
  _check_selection(posconstr.project_nonneg(mask=mask), set())
  _check_selection(posconstr.project_nonneg(mask={k: False for k in params}),
                   set())


def test_patterns_are_case_sensitive():
  with pytest.raises(ValueError, match=r"\['\*/Kernel'\] match no parameter"):
    posconstr.project_nonneg(mask="*/Kernel").init(_params())


def test_paths_through_lists_and_named_tuples():

  class Layer(NamedTuple):
    w: jax.Array
    b: jax.Array

  params = {"layers": [Layer(jnp.ones(2), jnp.ones(2)),
                       Layer(jnp.ones(2), jnp.ones(2))]}
  updates = jax.tree.map(lambda x: -3.0 * x, params)
  tx = posconstr.project_nonneg(mask="layers/1/w")
  out, _ = tx.update(updates, tx.init(params), params)
  new = optax.apply_updates(params, out)
  np.testing.assert_array_equal(new["layers"][1].w, [0.0, 0.0])
  for leaf in (new["layers"][0].w, new["layers"][0].b, new["layers"][1].b):
    np.testing.assert_array_equal(leaf, [-2.0, -2.0])
  with pytest.raises(ValueError,
                     match=r"'layers/0/w', 'layers/0/b', 'layers/1/w'"):
    posconstr.project_nonneg(mask="layers/2/*").init(params)


def test_a_field_named_value_keeps_its_name_outside_nnx_variables():
  # Only an nnx.Variable's own `.value` is left out of a path.
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Gain(NamedTuple):
    value: jax.Array
    bias: jax.Array

  params = {"gain": Gain(jnp.array([-1.0]), jnp.array([-2.0]))}
  new = posconstr.project_params(params, posconstr.NonNegative(),
                                 mask="gain/value")
  np.testing.assert_array_equal(new["gain"].value, [0.0])
  np.testing.assert_array_equal(new["gain"].bias, [-2.0])
  state = nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Param)
  for tree in (state, nnx.to_pure_dict(state)):
    report = posconstr.constraint_report(tree, posconstr.NonNegative())
    assert sorted(report) == ["bias", "kernel"], sorted(report)


# ---------------------------------------------------------------- mask errors


def test_mask_tree_that_does_not_match_params():
  params = _params()
  extra = {"Dense_0": True, "Dense_1": True, "Dense_2": True, "step": False,
           "flag": False}
  with pytest.raises(ValueError, match=r"the mask has `Dense_2`, which is not "
                     r"a path of params"):
    posconstr.project_nonneg(mask=extra).init(params)
  missing = {"Dense_0": True, "Dense_1": True, "flag": False}
  with pytest.raises(ValueError, match=r"params have `step`, which the mask "
                     r"does not cover"):
    posconstr.project_nonneg(mask=missing).init(params)
  deeper = {"Dense_0": {"kernel": {"x": True}, "bias": True}, "Dense_1": True,
            "step": False, "flag": False}
  with pytest.raises(ValueError, match=r"`mask` tree does not match"):
    posconstr.project_nonneg(mask=deeper).init(params)


def test_pattern_matching_nothing_fails_at_init():
  tx = posconstr.project_nonneg(mask=["*/kernel", "*/bais"])
  with pytest.raises(ValueError, match=r"\['\*/bais'\] match no parameter path"
                     r".*'Dense_0/bias'"):
    tx.init(_params())


@pytest.mark.parametrize("mask,path", [
    ("step", "step"),
    (["*/kernel", "flag"], "flag"),
    ({"Dense_0": True, "Dense_1": True, "step": True, "flag": False}, "step"),
    (lambda p: {"Dense_0": False, "Dense_1": False, "step": False,
                "flag": True}, "flag"),
])
def test_integer_or_bool_leaf_selected_explicitly(mask, path):
  with pytest.raises(TypeError, match=rf"cannot constrain parameter `{path}` "
                     r"of dtype (int32|bool)"):
    posconstr.project_nonneg(mask=mask).init(_params())


def test_bad_mask_arguments():
  with pytest.raises(TypeError, match=r"only pattern strings or only booleans"):
    posconstr.project_nonneg(mask=["*/kernel", True])
  with pytest.raises(ValueError, match=r"`mask` pattern must not be empty"):
    posconstr.project_nonneg(mask="")
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"mask entries must be booleans, got 1 "
                     r"at `a`"):
    posconstr.project_nonneg(mask={"a": 1, "b": True}).init(params)
  with pytest.raises(TypeError, match=r"callable `mask` must return a bool"):
    posconstr.project_nonneg(mask=lambda p: (lambda q: q)).init(params)


def test_value_dependent_mask_is_refused_under_jit():
  params = {"a": jnp.ones(2), "b": -jnp.ones(2)}
  tx = posconstr.project_nonneg(
      mask=lambda p: jax.tree.map(lambda x: jnp.all(x > 0), p))
  state = tx.init(params)
  with pytest.raises(TypeError, match=r"mask entry for `a` is traced"):
    jax.jit(tx.update)(params, state, params)


# ------------------------------------------------------------------ constrain


def _apply(tx, params, updates):
  out, _ = tx.update(updates, tx.init(params), params)
  return out, optax.apply_updates(params, out)


def test_constrain_first_matching_rule_wins():
  params = _params()
  updates = _updates(params)
  tx = posconstr.constrain({
      "Dense_0/kernel": posconstr.Box(-1.0, 1.0),
      "*/kernel": posconstr.NonNegative(),
      "*/bias": posconstr.NonNegative(eps=0.5),
  })
  out, new = _apply(tx, params, updates)
  def stepped(a, b):
    return np.asarray(params[a][b]) + np.asarray(updates[a][b])
  # p + (t - p) need not be exactly t = -1 here (|p| > 1): within one ulp.
  k0 = np.asarray(new["Dense_0"]["kernel"])
  np.testing.assert_allclose(k0, np.clip(stepped("Dense_0", "kernel"), -1, 1),
                             rtol=0, atol=2e-7)
  assert np.all((k0 >= -1) & (k0 <= 1)) and np.any(k0 < -0.99)
  np.testing.assert_array_equal(new["Dense_1"]["kernel"],
                                np.maximum(stepped("Dense_1", "kernel"), 0))
  for layer in ("Dense_0", "Dense_1"):  # Landed on 0.5 or just above it.
    bias = np.asarray(new[layer]["bias"])
    assert np.all(bias >= 0.5) and np.all(bias <= np.float32(0.5 + 1e-7))
  assert out["step"] is updates["step"] and out["flag"] is updates["flag"]


def test_constrain_none_rule_leaves_matches_unconstrained():
  params = _params()
  updates = _updates(params)
  tx = posconstr.constrain({"step": None, "flag": None, "Dense_0/*": None,
                            "*": posconstr.NonNegative()})
  out, new = _apply(tx, params, updates)
  for name in ("kernel", "bias"):
    assert out["Dense_0"][name] is updates["Dense_0"][name]
    np.testing.assert_array_equal(new["Dense_1"][name], 0.0)
  assert out["step"] is updates["step"]


_MLP = _models.TwoDense


def test_constrain_kernel_nonneg_and_bias_box_on_linen_params():
  params = _MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  assert set(_flat(params)) == {"Dense_0/kernel", "Dense_0/bias",
                                "Dense_1/kernel", "Dense_1/bias"}
  tx = optax.chain(optax.sgd(1.0), posconstr.constrain({
      "*/kernel": posconstr.NonNegative(),
      "*/bias": posconstr.Box(-0.25, 0.5)}))
  grads = jax.tree.map(lambda x: 0.3 + jnp.sin(7.0 * jnp.arange(x.size)
                                               ).reshape(x.shape), params)
  state = tx.init(params)
  for _ in range(3):
    expected = jax.tree.map(lambda p, g: p - g, params, grads)
    u, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, u)
    for layer in ("Dense_0", "Dense_1"):
      np.testing.assert_array_equal(
          params[layer]["kernel"], np.maximum(expected[layer]["kernel"], 0))
      np.testing.assert_allclose(
          params[layer]["bias"], np.clip(expected[layer]["bias"], -0.25, 0.5),
          rtol=0, atol=1e-7)
      bias = np.asarray(params[layer]["bias"])
      assert np.all((bias >= -0.25) & (bias <= 0.5))
  assert any(np.any(np.asarray(params[name]["kernel"]) == 0) for name in params)


def _numpy_max_norm(w, c, axis):
  norms = np.sqrt(np.sum(np.asarray(w, np.float64) ** 2, axis=axis,
                         keepdims=True))
  return np.asarray(w, np.float64) * np.minimum(1.0, c / norms)


@pytest.mark.parametrize("axis", [0, 1, None, (0, 1)])
def test_constrain_max_norm_per_axis_matches_numpy(axis):
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(4, 4)).astype(np.float32)
  kernel[:, 1] *= 0.01  # A column (and a row part) inside the ball.
  params = {"Dense_0": {"kernel": jnp.asarray(kernel),
                        "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = posconstr.constrain({"*/kernel": posconstr.MaxNorm(1.0, axis=axis)})
  out, new = _apply(tx, params, zero)
  got = np.asarray(new["Dense_0"]["kernel"], np.float64)
  ref = _numpy_max_norm(kernel, 1.0, axis)
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
  norms = np.sqrt(np.sum(got ** 2, axis=axis))
  assert np.all(norms <= 1.0 + 1e-6)
  assert out["Dense_0"]["bias"] is zero["Dense_0"]["bias"]
  # Slices inside the ball come back bit for bit; the others reach norm 1.
  before = np.sqrt(np.sum(kernel.astype(np.float64) ** 2, axis=axis,
                          keepdims=True))
  inside = np.broadcast_to(before <= 1.0, kernel.shape)
  np.testing.assert_array_equal(np.asarray(new["Dense_0"]["kernel"])[inside],
                                kernel[inside])
  after = np.sqrt(np.sum(got ** 2, axis=axis, keepdims=True))
  assert np.all(np.abs(after[before > 1.0] - 1.0) < 1e-6)
  if axis == 0:
    assert inside[:, 1].all() and (before > 1.0).sum() >= 2


# ----------------------------------------------------------- constrain errors


def test_constrain_bad_rules():
  with pytest.raises(TypeError, match=r"`rules` must be a mapping.*got list"):
    posconstr.constrain([("*/kernel", posconstr.NonNegative())])
  with pytest.raises(TypeError, match=r"rule keys must be non-empty path "
                     r"patterns \(str\), got 0"):
    posconstr.constrain({0: posconstr.NonNegative()})
  with pytest.raises(TypeError, match=r"rule for '\*/kernel' must be a "
                     r"constraint set or None, got 3"):
    posconstr.constrain({"*/kernel": 3})
  with pytest.raises(ValueError, match=r"`rules` must not be empty"):
    posconstr.constrain({})


def test_constrain_shadowed_and_unmatched_rules_fail_at_init():
  params = _params()
  tx = posconstr.constrain({"*/kernel": posconstr.NonNegative(),
                            "Dense_0/kernel": posconstr.Box(0.0, 1.0)})
  with pytest.raises(ValueError, match=r"\['Dense_0/kernel'\] only match paths "
                     r"that earlier rules already took"):
    tx.init(params)
  tx = posconstr.constrain({"*/kernel": posconstr.NonNegative(),
                            "*/weight": None})
  with pytest.raises(ValueError, match=r"\['\*/weight'\] match no parameter"):
    tx.init(params)


def test_constrain_errors_name_the_leaf():
  params = _params()
  with pytest.raises(TypeError, match=r"parameter `step` of dtype int32"):
    posconstr.constrain({"step": posconstr.NonNegative()}).init(params)
  with pytest.raises(ValueError, match=r"axis=2 is out of range for parameter "
                     r"`Dense_0/bias` of rank 1"):
    posconstr.constrain({"*/bias": posconstr.MaxNorm(1.0, axis=2)}).init(params)
