"""Adaptive gradient clipping (AGC): bound each unit's gradient relative to its weights.

A *unit* is a slice of a parameter leaf, for example one output column of a Flax ``Dense``
kernel. Which axes make up a unit depends on how the framework lays out its weights, so the
layout is an explicit argument (``unit_axes``) rather than a guess from the rank alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optaxclip._engine.nonfinite import (
    factors_under_policy,
    finite_for_leaves,
    raise_if_nonfinite,
    scale_leaves,
)
from optaxclip._numerics.reductions import (
    _MAX_JOINED,
    _TINY_SUM_OF_SQUARES,
    _Budget,
    _can_join,
    accumulation_dtype,
    behind_barriers,
    computed_once,
    norm_of_leaves,
    rescale_divisor,
    runtime_positions,
    safe_root,
    shrink_factors,
    stack_scalars,
    sum_across_devices,
)
from optaxclip._spec.layout import (
    AxisName,
    Layout,
    leaf_dim_axes,
    leaf_reduction_axes,
    normalize_axis_names,
)
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats
from optaxclip._spec.thresholds import Threshold, ThresholdLike, describe_mismatch
from optaxclip._spec.validation import check_name, check_nonfinite, check_number, path_str
from optaxclip._transforms.static import check_params, flatten_updates

UNIT_AXES_PRESETS = ("flax", "equinox", "torch", "whole")

UnitAxes = Any  # preset name | int | tuple[int, ...] | pytree (prefix) of those | callable


class AGCState(NamedTuple):
    """State of :func:`adaptive_grad_clip`: AGC keeps no statistics, only its report."""

    stats: ClipStats


def unit_reduction_axes(preset: str, ndim: int) -> tuple[int, ...]:
    """The axes a ``unit_axes`` preset reduces over for a leaf of rank ``ndim``.

    Rank 0 and rank 1 leaves (scalars, biases, scales) are one unit under every preset.

    Args:
      preset: ``"flax"`` (reduce every axis but the last: one unit per output feature of an
        ``(in, out)`` kernel or an ``(H, W, I, O)`` conv kernel), ``"equinox"`` or ``"torch"``
        (reduce every axis but the first: one unit per row of an ``(out, in)`` weight, an
        ``(out, in, k...)`` conv or a ``(vocab, dim)`` embedding), or ``"whole"`` (one unit
        per leaf).
      ndim: the rank of the leaf.

    Returns:
      The axes to reduce over, sorted.

    Raises:
      ValueError: an unknown preset name.

    Examples:
      >>> import optaxclip
      >>> optaxclip.unit_reduction_axes("flax", 4)
      (0, 1, 2)
      >>> optaxclip.unit_reduction_axes("equinox", 2)
      (1,)
      >>> optaxclip.unit_reduction_axes("torch", 1)
      (0,)
    """
    if preset not in UNIT_AXES_PRESETS:
        raise ValueError(
            f"unit_axes: unknown preset {preset!r}; choose one of {UNIT_AXES_PRESETS}, or give "
            f"the axes to reduce over as a tuple of ints."
        )
    everything = tuple(range(ndim))
    if ndim <= 1 or preset == "whole":
        return everything
    if preset == "flax":
        return everything[:-1]
    return everything[1:]


def _is_axes_entry(x: Any) -> bool:
    """A leaf of a ``unit_axes`` spec: a preset name, an int or a tuple of ints."""
    if isinstance(x, (str, int, np.integer)) or x is None:
        return True
    return (
        isinstance(x, tuple)
        and not hasattr(x, "_fields")
        and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in x)
    )


def _check_axes_entry(value: Any, where: str) -> None:
    """Checks a ``unit_axes`` entry that does not depend on a leaf's rank."""
    if isinstance(value, str):
        unit_reduction_axes(value, 0)
        return
    if isinstance(value, bool) or not _is_axes_entry(value) or value is None:
        raise TypeError(
            f"unit_axes{where} must be a preset name {UNIT_AXES_PRESETS}, an int or a tuple of "
            f"ints (the axes to reduce over), got {value!r}."
        )


