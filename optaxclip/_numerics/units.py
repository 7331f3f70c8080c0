"""Per-unit norms: the L2 norm of each slice of a leaf, for adaptive gradient clipping.

A unit is the slice of a leaf that remains when some of its axes are reduced (one output
column of a ``Dense`` kernel, say). The norms follow the accuracy rules of
:mod:`optaxclip._numerics.reductions`: float32 accumulation, and a rescaled pass when a sum
overflowed or lost bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optaxclip import _lowering as lowering
from optaxclip._numerics.arithmetic import (
    ScaledNorm,
    accumulation_dtype,
    needs_rescue,
    power_sum,
    psum,
    rescale_divisor,
    safe_root,
)


class UnitBlock(NamedTuple):
    """Leaves whose unit norms one reduction computes.

    ``axis`` None: one leaf, reduced in place over its own unit axes. Otherwise small leaves
    of one shape, dtype, unit axes and device layout, each laid out as a matrix with one unit
    per column (``axis`` 1) or per row (``axis`` 2) and stacked along a new leading axis.
    """

    members: list[tuple[int, int]]  # (position in the list of leaves, offset of its units)
    axis: int | None
    summed: tuple[str, ...]  # device axes along which devices hold parts of the same units
    agree: tuple[str, ...]  # device axes along which the rescue decision must agree
    across: tuple[str, ...]  # device axes along which devices hold different units


def unit_matrix(x: jax.Array, reduced: tuple[int, ...]) -> jax.Array:
    """``x`` as a matrix with one unit per column (reduced axes leading) or else per row.

    Units come in the row-major order of the kept dimensions, as in ``x``'s own unit norms.
    """
    kept = [d for d in range(x.ndim) if d not in reduced]
    size = int(np.prod([x.shape[d] for d in reduced], dtype=np.int64))
    if reduced == tuple(range(len(reduced))):  # the reduced axes lead: no transpose
        return x.reshape(size, -1)
    return jnp.transpose(x, kept + list(reduced)).reshape(-1, size)


def unit_blocks(
    arrays: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    summed: Sequence[tuple[str, ...]],
    agree: Sequence[tuple[str, ...]],
    across: Sequence[tuple[str, ...]],
) -> list[UnitBlock]:
    """How the unit norms of ``arrays`` are batched into reductions (see ``lowering``)."""
    keys = [
        (x.dtype, x.shape, axes[i], summed[i], agree[i], across[i]) for i, x in enumerate(arrays)
    ]
    alone, groups = lowering.stacked_unit_groups(arrays, weights, keys)
    blocks = [UnitBlock([(i, 0)], None, summed[i], agree[i], across[i]) for i in alone]
    for idx in groups:
        shape, reduced = arrays[idx[0]].shape, axes[idx[0]]
        lead = reduced == tuple(range(len(reduced)))
        units = int(np.prod([n for d, n in enumerate(shape) if d not in reduced], dtype=np.int64))
        members = [(i, k * units) for k, i in enumerate(idx)]
        i = idx[0]
        blocks.append(UnitBlock(members, 1 if lead else 2, summed[i], agree[i], across[i]))
    return blocks


def _block_array(
    block: UnitBlock, arrays: Sequence[jax.Array], axes: Sequence[tuple[int, ...]]
) -> jax.Array:
    """The array one block reduces: the leaf itself, or its leaves' unit matrices stacked."""
    if block.axis is None:
        return arrays[block.members[0][0]]
    matrices = [unit_matrix(arrays[i], axes[i]) for i, _ in block.members]
    if len(matrices) == 1:
        return matrices[0][None]
    # Raveled and concatenated, then reshaped: the same bytes as a stack.
    return jnp.concatenate([m.ravel() for m in matrices]).reshape(
        (len(matrices), *matrices[0].shape)
    )


def _unit_sums(
    array: jax.Array, axes: tuple[int, ...], summed: tuple[str, ...], divisor: jax.Array | None
) -> jax.Array:
    acc = accumulation_dtype(array.dtype)
    return psum(power_sum(array, 2.0, acc, divisor, axes, keepdims=True), summed)


def unit_norms(
    arrays: Sequence[jax.Array],
    blocks: Sequence[UnitBlock],
    axes: Sequence[tuple[int, ...]],
    rescue: bool,
) -> list[ScaledNorm]:
    """The L2 norm of each unit, per block: a vector for a stacked block, else the leaf's shape.

    Each in the scaled form (``divisor * root``), so that a unit of finite entries whose norm
    passes float32's range is still clipped exactly.

    With ``rescue``, when any unit's sum of squares overflows or loses bits to underflow, one
    rescaled pass over every block runs under a single ``lax.cond`` whose operands are the
    blocks' arrays. Without it (the weight norms: a unit weight norm outside about
    [1e-19, 1e19] is either floored by ``eps`` or so large that no gradient reaches the limit)
    the direct sums are used. The rescue decision is shared across ``block.agree`` (every axis
    the leaves are split along), so that all devices take the same branch.
    """
    inputs = lowering.converted_apart_from_the_output(
        [_block_array(block, arrays, axes) for block in blocks]
    )
    reduced = [axes[b.members[0][0]] if b.axis is None else (b.axis,) for b in blocks]

    def flat(value: jax.Array, block: UnitBlock) -> jax.Array:
        return value if block.axis is None else value.reshape(-1)

    direct = [
        _unit_sums(x, r, b.summed, None) for x, r, b in zip(inputs, reduced, blocks, strict=True)
    ]

    def as_is(_: list[jax.Array]) -> list[ScaledNorm]:
        return [
            ScaledNorm(jnp.ones_like(root), root)
            for root in (flat(safe_root(t, 2.0), b) for t, b in zip(direct, blocks, strict=True))
        ]

    if not rescue or not blocks:
        return as_is(inputs)

    def rescaled(operands: list[jax.Array]) -> list[ScaledNorm]:
        out = []
        for x, r, b in zip(operands, reduced, blocks, strict=True):
            acc = accumulation_dtype(x.dtype)
            largest = jnp.max(jnp.abs(x).astype(acc), axis=r, keepdims=True, initial=0)
            if b.summed:
                largest = lax.pmax(largest, b.summed)
            divisor = rescale_divisor(lax.stop_gradient(largest))
            root = safe_root(_unit_sums(x, r, b.summed, divisor), 2.0)
            out.append(ScaledNorm(flat(jnp.broadcast_to(divisor, root.shape), b), flat(root, b)))
        return out

    suspects = []
    for total, block in zip(direct, blocks, strict=True):
        suspect = jnp.any(needs_rescue(total, 2.0, zero_is_suspect=False))
        if block.agree:
            suspect = lax.pmax(suspect.astype(jnp.int32), block.agree) > 0
        suspects.append(suspect)
    return lax.cond(
        jnp.any(lowering.stack_against_chain_rewrite(suspects)), rescaled, as_is, inputs
    )
