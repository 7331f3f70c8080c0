"""Pure numerics on pytrees: exact, overflow-free norms and safe arithmetic.

This is the bottom layer of optaxclip; it imports nothing else of ours except the
Python-side input checks in ``_validation``.

Accuracy contract (see ``global_norm``):

* Every leaf is reduced in float32 (float64 for float64/complex128 leaves), whatever its
  own dtype, so fp16/bf16 gradients never overflow or underflow in the reduction.
* For ord 1 and 2 the sum is first taken directly. Only when it overflows (``inf``) or, for
  ord 2, falls into the range where squares lose precision (or flush to zero), a second,
  rescaled pass runs
  under ``lax.cond``: the leaves are divided by their largest magnitude before summing. The
  rescue pass costs nothing on steps that do not need it.
* Other orders ``p`` always use the rescaled form, since ``|x|**p`` leaves the float32
  range for ordinary values when p is large.
* Derivatives are finite everywhere, the all-zero input included: roots and divisions go
  through the "double where" form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes
from optaxclip._spec.validation import check_float_leaves, normalize_ord

# Below this sum of squares float32 squares have lost bits to the subnormal range.
_TINY_SUM_OF_SQUARES = 2.0**-96

# An elementwise function a reduction applies to an array as it reads it. It is given the array
# and the array's twin index: its position among the arrays of the same shape and dtype that
# the reduction reads for one group of device axes (so that a caller can keep the constants of
# twin arrays distinct).
Transform = Callable[[jax.Array, int], jax.Array]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a reduction over leaves of ``dtype`` accumulates in (float32 or float64)."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.float64), jnp.dtype(jnp.complex128)):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def result_dtype(leaves: Sequence[jax.Array]) -> jnp.dtype:
    """float64 if any leaf accumulates in float64, float32 otherwise (also when empty)."""
    dtypes = {accumulation_dtype(x.dtype) for x in leaves}
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` with 0 where the denominator is 0; finite derivatives."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def safe_root(total: jax.Array, p: float) -> jax.Array:
    """``total ** (1/p)`` for total >= 0, with a finite derivative at 0 (which is 0).

    A NaN total stays NaN: a NaN gradient must not get the norm 0, which would hide it from
    the non-finite policies.
    """
    positive = total > 0
    safe = jnp.where(positive, total, 1)
    root = jnp.sqrt(safe) if p == 2 else safe ** (1.0 / p)
    return jnp.where(positive, root, jnp.where(jnp.isnan(total), total, 0))


def rescale_divisor(largest: jax.Array) -> jax.Array:
    """What a rescaled sum divides by: ``largest``, at most 2^126 (1 for 0, inf or NaN).

    XLA:CPU divides by multiplying with the reciprocal, which it flushes to 0 when subnormal:
    dividing by an entry above 2^126 gave 0 (the norm of [3e38, 3e38] came out as 0). Capped
    there, the quotients stay at most 4 and their squares cannot overflow.
    """
    cap = 2.0 ** (jnp.finfo(largest.dtype).maxexp - 2)
    return jnp.where((largest > 0) & jnp.isfinite(largest), jnp.minimum(largest, cap), 1)


def stack_scalars(values: Sequence[ArrayLike]) -> jax.Array:
    """One vector of per-leaf scalars, kept as a single buffer.

    XLA rewrites a reduction of stacked scalars into a chain of scalar operations, and then
    fuses that chain into every consumer of the result: a flag or a sum over n leaves that
    reaches each leaf's kernel made the program O(n^2) (AGC took 93 s to compile at 250 leaves
    and did not finish at 2000). Behind the barrier the stack is built once and reduced as a
    vector.
    """
    return lax.optimization_barrier(jnp.stack([jnp.asarray(v) for v in values]))


def computed_once(fn: Any, operands: Any, anchor: jax.Array) -> Any:
    """``fn(operands)``, computed in full before any consumer reads the result.

    XLA fuses elementwise producers into their consumers and recomputes them per element of
    the consumer: a per-unit scale computed on a vector (a division and a dozen selects) and
    sliced by each leaf was recomputed for every element of every leaf (AGC on 2000 small
    leaves: 85 ms a step against 58 ms for Optax). ``lax.optimization_barrier`` does not
    prevent that on XLA:CPU, where barriers are removed before fusion, and a conditional that
    returns its operands is folded away; the results of a conditional whose two branches both
    compute ``fn`` (predicate from ``anchor``, any floating-point runtime scalar: the
    predicate must not be a constant XLA can fold) are not fused.

    That conditional is an XLA:CPU measure only (compile time and CPU kernels): on other
    platforms ``fn`` is inlined, since a GPU conditional may synchronize with the host to
    read its predicate, and recomputing a few scalar ops per element costs a GPU nothing.
    """

    def on_cpu(operands: Any, anchor: jax.Array) -> Any:
        return lax.cond(jnp.isnan(anchor), fn, fn, operands)

    def elsewhere(operands: Any, anchor: jax.Array) -> Any:
        del anchor
        return fn(operands)

    return lax.platform_dependent(operands, anchor, cpu=on_cpu, default=elsewhere)


def runtime_positions(positions: Sequence[int], anchor: jax.Array) -> tuple[jax.Array, ...]:
    """The integers ``positions`` as int32 scalars that XLA treats as runtime values.

    A per-leaf slice of a shared vector at a constant offset is fused into the leaf's kernel,
    so every leaf gets a kernel of its own, and XLA:CPU spends about 10 ms of LLVM on each
    (35 s at 2000 leaves). Positions that come out of a conditional are opaque to XLA: every
    leaf of one shape then runs the same kernel. Both branches return the same positions, so
    the predicate (built from ``anchor``, any runtime scalar) does not affect the result.
    """

    positions = list(positions)
    out: list[jax.Array] = []
    # One conditional per chunk: the outputs of one conditional are all live from its end
    # until their last use, and XLA's buffer assignment takes time that grows faster than
    # linearly with the number of buffers live at once (a single one for 2000 leaves cost
    # about a second).
    for start in range(0, len(positions), _POSITIONS_PER_COND):
        chunk = positions[start : start + _POSITIONS_PER_COND]

        def constants(_: None, chunk: list[int] = chunk) -> tuple[jax.Array, ...]:
            return tuple(jnp.asarray(i, jnp.int32) for i in chunk)

        out.extend(computed_once(constants, None, anchor))
    return tuple(out)


_POSITIONS_PER_COND = 64


def leaf_entries(vectors: Sequence[jax.Array]) -> list[list[jax.Array]]:
    """``[[v[i] for i in range(n)] for v in vectors]``, at runtime positions.

    One scalar per leaf from each vector, for the per-leaf kernels (see runtime_positions).
    """
    n = int(vectors[0].shape[0])
    if n <= 1:
        return [[v[i] for i in range(n)] for v in vectors]
    index = runtime_positions(range(n), vectors[0][0])
    return [
        [lax.dynamic_index_in_dim(v, index[i], keepdims=False) for i in range(n)] for v in vectors
    ]


# Below this, a clip ratio is carried as two factors (see shrink_factors).
_SPLIT_RATIO = 2.0**-100


def shrink_factors(
    limit: jax.Array, norm: jax.Array, over: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``limit / norm`` where ``over`` (else 1), as factors ``(coarse, fine)`` of that ratio.

    XLA:CPU flushes subnormal results to zero, so a ratio below 2^-126 (a norm more than 2^126
    times its limit) would come out as 0 and zero the gradient, whose clipped entries are in
    fact as large as the limit. Ratios below 2^-100 are therefore returned as ``2^-100`` times
    a normal number; otherwise ``coarse`` is 1 and ``fine`` is the ratio itself, so that
    ``(x * coarse) * fine`` is bit for bit ``x * ratio``. Double-where form: the derivative is
    finite everywhere.
    """
    limit = jnp.asarray(limit).astype(norm.dtype)
    safe_norm = jnp.where(over, norm, 1)
    direct = jnp.where(over, limit / safe_norm, 1)
    tiny = over & (direct < _SPLIT_RATIO)
    lifted = jnp.where(tiny, limit, 0) * (1 / _SPLIT_RATIO) / safe_norm
    fine = jnp.where(tiny, lifted, direct)
    coarse = jnp.where(tiny, jnp.asarray(_SPLIT_RATIO, norm.dtype), jnp.asarray(1, norm.dtype))
    return coarse, fine