def _axes_for_leaf(value: Any, path: Any, ndim: int) -> tuple[int, ...]:
    """Resolves one ``unit_axes`` entry for a leaf of rank ``ndim``."""
    where = f" at leaf {path_str(path)}"
    _check_axes_entry(value, where)
    if isinstance(value, str):
        return unit_reduction_axes(value, ndim)
    entries = (value,) if isinstance(value, (int, np.integer)) else value
    axes = []
    for axis in entries:
        if not -ndim <= int(axis) < ndim:
            raise ValueError(
                f"unit_axes{where}: axis {int(axis)} is out of range for a leaf of rank {ndim}."
            )
        axes.append(int(axis) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"unit_axes{where}: repeated axis in {value!r}.")
    return tuple(sorted(axes))


class _Box:
    """Holds one spec entry as an opaque pytree leaf while a prefix spec is broadcast."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _broadcast_prefix(spec: Any, tree: Any, name: str, is_leaf: Callable[[Any], bool]) -> list[Any]:
    """One spec entry per leaf of ``tree``, from a spec with the tree's structure or a prefix."""
    try:
        expanded = jax.tree.map(
            lambda entry, subtree: jax.tree.map(lambda _: _Box(entry), subtree),
            spec,
            tree,
            is_leaf=is_leaf,
        )
    except (ValueError, TypeError) as error:
        mismatch = describe_mismatch(spec, tree, "parameter", is_leaf)
        raise ValueError(
            f"{name} must have the structure of the parameter tree or of a prefix of it. "
            f"{mismatch} (JAX said: {error})"
        ) from None
    return [box.value for box in jax.tree_util.tree_leaves(expanded)]


def _validate_unit_axes(unit_axes: UnitAxes) -> None:
    """Construction-time checks of a ``unit_axes`` spec (its structure is checked at init)."""
    if callable(unit_axes):
        return
    if _is_axes_entry(unit_axes):
        _check_axes_entry(unit_axes, "")
        return
    for path, entry in jax.tree_util.tree_leaves_with_path(unit_axes, _is_axes_entry):
        _check_axes_entry(entry, f" at {path_str(path)}")


def _validate_exclude(exclude: Any) -> None:
    if exclude is None or callable(exclude):
        return
    for path, entry in jax.tree_util.tree_leaves_with_path(exclude, lambda x: x is None):
        if not isinstance(entry, (bool, np.bool_)):
            raise TypeError(
                f"exclude at {path_str(path)} must be a bool (True leaves the leaf unclipped), "
                f"got {entry!r}."
            )


def _resolve_layout(
    unit_axes: UnitAxes, exclude: Any, params: Any
) -> tuple[list[tuple[int, ...]], list[bool]]:
    """Per leaf of ``params``: the axes to reduce over, and whether the leaf is excluded."""
    paths_leaves = jax.tree_util.tree_leaves_with_path(params)
    if callable(unit_axes):
        entries = [unit_axes(path, leaf) for path, leaf in paths_leaves]
    elif _is_axes_entry(unit_axes):
        entries = [unit_axes] * len(paths_leaves)
    else:
        entries = _broadcast_prefix(unit_axes, params, "unit_axes", _is_axes_entry)
    axes = [
        _axes_for_leaf(entry, path, jnp.ndim(leaf))
        for entry, (path, leaf) in zip(entries, paths_leaves, strict=True)
    ]
    if exclude is None:
        flags = [False] * len(paths_leaves)
    elif callable(exclude):
        flags = []
        for path, leaf in paths_leaves:
            flag = exclude(path, leaf)
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(
                    f"exclude returned {flag!r} for leaf {path_str(path)}; it must return a "
                    f"Python bool."
                )
            flags.append(bool(flag))
    else:
        flags = [
            bool(f) for f in _broadcast_prefix(exclude, params, "exclude", lambda x: x is None)
        ]
    return axes, flags


