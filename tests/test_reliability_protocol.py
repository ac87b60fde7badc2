"""Issue 13 §3: user-written sets and parameterizations, on the documented
contract (``posconstr.Constraint``, ``posconstr.Parameterization``).

Before the fix, a user ``Constraint`` with ``elementwise = True`` crashed in
``project()`` and ``projected()`` (``AttributeError: ... 'bounds_in'``), and
one without it had to define ``violation``, ``active``, ``pushing_out`` and
a private ``_key``. References: the built-in sets that the user sets mirror
(``Box(None, top)``), and the closed forms of an L1 ball.
"""

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import posconstr as pc


@dataclasses.dataclass(frozen=True)
class AtMost(pc.Constraint):
  """x <= top, coordinatewise: written with ``project`` only."""

  top: float = 0.5
  elementwise = True

  def project(self, x):
    return jnp.minimum(x, jnp.asarray(self.top, x.dtype))


@dataclasses.dataclass(frozen=True)
class L1Ball(pc.Constraint):
  """Rows of L1 norm <= radius (not elementwise)."""

  radius: float = 1.0

  def project(self, x):
    inside = jnp.sum(jnp.abs(x), -1, keepdims=True) <= self.radius
    shrunk = jnp.sign(x) * pc.Simplex(self.radius, axis=-1).project(jnp.abs(x))
    return jnp.where(inside, x, shrunk).astype(x.dtype)


class Plain(pc.Constraint):
  """Not a dataclass: compared by identity, still usable."""

  def project(self, x):
    return jnp.clip(x, -1.0, 1.0)


X = jnp.array([[-2.0, 0.5, 0.5, 0.75], [0.25, 1.0, 0.5, 3.0]])
G = jnp.array([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 0.0]])


def test_elementwise_user_set_matches_the_builtin_box():
  c, ref = AtMost(0.5), pc.Box(None, 0.5)
  for method in ("project", "violation", "active"):
    np.testing.assert_array_equal(getattr(c, method)(X),
                                  getattr(ref, method)(X))
  np.testing.assert_array_equal(c.pushing_out(X, G), ref.pushing_out(X, G))
  assert c.bounds_in(jnp.float32) is None  # unknown: landing uses project
  assert float(c.violation(jnp.array([jnp.inf, 0.0]))) == np.inf
  # jit, and one trace for equal instances (static argument).
  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return c.project(x), c.violation(x), c.active(x), c.pushing_out(x, G)

  f(X)
  g = jax.jit(lambda c, x: traces.append(2) or c.project(x), static_argnums=0)
  g(AtMost(0.5), X)
  g(AtMost(0.5), X)  # equal: no retrace
  assert traces == [1, 2]
  assert AtMost(0.5) == c and hash(AtMost(0.5)) == hash(c)


@pytest.mark.parametrize("make", [
    lambda c: optax.chain(optax.adam(0.3), pc.project(c)),
    lambda c: optax.chain(optax.adam(0.3), pc.constrain({"w": c})),
    lambda c: pc.projected(optax.adam(0.3), c),
    lambda c: pc.chain(optax.adam(0.3), pc.project(c, mask="w")),
], ids=["project", "constrain", "projected", "posconstr.chain"])
def test_elementwise_user_set_trains_like_the_builtin_box(make):
  params = {"w": X}

  @jax.jit
  def run(params):
    out = []
    for c in (AtMost(0.5), pc.Box(None, 0.5)):
      tx, p = make(c), params
      state = tx.init(p)
      for _ in range(3):
        updates, state = tx.update({"w": G}, state, p)
        p = optax.apply_updates(p, updates)
      out.append(p["w"])
    return out

  mine, ref = run(params)
  np.testing.assert_array_equal(mine, ref)
  assert float(AtMost(0.5).violation(mine)) == 0


def test_user_set_in_report_matches_the_builtin():
  params, grads = {"w": X}, {"w": G}
  mine = pc.constraint_report(params, AtMost(0.5), grads)["w"]
  ref = pc.constraint_report(params, pc.Box(None, 0.5), grads)["w"]
  for a, b in zip(mine, ref):
    assert float(a) == float(b)
  assert "| w | 8 |" in pc.format_report({"w": mine})


