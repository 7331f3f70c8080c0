"""The reduction engine: norms, sums and maxima over the leaves of a pytree.

One p-norm of all leaves (``norm_of_leaves``), one per leaf (``norms_per_leaf``), sums of
elementwise terms (``sum_of_leaves``) and counts across devices (``sum_across_devices``).
Per-unit norms, for AGC, are in :mod:`optaxclip._numerics.units`. Each leaf's partial result is
reduced across the device axes it is split along, and only scalars or short vectors cross
devices. For p in {1, 2} the direct sum runs first, and the rescaled pass only when that sum
overflowed or lost bits (under one ``lax.cond`` whose predicate every device shares); other
orders always rescale, since ``|x|**p`` leaves the float32 range for ordinary values when p is
large. How the leaves are laid out for the backend (joined, read behind barriers) is
:mod:`optaxclip._lowering`'s business.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optaxclip import _lowering as lowering
from optaxclip._lowering import ReadView, Transform
from optaxclip._numerics.arithmetic import (
    ScaledNorm,
    abs_max,
    abs_max_for_scaling,
    needs_rescue,
    plain_norm,
    pmax,
    power_sum,
    psum,
    rescale_divisor,
    result_dtype,
    safe_root,
)


def group_by_axes(leaf_axes: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], list[int]]:
    """Leaf indices grouped by the device axes their partial results are reduced over."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, axes in enumerate(leaf_axes):
        groups.setdefault(axes, []).append(i)
    return groups


def _grouped_buckets(
    leaves: Sequence[jax.Array],
    leaf_axes: Sequence[tuple[str, ...]],
    transforms: Sequence[Transform | None] | None,
    view: ReadView,
) -> list[tuple[list[tuple[jax.Array, Transform | None, int]], tuple[str, ...]]]:
    """The arrays a reduction reads, for each group of leaves reduced over the same axes."""
    funcs = list(transforms) if transforms is not None else [None] * len(leaves)
    return [
        (lowering.joined_buckets([leaves[i] for i in idx], [funcs[i] for i in idx], view), axes)
        for axes, idx in group_by_axes(leaf_axes).items()
    ]


def sum_of_leaves(
    leaves: Sequence[jax.Array],
    leaf_axes: Sequence[tuple[str, ...]],
    terms: Sequence[Transform],
    *,
    view: ReadView = ReadView.NORM,
) -> jax.Array:
    """The float32 sum over leaves of ``terms[i](leaves[i], twin)``, a float32 scalar each.

    Each term must be a sum over the entries of its argument of an elementwise function, so
    that it may be applied to a joined array of the small leaves sharing it (as the same
    object) rather than to each leaf. Partial sums are reduced over each leaf's ``leaf_axes``.
    ``view``: which reduction of the step this is (see ``lowering.ReadView``).
    """
    total = jnp.zeros((), jnp.float32)
    leaves = lowering.converted_apart_from_the_output(leaves)
    for arrays, axes in _grouped_buckets(leaves, leaf_axes, terms, view):
        local = [f(a, twin) for a, f, twin in arrays if f is not None]
        if local:
            total = total + psum(jnp.sum(lowering.stack_against_chain_rewrite(local)), axes)
    return total


def norm_of_leaves(
    leaves: Sequence[jax.Array],
    p: float,
    leaf_axes: Sequence[tuple[str, ...]],
    transforms: Sequence[Transform | None] | None = None,
    *,
    view: ReadView = ReadView.NORM,
) -> jax.Array:
    """``scaled_norm_of_leaves`` as one number: inf where the norm passes the dtype's range."""
    return scaled_norm_of_leaves(leaves, p, leaf_axes, transforms, view=view).value


def scaled_norm_of_leaves(
    leaves: Sequence[jax.Array],
    p: float,
    leaf_axes: Sequence[tuple[str, ...]],
    transforms: Sequence[Transform | None] | None = None,
    *,
    view: ReadView = ReadView.NORM,
) -> ScaledNorm:
    """The p-norm of all leaves together; leaf i's partial sums are reduced over leaf_axes[i].

    With ``transforms``, the norm of ``transforms[i](leaves[i], twin)`` (elementwise functions
    that keep the dtype), computed where each leaf is read so that the transformed leaves
    need not be written out. Collectives run on scalars only. Every device takes the same
    branch of the rescue conditional, since its predicate is computed after the reduction
    across devices. ``view``: which reduction of the step this is (``lowering.ReadView``).
    """
    acc = result_dtype(leaves)
    if not leaves:
        return plain_norm(jnp.zeros((), acc))
    leaves = lowering.converted_apart_from_the_output(leaves)
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
        return plain_norm(across(lambda a: abs_max(a, acc), pmax, jnp.max))

    def rescaled() -> ScaledNorm:
        largest = across(lambda a: abs_max_for_scaling(a, acc), pmax, jnp.max)
        largest = lax.stop_gradient(largest)
        divisor = rescale_divisor(largest)
        total = across(lambda a: power_sum(a, p, acc, divisor), psum, jnp.sum)
        return ScaledNorm(divisor, safe_root(total, p))

    if p not in (1.0, 2.0):
        return rescaled()
    total = across(lambda a: power_sum(a, p, acc), psum, jnp.sum)
    return lax.cond(
        needs_rescue(total, p, zero_is_suspect=True),
        rescaled,
        lambda: plain_norm(safe_root(total, p)),
    )


