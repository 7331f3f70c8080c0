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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from optaxclip._layout import AxisName, Layout, leaf_reduction_axes
from optaxclip._validation import check_float_leaves, normalize_ord

# Below this sum of squares float32 squares have lost bits to the subnormal range.
_TINY_SUM_OF_SQUARES = 2.0**-96


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


def _magnitude(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    if jnp.iscomplexobj(x):
        return jnp.abs(x.astype(jnp.complex128 if acc == jnp.float64 else jnp.complex64))
    return jnp.abs(x.astype(acc))


def _power_sum(
    x: jax.Array, p: float, acc: jnp.dtype, divisor: jax.Array | None = None
) -> jax.Array:
    """sum(|x / divisor| ** p) over one leaf, accumulated in ``acc``."""
    if p == 2 and jnp.iscomplexobj(x):
        re = jnp.real(x).astype(acc)
        im = jnp.imag(x).astype(acc)
        if divisor is not None:
            re, im = re / divisor, im / divisor
        return jnp.sum(re * re + im * im)
    if jnp.iscomplexobj(x):
        mag = _magnitude(x, acc)
    elif p == 2:
        mag = x.astype(acc)
    else:
        mag = jnp.abs(x.astype(acc))
    if divisor is not None:
        mag = mag / divisor
    if p == 2:
        return jnp.sum(mag * mag)
    if p == 1:
        return jnp.sum(mag)
    return jnp.sum(mag**p)


def _abs_max(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    if x.size == 0:
        return jnp.zeros((), acc)
    # NaN is kept by a separate flag: on a sharded array the max becomes a cross-device
    # max, which XLA's CPU collectives compute without propagating NaN.
    mag = _magnitude(x, acc)
    nan = jnp.isnan(mag)
    return jnp.where(jnp.any(nan), jnp.nan, jnp.max(jnp.where(nan, -jnp.inf, mag)))


def _abs_max_for_scaling(x: jax.Array, acc: jnp.dtype) -> jax.Array:
    """max |x| as one plain reduce, for the rescue pass only.

    The divisor only sets the scale: a NaN in ``x`` makes the scaled sum NaN whatever the
    divisor, so the NaN bookkeeping of ``_abs_max`` (which makes XLA keep a full-size
    temporary of ``|x|``) is not needed here. (With p in {1, 2} the rescue does not even run
    on a NaN sum.)
    """
    if x.size == 0:
        return jnp.zeros((), acc)
    mag = _magnitude(x, acc)
    return lax.reduce_max(mag, tuple(range(mag.ndim))) if mag.ndim else mag


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.psum(x, axes) if axes else x


def _pmax(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``lax.pmax`` that keeps NaN (the cross-device max of XLA's CPU collectives drops it)."""
    if not axes:
        return x
    nan = lax.pmax(jnp.isnan(x).astype(jnp.int32), axes) > 0
    return jnp.where(nan, jnp.nan, lax.pmax(jnp.where(jnp.isnan(x), -jnp.inf, x), axes))


def _group_by_axes(leaf_axes: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], list[int]]:
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


def norm_of_leaves(
    leaves: Sequence[jax.Array], p: float, leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """The p-norm of all leaves together; leaf i's partial sums are reduced over leaf_axes[i].

    Collectives run on scalars only. Every device takes the same branch of the rescue
    ``lax.cond``, since its predicate is computed after the reduction across devices.
    """
    acc = result_dtype(leaves)
    if not leaves:
        return jnp.zeros((), acc)
    groups = _group_by_axes(leaf_axes)
    if p == math.inf:
        partial = [
            _pmax(jnp.max(jnp.stack([_abs_max(leaves[i], acc) for i in idx])), axes)
            for axes, idx in groups.items()
        ]
        return jnp.max(jnp.stack(partial))

    def rescaled() -> jax.Array:
        maxima = [
            _pmax(jnp.max(jnp.stack([_abs_max_for_scaling(leaves[i], acc) for i in idx])), axes)
            for axes, idx in groups.items()
        ]
        largest = lax.stop_gradient(jnp.max(jnp.stack(maxima)))
        divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
        total = sum(
            (
                _psum(
                    jnp.sum(jnp.stack([_power_sum(leaves[i], p, acc, divisor) for i in idx])), axes
                )
                for axes, idx in groups.items()
            ),
            start=jnp.zeros((), acc),
        )
        return divisor * safe_root(total, p)

    if p not in (1.0, 2.0):
        return rescaled()
    total = sum(
        (
            _psum(jnp.sum(jnp.stack([_power_sum(leaves[i], p, acc) for i in idx])), axes)
            for axes, idx in groups.items()
        ),
        start=jnp.zeros((), acc),
    )
    return lax.cond(
        _needs_rescue(total, p, zero_is_suspect=True), rescaled, lambda: safe_root(total, p)
    )


def norms_per_leaf(
    leaves: Sequence[jax.Array], p: float, leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """A vector with the p-norm of each leaf (same accuracy rules as ``norm_of_leaves``)."""
    acc = result_dtype(leaves)
    if not leaves:
        return jnp.zeros((0,), acc)

    def reduce_each(values: list[jax.Array], reducer: Any) -> jax.Array:
        out: list[jax.Array | None] = [None] * len(values)
        for axes, idx in _group_by_axes(leaf_axes).items():
            reduced = reducer(jnp.stack([values[i] for i in idx]), axes)
            for j, i in enumerate(idx):
                out[i] = reduced[j]
        return jnp.stack(out)  # type: ignore[arg-type]

    maxima_local = None
    if p == math.inf:
        maxima_local = [_abs_max(x, acc) for x in leaves]
        return reduce_each(maxima_local, _pmax)

    def rescaled() -> jax.Array:
        maxima = lax.stop_gradient(
            reduce_each([_abs_max_for_scaling(x, acc) for x in leaves], _pmax)
        )
        divisors = jnp.where((maxima > 0) & jnp.isfinite(maxima), maxima, 1)
        sums = reduce_each(
            [_power_sum(x, p, acc, divisors[i]) for i, x in enumerate(leaves)], _psum
        )
        return divisors * safe_root(sums, p)

    if p not in (1.0, 2.0):
        return rescaled()
    sums = reduce_each([_power_sum(x, p, acc) for x in leaves], _psum)
    return lax.cond(
        jnp.any(_needs_rescue(sums, p, zero_is_suspect=False)), rescaled, lambda: safe_root(sums, p)
    )


def sum_across_devices(
    values: Sequence[jax.Array], leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """Adds one local scalar per leaf, reducing each over its own axes (counts, sizes)."""
    if not values:
        return jnp.zeros((), jnp.float32)
    return sum(
        (
            _psum(jnp.sum(jnp.stack([jnp.asarray(values[i], jnp.float32) for i in idx])), axes)
            for axes, idx in _group_by_axes(leaf_axes).items()
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
    divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
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
        :mod:`optaxclip._layout`.

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
