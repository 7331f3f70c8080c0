"""clip_by_value: clamp every entry into a range, with exact statistics of what it did."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optaxclip import _lowering as lowering
from optaxclip._engine.clip import check_params, flatten_updates
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._lowering import ReadView
from optaxclip._numerics.arithmetic import accumulation_dtype
from optaxclip._numerics.reductions import norm_of_leaves, sum_across_devices, sum_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipState, initial_stats, make_stats
from optaxclip._spec.thresholds import Threshold, ThresholdLike
from optaxclip._spec.validation import check_name, check_real_leaves, path_str

# The count's and the post-clip norm's slots among the runtime ones (lowering.DistinctOnes).
_COUNT, _CLAMPED = 0, 1


# The clipped fraction and the post-clip norm are reductions over every entry, next to the
# clamp. They are written in plain arithmetic (no comparison or select in the reduced
# expression), since XLA:CPU runs a reduction at memory speed only as one fused loop of
# arithmetic, and every scalar they broadcast is multiplied by a runtime one of its own
# (lowering.DistinctOnes), so that no reduction shares a broadcast with another or with the
# clamp. The clamps of the output broadcast their bounds as constants, which no statistic then
# shares.

# Differences with a bound below this are computed at a larger scale, so that they stay normal
# numbers (XLA:CPU flushes subnormal results to 0).
_TINY_BOUND = 2.0**-60


def _difference_scale(bound: jax.Array, known: float | None, acc: Any) -> jax.Array:
    """The scale for ``x * s - bound * s``: 2^-17, or 2^64 near 0.

    With ``|bound| >= 2^-60``, a nonzero difference stays above 2^-115, a normal number, and an
    entry so small that ``x * s`` underflows lies on the same side of the bound as 0 does.
    With a smaller bound (0 included), scaling up keeps every nonzero entry and difference
    normal; an entry that overflows to +-inf still lies on the correct side. ``known`` is the
    bound as a Python number where the spec gives one (either scale is exact for a bound that
    rounding to the leaf's dtype moves across 2^-60, which is representable).
    """
    usual, near_zero = 2.0**-17, 2.0**64
    if known is not None:
        return jnp.asarray(near_zero if abs(known) < _TINY_BOUND else usual, acc)
    return jnp.where(jnp.abs(bound) < _TINY_BOUND, near_zero, usual).astype(acc)


def _count_outside(
    x: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    known: tuple[float | None, float | None],
    unit: jax.Array,
) -> jax.Array:
    """The number of entries of ``x`` below ``lo`` or above ``hi``, as a float32 scalar.

    The bounds come in the leaf's dtype, rounded as the clamp uses them. With
    ``gap = max(x - hi, lo - x)`` (each side scaled, see _difference_scale), an entry is outside
    exactly when ``gap > 0``, and ``sign(gap) + |sign(gap)|`` is 2 there and 0 elsewhere. An
    entry that overflows to +-inf when scaled still lies on the correct side. A NaN entry makes
    the count NaN. ``known`` holds (lo, hi) as Python numbers where the spec gives them.
    ``unit`` is a runtime 1 (see the comment above ``_TINY_BOUND``).
    """
    acc = accumulation_dtype(x.dtype)
    values = x.astype(acc)
    up = _difference_scale(hi, known[1], acc) * unit.astype(acc)
    down = _difference_scale(lo, known[0], acc) * unit.astype(acc)
    gap = jnp.maximum(values * up - hi.astype(acc) * up, lo.astype(acc) * down - values * down)
    side = jnp.sign(gap)
    return jnp.sum(side + jnp.abs(side), dtype=jnp.float32) / 2


def _capped_magnitude(x: jax.Array, cap: jax.Array, unit: jax.Array) -> jax.Array:
    """``min(|x|, cap)``, the magnitude of ``jnp.clip(x, -cap, cap)``, in float32 (or float64).

    ``cap`` is taken times ``unit``, a runtime 1 (see the comment above ``_TINY_BOUND``).
    """
    acc = accumulation_dtype(x.dtype)
    return jnp.minimum(jnp.abs(x.astype(acc)), cap.astype(acc) * unit.astype(acc))


def _value_terms(
    lo: jax.Array,
    hi: jax.Array,
    known_lo: float | None,
    known_hi: float | None,
    symmetric: bool,
    ones: lowering.DistinctOnes,
) -> tuple[Any, Any]:
    """The count term and the clamp (for the post-clip norm) of one pair of bounds.

    Each reads its own runtime one per twin index (see ``lowering.DistinctOnes``).
    """

    def count(x: jax.Array, twin: int) -> jax.Array:
        return _count_outside(x, lo, hi, (known_lo, known_hi), ones.one(_COUNT, twin))

    def capped(x: jax.Array, twin: int) -> jax.Array:
        return _capped_magnitude(x, hi, ones.one(_CLAMPED, twin))

    def clamp(x: jax.Array, twin: int) -> jax.Array:
        acc = accumulation_dtype(x.dtype)
        unit = ones.one(_CLAMPED, twin).astype(acc)
        return jnp.minimum(jnp.maximum(x.astype(acc), lo.astype(acc) * unit), hi.astype(acc) * unit)

    return count, capped if symmetric else clamp


def clip_by_value(
    max_delta: ThresholdLike,
    min_delta: ThresholdLike | None = None,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clamps every element into ``[min_delta, max_delta]`` (default ``[-max_delta, max_delta]``).

    The equivalent of ``optax.clip`` and ``torch.nn.utils.clip_grad_value_``. Both bounds
    accept numbers, schedules, per-leaf pytrees or ``(path, leaf) -> number`` functions.
    Under the default ``nonfinite="propagate"`` a gradient holding NaN/Inf is passed through
    unchanged (an Inf is not silently clamped to a finite bound).

    The stats report the L2 norms before and after, ``threshold = max_delta`` (the smallest
    per-leaf value) and ``clipped_fraction`` = the fraction of elements clamped. They cost
    three reductions over the gradient (the two norms and the count), which small leaves
    sharing their bounds run together. On XLA:CPU each is a loop of its own, so this clip
    costs more than ``optax.clip``, which reports nothing (see the
    [performance page](performance.md)).

    Args:
      max_delta: the upper bound (>= 0 when ``min_delta`` is None).
      min_delta: the lower bound; must not exceed ``max_delta``. Defaults to ``-max_delta``.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) for the reported norms and
        fraction.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"clip_by_value"``).

    Returns:
      An ``optax.GradientTransformation``.

    Raises:
      ValueError: ``min_delta > max_delta`` (names the leaf for per-leaf specs), NaN bounds,
        a negative ``max_delta`` without ``min_delta``.
      TypeError: an integer or complex leaf (names its path).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"w": jnp.array([-3.0, 0.5, 2.0])}
      >>> clipper = optaxclip.clip_by_value(1.0)
      >>> clipped, state = clipper.update(grads, clipper.init(grads))
      >>> print(clipped["w"])
      [-1.   0.5  1. ]
      >>> print(round(float(state.stats.clipped_fraction), 4))
      0.6667
    """
    symmetric = min_delta is None
    call = "clip_by_value"
    upper = Threshold(
        max_delta,
        "max_delta",
        per_leaf=True,
        minimum=0.0 if symmetric else -math.inf,
        call=call,
    )
    lower = (
        None
        if symmetric
        else Threshold(min_delta, "min_delta", per_leaf=True, minimum=-math.inf, call=call)
    )
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "clip_by_value")
    if (
        lower is not None
        and upper.kind == "constant"
        and lower.kind == "constant"
        and not isinstance(max_delta, jax.core.Tracer)
        and not isinstance(min_delta, jax.core.Tracer)
        and float(min_delta) > float(max_delta)  # type: ignore[arg-type]
    ):
        raise ValueError(f"min_delta ({min_delta}) must not exceed max_delta ({max_delta}).")

    def bounds(tree: Any, count: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        highs = upper.per_leaf_values(tree, count)
        lows = [-h for h in highs] if lower is None else lower.per_leaf_values(tree, count)
        return lows, highs

    def init_fn(params: Any) -> ClipState:
        check_params(params)
        check_real_leaves(jax.tree_util.tree_leaves_with_path(params), "params", label)
        upper.validate_for(params)
        if lower is not None:
            lower.validate_for(params)
            lows, highs = bounds(params, jnp.zeros((), jnp.int32))
            for (path, _), lo, hi in zip(
                jax.tree_util.tree_leaves_with_path(params), lows, highs, strict=True
            ):
                if (
                    not isinstance(lo, jax.core.Tracer)
                    and not isinstance(hi, jax.core.Tracer)
                    and float(lo) > float(hi)
                ):
                    raise ValueError(
                        f"min_delta ({float(lo)}) exceeds max_delta ({float(hi)}) at "
                        f"leaf {path_str(path)}."
                    )
        return ClipState(stats=initial_stats(label))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        check_real_leaves(zip(paths, leaves, strict=True), "updates", label)
        count = state.stats.steps
        lows, highs = bounds(updates, count)
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        known_highs = upper.known_per_leaf(updates)
        known_lows = (
            [None if h is None else -h for h in known_highs]
            if lower is None
            else lower.known_per_leaf(updates)
        )
        # Twin indices stay below the number of leaves. The ones' conditional reads the last
        # step's norm, a runtime value.
        ones = lowering.DistinctOnes(2, len(leaves), state.stats.pre_clip_norm)
        clamped, counts, clamps = [], [], []
        # One count term and one clamp per distinct (dtype, lo, hi), shared by the leaves with
        # those bounds (as the same object), so that the statistics reduce the concatenations
        # of small leaves the pre-clip norm already makes rather than one loop per leaf.
        shared: dict[Any, tuple[Any, Any]] = {}
        for x, lo, hi, known_lo, known_hi in zip(
            leaves, lows, highs, known_lows, known_highs, strict=True
        ):
            real = jnp.finfo(x.dtype).dtype
            lo_x, hi_x = lo.astype(real), hi.astype(real)
            clamped.append(jnp.clip(x, lo_x, hi_x))
            # Bounds known as numbers are compared by value, traced ones by identity. A
            # symmetric lower bound is the negation of the upper one (a new object per leaf),
            # so the upper bound alone identifies the pair.
            hi_key = id(hi) if known_hi is None else known_hi
            key: tuple[Any, ...]
            if symmetric:
                key = (x.dtype, hi_key)
            else:
                key = (x.dtype, id(lo) if known_lo is None else known_lo, hi_key)
            if key not in shared:
                shared[key] = _value_terms(lo_x, hi_x, known_lo, known_hi, symmetric, ones)
            count_term, clamp = shared[key]
            counts.append(count_term)
            clamps.append(clamp)
        pre = norm_of_leaves(leaves, 2.0, leaf_axes)
        finite = jnp.isfinite(pre)
        policy.raise_if_nonfinite(finite, paths, leaves, label)
        # The norm of the clamped leaves, measured on the inputs (clamped as they are read):
        # measuring the output instead would give it a second consumer besides the
        # optimizer that follows, and XLA would then write it out in full (and copy the
        # optimizer state) rather than fuse the clamp into the optimizer's update.
        post_if_finite = norm_of_leaves(
            leaves, 2.0, leaf_axes, transforms=clamps, view=ReadView.CLAMPED_NORM
        )
        n_clipped = sum_of_leaves(leaves, leaf_axes, counts, view=ReadView.OUTSIDE_COUNT)
        # Each clamp may be written over its donated input, so every reduction reading that
        # input runs first (a count is never negative, and NaN only when the norm is not
        # finite either).
        ready = lowering.after_reads(finite, [post_if_finite, n_clipped])
        out = policy.select(leaves, clamped, ready)
        total = sum_across_devices([jnp.asarray(x.size, jnp.float32) for x in leaves], leaf_axes)
        fraction = n_clipped / jnp.maximum(total, 1)
        post = policy.report(finite, post_if_finite, if_zeroed=0, if_passed=pre)
        fraction = policy.report(finite, fraction, if_zeroed=1.0, if_passed=0.0)
        limit = (
            jnp.min(lowering.stack_against_chain_rewrite([h.astype(jnp.float32) for h in highs]))
            if highs
            else jnp.asarray(jnp.inf)
        )
        stats = make_stats(
            label,
            steps=count + 1,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=limit,
            clipped_fraction=fraction,
        )
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