def _check_params_match(updates: Any, params: Any, label: str) -> list[jax.Array]:
    """The parameter leaves, after checking they mirror the gradient leaves."""
    if params is None:
        raise ValueError(
            f"{label}: adaptive gradient clipping compares each gradient with its parameters, "
            f"so it needs them: call tx.update(grads, state, params)."
        )
    grad_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
    param_items = jax.tree_util.tree_leaves_with_path(params)
    param_paths = [path_str(p) for p, _ in param_items]
    grad_structure: Any = jax.tree.structure(updates)
    if grad_structure != jax.tree.structure(params):
        missing = [p for p in grad_paths if p not in param_paths]
        extra = [p for p in param_paths if p not in grad_paths]
        details = []
        if missing:
            details.append(f"gradient leaf {missing[0]} has no parameter")
        if extra:
            details.append(f"parameter leaf {extra[0]} has no gradient")
        detail = "; ".join(details) or "the container types differ"
        raise ValueError(f"{label}: params and gradients must have the same tree ({detail}).")
    grad_leaves = jax.tree_util.tree_leaves(updates)
    for path, (_, param), grad in zip(param_paths, param_items, grad_leaves, strict=True):
        if jnp.shape(param) != jnp.shape(grad):
            raise ValueError(
                f"{label}: at leaf {path} the parameter has shape {jnp.shape(param)} but the "
                f"gradient has shape {jnp.shape(grad)}."
            )
    return [jnp.asarray(x) for _, x in param_items]


def _squares(x: jax.Array, acc: jnp.dtype, divisor: jax.Array | None = None) -> jax.Array:
    """``|x / divisor|**2`` elementwise, in ``acc``."""
    parts = [jnp.real(x), jnp.imag(x)] if jnp.iscomplexobj(x) else [x]
    scaled = [p.astype(acc) if divisor is None else p.astype(acc) / divisor for p in parts]
    return sum((y * y for y in scaled[1:]), start=scaled[0] * scaled[0])


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return lax.psum(x, axes) if axes else x


class _Block(NamedTuple):
    """Leaves whose unit norms one reduction computes.

    ``axis`` None: one leaf, reduced in place over its own unit axes. Otherwise small leaves
    of one shape, dtype, unit axes and device layout, each laid out as a matrix with one unit
    per column (``axis`` 1) or per row (``axis`` 2) and stacked along a new leading axis.
    """

    members: list[tuple[int, int]]  # (position in the list of leaves, offset of its units)
    axis: int | None
    summed: tuple[str, ...]
    agree: tuple[str, ...]
    across: tuple[str, ...]


def _unit_matrix(x: jax.Array, reduced: tuple[int, ...]) -> jax.Array:
    """``x`` as a matrix with one unit per column (reduced axes leading) or else per row.

    Units come in the row-major order of the kept dimensions, as in ``x``'s own unit norms.
    """
    kept = [d for d in range(x.ndim) if d not in reduced]
    size = int(np.prod([x.shape[d] for d in reduced], dtype=np.int64))
    if reduced == tuple(range(len(reduced))):  # the reduced axes lead: no transpose
        return x.reshape(size, -1)
    return jnp.transpose(x, kept + list(reduced)).reshape(-1, size)


# Leaves of at most this many elements are stacked for their unit norms (see _unit_blocks).
# Stacking copies them; for larger leaves the copy costs more step time than the separate
# loops do (2000 leaves of 88 x 88 and 88 x 176 with their biases: 91 ms a step with every
# leaf up to 65536 elements stacked, 52 ms with this limit, 61 ms with none stacked).
_JOIN_UNITS_UP_TO = 1 << 12


def _unit_blocks(
    arrays: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    axes: Sequence[tuple[int, ...]],
    summed: Sequence[tuple[str, ...]],
    agree: Sequence[tuple[str, ...]],
    across: Sequence[tuple[str, ...]],
) -> list[_Block]:
    """How the unit norms of ``arrays`` are batched into reductions.

    XLA:CPU's compile time grows with the number of reduction loops, so small leaves (at
    most ``_JOIN_UNITS_UP_TO`` elements) of one shape and layout are stacked and reduced
    together, at most ``_MAX_JOINED`` per block; the others are reduced one loop each.
    Only leaves of one shape are stacked: XLA:CPU reads a concatenation of operands of
    different widths element by element, choosing the operand each time (AGC on 2000 mixed
    kernels and biases took 145 ms a step that way, against 58 ms for Optax's loops).
    """
    budget = _Budget()
    blocks: list[_Block] = []
    stacked: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        if x.size <= _JOIN_UNITS_UP_TO and _can_join(weights[i]) and budget.take(x, int(x.size)):
            key = (x.dtype, x.shape, axes[i], summed[i], agree[i], across[i])
            stacked.setdefault(key, []).append(i)
        else:
            blocks.append(_Block([(i, 0)], None, summed[i], agree[i], across[i]))
    for (_, shape, reduced, *layout), idx in stacked.items():
        lead = reduced == tuple(range(len(reduced)))
        units = int(np.prod([n for d, n in enumerate(shape) if d not in reduced], dtype=np.int64))
        for start in range(0, len(idx), _MAX_JOINED):
            chunk = idx[start : start + _MAX_JOINED]
            members = [(i, k * units) for k, i in enumerate(chunk)]
            blocks.append(_Block(members, 1 if lead else 2, *layout))
    return blocks


