"""``constraint_report`` and ``format_report`` against counts made by hand.

A small Flax linen MLP is trained with ``projected`` Adam, each kernel in a
different set; the report on its parameters and gradients is then checked
against NumPy counts written from the definitions: coordinates at a
bound, the sign of the gradient there, a simplex slice's mean gradient over
its support, a norm ball's radial derivative.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr

# Bounds exactly representable in float32, so "== bound" needs no rounding.
BOX = 2.0 ** -4
RADIUS = 0.5
RULES = {
    "*Dense_0/*": posconstr.NonNegative(),           # kernel and bias
    "*Dense_1/kernel": posconstr.Box(-BOX, BOX),
    "*Dense_2/kernel": posconstr.Simplex(axis=0),
    "*Dense_3/kernel": posconstr.MaxNorm(RADIUS, axis=0),
}
CONSTRAINED = ["params/Dense_0/bias", "params/Dense_0/kernel",
               "params/Dense_1/kernel", "params/Dense_2/kernel",
               "params/Dense_3/kernel"]


# Jitted once for the tests on the trained model (eager and jitted reports
# are both checked in test_hand_made_values_for_each_set).
_report = jax.jit(lambda p, g: posconstr.constraint_report(p, RULES, g))
_report_no_grads = jax.jit(lambda p: posconstr.constraint_report(p, RULES))


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    for width in (16, 16, 16, 16):
      x = nn.tanh(nn.Dense(width)(x))
    return nn.Dense(1)(x)


def _loss(model, x, y):
  return lambda p: jnp.mean((model.apply(p, x) - y) ** 2)


@pytest.fixture(scope="module")
def trained():
  """(params, grads at params) after 80 steps of projected Adam."""
  model = _MLP()
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = jnp.asarray(np.sin(x[:, :1] * 2) + x[:, 1:2], jnp.float32)
  params = model.init(jax.random.key(0), x)
  tx = posconstr.projected(optax.adam(0.05), RULES)
  loss = _loss(model, x, y)

  @jax.jit
  def train(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(body, (params, tx.init(params)), None, length=80)[0][0]

  params = train(params)
  return params, jax.jit(jax.grad(loss))(params)


def _leaf(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return np.asarray(tree, np.float64)


def _column_norms(x):
  return np.sqrt(np.sum(x * x, axis=0))


def _reference(path, x, g):
  """(on-bound count, stuck count, violation) from the definitions.

  "On the bound" is "at or beyond it" (for infeasible x): x <= 0, |x| >= BOX,
  norm >= RADIUS; on feasible x these are equalities.
  """
  if "Dense_0" in path:  # x >= 0
    on = x <= 0
    return on.sum(), (on & (g > 0)).sum(), max(0.0, (-x).max())
  if "Dense_1" in path:  # -BOX <= x <= BOX
    lo, hi = x <= -BOX, x >= BOX
    stuck = (lo & (g > 0)) | (hi & (g < 0))
    return (lo | hi).sum(), stuck.sum(), max(0.0, (np.abs(x) - BOX).max())
  if "Dense_2" in path:  # columns on the simplex
    stuck = 0
    for col, gcol in zip(x.T, g.T):
      support = col > 0
      multiplier = gcol[support].mean()
      stuck += ((~support) & (gcol > multiplier)).sum()
    violation = max(0.0, (-x).max(), np.abs(x.sum(0) - 1).max() - 1e-5)
    return (x <= 0).sum(), stuck, violation
  if "Dense_3" in path:  # column norms <= RADIUS
    norms = _column_norms(x)
    # No column in the grey zone, so the tolerance below is not a guess.
    assert not np.any((norms > RADIUS * (1 - 1e-3))
                      & (norms < RADIUS * (1 - 1e-5))), norms
    at = norms >= RADIUS * (1 - 1e-5)
    radial = np.sum(x * g, axis=0)
    rows = x.shape[0]
    return (rows * at.sum(), rows * (at & (radial < 0)).sum(),
            max(0.0, (norms - RADIUS).max()))
  raise AssertionError(path)


def _check_against_reference(report, params, grads, violation_atol):
  assert sorted(report) == CONSTRAINED
  for path in CONSTRAINED:
    x, g = _leaf(params, path), _leaf(grads, path)
    on, stuck, violation = _reference(path, x, g)
    r = report[path]
    assert int(r.size) == x.size, path
    assert float(r.on_bound) == pytest.approx(on / x.size, abs=1e-7), path
    assert float(r.stuck) == pytest.approx(stuck / x.size, abs=1e-7), path
    assert float(r.violation) == pytest.approx(violation, abs=violation_atol)


def test_trained_model_counts_match_numpy(trained):
  params, grads = trained
  report = _report(params, grads)
  _check_against_reference(report, params, grads, violation_atol=1e-6)
  # The counts are not trivial: every kernel has weights on its boundary,
  # but not all, and some of them are stuck there.
  for path in CONSTRAINED[1:]:
    x, g = _leaf(params, path), _leaf(grads, path)
    on, stuck, _ = _reference(path, x, g)
    assert 0 < on < x.size, path
    assert 0 < stuck <= on, path
  for r in report.values():
    assert float(r.violation) == 0.0


def test_infeasible_params_report_their_violation(trained):
  params, grads = trained
  rng = np.random.default_rng(1)
  noisy = jax.tree.map(
      lambda p: p + jnp.asarray(0.2 * rng.normal(size=p.shape), p.dtype),
      params)
  report = _report(noisy, grads)
  _check_against_reference(report, noisy, grads, violation_atol=1e-5)
  for path in CONSTRAINED:
    assert float(report[path].violation) > 0.01, path


def test_jitted_report_is_a_dict_of_scalar_leaf_reports(trained):
  params, grads = trained
  report = _report(params, grads)
  for path in CONSTRAINED:
    assert isinstance(report[path], posconstr.LeafReport)
    assert all(np.ndim(v) == 0 for v in report[path])
  # Unconstrained leaves (the other biases, Dense_4) are not reported.
  assert "params/Dense_1/bias" not in report
  assert "params/Dense_4/kernel" not in report


def test_without_grads_stuck_is_nan(trained):
  params, grads = trained
  report = _report_no_grads(params)
  with_grads = _report(params, grads)
  for path in CONSTRAINED:
    assert np.isnan(float(report[path].stuck))
    assert float(report[path].on_bound) == float(with_grads[path].on_bound)


_ROW = re.compile(r"^\| (\S+) \| (\d+) \| ([\d.]+)% \| (-|[\d.]+%) "
                  r"\| (\S+) \|$")


def _parse(text):
  lines = text.splitlines()
  header = lines.index(
      "| parameter | size | on bound | stuck | max violation |")
  assert lines[header + 1] == "|---|---:|---:|---:|---:|"
  rows = {}
  for line in lines[header + 2:]:
    m = _ROW.match(line)
    assert m, line
    path, size, on, stuck, violation = m.groups()
    assert path not in rows
    rows[path] = (int(size), float(on) / 100,
                  None if stuck == "-" else float(stuck[:-1]) / 100,
                  float(violation))
  return lines[:header], rows


@pytest.mark.parametrize("with_grads", [True, False])
def test_format_report_has_one_parsable_row_per_path(trained, with_grads):
  params, grads = trained
  rng = np.random.default_rng(2)
  noisy = jax.tree.map(
      lambda p: p + jnp.asarray(0.01 * rng.normal(size=p.shape), p.dtype),
      params)
  report = _report(noisy, grads) if with_grads else _report_no_grads(noisy)
  title, rows = _parse(posconstr.format_report(report, title="after step 80"))
  assert title == ["**after step 80**", ""]
  assert sorted(rows) == CONSTRAINED
  for path, (size, on, stuck, violation) in rows.items():
    r = report[path]
    assert size == int(r.size)
    assert on == pytest.approx(float(r.on_bound), abs=1e-4)
    if with_grads:
      assert stuck == pytest.approx(float(r.stuck), abs=1e-4)
    else:
      assert stuck is None
    assert violation == pytest.approx(float(r.violation), rel=5e-3)
  _, untitled = _parse(posconstr.format_report(report))
  assert untitled == rows


def test_hand_made_values_for_each_set():
  x = {"n": jnp.array([0.0, 0.0, 1.0, 2.0]),
       "b": jnp.array([-1.0, -1.0, 0.0, 1.0, 1.0]),
       "s": jnp.array([[0.0, 0.5], [1.0, 0.5], [0.0, 0.0]]),
       "m": jnp.array([[3.0, 0.1], [4.0, 0.1]])}
  g = {"n": jnp.array([1.0, -1.0, 1.0, 1.0]),
       "b": jnp.array([1.0, -1.0, 1.0, -1.0, 1.0]),
       # column 0: support {1} with mean grad 0.5: row 0 (2.0) stuck, row 2
       # (0.0) not; column 1: support {0, 1}, mean 1.5: row 2 (2.0) stuck.
       "s": jnp.array([[2.0, 1.0], [0.5, 2.0], [0.0, 2.0]]),
       # column 0 has norm 5 (the radius) and <x, g> < 0: stuck.
       "m": jnp.array([[-1.0, -1.0], [0.0, -1.0]])}
  rules = {"n": posconstr.NonNegative(), "b": posconstr.Box(-1.0, 1.0),
           "s": posconstr.Simplex(axis=0), "m": posconstr.MaxNorm(5.0)}
  eager = posconstr.constraint_report(x, rules, g)
  jitted = jax.jit(lambda x, g: posconstr.constraint_report(x, rules, g))(x, g)
  expected = {"n": (4, 0.5, 0.25), "b": (5, 0.8, 0.4),
              "s": (6, 0.5, 2 / 6), "m": (4, 0.5, 0.5)}
  for report in (eager, jitted):
    assert sorted(report) == sorted(expected)
    for path, (size, on, stuck) in expected.items():
      r = report[path]
      assert (int(r.size), float(r.on_bound)) == (size, pytest.approx(on)), path
      assert float(r.stuck) == pytest.approx(stuck), path
      assert float(r.violation) == 0.0, path


def test_mask_limits_the_report_to_selected_leaves():
  params = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([-1.0, 0.0])}
  report = posconstr.constraint_report(params, posconstr.NonNegative(),
                                       mask="a")
  assert list(report) == ["a"]
  report = posconstr.constraint_report(params, posconstr.NonNegative())
  assert float(report["b"].violation) == 1.0
  assert float(report["b"].on_bound) == 1.0  # x <= 0 counts as on the bound


def test_nonnegative_eps_bound_counts_as_on_bound():
  params = {"w": jnp.array([0.25, 0.25, 0.5, 1.0])}
  grads = {"w": jnp.array([1.0, -1.0, 1.0, 1.0])}
  report = posconstr.constraint_report(params, posconstr.NonNegative(0.25),
                                       grads)
  assert float(report["w"].on_bound) == 0.5
  assert float(report["w"].stuck) == 0.25


def test_grads_tree_mismatch_is_an_error():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match="`grads` tree does not match"):
    posconstr.constraint_report(params, posconstr.NonNegative(),
                                {"a": jnp.zeros(2)})
  with pytest.raises(ValueError, match="`grads` tree does not match"):
    posconstr.constraint_report(params, posconstr.NonNegative(),
                                [jnp.zeros(2), jnp.zeros(2)])


def test_mask_with_rules_is_an_error():
  params = {"a": jnp.zeros(2)}
  with pytest.raises(ValueError, match="`mask` is only allowed"):
    posconstr.constraint_report(params, {"a": posconstr.NonNegative()},
                                mask="a")
