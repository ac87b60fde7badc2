"""Parameterizations and reparam/unreparam against independent references.

References: float64 NumPy/SciPy formulas (``np.logaddexp``,
``scipy.special.expit``), central finite differences, NumPy counts and
sampling (the half-normal mean ``sqrt(2/pi)``, a KS test). Arrays are padded
to one length per dtype so that eager ops compile once for the whole file.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from scipy import stats

import posconstr
from posconstr import Abs
from posconstr import Box
from posconstr import Exp
from posconstr import NonNegative
from posconstr import ReLU
from posconstr import Sigmoid
from posconstr import Softplus
from posconstr import Square

LOWER = [Softplus(), Softplus(eps=1e-3), Softplus(beta=3.0),
         Softplus(beta=0.25, eps=0.5), Exp(), Exp(eps=0.5), Square(),
         Square(eps=0.1), Abs(), Abs(eps=2.0), ReLU()]
BOXES = [Sigmoid(), Sigmoid(0.0, 2.0), Sigmoid(-1.0, 3.0), Sigmoid(-5.0, -2.0)]
ALL = LOWER + BOXES
MORE = ALL + [Softplus(beta=0.5), Softplus(beta=1e-3), Softplus(beta=100.0)]
N = 512
F32 = np.finfo(np.float32)


def grid(x, dtype=np.float32):
  """``x`` cycled to length N (duplicates are harmless), in ``dtype``."""
  return np.resize(np.asarray(x, np.float64).ravel(), N).astype(dtype)


def x64():
  """Float64 locally (``jax.experimental.enable_x64`` is gone in jax 0.10)."""
  ctx = getattr(jax.experimental, "enable_x64", None)
  return ctx() if ctx is not None else jax.enable_x64(True)


def bounds(g):
  return (g.lower, g.upper) if isinstance(g, Sigmoid) else (g.eps, np.inf)


FUNS = {"inverse": lambda g: g.inverse,
        "grad_deriv": lambda g: lambda z: (jax.vmap(jax.grad(g.forward))(z),
                                           g.derivative(z))}


@functools.lru_cache(maxsize=None)
def jitted(fun, inputs, dtype=np.float32):
  """``FUNS[fun](g)(INPUTS[inputs](g))`` for every g of MORE, in ONE jit.

  One compile instead of one per parameterization; returns {g: (x, out)}.
  """
  with x64() if dtype == np.float64 else jax.enable_x64(False):
    xs = [grid(INPUTS[inputs](g), dtype) for g in MORE]
    outs = jax.jit(lambda xs: [FUNS[fun](g)(x) for g, x in zip(MORE, xs)])(xs)
    return {g: (x, o) for g, x, o in zip(MORE, xs, outs)}


def _outside(g):
  lo, hi = bounds(g)
  with np.errstate(over="ignore"):
    x = np.array([-3e38, -1e30, lo - 1.0, lo - F32.tiny,
                  np.nextafter(np.float32(lo), np.float32(-1)), hi + 1.0])
  return x[(x < lo) | (x > hi)]


def _extreme(g):
  # Up to where forward overflows: exp above 88, z^2 above 1.8e19.
  big = {Exp: 80.0, Square: 1e18}.get(type(g), 3e38)
  z = np.array([-3e38, -1e30, -1e18, -1e4, -100, -20, -1e-30, 0, 1e-30, 20, 100,
                1e4, 1e18, 1e30, 3e38])
  return z[(z <= big) & (z >= (-big if isinstance(g, Square) else -3e38))]


def _ends(g):
  lo, hi = bounds(g)
  return [lo, min(hi, 3e38), lo + 1e-30, (lo + min(hi, lo + 2)) / 2]


INPUTS = {
    "ends_outside": lambda g: np.concatenate([_ends(g), _outside(g)]),
    "extreme": _extreme,
    "smooth": lambda g: np.linspace(-30, 30, N) + 0.0137,  # Off the kinks.
    "half": lambda g: [bounds(g)[0] - 1, bounds(g)[0],
                       min(bounds(g)[1], 1e3) + 1],
}


REF = {  # (g(z), g'(z)) in float64, written from the class docstrings.
    Softplus: lambda g, z: (g.eps + np.logaddexp(0.0, g.beta * z) / g.beta,
                            special.expit(g.beta * z)),
    Exp: lambda g, z: (g.eps + np.exp(z), np.exp(z)),
    Square: lambda g, z: (g.eps + z * z, 2 * z),
    Abs: lambda g, z: (g.eps + np.abs(z), np.sign(z)),
    ReLU: lambda g, z: (np.maximum(z, 0.0), (z > 0) * 1.0),
    Sigmoid: lambda g, z: (g.lower + (g.upper - g.lower) * special.expit(z),
                           (g.upper - g.lower) * special.expit(z)
                           * special.expit(-z)),
}


def ref_forward(g, z):
  with np.errstate(over="ignore"):
    return REF[type(g)](g, np.asarray(z, np.float64))[0]


def ref_derivative(g, z):
  with np.errstate(over="ignore"):
    return REF[type(g)](g, np.asarray(z, np.float64))[1]


# ------------------------------------------------------------ round trips


def test_softplus_float32_relative_round_trip_1e_8_to_1e4():
  # forward(inverse(w)) has relative condition ~1; the worst error seen is
  # ~1e-6 (8 ulp, from log(-expm1(-v)) and log1p); rtol 1e-5 still fails on
  # any cancellation (log(exp(w) - 1) loses everything near 1e-8).
  g, w = Softplus(), grid(np.logspace(-8, 4, N))
  back = g.forward(g.inverse(w))
  assert back.dtype == jnp.float32
  np.testing.assert_allclose(back, w, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype,rtol,lo,hi", [(np.float32, 1e-5, -8, 4),
                                              (np.float64, 1e-13, -12, 12)])
@pytest.mark.parametrize("g", LOWER, ids=repr)
def test_lower_bounded_round_trip(g, dtype, rtol, lo, hi):
  with x64() if dtype == np.float64 else jax.enable_x64(False):
    w = (g.eps + np.logspace(lo, hi, N)).astype(dtype)
    w = grid(w[w.astype(np.float64) > g.eps], dtype)
    z = g.inverse(w)
    assert z.dtype == dtype and np.isfinite(np.asarray(z)).all()
    back, w64 = np.asarray(g.forward(z), np.float64), w.astype(np.float64)
    # Relative in the excess over eps, plus the rounding of ``eps + ...``.
    tol = rtol * (w64 - g.eps) + 2 * np.spacing(w).astype(np.float64)
    err = np.abs(back - w64)
    assert (err <= tol).all(), (w64[np.argmax(err / tol)], (err / tol).max())


@pytest.mark.parametrize("dtype,rtol", [(np.float32, 1e-5),
                                        (np.float64, 1e-13)])
@pytest.mark.parametrize("g", BOXES, ids=repr)
def test_sigmoid_round_trip_relative_to_nearest_bound(g, dtype, rtol):
  with x64() if dtype == np.float64 else jax.enable_x64(False):
    width = g.upper - g.lower
    d = np.logspace(-30, 0, N // 2) * width / 2
    w = np.concatenate([g.lower + d, g.upper - d]).astype(dtype)
    w = grid(w[(w > g.lower) & (w < g.upper)], dtype)
    w64 = w.astype(np.float64)
    back = np.asarray(g.forward(g.inverse(w)), np.float64)
    # Relative to the distance from the nearest bound, plus a few ulps of
    # that bound (and, at the top, of the width: 1 - u is only absolute).
    def ulp(x):
      return float(np.spacing(dtype(max(abs(x), 1e-300))))
    tol = np.where(w64 - g.lower <= g.upper - w64,
                   rtol * (w64 - g.lower) + 4 * ulp(g.lower),
                   rtol * (g.upper - w64) + 4 * max(ulp(g.upper), ulp(width)))
    err = np.abs(back - w64)
    assert (err <= tol).all(), (w64[np.argmax(err / tol)], (err / tol).max())


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_inverse_of_forward_where_invertible(g):
  if isinstance(g, Sigmoid):  # sigmoid(z) keeps relative precision near 0 only.
    z = np.linspace(-80 if g.lower == 0 else -5, 5, N)
  elif isinstance(g, (Softplus, Exp)):
    z = np.linspace(-80, 80, N) / getattr(g, "beta", 1.0)
    z = z[ref_forward(g, z) - g.eps >= g.eps]  # eps + g(z) keeps g(z) to ~ulps.
  else:
    z = np.linspace(0, 1e3, N)  # The non-negative branch.
  z = grid(z)
  np.testing.assert_allclose(g.inverse(g.forward(z)), z, rtol=1e-5, atol=2e-4)
  if not isinstance(g, (Softplus, Exp, Sigmoid)):  # The other branch folds.
    np.testing.assert_allclose(g.inverse(g.forward(-z)),
                               z if g != ReLU() else 0 * z,
                               rtol=2e-7, atol=g.eps * 2e-7)


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_forward_matches_numpy_scipy_reference(g):
  z = grid(np.concatenate([np.linspace(-60, 60, N - 5),
                           [-1e4, -1e3, 0, 1e3, 1e4]]), np.float64)
  ref, base = ref_forward(g, z), bounds(g)[0]
  out = g.forward(z.astype(np.float32))
  assert out.dtype == jnp.float32
  out = np.asarray(out, np.float64)
  # Backward-error bound: a few ulps of each term, |z g'(z)| for rounding z.
  with np.errstate(invalid="ignore", over="ignore"):
    scale = abs(base) + np.abs(ref - base) + np.abs(z * ref_derivative(g, z))
    assert ((np.abs(out - ref) <= 4 * F32.eps * scale + F32.tiny)
            | (out == ref)).all()
  with x64():
    out = g.forward(z)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, ref, rtol=1e-14, atol=1e-300)
  if isinstance(g, Softplus):  # The custom_jvp primal equals jax.nn.softplus.
    np.testing.assert_allclose(
        g.forward(z.astype(np.float32)),
        g.eps + jax.nn.softplus(g.beta * z.astype(np.float32)) / g.beta,
        rtol=2e-6)


# ------------------------------------------------------------ gradients


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_grad_matches_central_differences_float64(g):
  with x64():
    z = grid(INPUTS["smooth"](g), np.float64)
    h = 1e-6 * np.maximum(1, np.abs(z))
    fd = (ref_forward(g, z + h) - ref_forward(g, z - h)) / (2 * h)
    fd_lib = (np.asarray(g.forward(z + h))
              - np.asarray(g.forward(z - h))) / (2 * h)
    grad = jitted("grad_deriv", "smooth", np.float64)[g][1][0]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grad, fd_lib, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_gradient_and_derivative_finite_at_the_boundary(g):
  z, (grad, deriv) = jitted("grad_deriv", "extreme")[g]
  grad, deriv = np.asarray(grad), np.asarray(deriv)
  assert np.isfinite(grad).all() and np.isfinite(deriv).all()
  np.testing.assert_array_equal(grad, deriv)
  ref = ref_derivative(g, z)
  if isinstance(g, Abs):  # d|z|/dz at 0: any subgradient in [-1, 1].
    assert np.abs(grad[z == 0]).max() <= 1
    ref[z == 0] = grad[z == 0]
  np.testing.assert_allclose(grad, ref, rtol=4e-6, atol=F32.tiny)


def test_softplus_second_derivative_through_custom_jvp():
  with x64():
    x = grid(np.linspace(-20, 20, N), np.float64)
    d2 = jax.jit(jax.vmap(jax.grad(jax.grad(Softplus(beta=2.0).forward))))(x)
    np.testing.assert_allclose(d2,
                               2 * special.expit(2 * x) * special.expit(-2 * x),
                               rtol=1e-12, atol=1e-300)


# ------------------------------------------------------------ out of range


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_concrete_out_of_range_or_nan_raises_naming_value(g):
  lo, hi = bounds(g)
  for bad in ([lo - 1.5] if hi == np.inf else [lo - 1.5, hi + 0.25]):
    with pytest.raises(ValueError,
                       match=rf"{str(np.float32(bad))}.*index \(2,\)"):
      g.inverse(grid([lo + 0.5, lo, bad]))
  with pytest.raises(ValueError, match="nan"):
    g.inverse(grid([lo + 0.5, np.nan]))


@pytest.mark.parametrize("g", MORE, ids=repr)
def test_bounds_and_out_of_range_under_jit_give_finite_latents(g):
  lo, hi = bounds(g)
  x, z_jit = jitted("inverse", "ends_outside")[g]
  n, k = len(_ends(g)), len(_outside(g))
  ends, z_out = grid(x[:n]), grid(np.asarray(z_jit)[n:n + k])
  z_ends = g.inverse(ends)  # Concrete: the closed range is accepted.
  for z in (z_ends, z_jit, z_out):
    assert np.isfinite(np.asarray(z)).all(), z
  assert float(g.constraint.violation(g.forward(z_out))) == 0
  # Near 3e38 rounding the latent costs |z g'(z)| ulps (Exp's log); that
  # forward stays finite there is tested below and in test_dtypes_*.
  fin = ends < 1e30
  np.testing.assert_allclose(np.asarray(g.forward(z_ends))[fin], ends[fin],
                             rtol=1e-6,
                             atol=1e-6 * (hi - lo if hi < np.inf else 1))


@pytest.mark.parametrize("g", ALL, ids=repr)
def test_inverse_of_infinity_raises_when_concrete_finite_under_jit(g):
  lo, hi = bounds(g)
  inside = lo + 0.5 if hi == np.inf else (lo + hi) / 2
  with pytest.raises(ValueError, match=r"`value`.*inf.*index \(1,\) is not "
                     "finite"):
    g.inverse(np.float32([inside, np.inf]))
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    top = float(jnp.finfo(dtype).max)
    z = jax.jit(g.inverse)(jnp.array([np.inf, top], dtype))
    back = np.asarray(g.forward(z), np.float64)
    assert z.dtype == dtype and np.isfinite(np.asarray(z, np.float32)).all()
    assert np.isfinite(back).all(), (g, dtype, z, back)
    assert back[0] == back[1]  # +inf is clamped to the dtype's max.
    if hi == np.inf:  # Within the rounding of the latent (|log max| ulps).
      assert back[0] >= top * (1 - 2 * 89 * float(jnp.finfo(dtype).eps))
    else:
      assert back[0] >= hi - 2 * float(jnp.finfo(dtype).eps) * (hi - lo)


@pytest.mark.parametrize("g", [Softplus(eps=0.7), Exp(eps=0.7),
                               Sigmoid(0.7, 1.3)], ids=repr)
def test_forward_never_rounds_below_an_inexact_bound(g):
  """0.7 is not a float32: 0.7f = 0.69999999 < 0.7, so eps + g(z) for a
  small g(z) rounds below the bound; forward lands on the bound rounded up,
  and the gradient is still g'(z), not the clamp's 0."""
  z = jnp.array([-30.0, -20.0, 0.0], jnp.float32)
  w = np.asarray(jax.jit(g.forward)(z), np.float64)
  assert (w >= 0.7).all() and float(g.constraint.violation(w)) == 0
  assert np.float64(np.float32(0.7)) < 0.7  # the premise
  grad = jax.jit(jax.vmap(jax.grad(g.forward)))(z)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(g.derivative(z)),
                             rtol=1e-6)
  assert float(grad[0]) > 0


def test_softplus_inverse_of_zero_is_finite_eager_jit_and_float64():
  # Also under jit for these betas (``MORE``): see the test above.
  gs = (Softplus(), Softplus(beta=0.5), Softplus(beta=1e-3))
  for g in gs:
    assert -np.inf < float(g.inverse(0.0)) < -80 / g.beta
    assert -np.inf < float(g.inverse(1e-39)) < -80 / g.beta
  with x64():
    zs = jax.jit(lambda w: [g.inverse(w) for g in gs])(np.float64(0.0))
    for g, z in zip(gs, zs):
      assert z.dtype == jnp.float64 and -np.inf < float(z) < -700 / g.beta
  g = Softplus(eps=1.0)  # eps + tiny rounds to eps: one ulp of eps instead.
  z = g.inverse(1.0)
  assert (-np.inf < float(z) < -15
          and float(g.forward(z)) == pytest.approx(1, abs=3e-7))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("g", MORE, ids=repr)  # beta=1e-3: latents past f16
def test_half_precision_keeps_dtype_and_stays_finite(g, dtype):
  lo, hi = bounds(g)
  hi = min(hi, 1e3)
  w = np.asarray(grid(np.linspace(lo, hi, N), dtype), np.float64)
  w = grid(w[w >= lo], dtype)  # eps may round below itself in dtype.
  latent = g.inverse(w)
  for z in (latent, jitted("inverse", "half", dtype)[g][1]):
    assert z.dtype == dtype and np.isfinite(np.asarray(z, np.float32)).all()
  back = g.forward(latent)
  assert back.dtype == dtype
  # Rounding the latent to dtype costs |z g'(z)| ulps of the value.
  u = float(jnp.finfo(dtype).eps)
  z, w = np.asarray(latent, np.float64), np.asarray(w, np.float64)
  tol = 2 * u * (np.abs(w) + np.abs(z * ref_derivative(g, z))) + 1e-6
  assert (np.abs(np.asarray(back, np.float64) - w) <= tol).all()
  z = grid(np.linspace(-8, 8, 33), dtype)
  np.testing.assert_allclose(np.asarray(g.forward(z), np.float32),
                             ref_forward(g, np.asarray(z, np.float64)),
                             rtol=2 * u, atol=1e-7)


# ------------------------------------------------------------ dead latents


def test_dead_relu_sigmoid_softplus():
  z = grid([-2.0, -1e-6, 0.0, 1e-6, 3.0])
  np.testing.assert_array_equal(ReLU().dead(z), z <= 0)
  np.testing.assert_array_equal(Softplus().dead(grid([-20.0, 0.0])),
                                grid([1, 0]) == 1)
  zz = np.linspace(-20, 20, N)
  slope = special.expit(zz) * special.expit(-zz)  # In units of the width.
  keep = np.abs(slope - 1e-3) > 1e-6  # Away from the threshold |z| ~ 6.9.
  for g in (Sigmoid(), Sigmoid(0.0, 2.0), Sigmoid(-7.0, 7.0)):
    dead = np.asarray(g.dead(grid(zz)))
    np.testing.assert_array_equal(dead[keep], (slope < 1e-3)[keep])
    np.testing.assert_array_equal(g.dead(grid([6.5, 7.5, -8.0, 0.0, 20.0])),
                                  grid([0, 1, 1, 0, 1]) == 1)
  assert not np.asarray(Sigmoid().dead(grid([7.5, -7.5]), tol=1e-4)).any()


def test_dead_fraction_on_a_pytree_matches_numpy_count():
  rng = np.random.default_rng(0)
  tree = {"a": {"kernel": rng.normal(0, 10, N).astype(np.float32),
                "bias": rng.normal(0, 10, N).astype(np.float32)},
          "b": {"kernel": rng.normal(-2, 5, N).astype(np.float32)}}
  rules = {"a/kernel": ReLU(), "*/bias": None, "b/*": Sigmoid()}
  z = tree["b"]["kernel"].astype(float)
  for tol in (1e-3, 1e-2):
    frac = posconstr.dead_fraction(tree, rules, tol=tol)
    assert set(frac) == {"a/kernel", "b/kernel"}
    assert float(frac["a/kernel"]) == pytest.approx(
        np.mean(tree["a"]["kernel"] <= 0))
    want = np.mean(special.expit(z) * special.expit(-z) < tol)
    assert float(frac["b/kernel"]) == pytest.approx(want)
  jitted = jax.jit(lambda t: posconstr.dead_fraction(
      t, Softplus(), mask="*/kernel"))(tree)
  assert set(jitted) == {"a/kernel", "b/kernel"}
  # An empty leaf has no dead latent: 0, not the NaN of a diverged run.
  empty = posconstr.dead_fraction({"w": jnp.zeros((0, 3))}, Softplus())
  assert float(empty["w"]) == 0.0
  assert float(jitted["a/kernel"]) == pytest.approx(
      np.mean(special.expit(tree["a"]["kernel"].astype(float)) < 1e-3))


# ------------------------------------------------------------ objects


def test_constraints_equality_hash_immutability():
  assert Softplus().constraint == NonNegative()
  assert Softplus(eps=0.1).constraint == NonNegative(0.1)
  assert Sigmoid(0, 2).constraint == Box(0, 2)
  assert all(g.constraint == NonNegative()
             for g in (Exp(), Square(), Abs(), ReLU()))
  assert (Softplus(1) == Softplus(beta=1.0, eps=0.0)
          and hash(Softplus(1)) == hash(Softplus()))
  assert (Softplus(2.0) != Softplus() and Softplus() != Exp()
          and Exp() != Exp(eps=0.1))
  assert (ReLU() == ReLU()
          and Sigmoid(0, 2) == Sigmoid(0.0, 2.0) != Sigmoid(0, 3))
  assert len({Softplus(), Softplus(1.0), Exp(), Sigmoid(), Sigmoid(0, 1)}) == 3
  f = jax.jit(lambda g, x: g.forward(x), static_argnums=0)
  assert float(f(Softplus(beta=2.0), 1.0)) == pytest.approx(
      np.logaddexp(0, 2) / 2)
  for g, name in ((Softplus(), "beta"), (Sigmoid(), "lower"), (ReLU(), "eps")):
    with pytest.raises(AttributeError, match="cannot assign"):  # frozen
      setattr(g, name, 3.0)
  z = grid(np.linspace(-200, 200, N))
  for g in ALL:  # The range lies in the constraint set; an overflow does not.
    w = np.asarray(g.forward(z))
    finite = np.isfinite(w)
    assert float(g.constraint.violation(w[finite])) == 0, g
    assert float(g.constraint.violation(w)) == (0 if finite.all() else np.inf)


@pytest.mark.parametrize("make,name", [
    (lambda: Softplus(beta=0.0), "beta"), (lambda: Softplus(beta=-1.0), "beta"),
    (lambda: Softplus(beta=float("nan")), "beta"),
    (lambda: Softplus(eps=-0.1), "eps"),
    (lambda: Exp(eps=-1e-9), "eps"), (lambda: Square(eps=-1.0), "eps"),
    (lambda: Abs(eps=float("inf")), "eps"),
    (lambda: Sigmoid(1.0, 1.0), "lower"),
    (lambda: Sigmoid(2.0, 1.0), "upper"),
    (lambda: Sigmoid(-3e38, 3e38), "upper - lower")])  # forward: NaN
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    make()


# ------------------------------------------------------------ fold


def test_fold_identity_on_range_reflection_outside():
  v = grid(np.random.default_rng(1).normal(0, 50, N))
  for g in ALL:
    lo, hi = bounds(g)
    inside = grid(np.linspace(lo, min(hi, lo + 100), N))
    np.testing.assert_array_equal(g.fold(inside), inside)
    out = np.asarray(g.fold(v + np.float32(lo)))
    assert float(g.constraint.violation(out)) == 0
    ref = lo + np.abs(v.astype(np.float64))  # Reflect at the lower bound,
    np.testing.assert_allclose(out, np.minimum(ref, hi),  # clip.
                               rtol=1e-6, atol=1e-5)


def test_fold_maps_a_normal_to_a_half_normal():
  n = 200_000
  v = np.random.default_rng(3).standard_normal(n).astype(np.float32)
  w = np.asarray(Softplus().fold(v), np.float64)
  se = math.sqrt((1 - 2 / math.pi) / n)
  assert abs(w.mean() - math.sqrt(2 / math.pi)) < 5 * se
  assert stats.kstest(w[:20000], "halfnorm").pvalue > 1e-3
  shifted = np.asarray(Exp(eps=0.5).fold(v + 0.5), np.float64) - 0.5
  assert abs(shifted.mean() - math.sqrt(2 / math.pi)) < 5 * se


# ------------------------------------------------------------ reparam


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  def leaf():
    return rng.normal(0, 3, N).astype(np.float32)
  return {"Dense_0": {"kernel": leaf(), "bias": leaf()},
          "Dense_1": {"kernel": leaf(), "bias": leaf()}, "step": np.int32(7)}


def test_reparam_rules_first_match_wins_and_round_trip():
  t = _tree()
  rules = {"Dense_0/kernel": None, "*/kernel": Softplus(),
           "*/bias": Sigmoid(-1, 1)}
  out = posconstr.reparam(t, rules)
  assert (out["Dense_0"]["kernel"] is t["Dense_0"]["kernel"]
          and out["step"] is t["step"])
  np.testing.assert_allclose(out["Dense_1"]["kernel"],
                             np.logaddexp(0, t["Dense_1"]["kernel"]), rtol=2e-6)
  for layer in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(out[layer]["bias"],
                               2 * special.expit(t[layer]["bias"]) - 1,
                               rtol=2e-6, atol=2.5e-7)
  back = posconstr.unreparam(out, rules)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(t)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="Dense_1/kernel.*earlier rules"):
    posconstr.reparam(t, {"*/kernel": Exp(), "Dense_1/kernel": Square()})


@pytest.mark.parametrize("mask", [
    "*/kernel", ["Dense_0/kernel", "Dense_1/kernel"],
    lambda p: {k: (jax.tree.map(lambda _: False, v) if k == "step" else
                   {"kernel": True, "bias": False}) for k, v in p.items()},
    {"Dense_0": {"kernel": True, "bias": False},
     "Dense_1": {"kernel": True, "bias": False}, "step": False}])
def test_reparam_single_parameterization_with_mask(mask):
  t = _tree()
  out = posconstr.reparam(t, Exp(eps=0.5), mask=mask)
  for layer in ("Dense_0", "Dense_1"):
    np.testing.assert_allclose(out[layer]["kernel"],
                               0.5 + np.exp(t[layer]["kernel"]), rtol=2e-6)
    assert out[layer]["bias"] is t[layer]["bias"]
  assert out["step"] is t["step"]
  out = posconstr.reparam(t, Square())  # mask=None: every float leaf.
  assert out["step"] is t["step"]
  np.testing.assert_allclose(out["Dense_1"]["bias"], t["Dense_1"]["bias"] ** 2,
                             rtol=2e-7)


def test_reparam_under_jit_vmap_grad():
  t = {k: v for k, v in _tree().items() if k != "step"}
  rules = {"*/kernel": Softplus(beta=2.0), "*/bias": None}
  eager = posconstr.reparam(t, rules)
  jitted = jax.jit(lambda p: posconstr.reparam(p, rules))(t)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  batch = jax.tree.map(lambda x: np.stack([x, -x]), t)
  vm = jax.jit(jax.vmap(lambda p: posconstr.reparam(p, rules)))(batch)
  np.testing.assert_allclose(vm["Dense_0"]["kernel"][1],
                             np.logaddexp(0, -2 * t["Dense_0"]["kernel"]) / 2,
                             rtol=2e-6)
  grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(
      posconstr.reparam(p, rules)))))(t)
  np.testing.assert_allclose(grads["Dense_1"]["kernel"],
                             special.expit(2 * t["Dense_1"]["kernel"]),
                             rtol=1e-5)
  np.testing.assert_array_equal(grads["Dense_1"]["bias"], np.ones(N))
  w = jax.jit(lambda p: posconstr.unreparam(p, rules))(
      jax.tree.map(lambda x: x - 10.0, t))  # Out of range under jit: finite.
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(w))


def test_reparam_argument_errors():
  t = _tree()
  hint = r"constraint set.*Softplus\(\) for NonNegative\(\)"
  for call in (lambda: posconstr.reparam(t, NonNegative()),
               lambda: posconstr.reparam(t, NonNegative(), mask="*/kernel"),
               lambda: posconstr.unreparam(t, {"*/kernel": Box(0, 1)}),
               lambda: posconstr.dead_fraction(t, {"*/kernel": NonNegative()}),
               lambda: posconstr.initializers.through(NonNegative(), jnp.ones)):
    with pytest.raises(TypeError, match=hint):
      call()
  with pytest.raises(ValueError, match="'Dense_9/\\*'.*match no parameter"):
    posconstr.reparam(t, {"Dense_9/*": Softplus()})
  with pytest.raises(ValueError, match="kernl"):
    posconstr.reparam(t, Softplus(), mask="*/kernl")
  with pytest.raises(ValueError, match="`mask`"):
    posconstr.reparam(t, {"*/kernel": Softplus()}, mask="*/kernel")
  with pytest.raises(TypeError, match="step.*int32"):
    posconstr.reparam(t, Softplus(), mask="step")
  with pytest.raises(ValueError, match="-1"):
    posconstr.unreparam({"w": grid([1.0, -1.0])}, Softplus())