def _block_array(
    block: _Block, arrays: Sequence[jax.Array], axes: Sequence[tuple[int, ...]]
) -> jax.Array:
    """The array one block reduces: the leaf itself, or its leaves' unit matrices stacked."""
    if block.axis is None:
        return arrays[block.members[0][0]]
    matrices = [_unit_matrix(arrays[i], axes[i]) for i, _ in block.members]
    if len(matrices) == 1:
        return matrices[0][None]
    # Raveled and concatenated, then reshaped: the same bytes as a stack.
    return jnp.concatenate([m.ravel() for m in matrices]).reshape(
        (len(matrices), *matrices[0].shape)
    )


def _unit_sums(
    array: jax.Array, axes: tuple[int, ...], summed: tuple[str, ...], divisor: Any = None
) -> jax.Array:
    acc = accumulation_dtype(array.dtype)
    total = jnp.sum(_squares(array, acc, divisor), axis=axes, keepdims=True)
    return _psum(total, summed)


def unit_norms(
    arrays: Sequence[jax.Array],
    blocks: Sequence[_Block],
    axes: Sequence[tuple[int, ...]],
    rescue: bool,
) -> list[jax.Array]:
    """The L2 norm of each unit, per block: a vector for a joined block, else the leaf's shape.

    Accumulates in float32 (float64 for float64 arrays). With ``rescue``, when any unit's sum
    of squares overflows or loses bits to underflow, one rescaled pass over every block runs
    under a single ``lax.cond`` whose operands are the blocks' arrays. Without it (the weight
    norms: a unit weight norm outside about [1e-19, 1e19] is either floored by ``eps`` or so
    large that no gradient reaches the limit) the direct sums are used.

    Devices along ``block.summed`` hold parts of the same units: the partial sums are added
    across them. The rescue decision is shared across ``block.agree`` (every axis the leaves
    are split along), so that all devices take the same branch.
    """
    # Read through a barrier: the gradients' output multiply (or, for the weights, the
    # optimizer that follows) converts the same fp16/bf16 leaves, and a conversion shared
    # with a reduction is written out in full (see behind_barriers).
    inputs = [behind_barriers(_block_array(block, arrays, axes), 1) for block in blocks]
    reduced = [axes[b.members[0][0]] if b.axis is None else (b.axis,) for b in blocks]

    def flat(value: jax.Array, block: _Block) -> jax.Array:
        return value if block.axis is None else value.reshape(-1)

    direct = [_unit_sums(x, r, b.summed) for x, r, b in zip(inputs, reduced, blocks, strict=True)]
    if not rescue or not blocks:
        return [flat(safe_root(t, 2.0), b) for t, b in zip(direct, blocks, strict=True)]

    def rescaled(operands: list[jax.Array]) -> list[jax.Array]:
        out = []
        for x, r, b in zip(operands, reduced, blocks, strict=True):
            acc = accumulation_dtype(x.dtype)
            largest = jnp.max(jnp.abs(x).astype(acc), axis=r, keepdims=True, initial=0)
            if b.summed:
                largest = lax.pmax(largest, b.summed)
            divisor = rescale_divisor(lax.stop_gradient(largest))
            out.append(flat(divisor * safe_root(_unit_sums(x, r, b.summed, divisor), 2.0), b))
        return out

    def as_is(_: list[jax.Array]) -> list[jax.Array]:
        return [flat(safe_root(t, 2.0), b) for t, b in zip(direct, blocks, strict=True)]

    suspects = []
    for total, block in zip(direct, blocks, strict=True):
        suspect = jnp.any(jnp.isinf(total) | ((total > 0) & (total < _TINY_SUM_OF_SQUARES)))
        if block.agree:
            suspect = lax.pmax(suspect.astype(jnp.int32), block.agree) > 0
        suspects.append(suspect)
    return lax.cond(jnp.any(stack_scalars(suspects)), rescaled, as_is, inputs)


