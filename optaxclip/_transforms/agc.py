"""Adaptive gradient clipping (AGC): bound each unit's gradient relative to its weights.

A *unit* is a slice of a parameter leaf, for example one output column of a Flax ``Dense``
kernel. Which axes make up a unit depends on how the framework lays out its weights, so the
layout is an explicit argument (``unit_axes``, see :mod:`optaxclip._spec.units`) rather than a
guess from the rank alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optaxclip import _lowering as lowering
from optaxclip._engine.clip import check_params, flatten_updates, scale_under_policy
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.arithmetic import ScaledNorm, scaled_post_norm, shrink_factors
from optaxclip._numerics.reductions import norm_of_leaves, sum_across_devices
from optaxclip._numerics.units import unit_blocks, unit_norms
from optaxclip._spec.layout import (
    AxisName,
    Layout,
    leaf_dim_axes,
    leaf_reduction_axes,
    normalize_axis_names,
)
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats, nothing_clipped
from optaxclip._spec.thresholds import Threshold, ThresholdLike
from optaxclip._spec.units import (
    AXIS_UNSET,
    UNIT_AXES_UNSET,
    UnitAxes,
    Unset,
    check_params_match,
    resolve_units,
    unit_spec,
    validate_exclude,
    validate_unit_axes,
)
from optaxclip._spec.validation import check_name, check_number, path_str


class AGCState(NamedTuple):
    """State of [`adaptive_grad_clip`][optaxclip.adaptive_grad_clip]: only its report.

    AGC keeps no running statistics.
    """

    stats: ClipStats


class _Part(NamedTuple):
    """Unit values of one or more blocks, joined: ``columns[k]`` is column k's values."""

    columns: list[jax.Array]
    axes: tuple[str, ...]
    members: list[tuple[int, int]]  # (leaf position, offset of its units in the vectors)


