"""Issue 13 §2: integer, boolean and complex arrays raise a ``TypeError``
naming the argument and its dtype, everywhere (one rule: only
floating-point arrays; Python numbers are taken as floats).

Before the fix: ``Softplus().forward`` of int32 returned int32 ``[0 0 1 2]``,
``MaxNorm(1.).project([3, 4])`` gave ``[0, 0]``, ``NonNegative().project``
of ints raised "cannot convert float infinity to integer", and complex
inputs gave NumPy ufunc errors or dropped the imaginary part.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import posconstr as pc

BAD = {"int32": jnp.array([-1, 0, 1, 2]), "bool": jnp.array([True, False]),
       "complex64": jnp.array([-1 + 1j, 2 + 0j])}
SETS = [pc.NonNegative(), pc.NonNegative(0.1), pc.Box(0.0, 1.0),
        pc.Simplex(axis=None), pc.MaxNorm(1.0, axis=None),
        pc.UnitNorm(axis=None), pc.MinMaxNorm(0.5, 1.0, axis=None)]
PARAMETERIZATIONS = [pc.Softplus(), pc.Exp(), pc.Square(), pc.Abs(),
                     pc.ReLU(), pc.Sigmoid()]

SET_METHODS = {
    "project": lambda c, x: c.project(x),
    "violation": lambda c, x: c.violation(x),
    "active": lambda c, x: c.active(x),
    "pushing_out": lambda c, x: c.pushing_out(x, jnp.ones(x.shape)),
}
PARAM_METHODS = {
    "forward": ("latent", lambda g, x: g.forward(x)),
    "derivative": ("latent", lambda g, x: g.derivative(x)),
    "dead": ("latent", lambda g, x: g.dead(x)),
    "inverse": ("value", lambda g, x: g.inverse(x)),
    "fold": ("value", lambda g, x: g.fold(x)),
}


@pytest.mark.parametrize("dtype", list(BAD))
@pytest.mark.parametrize("method", list(SET_METHODS))
@pytest.mark.parametrize("c", SETS, ids=repr)
def test_sets_reject_non_float_arrays(c, method, dtype):
  x = BAD[dtype]
  with pytest.raises(TypeError, match=rf"\.{method}: `x` must be a real "
                     rf"floating-point array, got dtype {dtype}"):
    SET_METHODS[method](c, x)
  with pytest.raises(TypeError, match=rf"`x`.*{dtype}"):
    jax.jit(lambda x: SET_METHODS[method](c, x))(x)


@pytest.mark.parametrize("dtype", list(BAD))
@pytest.mark.parametrize("method", list(PARAM_METHODS))
@pytest.mark.parametrize("g", PARAMETERIZATIONS, ids=repr)
def test_parameterizations_reject_non_float_arrays(g, method, dtype):
  name, call = PARAM_METHODS[method]
  with pytest.raises(TypeError, match=rf"\.{method}: `{name}` must be a real "
                     rf"floating-point array, got dtype {dtype}"):
    call(g, BAD[dtype])


def test_complex_gradient_to_pushing_out_is_rejected():
  with pytest.raises(TypeError, match="`grad`.*complex64"):
    pc.NonNegative().pushing_out(jnp.ones(2), BAD["complex64"])


def test_python_numbers_are_floats():
  assert float(pc.NonNegative().project(-3)) == 0.0
  assert float(pc.Softplus().forward(0)) == pytest.approx(np.log(2.0))
  assert float(pc.Exp().inverse(1)) == 0.0
  assert pc.Softplus().forward(np.float32(1.0)).dtype == jnp.float32


def test_complex_hyperparameters_are_rejected():
  for make in (lambda: pc.Simplex(1 + 1j), lambda: pc.MaxNorm(jnp.array(1j)),
               lambda: pc.Softplus(beta=1j), lambda: pc.Box(np.array([1j]))):
    with pytest.raises(TypeError, match="real"):
      make()