def test_non_elementwise_user_set_everywhere():
  ball = L1Ball(1.0)
  y = np.asarray(ball.project(X), np.float64)
  np.testing.assert_allclose(np.abs(y).sum(-1), [1.0, 1.0], rtol=1e-6)
  assert float(ball.violation(X)) > 0 and float(ball.violation(jnp.asarray(
      y, jnp.float32))) == 0
  assert not ball.active(X).any() and not ball.pushing_out(X, G).any()
  params, grads = {"w": X, "b": jnp.zeros(2)}, {"w": G, "b": jnp.ones(2)}
  for tx in (optax.chain(optax.sgd(0.1), pc.project(ball, mask="w")),
             optax.chain(optax.sgd(0.1), pc.constrain({"w": ball})),
             pc.projected(optax.sgd(0.1), {"w": ball, "b": None})):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(
        new["w"], ball.project(X - 0.1 * G), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(new["b"], np.full(2, -0.1, np.float32))
    report = pc.constraint_report(new, {"w": ball, "b": None}, grads)
    assert float(report["w"].violation) == 0 and set(report) == {"w"}


def test_user_sets_without_dataclass_and_bad_leaves():
  a, b = Plain(), Plain()
  assert a == a and a != b and len({a, b}) == 2
  np.testing.assert_array_equal(a.project(X), jnp.clip(X, -1, 1))
  with pytest.raises(TypeError, match=r"`params/n`.*only floating"):
    a.check_leaf((3,), jnp.int32, "params/n")
  with pytest.raises(TypeError, match="abstract"):
    pc.Constraint()  # project is required
  tx = optax.chain(optax.sgd(1.0), pc.project(a, mask="n"))
  with pytest.raises(TypeError, match=r"`n` of dtype int32"):
    tx.init({"n": jnp.arange(3)})


@dataclasses.dataclass(frozen=True)
class Cube(pc.Parameterization):
  """w = lower + z**3 on [lower, inf): defaults for clamp and out_of_range."""

  lower: float = 0.0

  @property
  def constraint(self):
    return pc.NonNegative(self.lower)

  def forward_map(self, z):
    return self.lower + jnp.abs(z) ** 3

  def inverse_map(self, w):
    return jnp.cbrt(w - self.lower)


def test_user_parameterization_defaults():
  g = Cube(0.5)
  z = jnp.array([-2.0, 0.0, 1.0])
  np.testing.assert_allclose(g.forward(z), [8.5, 0.5, 1.5])
  np.testing.assert_allclose(g.derivative(z), [-12.0, 0.0, 3.0])
  np.testing.assert_allclose(g.inverse(jnp.array([8.5, 0.5])), [2.0, 0.0])
  with pytest.raises(ValueError, match="outside the range"):
    g.inverse(jnp.array([0.25]))  # default out_of_range: project moves it
  np.testing.assert_allclose(jax.jit(g.inverse)(jnp.array([0.25])), [0.0])
  np.testing.assert_allclose(g.fold(jnp.array([0.0, 2.0])), [1.0, 2.0])
  assert g.dead(z).tolist() == [False, True, False]
  latents = {"w": jnp.array([1.0, 2.0])}
  params = pc.reparam(latents, {"w": g})
  np.testing.assert_allclose(params["w"], [1.5, 8.5])
  np.testing.assert_allclose(pc.unreparam(params, {"w": g})["w"], [1.0, 2.0],
                             rtol=1e-6)
  assert float(pc.dead_fraction(latents, g)["w"]) == 0.0
  assert Cube(0.5) == g and hash(Cube(0.5)) == hash(g) and Cube(1.0) != g


def test_builtin_value_objects_keep_their_semantics():
  a, b = pc.Box(np.array([0.0, 1.0]), 2.0), pc.Box(np.array([0, 1]), 2)
  assert a == b and hash(a) == hash(b)
  assert a != pc.Box(np.array([0.0, 1.5]), 2.0)
  assert repr(a) == "Box(lower=array(shape=(2,), dtype=float64), upper=2.0)"
  assert repr(pc.MaxNorm(1.5, axis=(1, 0))) == (
      "MaxNorm(max_value=1.5, axis=(0, 1))")
  assert repr(pc.ReLU()) == "ReLU()" and pc.ReLU().eps == 0.0
  assert repr(pc.Softplus(2)) == "Softplus(beta=2.0, eps=0.0)"
  for c in (a, pc.Simplex(2.0, axis=1), pc.MinMaxNorm(0.5, 1.0, 0.5),
            pc.Sigmoid(-1, 1), pc.Softplus(eps=0.1)):
    back = pickle.loads(pickle.dumps(c))
    assert back == c and hash(back) == hash(c)
  assert dataclasses.replace(pc.Box(0.0, 1.0), upper=2.0) == pc.Box(0.0, 2.0)
  with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
    dataclasses.replace(pc.Box(0.0, 1.0), upper=-1.0)  # validated again
  with pytest.raises(AttributeError):
    pc.UnitNorm().min_value = 0.5  # a class constant, not a field


def test_a_user_parameterization_gets_its_defaults_from_bounds_in():
  # A user's set that declares its bounds only by bounds_in (no `lower`
  # attribute): fold reflects at the lower bound, and a range bounded on
  # both sides is the unit of `dead`, as for the built-in Sigmoid.
  @dataclasses.dataclass(frozen=True)
  class AtLeast(pc.Constraint):
    a: float = 0.1
    elementwise = True

    def project(self, x):
      return jnp.maximum(x, self.a)

    def bounds_in(self, dtype):
      return (jnp.asarray(self.a, dtype), None)

  @dataclasses.dataclass(frozen=True)
  class Quartic(pc.Parameterization):
    constraint: pc.Constraint = AtLeast(0.1)

    def forward_map(self, z):
      return z ** 4 + 0.1

    def inverse_map(self, w):
      return (w - 0.1) ** 0.25

  v = jnp.array([-0.5, 0.0, 0.3])
  np.testing.assert_allclose(Quartic().fold(v), [0.7, 0.2, 0.3], rtol=1e-6)

  @dataclasses.dataclass(frozen=True)
  class TenSigmoid(pc.Parameterization):
    constraint = pc.Box(0.0, 10.0)

    def forward_map(self, z):
      return 10 * jax.nn.sigmoid(z)

    def inverse_map(self, w):
      return jnp.log(w / (10 - w))

  z = jnp.array([-8.0, -6.0, -4.0, 0.0, 4.0, 6.0, 8.0])
  assert float(TenSigmoid().derivative_unit()) == 10.0
  np.testing.assert_array_equal(TenSigmoid().dead(z),
                                pc.Sigmoid(0.0, 10.0).dead(z))