def _magnitude(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    if jnp.iscomplexobj(x):
        return jnp.abs(x.astype(jnp.complex128 if acc == jnp.float64 else jnp.complex64))
    return jnp.abs(x.astype(acc))


def _expand(divisor: jax.Array | None, axis: int | None) -> jax.Array | None:
    """A per-row divisor of shape (k,) broadcast against (k, n) rows."""
    if divisor is None or axis is None or divisor.ndim == 0:
        return divisor
    return divisor[:, None]


def _power_sum(
    x: jax.Array,
    p: float,
    acc: jnp.dtype,
    divisor: jax.Array | None = None,
    axis: int | None = None,
) -> jax.Array:
    """sum(|x / divisor| ** p), accumulated in ``acc``: over all of x, or along ``axis``."""
    divisor = _expand(divisor, axis)
    if p == 2 and jnp.iscomplexobj(x):
        re = jnp.real(x).astype(acc)
        im = jnp.imag(x).astype(acc)
        if divisor is not None:
            re, im = re / divisor, im / divisor
        return jnp.sum(re * re + im * im, axis=axis)
    if jnp.iscomplexobj(x):
        mag = _magnitude(x, acc)
    elif p == 2:
        mag = x.astype(acc)
    else:
        mag = jnp.abs(x.astype(acc))
    if divisor is not None:
        mag = mag / divisor
    if p == 2:
        return jnp.sum(mag * mag, axis=axis)
    if p == 1:
        return jnp.sum(mag, axis=axis)
    return jnp.sum(mag**p, axis=axis)


def _abs_max(x: jax.Array, acc: jnp.dtype, axis: int | None = None) -> jax.Array:
    """max |x| (over all of x, or along ``axis``), NaN if any entry is NaN."""
    if x.size == 0:
        return jnp.zeros((), acc)
    # NaN is kept by a separate flag: on a sharded array the max becomes a cross-device
    # max, which XLA's CPU collectives compute without propagating NaN.
    mag = _magnitude(x, acc)
    nan = jnp.isnan(mag)
    return jnp.where(
        jnp.any(nan, axis=axis), jnp.nan, jnp.max(jnp.where(nan, -jnp.inf, mag), axis=axis)
    )


def _abs_max_for_scaling(x: jax.Array, acc: jnp.dtype, axis: int | None = None) -> jax.Array:
    """max |x| as one plain reduce, for the rescue pass only.

    The divisor only sets the scale: a NaN in ``x`` makes the scaled sum NaN whatever the
    divisor, so the NaN bookkeeping of ``_abs_max`` (which makes XLA keep a full-size
    temporary of ``|x|``) is not needed here. (With p in {1, 2} the rescue does not even run
    on a NaN sum.)
    """
    if x.size == 0:
        return jnp.zeros((), acc)
    mag = _magnitude(x, acc)
    if axis is not None:
        return lax.reduce_max(mag, (axis,))
    return lax.reduce_max(mag, tuple(range(mag.ndim))) if mag.ndim else mag


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def _pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.pmax`` that keeps NaN (the cross-device max of XLA's CPU collectives drops it)."""
    if not axes:
        return x
    nan = lax.pmax(jnp.isnan(x).astype(jnp.int32), axes) > 0
    return jnp.where(nan, jnp.nan, lax.pmax(jnp.where(jnp.isnan(x), -jnp.inf, x), axes))


def group_by_axes(leaf_axes: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], list[int]]:
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, axes in enumerate(leaf_axes):
        groups.setdefault(axes, []).append(i)
    return groups


def _needs_rescue(total: jax.Array, p: float, *, zero_is_suspect: bool) -> jax.Array:
    """Whether a direct power sum may be wrong: overflowed, or squares lost to underflow.

    XLA flushes subnormals to zero on CPU, so squares below ~1.2e-38 vanish entirely and a
    sum of exactly 0 may hide a nonzero norm. ``zero_is_suspect`` re-checks exact zeros;
    per-leaf norms do not, so that an all-zero (frozen) leaf does not force the slow path on
    every step: a leaf whose entries are all below ~1e-19 in magnitude then counts as 0.
    """
    overflow = jnp.isinf(total)
    if p == 2:
        low = total < _TINY_SUM_OF_SQUARES
        if not zero_is_suspect:
            low = low & (total > 0)
        return overflow | low
    return overflow


# How reductions over many leaves are laid out (compile time). XLA compiles one loop per
# reduction, and its fusion pass takes time that grows faster than linearly with the number
# of loops in a program (Optax's global norm: 0.3 s at 100 leaves, 23 s at 2000). Leaves of at
# most _SMALL_LEAF elements are therefore reduced together: for one norm of all leaves,
# raveled and concatenated per dtype; for one norm per leaf, leaves of one size and dtype are
# stacked into a (leaves, size) matrix reduced along its rows. The copy this makes
# is limited to _CONCAT_BYTES per reduction (XLA:CPU allocates its scratch memory afresh on
# every call, and a scratch block above glibc's 32 MiB mmap ceiling costs page faults on every
# step); small leaves beyond it, larger leaves and leaves whose type is explicitly sharded are
# reduced in place, one loop each.
_SMALL_LEAF = 1 << 16
_CONCAT_BYTES = 24 << 20
# XLA:CPU emits a concatenation element by element; its code grows with the number of
# operands, so at most this many leaves go into one.
_MAX_JOINED = 512


def _can_join(x: jax.Array) -> bool:
    """Whether ``x`` may be raveled into a concatenation (not an explicitly sharded type)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec is None or all(entry is None for entry in spec)


class _Budget:
    """Bytes of small leaves a reduction may still copy (see _CONCAT_BYTES)."""

    def __init__(self) -> None:
        self.left = _CONCAT_BYTES

    def take(self, x: jax.Array, size: int) -> bool:
        nbytes = size * x.dtype.itemsize
        if 0 < x.size <= _SMALL_LEAF and nbytes <= self.left and _can_join(x):
            self.left -= nbytes
            return True
        return False


def _shield_low_precision(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """fp16/bf16 leaves passed through ``lax.optimization_barrier``, the others as they are.

    A clip multiplies ``x.astype(float32)`` by its scale. Without the barrier XLA merges that
    convert with the norm's own and materializes a float32 copy of the whole gradient for the
    two consumers; with it, each reduction and each multiply converts as it reads.
    """
    # One barrier per leaf: a barrier over several leaves would give each output the union of
    # their device-variance types inside shard_map.
    return [behind_barriers(x, 1) for x in leaves]


def _read_in_place(x: jax.Array) -> jax.Array:
    """A leaf that a reduction reads in place (not joined), behind a barrier of its own.

    XLA merges equal expressions, and XLA:CPU writes out in full an array that a reduction's
    fusion shares with another fusion. Read directly, a norm's squares ``x * x`` of a float32
    leaf are the very squares Adam computes for its second moment when the same step also
    updates with that leaf, as a step that logs ``global_norm(grads)`` beside Adam does: XLA
    wrote the squares of every large leaf out in full, and the step took 2.3-2.5x Adam's time
    (1.2x with the barrier). Two reductions of ours read the same barrier, so a logged
    ``global_norm`` and a clip's norm are still computed once. Joined leaves need none (their
    reduction squares the concatenation), nor fp16/bf16 ones, which ``_shield_low_precision``
    has already put behind one.
    """
    if x.dtype in (jnp.float16, jnp.bfloat16):
        return x
    return lax.optimization_barrier(x)


def behind_barriers(x: jax.Array, depth: int) -> jax.Array:
    """An fp16/bf16 ``x`` read through ``depth`` nested optimization barriers (others as is).

    XLA merges equal expressions, equal barriers of one array included. Two reductions that
    convert the same low-precision array to float32 then share one conversion, and XLA:CPU
    writes it out in full rather than fuse it into both (its YNNPACK reduction fusions take
    no producer that another fusion also reads): on a bfloat16 leaf of 64M entries, two such
    sums took 109 ms instead of 16 ms. Reductions that read an array through different
    depths each convert as they read.
    """
    if x.dtype not in (jnp.float16, jnp.bfloat16):
        return x
    for _ in range(depth):
        x = lax.optimization_barrier(x)
    return x


def _buckets(
    leaves: Sequence[jax.Array], transforms: Sequence[Transform | None], view: int = 0
) -> list[tuple[jax.Array, Transform | None, int]]:
    """The arrays a reduction over all of ``leaves`` runs over (see _SMALL_LEAF above).

    Each comes with the transform to apply where it is read and its twin index. Small leaves
    of one dtype that share one transform (the same object, or none) are joined as they are
    and the transform is applied to the joined array: a reduction costs one loop per bucket,
    not one per leaf, and reductions whose leaves share a transform join the same arrays in
    the same order, so XLA computes each concatenation once for all of them. A leaf reduced in
    place keeps its own transform (so that the rescue's cond takes the leaf itself as
    operand, not a full-size transformed copy). With ``view`` k > 0, fp16/bf16 arrays are
    read through k more barriers (see ``behind_barriers``): a second reduction over the same
    leaves then converts them apart from the first, while still sharing its concatenations.
    """
    budget = _Budget()
    alone: list[tuple[jax.Array, Transform | None]] = []
    joined: dict[tuple[Any, int], tuple[Transform | None, list[jax.Array]]] = {}

    def join(parts: list[jax.Array]) -> jax.Array:
        if len(parts) == 1:
            return parts[0]
        # lax rather than jnp: the same program, without jnp's per-call dispatch on every leaf.
        return lax.concatenate([lax.reshape(x, (x.size,)) for x in parts], 0)

    for x, transform in zip(leaves, transforms, strict=True):
        if x.size == 0:
            continue
        if budget.take(x, x.size):
            _, parts = joined.setdefault((x.dtype, id(transform)), (transform, []))
            parts.append(x)
            if len(parts) == _MAX_JOINED:
                alone.append((join(parts), transform))
                parts.clear()
        else:
            alone.append((_read_in_place(x), transform))
    arrays = alone + [(join(parts), f) for f, parts in joined.values() if parts]
    arrays = [(behind_barriers(a, view), f) for a, f in arrays]
    twins: dict[Any, int] = {}
    out = []
    for a, f in arrays:
        key = (a.shape, a.dtype)
        out.append((a, f, twins.get(key, 0)))
        twins[key] = twins.get(key, 0) + 1
    return out


def _grouped_buckets(
    leaves: Sequence[jax.Array],
    leaf_axes: Sequence[tuple[str, ...]],
    transforms: Sequence[Transform | None] | None,
    view: int = 0,
) -> list[tuple[list[tuple[jax.Array, Transform | None, int]], tuple[str, ...]]]:
    """``_buckets`` for each group of leaves reduced over the same device axes."""
    funcs = list(transforms) if transforms is not None else [None] * len(leaves)
    return [
        (_buckets([leaves[i] for i in idx], [funcs[i] for i in idx], view), axes)
        for axes, idx in group_by_axes(leaf_axes).items()
    ]


def sum_of_leaves(
    leaves: Sequence[jax.Array],
    leaf_axes: Sequence[tuple[str, ...]],
    terms: Sequence[Transform],
    *,
    view: int = 0,
) -> jax.Array:
    """The float32 sum over leaves of ``terms[i](leaves[i], twin)``, a float32 scalar each.

    Each term must be a sum over the entries of its argument of an elementwise function, so
    that it may be applied to the concatenation of the small leaves sharing it (as the same
    object) rather than to each leaf (see ``_buckets``). Partial sums are reduced over each
    leaf's ``leaf_axes`` (scalars only). ``view``: as for ``norm_of_leaves``.
    """
    total = jnp.zeros((), jnp.float32)
    leaves = _shield_low_precision(leaves)
    for arrays, axes in _grouped_buckets(leaves, leaf_axes, terms, view):
        local = [f(a, twin) for a, f, twin in arrays if f is not None]
        if local:
            total = total + _psum(jnp.sum(stack_scalars(local)), axes)
    return total


def norm_of_leaves(
    leaves: Sequence[jax.Array],
    p: float,
    leaf_axes: Sequence[tuple[str, ...]],
    transforms: Sequence[Transform | None] | None = None,
    *,
    view: int = 0,
) -> jax.Array:
    """The p-norm of all leaves together; leaf i's partial sums are reduced over leaf_axes[i].

    With ``transforms``, the norm of ``transforms[i](leaves[i], twin)`` (elementwise functions
    that keep the dtype; see ``Transform``), computed where each leaf is read so that XLA need
    not materialize the transformed leaves. Small leaves sharing one transform object are
    joined first and transformed together (see ``_buckets``).

    Collectives run on scalars only. Every device takes the same branch of the rescue
    ``lax.cond``, since its predicate is computed after the reduction across devices. The
    rescue reads the same concatenations as the direct sum (they are operands of the cond, so
    it has a few operands rather than one per leaf).

    A caller that reduces the same fp16/bf16 leaves twice gives each reduction its own
    ``view`` (0, 1, ...), so that each converts them to float32 as it reads them (see
    ``behind_barriers``).
    """
    acc = result_dtype(leaves)
    if not leaves:
        return jnp.zeros((), acc)
    leaves = _shield_low_precision(leaves)
    groups = _grouped_buckets(leaves, leaf_axes, transforms, view)

    def combined(values: list[jax.Array], combine: Any) -> jax.Array:
        if not values:
            return jnp.zeros((), acc)
        return values[0] if len(values) == 1 else combine(jnp.stack(values))

    def across(local: Any, device_reduce: Any, combine: Any) -> jax.Array:
        return combined(
            [
                device_reduce(
                    combined(
                        [local(a if f is None else f(a, twin)) for a, f, twin in arrays], combine
                    ),
                    axes,
                )
                for arrays, axes in groups
            ],
            combine,
        )

    if p == math.inf:
        return across(lambda a: _abs_max(a, acc), _pmax, jnp.max)

    def rescaled() -> jax.Array:
        largest = across(lambda a: _abs_max_for_scaling(a, acc), _pmax, jnp.max)
        largest = lax.stop_gradient(largest)
        divisor = rescale_divisor(largest)
        total = across(lambda a: _power_sum(a, p, acc, divisor), _psum, jnp.sum)
        return divisor * safe_root(total, p)

    if p not in (1.0, 2.0):
        return rescaled()
    total = across(lambda a: _power_sum(a, p, acc), _psum, jnp.sum)
    return lax.cond(
        _needs_rescue(total, p, zero_is_suspect=True), rescaled, lambda: safe_root(total, p)
    )


def _row_blocks(
    leaves: Sequence[jax.Array], leaf_axes: Sequence[tuple[str, ...]]
) -> tuple[list[tuple[list[int], tuple[str, ...]]], int, np.ndarray]:
    """How per-leaf reductions are batched: blocks of leaf indices, and the output order.

    A block is either one leaf reduced in place, or the small leaves of one reduction-axes
    group, dtype and size, stacked as rows (see _SMALL_LEAF above). Returns the blocks (the
    leaves reduced in place first), how many of them are single leaves reduced in place, and
    the permutation that puts the concatenated block results back in leaf order.
    """
    budget = _Budget()
    blocks: list[tuple[list[int], tuple[str, ...]]] = []
    rows: dict[Any, list[int]] = {}
    for i, (x, axes) in enumerate(zip(leaves, leaf_axes, strict=True)):
        if budget.take(x, int(x.size)):
            rows.setdefault((axes, x.dtype, x.size), []).append(i)
        else:
            blocks.append(([i], axes))
    n_alone = len(blocks)
    blocks += [(idx, key[0]) for key, idx in rows.items()]
    order = np.array([i for idx, _ in blocks for i in idx], dtype=np.int64)
    return blocks, n_alone, np.argsort(order)


def _block_rows(
    leaves: Sequence[jax.Array], idx: list[int], stacked: bool
) -> tuple[jax.Array, int | None]:
    """One block as an array and the axis to reduce along (None: reduce all of it)."""
    if not stacked:
        return _read_in_place(leaves[idx[0]]), None
    size = int(leaves[idx[0]].size)
    flat = [leaves[i].ravel() for i in idx]
    return (flat[0] if len(flat) == 1 else jnp.concatenate(flat)).reshape(len(idx), size), 1


def norms_per_leaf(
    leaves: Sequence[jax.Array], p: float, leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """A vector with the p-norm of each leaf (same accuracy rules as ``norm_of_leaves``)."""
    acc = result_dtype(leaves)
    if not leaves:
        return jnp.zeros((0,), acc)
    leaves = _shield_low_precision(leaves)
    blocks, n_alone, inverse = _row_blocks(leaves, leaf_axes)
    # Built once: the rescue's cond takes these arrays (a few stacks) as operands.
    arrays = [_block_rows(leaves, idx, b >= n_alone) for b, (idx, _) in enumerate(blocks)]

    def per_leaf(local: Any, device_reduce: Any, divisors: jax.Array | None = None) -> jax.Array:
        parts = []
        start = 0
        for (array, axis), (idx, axes) in zip(arrays, blocks, strict=True):
            block_divisors = None
            if divisors is not None:
                block_divisors = divisors[start : start + len(idx)]
                if axis is None:
                    block_divisors = block_divisors[0]
            value = local(array, axis, block_divisors) if array.size else jnp.zeros((), acc)
            parts.append(device_reduce(jnp.reshape(value, (len(idx),)), axes))
            start += len(idx)
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

    identity = bool(np.array_equal(inverse, np.arange(len(leaves))))

    def in_leaf_order(vector: jax.Array) -> jax.Array:
        if identity:
            return vector
        # The barrier keeps the reordering one small kernel: fused into each leaf's consumer
        # (the per-leaf multiplies), it would copy the index table into every one of them.
        return lax.optimization_barrier(vector[inverse])

    if p == math.inf:
        return in_leaf_order(per_leaf(lambda a, axis, _: _abs_max(a, acc, axis), _pmax))

    def rescaled() -> jax.Array:
        maxima = lax.stop_gradient(
            per_leaf(lambda a, axis, _: _abs_max_for_scaling(a, acc, axis), _pmax)
        )
        divisors = rescale_divisor(maxima)
        sums = per_leaf(lambda a, axis, d: _power_sum(a, p, acc, d, axis), _psum, divisors)
        return divisors * safe_root(sums, p)

    if p not in (1.0, 2.0):
        return in_leaf_order(rescaled())
    sums = per_leaf(lambda a, axis, _: _power_sum(a, p, acc, None, axis), _psum)
    return in_leaf_order(
        lax.cond(
            jnp.any(_needs_rescue(sums, p, zero_is_suspect=False)),
            rescaled,
            lambda: safe_root(sums, p),
        )
    )


def sum_across_devices(
    values: Sequence[jax.Array], leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """Adds one local scalar per leaf, reducing each over its own axes (counts, sizes)."""
    if not values:
        return jnp.zeros((), jnp.float32)
    return sum(
        (
            _psum(jnp.sum(stack_scalars([jnp.asarray(values[i], jnp.float32) for i in idx])), axes)
            for axes, idx in group_by_axes(leaf_axes).items()
        ),
        start=jnp.zeros((), jnp.float32),
    )


def combine_norms(norms: jax.Array, p: float) -> jax.Array:
    """The p-norm of a vector of partial norms, without overflow (a cheap, small reduction)."""
    if norms.size == 0:
        return jnp.zeros((), norms.dtype)
    if p == math.inf:
        return jnp.max(norms)
    largest = lax.stop_gradient(jnp.max(norms))
    divisor = rescale_divisor(largest)
    return divisor * safe_root(jnp.sum((norms / divisor) ** p), p)


def _flatten_checked(tree: Any, name: str) -> tuple[list[Any], list[jax.Array], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [jnp.asarray(x) if not hasattr(x, "dtype") else x for _, x in paths_leaves]
    check_float_leaves(((p, x) for (p, _), x in zip(paths_leaves, leaves, strict=True)), name)
    return [p for p, _ in paths_leaves], leaves, treedef


def global_norm(
    tree: Any,
    ord: float | int | str | None = 2,
    *,
    axis_name: AxisName = None,
    layout: Layout = None,
) -> jax.Array:
    """The p-norm of all leaves of a pytree taken together, computed exactly.

    Unlike ``optax.global_norm``, the reduction accumulates in float32 (float64 for float64
    leaves) whatever the leaf dtype, and never overflows or underflows where the true norm
    fits in float32: an fp16 tree of 1e5 ones gives 316.23, float32 leaves of magnitude
    1e25 give their finite norm. Complex leaves contribute ``|x|``. ``None`` leaves and
    empty trees contribute nothing (an empty tree has norm 0). The gradient is finite
    everywhere, including at an all-zero tree.

    Args:
      tree: a pytree of floating-point or complex arrays.
      ord: the order p of the norm: 1, 2, ``math.inf`` (the max norm) or any real p >= 1.
      axis_name: inside ``shard_map`` or ``pmap``, the mapped axis name (or tuple of names)
        across which the leaves are split; the partial sums are added across those devices,
        so every device gets the norm of the whole, unsharded tree.
      layout: with ``axis_name``, how each leaf is laid out: a PartitionSpec (or a prefix
        pytree of them, or ``(path, leaf) -> spec``) naming the axes the leaf is split along;
        leaves replicated along an axis are counted once, not once per device. See
        :mod:`optaxclip._spec.layout`.

    Returns:
      A float32 scalar (float64 if any leaf is float64).

    Raises:
      TypeError: if a leaf is not a floating-point or complex array (names its path).
      ValueError: if ``ord`` is below 1 or NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tree = {"w": jnp.ones(100_000, jnp.float16)}
      >>> print(f"{float(optaxclip.global_norm(tree)):.2f}")
      316.23
      >>> print(float(optaxclip.global_norm({"a": jnp.array([3.0, -4.0])}, ord=1)))
      7.0
    """
    p = normalize_ord(ord)
    _, leaves, _ = _flatten_checked(tree, "tree")
    return norm_of_leaves(leaves, p, leaf_reduction_axes(tree, axis_name, layout))


def leaf_norms(
    tree: Any,
    ord: float | int | str | None = 2,
    *,
    axis_name: AxisName = None,
    layout: Layout = None,
) -> Any:
    """One p-norm per leaf, as a pytree of scalars with the structure of ``tree``.

    Same accuracy rules as :func:`global_norm` (float32 accumulation, no overflow, finite
    gradients).

    Args:
      tree: a pytree of floating-point or complex arrays.
      ord: the order p of the norm: 1, 2, ``math.inf`` or any real p >= 1.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) across which each leaf is
        split; partial sums are added across them.
      layout: per-leaf PartitionSpecs, as for :func:`global_norm`.

    Returns:
      A pytree with the structure of ``tree`` whose leaves are float32 (or float64) scalars.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> norms = optaxclip.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(4)})
      >>> print({k: float(v) for k, v in norms.items()})
      {'a': 5.0, 'b': 2.0}
    """
    p = normalize_ord(ord)
    _, leaves, treedef = _flatten_checked(tree, "tree")
    vector = norms_per_leaf(leaves, p, leaf_reduction_axes(tree, axis_name, layout))
    return jax.tree_util.tree_unflatten(treedef, [vector[i] for i in range(len(leaves))])