class _Part(NamedTuple):
    """Unit values of one block, or of several joined into vectors: ``columns[k]`` is column k's."""

    columns: list[jax.Array]
    axes: tuple[str, ...]
    members: list[tuple[int, int]]  # (leaf position, offset of its units in the vectors)


def _unit_parts(
    pieces: Sequence[tuple[list[jax.Array], tuple[str, ...], list[tuple[int, int]]]],
) -> list[_Part]:
    """The per-block unit values (``columns``, ``across_units`` axes, members), joined.

    Pieces of one group of ``across_units`` axes and dtype are raveled and joined, at most
    ``_MAX_JOINED`` per part, so that the limits, scales and stats run as a few vector
    operations; a piece whose arrays are explicitly sharded stays on its own. The barrier
    keeps each joined vector one buffer: XLA would otherwise split a reduction of it back
    into one per piece.
    """
    parts: list[_Part] = []
    groups: dict[Any, list[int]] = {}
    for k, (columns, axes, _) in enumerate(pieces):
        groups.setdefault((axes, columns[0].dtype), []).append(k)
    for (axes, _), idx in groups.items():
        joinable = [k for k in idx if all(_can_join(c) for c in pieces[k][0])]
        for k in idx:
            if k not in joinable:  # kept as it is: an explicitly sharded array is not raveled
                parts.append(_Part(list(pieces[k][0]), axes, list(pieces[k][2])))
        for start in range(0, len(joinable), _MAX_JOINED):
            chunk = joinable[start : start + _MAX_JOINED]
            if len(chunk) == 1:
                columns, _, members = pieces[chunk[0]]
                parts.append(_Part([c.ravel() for c in columns], axes, list(members)))
                continue
            shifts = np.cumsum([0] + [pieces[k][0][0].size for k in chunk])[:-1]
            members = [
                (i, int(shift) + offset)
                for k, shift in zip(chunk, shifts, strict=True)
                for i, offset in pieces[k][2]
            ]
            # One barrier per column: a shared one would give every output the union of
            # their device-variance types inside shard_map.
            joined = [
                lax.optimization_barrier(jnp.concatenate([pieces[k][0][c].ravel() for k in chunk]))
                for c in range(len(pieces[chunk[0]][0]))
            ]
            parts.append(_Part(joined, axes, members))
    return parts


def _part_limits(
    part: _Part,
    limits: Sequence[jax.Array],
    known: Sequence[float | None],
    shapes: Sequence[tuple[int, ...]],
) -> jax.Array:
    """Each unit's ``clipping`` value, laid out like ``part.columns``."""
    like = part.columns[0]
    first = part.members[0][0]
    if all(limits[i] is limits[first] for i, _ in part.members):  # one value for every leaf
        return jnp.broadcast_to(limits[first].astype(like.dtype), like.shape)
    sizes = [int(np.prod(shapes[i], dtype=np.int64)) for i, _ in part.members]
    values = [known[i] for i, _ in part.members]
    if all(v is not None for v in values):
        return jnp.asarray(np.repeat(np.asarray(values, np.float64), sizes), like.dtype)
    return jnp.concatenate(
        [
            jnp.broadcast_to(limits[i].astype(like.dtype), (n,))
            for (i, _), n in zip(part.members, sizes, strict=True)
        ]
    )


def _per_leaf(
    parts: Sequence[_Part],
    columns: Sequence[Sequence[jax.Array]],
    shapes: Sequence[tuple[int, ...]],
) -> list[list[Any]]:
    """Splits ``column[k]`` (laid out like ``parts[k]``) back into one array per leaf.

    Each leaf's slice comes in its own shape, taken at runtime positions shared by the
    columns.
    """
    out: list[list[Any]] = [[None] * len(shapes) for _ in columns]
    for k, part in enumerate(parts):
        if len(part.members) == 1:
            ((i, _),) = part.members
            for column, values in zip(columns, out, strict=True):
                values[i] = column[k].reshape(shapes[i])
            continue
        starts = runtime_positions([o for _, o in part.members], columns[0][k][0])
        for (i, _), start in zip(part.members, starts, strict=True):
            size = int(np.prod(shapes[i], dtype=np.int64))
            for column, values in zip(columns, out, strict=True):
                values[i] = lax.dynamic_slice_in_dim(column[k], start, size).reshape(shapes[i])
    return out