def norms_per_leaf(
    leaves: Sequence[jax.Array], p: float, leaf_axes: Sequence[tuple[str, ...]]
) -> jax.Array:
    """``scaled_norms_per_leaf`` as one vector: inf where a norm passes the dtype's range."""
    return scaled_norms_per_leaf(leaves, p, leaf_axes).value


def scaled_norms_per_leaf(
    leaves: Sequence[jax.Array], p: float, leaf_axes: Sequence[tuple[str, ...]]
) -> ScaledNorm:
    """The p-norm of each leaf, as vectors (same accuracy rules as ``norm_of_leaves``).

    As for the global norm, a leaf whose direct sum is 0 is checked by the rescaled pass, so
    that a leaf of entries too small to square in float32 gets its true norm, not 0. A leaf
    of exact zeros therefore runs that pass on every step it is zero.
    """
    acc = result_dtype(leaves)
    if not leaves:
        return plain_norm(jnp.zeros((0,), acc))
    leaves = lowering.converted_apart_from_the_output(leaves)
    blocks, n_alone, inverse = lowering.row_blocks(leaves, leaf_axes)
    # Built once: the rescue's conditional takes these arrays (a few stacks) as operands.
    arrays = [lowering.block_rows(leaves, idx, b >= n_alone) for b, (idx, _) in enumerate(blocks)]

    def per_leaf(local: Any, device_reduce: Any, divisors: jax.Array | None = None) -> jax.Array:
        parts = []
        start = 0
        for (array, axis), (idx, axes) in zip(arrays, blocks, strict=True):
            block_divisors = None
            if divisors is not None:
                block_divisors = divisors[start : start + len(idx)]
                # One divisor per row of a stacked block; one for a leaf reduced in place.
                block_divisors = block_divisors[0] if axis is None else block_divisors[:, None]
            value = local(array, axis, block_divisors) if array.size else jnp.zeros((), acc)
            parts.append(device_reduce(jnp.reshape(value, (len(idx),)), axes))
            start += len(idx)
        return jnp.concatenate(parts) if len(parts) > 1 else parts[0]

    identity = bool(np.array_equal(inverse, np.arange(len(leaves))))

    def in_leaf_order(vector: jax.Array) -> jax.Array:
        return vector if identity else lowering.one_buffer(vector[inverse])

    def ordered(norms: ScaledNorm) -> ScaledNorm:
        return ScaledNorm(in_leaf_order(norms.divisor), in_leaf_order(norms.root))

    if p == math.inf:
        return ordered(plain_norm(per_leaf(lambda a, axis, _: abs_max(a, acc, axis), pmax)))

    def rescaled() -> ScaledNorm:
        maxima = lax.stop_gradient(
            per_leaf(lambda a, axis, _: abs_max_for_scaling(a, acc, axis), pmax)
        )
        divisors = rescale_divisor(maxima)
        sums = per_leaf(lambda a, axis, d: power_sum(a, p, acc, d, axis), psum, divisors)
        return ScaledNorm(divisors, safe_root(sums, p))

    if p not in (1.0, 2.0):
        return ordered(rescaled())
    sums = per_leaf(lambda a, axis, _: power_sum(a, p, acc, None, axis), psum)
    return ordered(
        lax.cond(
            jnp.any(needs_rescue(sums, p, zero_is_suspect=True)),
            rescaled,
            lambda: plain_norm(safe_root(sums, p)),
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
            psum(
                jnp.sum(
                    lowering.stack_against_chain_rewrite(
                        [jnp.asarray(values[i], jnp.float32) for i in idx]
                    )
                ),
                axes,
            )
            for axes, idx in group_by_axes(leaf_axes).items()
        ),
        start=jnp.zeros((), jnp.float32),
    )