def _parts(
    pieces: Sequence[tuple[list[jax.Array], tuple[str, ...], list[tuple[int, int]]]],
) -> list[_Part]:
    """The per-block unit values (columns, axes across units, members), joined by axes and dtype."""
    joined = lowering.joined_vectors(
        [columns for columns, _, _ in pieces],
        [(axes, columns[0].dtype) for columns, axes, _ in pieces],
    )
    return [
        _Part(
            vectors.columns,
            pieces[vectors.pieces[0]][1],
            [
                (i, shift + offset)
                for k, shift in zip(vectors.pieces, vectors.offsets, strict=True)
                for i, offset in pieces[k][2]
            ],
        )
        for vectors in joined
    ]


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
        starts = lowering.positions_opaque_to_fusion([o for _, o in part.members], columns[0][k][0])
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
    axis: int | tuple[int, ...] | Unset | None = AXIS_UNSET,
    *,
    unit_axes: UnitAxes = UNIT_AXES_UNSET,
    exclude: Any = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clips each unit's gradient to a fraction of that unit's weight norm (AGC).

    For every unit ``i`` (a slice of a parameter leaf, see ``unit_axes``) with weights
    ``W_i`` and gradient ``G_i``:

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
      one (``axis=None`` gives Optax's rule). For query/key/value projections
      ``(in, heads, head_dim)``, where each ``(head, feature)`` pair is a unit, pass ``(0,)``
      for those leaves.
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
      axis: Optax's argument, with Optax's meaning, here so that
        ``optax.adaptive_grad_clip(clipping, eps, axis)`` calls carry over: the axis or axes
        along which each unit's norm is computed (reduced) in every leaf, or None for Optax's
        rule by shape (a leaf with at most one axis longer than 1 is one unit; rank 2 and 3
        reduce over axis 0, rank 4 and 5 over every axis but the last; higher ranks raise at
        ``init``). Left out, ``unit_axes`` decides. It names the same axes as ``unit_axes``,
        so giving both raises unless they are the same axes.
      unit_axes: which axes form a unit, given as the axes to REDUCE over: a preset name
        (above; ``"flax"`` when neither this nor ``axis`` is given), an int or tuple of ints
        for every leaf, a pytree matching the parameters (or a prefix of them, matched by key
        path, so a dict describes an ``nnx.State``) whose entries are presets or axis tuples,
        or a function ``(path, leaf) -> preset or axes``.
      exclude: the leaves AGC must not touch, as a pytree of bools matching the parameters
        (or a prefix, matched by key path) or ``(path, leaf) -> bool``; NFNets excludes the final
        classifier. Excluded leaves pass through bit for bit and are not part of the stats or of the
        non-finite check.
      nonfinite: what a gradient holding NaN or Inf becomes, among the leaves that are not
        excluded: ``"propagate"`` (default) passes it through unscaled, ``"zero"`` makes
        the update all zeros, ``"error"`` raises ``FloatingPointError`` naming the first
        non-finite leaf.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s). Each unit's partial
        sums (gradient and weights) are added across the axes that split one of its reduced
        dimensions (an ``(in, out)`` kernel split along ``in``); along axes that split a unit
        dimension (split along ``out``) each device holds whole units and only the stats are
        added across devices.
      layout: with ``axis_name``, the PartitionSpec of each leaf (a prefix pytree of them or
        ``(path, leaf) -> spec``; see
        [`layout_from_shardings`][optaxclip.layout_from_shardings]). AGC must know which
        dimension a leaf is split along, so a leaf that is split and has unit dimensions needs
        a PartitionSpec: a bare axis name, or no layout where JAX only records that the leaf
        varies across devices, raises a ValueError naming the leaf.
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"adaptive_grad_clip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is an ``AGCState``. Its stats report the
      global norm of the clipped leaves before and after (the latter from the unit scales),
      the smallest unit limit as ``threshold``, the fraction of units clipped and ``steps``,
      the number of updates seen. A unit whose entries are all below about 1e-19 in
      magnitude squares to 0 in float32 and counts with norm 0 in the stats (it is under
      every positive limit, so its clip is unaffected; ``clipping=0`` still zeroes it).

    Raises:
      ValueError: negative or NaN ``clipping``/``eps``, an unknown preset, an axis out of
        range, a ``unit_axes``/``exclude`` pytree that does not match the parameters (at
        ``init``, naming the path), ``axis`` and ``unit_axes`` both given with different
        axes, ``axis=None`` with a leaf of rank 6 or more, ``params=None`` in ``update``,
        parameters that do not mirror the gradients, or a split leaf without a per-dimension
        layout (naming the path).
      TypeError: spec entries of the wrong type, an ``axis`` that is not None, an int or a
        tuple of ints, non-float leaves.

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

      Optax's positional ``axis`` names the axes to reduce over, here the same as the default:

      >>> tx = optaxclip.adaptive_grad_clip(0.1, 1e-3, 0)
      >>> print(tx.update(grads, tx.init(params), params)[0]["kernel"])
      [[0.3 0. ]
       [0.4 0.1]]

    References:
      Brock, De, Smith & Simonyan, "High-Performance Large-Scale Image Recognition Without
      Normalization", ICML 2021 (https://arxiv.org/abs/2102.06171).
    """
    threshold = Threshold(clipping, "clipping", per_leaf=True, call="adaptive_grad_clip")
    check_number(eps, "eps", call="adaptive_grad_clip")
    unit_axes, units_name = unit_spec(axis, unit_axes)
    validate_unit_axes(unit_axes)
    validate_exclude(exclude)
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "adaptive_grad_clip")

    def init_fn(params: Any) -> AGCState:
        check_params(params)
        threshold.validate_for(params)
        resolve_units(unit_axes, exclude, params, name=units_name)
        return AGCState(stats=initial_stats(label))

    def update_fn(updates: Any, state: AGCState, params: Any = None) -> tuple[Any, AGCState]:
        paths, leaves, treedef = flatten_updates(updates)
        weights = check_params_match(updates, params, label)
        axes, excluded = resolve_units(unit_axes, exclude, params, name=units_name)
        count = state.stats.steps
        limits = threshold.per_leaf_values(updates, count)
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        dim_axes = leaf_dim_axes(updates, axis_name, layout)
        active = [i for i, skip in enumerate(excluded) if not skip]
        if not active:
            stats = nothing_clipped(label, count + 1)
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
        blocks = unit_blocks(
            grads, params_of, active_axes, summed, [leaf_axes[i] for i in active], across_units
        )
        grad_norms = unit_norms(grads, blocks, active_axes, rescue=True)
        weight_norms = unit_norms(params_of, blocks, active_axes, rescue=False)
        # Limits, scales and stats run on the unit norms joined into a few vectors: computed
        # per leaf, they would add about a dozen kernels per leaf to the program.
        parts = _parts(
            [
                ([g.divisor, g.root, w.value.astype(g.root.dtype)], block.across, block.members)
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
        unit_norms_of: list[ScaledNorm] = []
        bad: list[jax.Array] = []
        n_clipped: list[jax.Array] = []
        n_units: list[jax.Array] = []
        least_limits: list[jax.Array] = []
        unit_limits: list[jax.Array] = []

        for part in parts:
            divisor, root, w = part.columns
            g = divisor * root  # inf for a unit of finite entries past float32's range
            c = _part_limits(part, active_limits, active_known, shapes)
            limit = c * jnp.maximum(w, jnp.asarray(eps, g.dtype))
            unit_limits.append(limit)
            unit_norms_of.append(ScaledNorm(divisor, root))
            bad.append(jnp.sum(~jnp.isfinite(root)))
            n_clipped.append(jnp.sum(g > limit))
            n_units.append(jnp.asarray(g.size))
            least = jnp.min(limit, initial=jnp.inf)
            least_limits.append(lax.pmin(least, part.axes) if part.axes else least)
        # Devices along a unit dimension hold different units: the stats add across them.
        n_bad = sum_across_devices(bad, part_axes)
        finite = n_bad == 0
        active_leaves = [leaves[i] for i in active]

        def unit_factors(operands: Any) -> tuple[list[jax.Array], list[jax.Array]]:
            norms, limits_ = operands
            coarse_parts, fine_parts = [], []
            for g, limit in zip(norms, limits_, strict=True):
                first, second = shrink_factors(limit, g, g.value > limit)
                # clipping=0 zeroes every unit, also one whose norm rounds to 0 (entries below
                # about 1e-19 square to 0 in float32 and are not rescued, see unit_norms).
                coarse_parts.append(first)
                fine_parts.append(jnp.where(limit == 0, 0, second))
            return coarse_parts, fine_parts

        def per_unit(both: Any) -> tuple[list[Any], list[Any]]:
            coarse, fine = _per_leaf(parts, list(both), shapes)
            return coarse, fine

        clipped, (coarse_parts, fine_parts) = scale_under_policy(
            policy,
            label,
            [paths[i] for i in active],
            active_leaves,
            finite,
            unit_factors,
            (unit_norms_of, unit_limits),
            n_bad,
            per_unit,
        )
        # Read only where the step is finite (post below), so the policy's 1s do not matter.
        clipped_norms_of = [
            scaled_post_norm(g, first, second)
            for g, first, second in zip(unit_norms_of, coarse_parts, fine_parts, strict=True)
        ]
        out = list(leaves)
        for i, leaf in zip(active, clipped, strict=True):
            out[i] = leaf

        pre = norm_of_leaves([g.value for g in unit_norms_of], 2.0, part_axes)
        post_if_finite = norm_of_leaves(clipped_norms_of, 2.0, part_axes)
        post = policy.report(finite, post_if_finite, if_zeroed=0, if_passed=pre)
        fraction = sum_across_devices(n_clipped, part_axes) / sum_across_devices(n_units, part_axes)
        fraction = policy.report(finite, fraction, if_zeroed=1.0, if_passed=0.0)
        smallest = jnp.min(lowering.stack_against_chain_rewrite(least_limits))
        stats = make_stats(
            label,
            steps=count + 1,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=smallest,
            clipped_fraction=fraction,
        )
        return jax.tree_util.tree_unflatten(treedef, out), AGCState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
