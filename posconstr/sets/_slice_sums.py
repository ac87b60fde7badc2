"""Sums over slices of elementwise terms, in a form XLA:CPU fuses.

XLA:CPU hands a floating-point sum to its YNNPACK kernels only with a plain
array as input: an elementwise producer with a comparison or a select in it
(``where(w > theta, w, 0)``) is written out in full first, and read back;
down the columns of a ``Dense`` kernel, with a stride. All terms in one
variadic reduction, which XLA fuses with its producer, avoid that; a sum
over leading axes, whose native reduction is slow too, runs in a loop over
blocks of rows that stay in cache. The sums are the same up to the order of
the additions. Other backends reduce a fused producer in one kernel, and
get the plain sums. (Measured in ``benchmarks/projection_scale.py``.)
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Rows per block: of 2 to 512, 8 was the fastest or near it for 25 to 20,000
# columns on a 2-core x86 CPU.
_BLOCK_ROWS = 8
# Below this many elements one reduction is as fast: no loop.
_MIN_ELEMENTS = 1 << 20


def _sums(terms, xs, axes):
  return tuple(jnp.sum(t, axes, t.dtype, keepdims=True) for t in terms(*xs))


def _fused_sums(terms, xs, axes):
  parts = tuple(terms(*xs))
  sums = lax.reduce(parts, tuple(jnp.zeros((), t.dtype) for t in parts),
                    lambda a, b: tuple(map(lax.add, a, b)), axes)
  return tuple(jnp.expand_dims(s, axes) for s in sums)


def _blocked_sums(terms, xs, k):
  """The sums over the leading ``k`` axes, by blocks of their rows."""
  shape = xs[0].shape
  rest = shape[k:]
  rows = math.prod(shape[:k])
  # Free: the leading axes are contiguous.
  flat = tuple(x.reshape(rows, *rest) for x in xs)
  block = min(rows, _BLOCK_ROWS)
  first = rows % block or block  # The leftover rows, else the first block.
  axes = tuple(range(k))

  def sums(start, size):
    # Back to the arrays' rank (size 1 on the other leading axes), so that
    # what `terms` closes over broadcasts.
    block_shape = (size,) + (1,) * (k - 1) + rest
    return _fused_sums(terms, [
        lax.dynamic_slice_in_dim(x, start, size, 0).reshape(block_shape)
        for x in flat], axes)

  def body(i, acc):
    return tuple(map(jnp.add, acc, sums(first + i * block, block)))

  return lax.fori_loop(0, (rows - first) // block, body, sums(0, first))


def _cpu_sums(terms, xs, axes):
  if len(jax.devices("cpu")) > 1:
    # The arrays may be sharded: a block's dynamic slice would gather a
    # sharded leading axis, and the variadic reduction is left unfused.
    return _sums(terms, xs, axes)
  k = len(axes)
  if axes == tuple(range(k)) and k < xs[0].ndim:
    return _blocked_sums(terms, xs, k)  # Down the columns.
  return _fused_sums(terms, xs, axes)


def slice_sums(terms: Callable[..., Sequence[jax.Array]],
               xs: Sequence[jax.Array],
               axes: tuple[int, ...]) -> tuple[jax.Array, ...]:
  """Per slice along ``axes`` (keepdims), the sums of ``terms(*xs)``.

  Args:
    terms: maps blocks of ``xs`` (the same rows of each: leading axes cut,
      the others whole) to arrays of that block's shape, elementwise, each
      in int32 or one float dtype of at least 32 bits (they are summed in
      their own dtype); anything it closes over must broadcast against such
      a block (per-slice values, with size 1 along ``axes``).
    xs: arrays of one shape.
    axes: the normalized axes the slices span.

  Returns:
    One sum per term, in the term's dtype, each of the arrays' rank with
    size 1 along ``axes``. ``xs`` are constants to differentiation (the
    variadic reduction cannot be transposed): differentiate through
    ``jnp.sum`` instead.
  """
  xs = tuple(lax.stop_gradient(x) for x in xs)
  if len({x.shape for x in xs}) != 1:
    raise ValueError(f"slice_sums: xs of shapes {[x.shape for x in xs]}; "
                     "they must have one shape (broadcast them first).")
  dtypes = [t.dtype for t in jax.eval_shape(lambda *xs: tuple(terms(*xs)),
                                            *xs)]
  floats = {d for d in dtypes if jnp.issubdtype(d, jnp.floating)}
  if len(floats) > 1 or any(jnp.finfo(f).bits < 32 for f in floats):
    raise TypeError(f"slice_sums: terms of dtypes {dtypes}; floats must share"
                    " one dtype of at least 32 bits.")
  if xs[0].size < _MIN_ELEMENTS:
    return _sums(terms, xs, axes)
  return lax.platform_dependent(
      *xs, cpu=lambda *xs: _cpu_sums(terms, xs, axes),
      default=lambda *xs: _sums(terms, xs, axes))
