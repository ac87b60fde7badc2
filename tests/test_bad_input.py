"""A catalogue of bad inputs across the public API: exact exception types and
messages that name the argument or the parameter path.

Each row is ``(call, exception type, regex)``. The exception must be of
*exactly* that type (not a subclass, not a bare ``AttributeError`` from deep
inside) and its message must match the regex, which always contains the
offending argument (```eps```, ```mask```, ```learning_rate```, ...) or the
parameter path (```layer/w```) and the owner (``minimize:``, ``icnn:``...).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import posconstr as pc
from posconstr import initializers as ini

P = {"layer": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}}
G = jax.tree.map(jnp.ones_like, P)
X = jnp.ones((1, 2))


def _f(p):
  return jnp.sum(p["layer"]["w"] ** 2) + jnp.sum(p["layer"]["b"] ** 2)


def _init_linen(module):
  return lambda: module.init(jax.random.key(0), X)


def _lbfgsb_update_without_value_fn():
  tx = pc.lbfgsb(lower=0.0)
  state = tx.init(P)
  # Under jit: the error is raised while tracing, with no eager work first.
  return jax.jit(lambda: tx.update(G, state, P))()


def _nnx_linear():
  return nnx.Linear(2, 3, rngs=nnx.Rngs(0))


CASES = [
    # ------------------------------------------------ constraint sets
    ("NonNegative.eps<0", lambda: pc.NonNegative(eps=-0.1), ValueError,
     r"NonNegative: `eps` must be >= 0, got -0.1"),
    ("NonNegative.eps=str", lambda: pc.NonNegative(eps="0.1"), TypeError,
     r"NonNegative: `eps` must be a real number, got '0.1'"),
    ("NonNegative.eps=inf", lambda: pc.NonNegative(eps=np.inf), ValueError,
     r"NonNegative: `eps` must be finite"),
    ("Box.lower>upper", lambda: pc.Box(1.0, 0.0), ValueError,
     r"Box: `lower` must be <= `upper`, got lower=1.0 > upper=0.0"),
    ("Box.lower=NaN", lambda: pc.Box(np.array([0.0, np.nan])), ValueError,
     r"Box: `lower` contains NaN at index \(1,\)"),
    ("Box.upper=bool", lambda: pc.Box(None, True), TypeError,
     r"Box: `upper` must be a number or an array, got True"),
    ("Box.shapes", lambda: pc.Box(np.zeros(2), np.ones(3)), ValueError,
     r"Box: `lower` of shape \(2,\) and `upper` of shape \(3,\) do not "
     r"broadcast"),
    ("Simplex.scale=0", lambda: pc.Simplex(scale=0.0), ValueError,
     r"Simplex: `scale` must be > 0"),
    ("Simplex.axis=float", lambda: pc.Simplex(axis=1.5), TypeError,
     r"Simplex: `axis` must be an int, a tuple of ints or None, got 1.5"),
    ("MaxNorm.max_value<0", lambda: pc.MaxNorm(max_value=-1.0), ValueError,
     r"MaxNorm: `max_value` must be > 0, got -1.0"),
    ("MinMaxNorm.min>max", lambda: pc.MinMaxNorm(2.0, 1.0), ValueError,
     r"MinMaxNorm: `min_value` must be <= `max_value`"),
    ("MinMaxNorm.rate", lambda: pc.MinMaxNorm(rate=1.5), ValueError,
     r"MinMaxNorm: `rate` must be in \[0, 1\], got 1.5"),
    ("UnitNorm.axis=()", lambda: pc.UnitNorm(axis=()), ValueError,
     r"UnitNorm: `axis` must not be an empty tuple"),
    # ------------------------------------------------ masks
    ("mask.unmatched", lambda: pc.project_nonneg(mask="*/kernal").init(P),
     ValueError, r"pattern\(s\) \['\*/kernal'\] match no parameter path.*"
     r"'layer/b', 'layer/w'"),
    ("mask.mixed_list", lambda: pc.project_nonneg(mask=["layer/w", True]),
     TypeError, r"a `mask` list must hold only pattern strings or only "
     r"booleans"),
    ("mask.tree_missing_leaf",
     lambda: pc.project_nonneg(mask={"layer": {"w": True}}).init(P),
     ValueError, r"the `mask` tree does not match the params tree.*params "
     r"have `layer/b`, which the mask does not cover"),
    ("mask.int_entry",
     lambda: pc.project_nonneg(mask={"layer": {"w": 1, "b": True}}).init(P),
     TypeError, r"mask entries must be booleans, got 1 at `layer/w`"),
    ("mask.empty_pattern", lambda: pc.project_nonneg(mask=""), ValueError,
     r"`mask` pattern must not be empty"),
    ("mask.int_leaf",
     lambda: pc.project_nonneg(mask="i").init({"i": jnp.arange(3)}),
     TypeError, r"cannot constrain parameter `i` of dtype int32"),
    ("mask.scalar_int", lambda: pc.project_nonneg(mask=3), TypeError,
     r"project\(NonNegative\(eps=0.0\)\): `mask` must be None, a glob "
     r"pattern, .*got 3 of type int"),
    ("mask.bool_array",
     lambda: pc.project_nonneg(mask=np.array([True, False])), TypeError,
     r"`mask` must be None.*got an array of shape \(2,\) of type ndarray"),
    ("constrain.int_bare_array",
     lambda: pc.constrain({"*": pc.NonNegative()}).init(jnp.arange(3)),
     TypeError, r"cannot constrain parameter `params` of dtype int32"),
    ("minimize.int_bare_x0",
     lambda: pc.minimize(lambda x: jnp.sum(x ** 2), jnp.arange(3), lower=0.0),
     TypeError, r"minimize: `x0` leaf 'x0' has dtype int32; only floating"),
    ("minimize.int_leaf_no_bounds",
     lambda: pc.minimize(lambda x: jnp.sum(x["b"] ** 2),
                         {"a": jnp.ones(2), "b": jnp.arange(3)}),
     TypeError, r"minimize: `x0` leaf 'b' has dtype int32; only floating"),
    # ------------------------------------------------ rules (constrain)
    ("constrain.parameterization_rule",
     lambda: pc.constrain({"layer/w": pc.Softplus()}), TypeError,
     r"constrain: the rule for 'layer/w' must be a constraint set or None, "
     r"got Softplus.*It is a parameterization: reparameterize with "
     r"`posconstr.reparam`"),
    ("constrain.empty", lambda: pc.constrain({}), ValueError,
     r"constrain: `rules` must not be empty"),
    ("constrain.list", lambda: pc.constrain([("w", pc.NonNegative())]),
     TypeError, r"constrain: `rules` must be a mapping"),
    ("constrain.shadowed",
     lambda: pc.constrain({"*": pc.NonNegative(),
                           "layer/w": pc.Box(0, 1)}).init(P),
     ValueError, r"constrain: rule\(s\) \['layer/w'\] only match paths that "
     r"earlier rules already took"),
    ("constrain.axis_out_of_range",
     lambda: pc.constrain({"layer/b": pc.Simplex(axis=1)}).init(P),
     ValueError, r"axis=1 is out of range for parameter `layer/b` of rank 1"),
    ("constrain.repeated_axis",
     lambda: pc.constrain({"layer/w": pc.MaxNorm(axis=(0, -2))}).init(P),
     ValueError, r"axis=\((0, -2|-2, 0)\) repeats an axis \(at `layer/w`\)"),
    ("project_box.empty_in_dtype",
     lambda: pc.project_box(0.1, 0.10001).init(
         {"w": jnp.ones(2, jnp.bfloat16)}),
     ValueError, r"no bfloat16 value lies between `lower` and `upper` "
     r"\(parameter `w`\)"),
    ("project_nonneg.update_shape",
     lambda: pc.project_nonneg().update({"w": jnp.ones(2)},
                                        pc.ProjectionState(),
                                        {"w": jnp.ones(3)}),
     ValueError, r"the update of parameter `w` has shape \(2,\), which does "
     r"not broadcast to the parameter's shape \(3,\)"),
    ("project_nonneg.eps_past_dtype",
     lambda: pc.project_nonneg(1e5).init({"w": jnp.ones(2, jnp.float16)}),
     ValueError, r"NonNegative\(eps=100000.0\): no finite float16 value lies "
     r"at or above `eps` \(parameter `w`\)"),
    ("project_box.one_sided_past_dtype",
     lambda: pc.project_box(None, -7e4).init({"w": jnp.ones(2, jnp.float16)}),
     ValueError, r"no finite float16 value lies at or below `upper` "
     r"\(parameter `w`\)"),
    # ------------------------------------------------ project_box bound trees
    ("project_box.tree_not_prefix",
     lambda: pc.project_box(lower={"layer": {"w": 0.0}}).init(P), ValueError,
     r"project_box: the `lower` tree is not a prefix of the params tree"),
    ("project_box.list_of_numbers",
     lambda: pc.project_box([0.0, 1.0, 2.0], 5.0).init(
         {"w": jnp.ones((2, 3))}), ValueError,
     r"the `lower` tree is not a prefix .* For one bound per column, pass an "
     r"array: np.array\(\[0.0, 1.0, 2.0\]\)"),
    ("project_box.tree_lower>upper",
     lambda: pc.project_box(lower={"layer": {"w": 0.0, "b": 2.0}},
                            upper={"layer": {"w": 1.0, "b": 1.0}}).init(P),
     ValueError, r"project_box: bounds of parameter `layer/b`: .*lower=2.0 > "
     r"upper=1.0"),
    ("project_box.tree_shape",
     lambda: pc.project_box(upper={"layer": {"w": np.ones(4), "b": 1.0}}
                            ).init(P),
     ValueError, r"`upper` of shape \(4,\) does not broadcast to parameter "
     r"`layer/w` of shape \(2, 3\)"),
    ("project_box.lower=str", lambda: pc.project_box(lower="a"), TypeError,
     r"Box: `lower` must be a number or an array of numbers, got 'a'"),
    # ------------------------------------------------ projected, updates
    ("projected.mask+rules",
     lambda: pc.projected(optax.adam(0.1), {"layer/w": pc.NonNegative()},
                          mask="layer/w"),
     ValueError, r"projected: `mask` is only allowed with a single "
     r"constraint set"),
    ("projected.inner=str", lambda: pc.projected("adam", pc.NonNegative()),
     TypeError, r"projected: `inner` must be an Optax optimizer.*got 'adam'"),
    ("projected.parameterization",
     lambda: pc.projected(optax.adam(0.1), pc.Softplus()), TypeError,
     r"projected: `constraint` must be a constraint set.*It looks like a "
     r"parameterization"),
    ("update.no_params", lambda: pc.project_nonneg().update(G, ()),
     ValueError, r"project\(NonNegative\(eps=0.0\)\) needs the current "
     r"parameters"),
    ("update.tree_mismatch",
     lambda: pc.project_nonneg().update({"layer": {"w": G["layer"]["w"]}},
                                        (), P),
     ValueError, r"project\(NonNegative\(eps=0.0\)\): the updates tree does "
     r"not match the params tree.*present keys: \['w'\]"),
    ("chain.order",
     lambda: pc.chain(pc.project_nonneg(), optax.sgd(0.1)).init(P),
     ValueError, r"opt_state: the projection in link 0 is followed by link 1 "
     r"\(tuple\)"),
    ("check_projection_last",
     lambda: pc.check_projection_last(
         (pc.ProjectionState(), optax.ScaleByAdamState(0, {}, {}))),
     ValueError, r"link 0 is followed by link 1 \(ScaleByAdamState\)"),
    # ------------------------------------------------ constraint_report
    ("report.grads_mismatch",
     lambda: pc.constraint_report(P, pc.NonNegative(),
                                  grads={"layer": {"w": G["layer"]["w"]}}),
     ValueError, r"constraint_report: the `grads` tree does not match the "
     r"params tree"),
    ("report.parameterization",
     lambda: pc.constraint_report(P, pc.Softplus()), TypeError,
     r"constraint_report: `constraint` must be a constraint set"),
    ("report.unmatched_rule",
     lambda: pc.constraint_report(P, {"layer/v": pc.NonNegative()}),
     ValueError, r"constraint_report: pattern\(s\) \['layer/v'\] match no "
     r"parameter path"),
    ("format_report.not_a_report", lambda: pc.format_report(None),
     TypeError, r"format_report: `report` must be the dict that "
     r"constraint_report returns.*got NoneType"),
    ("format_report.bad_entry", lambda: pc.format_report({"w": 1.0}),
     TypeError, r"format_report: `report\['w'\]` must be a LeafReport.*got "
     r"1.0 of type float"),
    # ------------------------------------------------ minimize
    ("minimize.lower>upper", lambda: pc.minimize(_f, P, lower=1.0, upper=0.0),
     ValueError, r"minimize: bounds of parameter `layer/b`: .*`lower` must be "
     r"<= `upper`"),
    ("minimize.tree_not_prefix",
     lambda: pc.minimize(_f, P, lower={"layer": {"w": 0.0}}), ValueError,
     r"minimize: the `lower` tree is not a prefix"),
    ("minimize.maxiter<0", lambda: pc.minimize(_f, P, maxiter=-1),
     ValueError, r"minimize: `maxiter` must be >= 0, got -1"),
    ("minimize.maxiter=float", lambda: pc.minimize(_f, P, maxiter=1.5),
     TypeError, r"minimize: `maxiter` must be an int, got 1.5"),
    ("minimize.tol=str", lambda: pc.minimize(_f, P, tol="1e-3"), TypeError,
     r"minimize: `tol` must be a real number, got '1e-3'"),
    ("minimize.atol<0", lambda: pc.minimize(_f, P, atol=-1.0), ValueError,
     r"minimize: `atol` must be >= 0"),
    ("minimize.eps_active<0", lambda: pc.minimize(_f, P, eps_active=-1.0),
     ValueError, r"minimize: `eps_active` must be >= 0, got -1.0"),
    ("minimize.fun", lambda: pc.minimize(3, P), TypeError,
     r"minimize: `fun` must be callable, got 3"),
    # ------------------------------------------------ lbfgsb
    ("lbfgsb.learning_rate=0", lambda: pc.lbfgsb(learning_rate=0.0),
     ValueError, r"lbfgsb: `learning_rate` must be > 0 or None, got 0.0"),
    ("lbfgsb.learning_rate=str", lambda: pc.lbfgsb(learning_rate="0.1"),
     TypeError, r"lbfgsb: `learning_rate` must be a real number, got '0.1'"),
    ("lbfgsb.memory_size=0", lambda: pc.lbfgsb(memory_size=0), ValueError,
     r"lbfgsb: `memory_size` must be >= 1, got 0"),
    ("lbfgsb.memory_size=str", lambda: pc.lbfgsb(memory_size="10"),
     TypeError, r"lbfgsb: `memory_size` must be an int, got '10'"),
    ("lbfgsb.eps_active=nan", lambda: pc.lbfgsb(eps_active=np.nan),
     ValueError, r"lbfgsb: `eps_active` must be >= 0, got nan"),
    ("lbfgsb.no_value_fn", _lbfgsb_update_without_value_fn, ValueError,
     r"lbfgsb with a line search needs `value=` and `value_fn=`"),
    ("lbfgsb.tree_lower>upper",
     lambda: pc.lbfgsb(lower={"layer": {"w": 2.0, "b": 0.0}},
                       upper=1.0).init(P),
     ValueError, r"lbfgsb: bounds of parameter `layer/w`: .*lower=2.0 > "
     r"upper=1.0"),
    # ------------------------------------------------ parameterizations
    ("Softplus.beta=0", lambda: pc.Softplus(beta=0.0), ValueError,
     r"Softplus: `beta` must be > 0, got 0.0"),
    ("Softplus.beta=str", lambda: pc.Softplus(beta="2"), TypeError,
     r"Softplus: `beta` must be a real number, got '2'"),
    ("Exp.eps<0", lambda: pc.Exp(eps=-1.0), ValueError,
     r"Exp: `eps` must be >= 0, got -1.0"),
    ("Sigmoid.lower=upper", lambda: pc.Sigmoid(1.0, 1.0), ValueError,
     r"Sigmoid: `lower` must be < `upper`, got lower=1.0, upper=1.0"),
    ("Softplus.inverse_out_of_range",
     lambda: pc.Softplus().inverse(jnp.array([1.0, -1.0])), ValueError,
     r"Softplus\(beta=1.0, eps=0.0\).inverse: `value` .*-1.0.* at index "
     r"\(1,\) is outside the range"),
    ("Sigmoid.inverse_out_of_range", lambda: pc.Sigmoid(0, 1).inverse(2.0),
     ValueError, r"Sigmoid\(lower=0.0, upper=1.0\).inverse: `value` .*2.0.* is "
     r"outside the range of the parameterization \(Box\(lower=0.0, "
     r"upper=1.0\)\)"),
    ("Exp.inverse_nan", lambda: pc.Exp(eps=0.5).inverse(jnp.nan),
     ValueError, r"Exp\(eps=0.5\).inverse: `value` .*nan.* is not finite"),
    ("Softplus.inverse_inf",
     lambda: pc.Softplus().inverse(jnp.array([1.0, jnp.inf])), ValueError,
     r"Softplus\(beta=1.0, eps=0.0\).inverse: `value` .*inf.* at index "
     r"\(1,\) is not finite"),
    ("dead_fraction.tol<0",
     lambda: pc.dead_fraction(P, pc.Softplus(), tol=-1.0), ValueError,
     r"dead_fraction: `tol` must be >= 0, got -1.0"),
    ("dead.tol=str", lambda: pc.ReLU().dead(jnp.ones(2), tol="0"), TypeError,
     r"ReLU\(\).dead: `tol` must be a real number, got '0'"),
    ("dead_fraction.int_bare_array",
     lambda: pc.dead_fraction(jnp.arange(3), pc.ReLU(), mask="*"), TypeError,
     r"dead_fraction: parameter `params` has dtype int32"),
    # ------------------------------------------------ reparam
    ("reparam.constraint", lambda: pc.reparam(P, pc.NonNegative()),
     TypeError, r"reparam: `rules` must be a parameterization.*It is a "
     r"constraint set"),
    ("reparam.constraint_rule",
     lambda: pc.reparam(P, {"layer/w": pc.NonNegative()}), TypeError,
     r"reparam: `rules\['layer/w'\]` must be a parameterization"),
    ("unreparam.unmatched",
     lambda: pc.unreparam(P, pc.Softplus(), mask="nomatch"), ValueError,
     r"unreparam: pattern\(s\) \['nomatch'\] match no parameter path"),
    ("reparam.mask+rules",
     lambda: pc.reparam(P, {"layer/w": pc.Softplus()}, mask="layer/w"),
     ValueError, r"reparam: `mask` is only allowed with a single "
     r"parameterization"),
    ("dead_fraction.int_leaf",
     lambda: pc.dead_fraction({"i": jnp.arange(3)}, pc.ReLU(), mask="i"),
     TypeError, r"dead_fraction: parameter `i` has dtype int32"),
    # ------------------------------------------------ linen
    ("linen.unknown_variable",
     _init_linen(pc.linen.Reparameterized(
         nn.Dense(3), rules={"kernal": pc.Softplus()})),
     ValueError, r"Reparameterized: pattern\(s\) \['kernal'\] match no "
     r"parameter path.*'bias', 'kernel'"),
    ("linen.constraint_kernel",
     _init_linen(pc.linen.Reparameterized(nn.Dense(3),
                                          kernel=pc.NonNegative())),
     TypeError, r"Reparameterized: `kernel` must be a parameterization.*It "
     r"is a constraint set"),
    ("linen.nothing",
     _init_linen(pc.linen.Reparameterized(nn.Dense(3), kernel=None)),
     ValueError, r"Reparameterized: nothing to reparameterize; give "
     r"`kernel=`, `bias=` or `rules=`"),
    ("linen.kernel_init_not_an_attribute",
     _init_linen(pc.linen.Reparameterized(
         nn.LayerNorm(), kernel=None, rules={"scale": pc.Softplus()},
         kernel_init=nn.initializers.ones)),
     TypeError, r"Reparameterized: `kernel_init` given, but LayerNorm has no "
     r"`kernel_init`"),
    ("linen.NonNegDense.parameterization",
     _init_linen(pc.linen.NonNegDense(3, parameterization=pc.Box(0, 1))),
     TypeError, r"NonNegDense: `parameterization` must be a "
     r"parameterization"),
    # ------------------------------------------------ nnx
    ("nnx.unmatched",
     lambda: pc.nnx.reparameterize(_nnx_linear(), {"*kernal": pc.Softplus()}),
     ValueError, r"posconstr.nnx.reparameterize: pattern\(s\) \['\*kernal'\] "
     r"match no parameter path.*'bias', 'kernel'"),
    ("nnx.constraint",
     lambda: pc.nnx.reparameterize(_nnx_linear(), pc.NonNegative()),
     TypeError, r"posconstr.nnx.reparameterize: `rules` must be a "
     r"parameterization.*It is a constraint set"),
    ("nnx.NonNegLinear.parameterization",
     lambda: pc.nnx.NonNegLinear(2, 3, rngs=nnx.Rngs(0),
                                 parameterization=pc.Box(0, 1)),
     TypeError, r"NonNegLinear: `parameterization` must be a "
     r"parameterization"),
    # ------------------------------------------------ initializers
    ("icnn.rho=0", lambda: ini.icnn(rho=0.0), ValueError,
     r"icnn: `rho` must be in \(0, 1\), got 0.0"),
    ("icnn.rho=str", lambda: ini.icnn(rho="0.5"), TypeError,
     r"icnn: `rho` must be a real number, got '0.5'"),
    ("icnn.bias_noise=1", lambda: ini.icnn(bias_noise=1.0), ValueError,
     r"icnn: `bias_noise` must be in \[0, 1\), got 1.0"),
    ("icnn_moments.fan_in=0", lambda: ini.icnn_moments(0), ValueError,
     r"icnn: `fan_in` must be an int >= 1, got 0"),
    ("icnn.rank1_kernel", lambda: ini.icnn()(jax.random.key(0), (5,)),
     ValueError, r"icnn: a kernel of rank >= 2 is needed, got shape \(5,\)"),
    ("icnn.in_axis_out_of_range",
     lambda: ini.icnn(in_axis=5)(jax.random.key(0), (3, 4)), ValueError,
     r"icnn: `in_axis`=5 is out of range for a kernel of shape \(3, 4\)"),
    ("through.constraint", lambda: ini.through(pc.NonNegative(), ini.icnn()),
     TypeError, r"initializers.through: `parameterization` must be a "
     r"parameterization"),
]


@pytest.mark.parametrize("call,exc,regex", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_raises_exact_type_naming_the_argument(call, exc, regex):
  with pytest.raises(Exception) as info:
    call()
  assert type(info.value) is exc, (
      f"expected {exc.__name__}, got {type(info.value).__name__}: "
      f"{info.value}")
  assert re.search(regex, str(info.value), re.DOTALL), str(info.value)


def test_catalogue_is_large_and_distinct():
  assert len(CASES) >= 20
  assert len({c[0] for c in CASES}) == len(CASES)
  # Every regex names something: an argument or a path (in backticks or
  # quotes, or as ``name=value``), or the owner's hyperparameters (the repr
  # of a set or parameterization).
  for name, _, _, regex in CASES:
    assert ("`" in regex or "'" in regex or "\\(" in regex
            or re.search(r"[a-z_]+=", regex)), name
