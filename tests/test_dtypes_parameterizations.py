"""Parameterizations in half precision and float32, and reparam/unreparam on
a pytree with float16, bfloat16, float32 and float64 leaves.

Per dtype: forward is finite for latents in [-100, 100] (Exp up to
log(max), where it saturates to +inf), its values lie in ``.constraint``,
and ``forward(inverse(w)) ~= w`` within the rounding that a latent stored
in that dtype allows, over the representable range and at its ends.
Everything for one dtype is computed in one jit.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import DTYPES
from _reference import assert_dtypes as _assert_dtypes
from _reference import mixed_dtype_tree as _tree

import posconstr as pc

PARAMETERIZATIONS = {
    "Softplus": pc.Softplus(),
    "Softplus(2,0.1)": pc.Softplus(beta=2.0, eps=0.1),
    "Exp(0.1)": pc.Exp(eps=0.1),
    "Square(0.1)": pc.Square(eps=0.1),
    "Abs(0.1)": pc.Abs(eps=0.1),
    "ReLU": pc.ReLU(),
    "Sigmoid(0.1,0.3)": pc.Sigmoid(0.1, 0.3),
    "Sigmoid(-1,2)": pc.Sigmoid(-1.0, 2.0),
}
G_IDS = list(PARAMETERIZATIONS)
# One of each class, for the pytree tests.
BASE = ["Softplus", "Exp(0.1)", "Square(0.1)", "Abs(0.1)", "ReLU",
        "Sigmoid(-1,2)"]


@functools.lru_cache(maxsize=None)
def _trees():
  """reparam / unreparam / dead_fraction of the mixed tree, ONE jit."""
  with jax.enable_x64(True):
    latents = _tree(scale=3.0)  # Exp(z) overflows float16 for z > 11.09.

    @jax.jit
    def run(latents):
      out = {}
      for name in BASE:
        g = PARAMETERIZATIONS[name]
        values = pc.reparam(latents, g)
        out[name] = (values, pc.unreparam(values, {"*": g}),
                     pc.dead_fraction(latents, g))
      return out

    return jax.tree.map(np.asarray, run(latents))


@pytest.mark.parametrize("name", BASE)
def test_reparam_unreparam_keep_every_dtype(name):
  values, back, fractions = _trees()[name]
  _assert_dtypes(values, "reparam")
  _assert_dtypes(back, "unreparam")
  g = PARAMETERIZATIONS[name]
  for k in DTYPES:
    assert np.isfinite(np.asarray(back[k], np.float64)).all(), k
    if name == "ReLU":  # Negative latents come back as 0: not invertible.
      continue
    # forward(unreparam(reparam(z))) == reparam(z) up to the rounding of
    # the latent (Exp in bfloat16: |z| * 2^-9 relative).
    again = np.asarray(g.forward(jnp.asarray(back[k])), np.float64)
    np.testing.assert_allclose(again, np.asarray(values[k], np.float64),
                               rtol=0.05, atol=1e-30)
  assert set(fractions) == set(DTYPES)
  assert all(0 <= float(f) <= 1 for f in fractions.values())


def _lower_upper(g):
  if isinstance(g, pc.Sigmoid):
    return g.lower, g.upper
  return g.eps, np.inf


def _width(g):
  lo, hi = _lower_upper(g)
  return 0.0 if np.isinf(hi) else hi - lo


def _value_grid(g, dtype):
  """Values of w over the representable range (below the top binades)."""
  info = jnp.finfo(dtype)
  lo, hi = _lower_upper(g)
  if np.isinf(hi):
    excess = np.geomspace(4 * float(info.tiny), float(info.max) / 4, 300)
    w = lo + excess
  else:
    u = np.concatenate([np.geomspace(4 * float(info.tiny), 0.5, 150),
                        1 - np.geomspace(0.5, float(info.eps), 150)])
    w = lo + (hi - lo) * u
  w = np.asarray(jnp.asarray(w, jnp.float32).astype(dtype))
  w = w[(w.astype(np.float64) >= lo) & (w.astype(np.float64) <= hi)]
  return np.resize(w, 300)  # One length: one compile per dtype.


def _ends(g, dtype):
  """The ends of the range in ``dtype``: bounds rounded inwards, or max."""
  lo, hi = g.constraint.bounds_in(dtype)
  top = jnp.finfo(dtype).max if hi is None else hi
  return np.asarray(jnp.stack([lo, top]).astype(dtype))


@functools.lru_cache(maxsize=None)
def _computed(dtype_name):
  """For every parameterization, in ONE jit per dtype.

  Returns ``(z, ws, results)``; ``results[i]`` holds, for the i-th
  parameterization: forward of latents z in [-100, 100] and (a second jit)
  the violation of those values; for the value grid ``ws[i]``: ``inverse``,
  ``forward`` of it and ``derivative`` there; the same three for the two
  ends of the range.
  """
  dtype = DTYPES[dtype_name]
  z = np.asarray(jnp.asarray(np.linspace(-100, 100, 401), dtype))
  gs = list(PARAMETERIZATIONS.values())
  ws = [_value_grid(g, dtype) for g in gs]
  ends = [_ends(g, dtype) for g in gs]

  @jax.jit
  def run(z, ws, ends):
    out = []
    for g, w, e in zip(gs, ws, ends):
      values = g.forward(z)
      latent, end_latent = g.inverse(w), g.inverse(e)
      out.append(dict(
          values=values,
          latent=latent, back=g.forward(latent), slope=g.derivative(latent),
          end_latent=end_latent, end_back=g.forward(end_latent),
          end_slope=g.derivative(end_latent)))
    return out

  results = run(z, ws, ends)
  # The violation in a jit of its own, on the materialized values: fused with
  # forward, XLA (CPU) may skip the final rounding to the half dtype.
  # Exp's overflow to +inf is not in the set (violation inf, checked
  # below); the finite values are, so inf is measured as the dtype's max.
  violations = jax.jit(lambda vs: [
      (g.constraint.violation(jnp.where(jnp.isposinf(v), jnp.finfo(v.dtype).max,
                                        v)), g.constraint.violation(v))
      for g, v in zip(gs, vs)])([r["values"] for r in results])
  results = jax.tree.map(np.asarray, results)
  for r, e, (v, raw) in zip(results, ends, violations):
    r["ends"], r["violation"], r["raw_violation"] = e, np.asarray(v), raw
  return z, ws, results


def _result(name, dtype_name):
  return _computed(dtype_name)[2][G_IDS.index(name)]


def _cases():
  """(name, dtype_name) for bf16, f16, f32."""
  return [pytest.param(name, dtype_name, id=f"{name}-{dtype_name}")
          for dtype_name in ("bf16", "f16", "f32") for name in G_IDS]


@pytest.mark.parametrize("name", G_IDS)
@pytest.mark.parametrize("dtype_name", ["bf16", "f16"])
def test_forward_is_finite_for_latents_up_to_100(name, dtype_name):
  z = _computed(dtype_name)[0].astype(np.float64)
  values = _result(name, dtype_name)["values"]
  assert values.dtype == DTYPES[dtype_name]
  w = values.astype(np.float64)
  if name.startswith("Exp"):
    # exp overflows past log(max): 11.09 in float16, 88.7 in bfloat16 (and
    # float32). It saturates to +inf, never NaN; below that it is finite.
    limit = np.log(float(jnp.finfo(DTYPES[dtype_name]).max))
    finite = z < limit - 0.1
    assert np.isfinite(w[finite]).all()
    assert not np.isnan(w).any() and np.isposinf(w[-1])
  else:
    assert np.isfinite(w).all()


@pytest.mark.parametrize("name,dtype_name", _cases())
def test_forward_lands_in_the_constraint(name, dtype_name):
  r = _result(name, dtype_name)
  assert float(r["violation"]) == 0.0
  overflow = np.isinf(r["values"].astype(np.float64)).any()
  assert float(r["raw_violation"]) == (np.inf if overflow else 0.0)


def _bound(w, latent, slope, width, dtype):
  """``2 eps (|w| + |z g'(z)| + width)``, see the test below."""
  eps = float(jnp.finfo(dtype).eps)
  return 2 * eps * (np.abs(w) + np.abs(latent * slope) + width)


@pytest.mark.parametrize("name", G_IDS)
@pytest.mark.parametrize("dtype_name", ["bf16", "f16", "f32"])
def test_inverse_is_stable_over_the_representable_range(name, dtype_name):
  """forward(inverse(w)) ~= w, to the rounding of a latent in the dtype.

  The bound is ``2 eps (|w| + |z g'(z)| + width)``: one rounding of w, one
  of the latent z (which moves w by ``g'(z) * eps * |z|``) and, for Sigmoid,
  one of the relative position. Where ``|z g'(z)| <= |w|`` (Softplus and
  Square for w >= 1, Abs, ReLU) this is the plain relative tolerance
  ``4 eps``; Exp and the low end of Softplus store ``log(w)``, whose
  rounding in bfloat16 alone moves w by up to ``|log w| * 2^-9``.
  """
  g = PARAMETERIZATIONS[name]
  dtype = DTYPES[dtype_name]
  r = _result(name, dtype_name)
  w = _computed(dtype_name)[1][G_IDS.index(name)].astype(np.float64)
  assert r["latent"].dtype == r["back"].dtype == dtype
  latent, back, slope = (r[k].astype(np.float64)
                         for k in ("latent", "back", "slope"))
  assert np.isfinite(latent).all() and np.isfinite(back).all()
  width = _width(g)
  bound = _bound(w, latent, slope, width, dtype)
  err = np.abs(back - w)
  worst = int(np.argmax(err / bound))
  assert (err <= bound).all(), (w[worst], latent[worst], back[worst])
  # Well-conditioned points: the plain relative tolerance.
  plain = np.abs(latent * slope) <= np.abs(w)
  assert plain.sum() > 10 or name.startswith(("Exp", "Sigmoid"))
  if width == 0:
    eps = float(jnp.finfo(dtype).eps)
    assert (err[plain] <= 4 * eps * np.abs(w[plain])).all()


@pytest.mark.parametrize("name", G_IDS)
@pytest.mark.parametrize("dtype_name", ["bf16", "f16", "f32"])
def test_inverse_at_the_lower_end_is_finite(name, dtype_name):
  """inverse(lower bound) is a finite latent that maps back to the bound
  (within the smallest normal excess or one ulp of it), never NaN."""
  dtype = DTYPES[dtype_name]
  r = _result(name, dtype_name)
  assert np.isfinite(r["end_latent"].astype(np.float64)).all()
  lo = float(r["ends"][0])
  back = float(r["end_back"][0])
  assert abs(back - lo) <= max(float(jnp.finfo(dtype).eps) * abs(lo),
                               4 * float(jnp.finfo(dtype).tiny))


@pytest.mark.parametrize("name,dtype_name", _cases())
def test_round_trip_at_the_top_of_the_range_stays_finite(name, dtype_name):
  """At the dtype's max (or a Sigmoid's upper bound, rounded inwards)."""
  g = PARAMETERIZATIONS[name]
  r = _result(name, dtype_name)
  w = float(r["ends"][1])
  latent = float(r["end_latent"][1])
  back = float(r["end_back"][1])
  assert np.isfinite(latent) and np.isfinite(back)
  assert abs(back - w) <= _bound(w, latent, float(r["end_slope"][1]),
                                 _width(g), DTYPES[dtype_name])