def _split_axes(
    path: Any,
    ndim: int,
    split: tuple[str, ...],
    dims: tuple[tuple[str, ...], ...] | None,
    reduced: tuple[int, ...],
    label: str,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A leaf's mapped axes, parted into those of its reduced dimensions and of its unit dims.

    The first are summed over to complete each unit's norm; along the second the devices hold
    different units, so only the stats add across them.

    Raises:
      ValueError: the leaf is split across devices and has dimensions that are not reduced,
        but the layout does not say which dimension is split.
    """
    if dims is None:
        if split and len(reduced) < ndim:
            raise ValueError(
                f"{label}: gradient leaf {path_str(path)} is split across the mapped axes "
                f"{split}, but the layout does not say along which dimension. Per-unit norms "
                f"must be added across devices when a reduced dimension is split, and not when "
                f"a unit dimension is: give layout= the leaf's PartitionSpec (for example "
                f"optaxclip.layout_from_shardings(params), or the in_specs of shard_map)."
            )
        return split, ()
    on_reduced = {name for d in reduced for name in dims[d]}
    return (
        tuple(n for n in split if n in on_reduced),
        tuple(n for n in split if n not in on_reduced),
    )


def adaptive_grad_clip(
    clipping: ThresholdLike = 0.01,
    eps: float = 1e-3,
    *,
    unit_axes: UnitAxes = "flax",
    exclude: Any = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clips each unit's gradient to a fraction of that unit's weight norm (AGC).

    For every unit ``i`` (a slice of a parameter leaf, see ``unit_axes``) with weights
    ``W_i`` and gradient ``G_i``::

        limit_i = clipping * max(||W_i||, eps)
        G_i <- G_i * limit_i / ||G_i||     if ||G_i|| > limit_i, else G_i unchanged

    Norms are Frobenius norms accumulated in float32. Units under their limit come back bit
    for bit, a zero gradient or zero weights never produce NaN, and each leaf keeps its dtype.

    Presets for ``unit_axes`` (rank 0 and 1 leaves are one unit under all of them):

    * ``"flax"`` (default): rank >= 2 leaves reduce over every axis but the last, giving one
      unit per output feature: the columns of a ``Dense`` kernel ``(in, out)``, the filters of
      a conv kernel ``(H, W, I, O)`` or ``(D, H, W, I, O)``, the output features of an
      attention output projection ``(heads, head_dim, out)``. Unlike
      ``optax.adaptive_grad_clip``, which infers axes from the rank, rank 3 reduces over
      (0, 1) rather than 0 (so a Conv1D kernel ``(W, I, O)`` and an attention output
      projection get per-output units), and a ``(1, n)`` kernel has ``n`` units rather than
      one. For query/key/value projections ``(in, heads, head_dim)``, where each
      ``(head, feature)`` pair is a unit, pass ``(0,)`` for those leaves.
    * ``"equinox"`` / ``"torch"``: rank >= 2 leaves reduce over every axis but the first:
      rows of an ``(out, in)`` linear weight, ``(out, in, k...)`` conv filters, or one unit
      per token of a ``(vocab, dim)`` embedding.
    * ``"whole"``: one unit per leaf.

    Args:
      clipping: the largest allowed ratio ``||G_i|| / max(||W_i||, eps)``, lambda in the
        paper: a number >= 0, a schedule ``step -> value``, a pytree of numbers (or prefix)
        or ``(path, leaf) -> number``. 0.01 is the NFNets value for SGD with batches of
        1024-4096; it depends on the optimizer (see the docs).
      eps: the floor on the weight norm, so zero-initialised weights may still move by
        ``clipping * eps`` per unit.
      unit_axes: which axes form a unit, given as the axes to REDUCE over: a preset name
        (above), an int or tuple of ints for every leaf, a pytree matching the parameters
        (or a prefix of them) whose entries are presets or axis tuples, or a function
        ``(path, leaf) -> preset or axes``.
      exclude: the leaves AGC must not touch, as a pytree of bools matching the parameters
        (or a prefix) or ``(path, leaf) -> bool``; NFNets excludes the final classifier.
        Excluded leaves pass through bit for bit and are not part of the stats or of the
        non-finite check.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``, applied to the
        leaves that are not excluded; see :mod:`optaxclip._engine.nonfinite`.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s). Each unit's partial
        sums (gradient and weights) are added across the axes that split one of its reduced
        dimensions (an ``(in, out)`` kernel split along ``in``); along axes that split a unit
        dimension (split along ``out``) each device holds whole units and only the stats are
        added across devices.
      layout: with ``axis_name``, the PartitionSpec of each leaf (a prefix pytree of them or
        ``(path, leaf) -> spec``; see :func:`layout_from_shardings`). AGC must know which
        dimension a leaf is split along, so a leaf that is split and has unit dimensions needs
        a PartitionSpec: a bare axis name, or no layout where JAX only records that the leaf
        varies across devices, raises a ValueError naming the leaf.
      name: label for :func:`clip_stats` (default ``"adaptive_grad_clip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is an ``AGCState``. Its stats report the
      global norm of the clipped leaves before and after (the latter from the unit scales),
      the smallest unit limit as ``threshold``, the fraction of units clipped and ``count``,
      the number of updates seen. A unit whose entries are all below about 1e-19 in
      magnitude squares to 0 in float32 and counts with norm 0 in the stats (it is under
      every positive limit, so its clip is unaffected; ``clipping=0`` still zeroes it).

    Raises:
      ValueError: negative or NaN ``clipping``/``eps``, an unknown preset, an axis out of
        range, a ``unit_axes``/``exclude`` pytree that does not match the parameters (at
        ``init``, naming the path), ``params=None`` in ``update``, parameters that do not
        mirror the gradients, or a split leaf without a per-dimension layout (naming the
        path).
      TypeError: spec entries of the wrong type, non-float leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> params = {"kernel": jnp.array([[3.0, 1.0], [4.0, 0.0]])}  # (in, out)
      >>> grads = {"kernel": jnp.array([[0.3, 0.0], [0.4, 0.5]])}
      >>> tx = optaxclip.adaptive_grad_clip(0.1)
      >>> clipped, state = tx.update(grads, tx.init(params), params)
      >>> print(clipped["kernel"])
      [[0.3 0. ]
       [0.4 0.1]]
      >>> print(float(state.stats.clipped_fraction))
      0.5

    References:
      Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
      Normalization", ICML 2021 (https://arxiv.org/abs/2102.06171).
    """
    threshold = Threshold(clipping, "clipping", per_leaf=True)
    check_number(eps, "eps")
    _validate_unit_axes(unit_axes)
    _validate_exclude(exclude)
    policy = check_nonfinite(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "adaptive_grad_clip")

    def init_fn(params: Any) -> AGCState:
        check_params(params)
        threshold.validate_for(params)
        _resolve_layout(unit_axes, exclude, params)
        return AGCState(stats=initial_stats(label))

    def update_fn(updates: Any, state: AGCState, params: Any = None) -> tuple[Any, AGCState]:
        paths, leaves, treedef = flatten_updates(updates)
        weights = _check_params_match(updates, params, label)
        axes, excluded = _resolve_layout(unit_axes, exclude, params)
        count = state.stats.count
        limits = threshold.per_leaf_values(updates, count)
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        dim_axes = leaf_dim_axes(updates, axis_name, layout)
        active = [i for i, skip in enumerate(excluded) if not skip]
        if not active:
            stats = make_stats(
                label,
                count=count + 1,
                pre_clip_norm=0.0,
                post_clip_norm=0.0,
                threshold=jnp.inf,
                clipped_fraction=0.0,
            )
            return updates, AGCState(stats=stats)

        # Per active leaf: unit norms, limits and scales, all with size-1 reduced dims.
        splits = [
            _split_axes(paths[i], leaves[i].ndim, leaf_axes[i], dim_axes[i], axes[i], label)
            for i in active
        ]
        summed = [summed for summed, _ in splits]
        across_units = [kept for _, kept in splits]
        active_axes = [axes[i] for i in active]
        grads = [leaves[i] for i in active]
        params_of = [weights[i] for i in active]
        blocks = _unit_blocks(
            grads, params_of, active_axes, summed, [leaf_axes[i] for i in active], across_units
        )
        grad_norms = unit_norms(grads, blocks, active_axes, rescue=True)
        weight_norms = unit_norms(params_of, blocks, active_axes, rescue=False)
        # Limits, scales and stats on the unit norms joined into a few vectors: computed per
        # leaf, they added about a dozen kernels per leaf to the program.
        parts = _unit_parts(
            [
                ([g, w.astype(g.dtype)], block.across, block.members)
                for g, w, block in zip(grad_norms, weight_norms, blocks, strict=True)
            ]
        )
        shapes = [
            tuple(1 if d in leaf_axes_ else n for d, n in enumerate(x.shape))
            for x, leaf_axes_ in zip(grads, active_axes, strict=True)
        ]
        known = threshold.known_per_leaf(updates)
        active_limits = [limits[i] for i in active]
        active_known = [known[i] for i in active]
        part_axes = [part.axes for part in parts]
        unit_norms_of: list[jax.Array] = []
        bad: list[jax.Array] = []
        n_clipped: list[jax.Array] = []
        n_units: list[jax.Array] = []
        least_limits: list[jax.Array] = []
        unit_limits: list[jax.Array] = []

        for part in parts:
            g, w = part.columns
            c = _part_limits(part, active_limits, active_known, shapes)
            limit = c * jnp.maximum(w, jnp.asarray(eps, g.dtype))
            unit_limits.append(limit)
            unit_norms_of.append(g)
            bad.append(jnp.sum(~jnp.isfinite(g)))
            n_clipped.append(jnp.sum(g > limit))
            n_units.append(jnp.asarray(g.size))
            least = jnp.min(limit, initial=jnp.inf)
            least_limits.append(lax.pmin(least, part.axes) if part.axes else least)
        # Devices along a unit dimension hold different units: the stats add across them.
        n_bad = sum_across_devices(bad, part_axes)
        finite = n_bad == 0
        active_leaves = [leaves[i] for i in active]
        raise_if_nonfinite(policy, finite, [paths[i] for i in active], active_leaves, label)

        def leaf_factors(operands: Any) -> tuple[list[jax.Array], list[jax.Array]]:
            norms, limits_, ok = operands
            coarse_parts, fine_parts = [], []
            for g, limit in zip(norms, limits_, strict=True):
                first, second = shrink_factors(limit, g, g > limit)
                # clipping=0 zeroes every unit, also one whose norm rounds to 0 (entries below
                # about 1e-19 square to 0 in float32 and are not rescued, see unit_norms).
                first, second = factors_under_policy(
                    policy, ok, (first, jnp.where(limit == 0, 0, second))
                )
                coarse_parts.append(first)
                fine_parts.append(second)
            return coarse_parts, fine_parts

        # The scale factors the leaves read are computed as vectors first (see computed_once).
        coarse_parts, fine_parts = computed_once(
            leaf_factors, (unit_norms_of, unit_limits, finite), n_bad
        )
        coarse, fine = _per_leaf(parts, [coarse_parts, fine_parts], shapes)
        # Read only where the step is finite (post below), so the policy's 1s do not matter.
        clipped_norms_of = [
            (g * first) * second
            for g, first, second in zip(unit_norms_of, coarse_parts, fine_parts, strict=True)
        ]
        clipped = scale_leaves(
            active_leaves, fine, policy, finite_for_leaves(policy, finite), coarse
        )
        out = list(leaves)
        for i, leaf in zip(active, clipped, strict=True):
            out[i] = leaf

        pre = norm_of_leaves(unit_norms_of, 2.0, part_axes)
        post_if_finite = norm_of_leaves(clipped_norms_of, 2.0, part_axes)
        post = jnp.where(finite, post_if_finite, 0 if policy == "zero" else pre)
        fraction = sum_across_devices(n_clipped, part_axes) / sum_across_devices(n_units, part_axes)
        fraction = jnp.where(finite, fraction, 1.0 if policy == "zero" else 0.0)
        smallest = jnp.min(stack_scalars(least_limits))
        stats = make_stats(
            label,
            count=count + 1,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=smallest,
            clipped_fraction=fraction,
        )
        return jax.tree_util.tree_unflatten(treedef, out), AGCState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
