"""Sums (and maxima) over slices of elementwise terms, in a form XLA:CPU
fuses.

XLA:CPU hands a floating-point reduction with one output to its YNNPACK
kernels, which need a plain array as input: an elementwise producer with a
comparison or a select in it (``where(w > theta, w, 0)``) is written out in
full first, and read back; down the columns of a ``Dense`` kernel, with a
stride. All terms in one variadic reduction, which XLA emits itself, fused
with its producer, avoid that; over leading axes, in a loop over blocks of
rows that stay in cache. A lone term (a norm's sum of squares) keeps
YNNPACK's sum, except down the columns of kernels wider than about 10,000,
where that sum slows down several times: there each block's two halves
are reduced side by side, which keeps the reduction variadic, with no loop
(a loop reading an intermediate leaf keeps that leaf out of place, so the
projection after ``apply_updates`` would lose its in-place update). The
results are the same up to the order of the additions. Other backends
reduce a fused producer in one kernel, and get the plain reductions.
Measured by ``python -m benchmarks.column_sums``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Rows per block, and blocks per loop iteration: of 2 to 200 rows unrolled
# 1 to 64 times, 16 x 16 was the fastest or near it for 512 to 20,000
# columns on a 2-core x86 CPU (the loop's own overhead halved the speed of
# single blocks of 8 rows).
_BLOCK_ROWS = 16
_UNROLL = 16
# A lone term's blocks (no loop), two halves each: 16 or 32 rows were the
# fastest of 8, 16 and 32 for 2,048 to 20,000 columns.
_LONE_BLOCK_ROWS = 16
# YNNPACK's own sum of a lone term down the columns is as fast up to rows
# of 10,000 elements, and 3-4x slower from 12,500 (10x at 20,000), on a
# 2-core x86 CPU.
_LONE_NATIVE_MAX_ROW = 10_000
# Below this many elements one reduction is as fast: no loop.
_MIN_ELEMENTS = 1 << 20


# name -> (combine two partial results, the identity for a dtype).
_OPS = {"sum": (lax.add, lambda dtype: jnp.zeros((), dtype)),
        "max": (lax.max, lambda dtype: jnp.array(-jnp.inf, dtype))}


def _plain(t, axes, op):
  # The dtype of a sum is the term's: int32 counts stay int32 under x64.
  if op == "sum":
    return jnp.sum(t, axes, t.dtype, keepdims=True)
  return jnp.max(t, axes, keepdims=True, initial=-jnp.inf)


def _sums(terms, xs, axes, ops):
  return tuple(_plain(t, axes, op)
               for t, op in zip(terms(*xs), ops, strict=True))


def _combined(ops, a, b):
  return tuple(_OPS[op][0](x, y) for op, x, y in zip(ops, a, b, strict=True))


def _reduced(parts, axes, ops):
  results = lax.reduce(
      parts, tuple(_OPS[op][1](t.dtype) for t, op in zip(parts, ops)),
      functools.partial(_combined, ops), axes)
  return tuple(jnp.expand_dims(r, axes) for r in results)


def _fused_sums(terms, xs, axes, ops):
  return _reduced(tuple(terms(*xs)), axes, ops)


def _blocked_sums(terms, xs, k, ops):
  """The reductions over the leading ``k`` axes, in a loop over blocks of
  their rows."""
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
        for x in flat], axes, ops)

  def body(i, acc):
    return _combined(ops, acc, sums(first + i * block, block))

  steps = (rows - first) // block
  return lax.fori_loop(0, steps, body, sums(0, first),
                       unroll=max(1, min(_UNROLL, steps)))


def _halved_sums(terms, xs, k, ops):
  """A lone term's reduction over the leading ``k`` axes, with no loop:
  each block's two halves in one variadic reduction, then the blocks'."""
  shape = xs[0].shape
  rest = shape[k:]
  rows = math.prod(shape[:k])
  blocks, half = rows // _LONE_BLOCK_ROWS, _LONE_BLOCK_ROWS // 2
  if not blocks:
    return _sums(terms, xs, tuple(range(k)), ops)
  whole = blocks * _LONE_BLOCK_ROWS
  flat = tuple(x.reshape(rows, *rest) for x in xs)
  (term,) = terms(*[x[:whole].reshape(blocks, _LONE_BLOCK_ROWS,
                                      *(1,) * (k - 1), *rest) for x in flat])
  top, bottom = _reduced((term[:, :half], term[:, half:]), (1,), ops * 2)
  (op,) = ops
  combine = _OPS[op][0]
  result = _plain(combine(top, bottom), (0,), op).reshape((1,) * k + rest)
  if whole < rows:  # The leftover rows, fewer than a block.
    (leftover,) = terms(*[x[whole:].reshape(rows - whole, *(1,) * (k - 1),
                                            *rest) for x in flat])
    result = combine(result, _plain(leftover, (0,), op))
  return (result,)


def _cpu_sums(terms, xs, axes, ops):
  if len(jax.devices("cpu")) > 1:
    # The arrays may be sharded: a block's dynamic slice would gather a
    # sharded leading axis, and the variadic reduction is left unfused.
    return _default_sums(terms, xs, axes, ops)
  k = len(axes)
  leading = axes == tuple(range(k)) and k < xs[0].ndim
  if len(ops) == 1:
    if leading and math.prod(xs[0].shape[k:]) > _LONE_NATIVE_MAX_ROW:
      return _halved_sums(terms, xs, k, ops)  # Down long columns.
    return _sums(terms, xs, axes, ops)  # YNNPACK's, as fast here.
  if leading:
    return _blocked_sums(terms, xs, k, ops)  # Down the columns.
  return _fused_sums(terms, xs, axes, ops)


def _default_sums(terms, xs, axes, ops):
  # Other backends fuse each plain reduction with its producer; a maximum
  # among sums would be a pass of its own: one variadic reduction then.
  if "max" in ops:
    return _fused_sums(terms, xs, axes, ops)
  return _sums(terms, xs, axes, ops)


def slice_sums(terms: Callable[..., Sequence[jax.Array]],
               xs: Sequence[jax.Array],
               axes: tuple[int, ...],
               ops: Sequence[str] | None = None) -> tuple[jax.Array, ...]:
  """Per slice along ``axes`` (keepdims), the sums of ``terms(*xs)``.

  Args:
    terms: maps blocks of ``xs`` (the same rows of each: leading axes cut,
      the others whole) to arrays of that block's shape, elementwise, each
      in int32 or one float dtype of at least 32 bits (they are summed in
      their own dtype); anything it closes over must broadcast against such
      a block (per-slice values, with size 1 along ``axes``).
    xs: arrays of one shape.
    axes: the normalized axes the slices span.
    ops: per term, ``"sum"`` (the default for all) or ``"max"`` (a float
      term's maximum, ``-inf`` if the slice is empty; XLA:CPU's maximum may
      skip a NaN, so test a sum for NaN where that matters).

  Returns:
    One sum (or maximum) per term, in the term's dtype, each of the
    arrays' rank with size 1 along ``axes``. ``xs`` are constants to
    differentiation (the variadic reduction cannot be transposed):
    differentiate through ``jnp.sum`` instead (as
    :func:`sum_of_squares` does).
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
  ops = ("sum",) * len(dtypes) if ops is None else tuple(ops)
  if len(ops) != len(dtypes) or not {"sum", "max"}.issuperset(ops) or any(
      op == "max" and d not in floats for op, d in zip(ops, dtypes)):
    raise ValueError(f"slice_sums: ops {ops} for terms of dtypes {dtypes};"
                     ' one "sum" or "max" per term, "max" for floats.')
  if xs[0].size < _MIN_ELEMENTS:
    return _sums(terms, xs, axes, ops)
  return lax.platform_dependent(
      *xs, cpu=lambda *xs: _cpu_sums(terms, xs, axes, ops),
      default=lambda *xs: _default_sums(terms, xs, axes, ops))


def sum_of_squares(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Per slice along ``axes`` (keepdims), ``sum(x * x)``, differentiable.

  ``x`` is a float of at least 32 bits. Leaves under ``_MIN_ELEMENTS`` get
  ``jnp.sum`` itself (the same program as before, in every small leaf).
  """
  if x.size < _MIN_ELEMENTS:
    return jnp.sum(x * x, axis=axes, keepdims=True)
  return _large_sum_of_squares(x, axes)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _large_sum_of_squares(x, axes):
  return slice_sums(lambda b: (b * b,), [x], axes)[0]


@_large_sum_of_squares.defjvp
def _large_sum_of_squares_jvp(axes, primals, tangents):
  # Linear in dx through a plain sum, so reverse mode transposes it.
  (x,), (dx,) = primals, tangents
  return (_large_sum_of_squares(x, axes),
          jnp.sum(2 * x * dx, axis=axes, keepdims=True))
