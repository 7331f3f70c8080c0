"""Static clippers: by global norm, by per-leaf norm, by value, by block RMS.

Each is a drop-in ``optax.GradientTransformation`` whose state is a :class:`ClipState`
carrying :class:`ClipStats`.
"""

from __future__ import annotations

import math
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
    select_leaves,
)
from optaxclip._numerics.reductions import (
    accumulation_dtype,
    combine_norms,
    computed_once,
    group_by_axes,
    leaf_entries,
    norm_of_leaves,
    norms_per_leaf,
    shrink_factors,
    stack_scalars,
    sum_across_devices,
    sum_of_leaves,
)
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats
from optaxclip._spec.thresholds import Threshold, ThresholdLike
from optaxclip._spec.validation import (
    check_float_leaves,
    check_name,
    check_nonfinite,
    normalize_ord,
    path_str,
)


class ClipState(NamedTuple):
    """State of a static clipper: only what it did on its last step."""

    stats: ClipStats


def flatten_updates(updates: Any, name: str = "updates") -> tuple[list[Any], list[jax.Array], Any]:
    """Flattens a gradient pytree, checking that every leaf is floating point."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    check_float_leaves(paths_leaves, name)
    return [p for p, _ in paths_leaves], [x for _, x in paths_leaves], treedef


def check_params(params: Any) -> None:
    """At ``init``: the parameters the gradients will mirror must be floating point."""
    check_float_leaves(jax.tree_util.tree_leaves_with_path(params), "params")


def _check_real_leaves(paths_and_leaves: Any, name: str, label: str) -> None:
    """Value clipping orders the elements, which complex numbers do not allow."""
    for path, leaf in paths_and_leaves:
        if jnp.iscomplexobj(leaf):
            raise TypeError(
                f"{label}: {name} leaf {path_str(path)} has the complex dtype {leaf.dtype}; "
                f"clamping needs real values (use a norm clipper such as clip_by_leaf_norm)."
            )


def global_scale(norm: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``min(1, threshold / norm)`` as factors ``(coarse, fine)``, and whether it clipped.

    The factors are those of ``_numerics.shrink_factors`` (their product is the scale; kept
    apart, a ratio below 2^-126 is not flushed to 0).
    """
    over = norm > threshold.astype(norm.dtype)
    coarse, fine = shrink_factors(threshold, norm, over)
    return coarse, fine, over


def clip_to_global_norm(
    paths: list[Any],
    leaves: list[jax.Array],
    norm: jax.Array,
    limit: jax.Array,
    policy: str,
    label: str,
    count: jax.Array,
) -> tuple[list[jax.Array], ClipStats]:
    """Scales ``leaves`` (whose global norm is ``norm``) down to ``limit`` if above it.

    The one implementation of "clip by a global threshold" that every global clipper, static
    or adaptive, goes through: double-where scale, non-finite policy, dtype-preserving multiply
    and the ClipStats (``count`` is the value to store, i.e. including this step).
    """
    finite = jnp.isfinite(norm)
    raise_if_nonfinite(policy, finite, paths, leaves, label)

    def factors(operands: Any) -> tuple[jax.Array, ...]:
        norm, limit, ok = operands
        coarse, fine, _ = global_scale(norm, limit)
        return factors_under_policy(policy, ok, (coarse, fine))

    # Two scalars computed once (see computed_once): XLA:CPU otherwise copies the dozen
    # selects that produce them into every leaf's kernel, and into each of Adam's kernels
    # per leaf in a chain (chain(clip, adam) then compiled in 1.3-1.5x Adam's own time at
    # 2000 leaves, against 1.13-1.17x now).
    coarse, fine = computed_once(factors, (norm, limit, finite), norm)
    n = len(leaves)
    out = scale_leaves(leaves, [fine] * n, policy, finite_for_leaves(policy, finite), [coarse] * n)
    scale = coarse * fine
    applied = jnp.where(finite, scale, 0 if policy == "zero" else 1)
    post = jnp.where(finite, (norm * coarse) * fine, 0 if policy == "zero" else norm)
    stats = make_stats(
        label,
        count=count,
        pre_clip_norm=norm,
        post_clip_norm=post,
        threshold=limit,
        clipped_fraction=(applied < 1).astype(jnp.float32),
    )
    return out, stats._replace(scale=applied.astype(jnp.float32))


def clip_by_global_norm(
    max_norm: ThresholdLike,
    *,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Rescales the whole gradient when its global norm exceeds ``max_norm``.

    If ``norm > max_norm``, every leaf is multiplied by ``max_norm / norm``; otherwise the
    leaves are returned bit for bit unchanged. The norm is exact in fp16/bf16 (float32
    accumulation, no overflow), ``max_norm=0`` gives zeros (never NaN), derivatives through
    the update are finite everywhere, and each output leaf keeps its dtype. Same name and
    call shape as ``optax.clip_by_global_norm`` (and ``torch.nn.utils.clip_grad_norm_``).

    Args:
      max_norm: the threshold: a number >= 0 or a schedule ``step -> value`` (the step is
        counted in the state).
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or any real
        p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``; see
        :mod:`optaxclip._engine.nonfinite`. The default passes a NaN/Inf gradient through unscaled so
        that a downstream guard can skip the step without finite leaves being altered.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is split
        across; the norm is then that of the whole gradient.
      layout: with ``axis_name``, the PartitionSpec of each leaf (a prefix pytree of specs or
        ``(path, leaf) -> spec``), so that leaves replicated along an axis are counted once;
        see :mod:`optaxclip._spec.layout`. Default: inside ``shard_map(check_vma=True)`` read
        from JAX's types; elsewhere every leaf is taken as split along all of ``axis_name``.
      name: label for :func:`clip_stats` (default ``"clip_by_global_norm"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ClipState`.

    Raises:
      ValueError: a negative or NaN ``max_norm``, ``ord < 1``, an unknown ``nonfinite``.
      TypeError: a non-float gradient leaf (names its path).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> clipper = optaxclip.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> state = clipper.init(grads)
      >>> clipped, state = clipper.update(grads, state)
      >>> print(clipped["w"], float(state.stats.pre_clip_norm))
      [0.6 0.8] 5.0

    References:
      Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
      ICML 2013 (https://arxiv.org/abs/1211.5063).
    """
    threshold = Threshold(max_norm, "max_norm", per_leaf=False)
    p = normalize_ord(ord)
    policy = check_nonfinite(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "clip_by_global_norm")

    def init_fn(params: Any) -> ClipState:
        check_params(params)
        threshold.check_schedule_start()
        return ClipState(stats=initial_stats(label))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        count = state.stats.count
        limit = threshold.scalar(count)
        norm = norm_of_leaves(leaves, p, leaf_reduction_axes(updates, axis_name, layout))
        out, stats = clip_to_global_norm(paths, leaves, norm, limit, policy, label, count + 1)
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)


def _per_leaf_norm_clipper(
    threshold: Threshold,
    p: float,
    policy: str,
    axis_name: AxisName,
    layout: Layout,
    label: str,
    rms: bool,
) -> optax.GradientTransformation:
    """Shared body of clip_by_leaf_norm and clip_by_block_rms (RMS = L2 norm / sqrt(size))."""

    normalize_axis_names(axis_name)

    def init_fn(params: Any) -> ClipState:
        check_params(params)
        threshold.validate_for(params)
        return ClipState(stats=initial_stats(label))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        count = state.stats.count
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        norms = norms_per_leaf(leaves, p, leaf_axes)
        if not leaves:
            return updates, ClipState(
                stats=make_stats(
                    label,
                    count=count + 1,
                    pre_clip_norm=0.0,
                    post_clip_norm=0.0,
                    threshold=jnp.inf,
                    clipped_fraction=0.0,
                )
            )
        limit_vector = threshold.per_leaf_vector(updates, count).astype(norms.dtype)
        if rms:
            sizes = jnp.asarray(np.array([max(x.size, 1) for x in leaves], np.float64), norms.dtype)
            for axes, idx in group_by_axes(leaf_axes).items():
                if axes:
                    mask = np.zeros(len(leaves), bool)
                    mask[idx] = True
                    sizes = jnp.where(mask, sizes * lax.psum(1, axes), sizes)
            norm_limits = limit_vector * jnp.sqrt(sizes)
        else:
            norm_limits = limit_vector
        over = norms > norm_limits
        finite = jnp.all(jnp.isfinite(norms))
        raise_if_nonfinite(policy, finite, paths, leaves, label)
        pre = combine_norms(norms, p)

        def leaf_factors(operands: Any) -> tuple[jax.Array, ...]:
            norms, norm_limits, over, ok = operands
            coarse, fine = shrink_factors(norm_limits, norms, over)
            # A threshold of 0 zeroes a leaf even when its norm rounds to 0 (entries below
            # ~1e-19, see _numerics._needs_rescue); the stats count it as unclipped, like a
            # zero leaf.
            return factors_under_policy(policy, ok, (coarse, jnp.where(norm_limits == 0, 0, fine)))

        # Computed as vectors before the leaves read them (see computed_once): fused into
        # each leaf's multiply, the dozen selects were recomputed for every element.
        coarse, fine = computed_once(leaf_factors, (norms, norm_limits, over, finite), pre)
        coarse_of, fine_of = leaf_entries([coarse, fine])
        out = scale_leaves(leaves, fine_of, policy, finite_for_leaves(policy, finite), coarse_of)
        post_if_finite = combine_norms((norms * coarse) * fine, p)
        post = jnp.where(finite, post_if_finite, 0 if policy == "zero" else pre)
        clipped = jnp.where(
            finite, jnp.mean(over.astype(jnp.float32)), 1.0 if policy == "zero" else 0.0
        )
        stats = make_stats(
            label,
            count=count + 1,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=jnp.min(limit_vector),
            clipped_fraction=clipped,
        )
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_leaf_norm(
    max_norm: ThresholdLike,
    *,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Bounds each leaf by its own norm: ``g_i * min(1, max_norm_i / ||g_i||)``.

    This is Keras ``clipnorm`` and ``tf.clip_by_norm`` applied to every leaf. Leaves under
    their threshold are returned bit for bit.

    Args:
      max_norm: a number, a schedule ``step -> value``, a pytree of numbers matching the
        gradient tree (or a prefix of it, e.g. ``{"head": 10.0, "body": 1.0}``), or a function
        ``(path, leaf) -> number`` (e.g. a wider range for the output layer).
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or any real
        p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split across.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        :func:`clip_by_global_norm`.
      name: label for :func:`clip_stats` (default ``"clip_by_leaf_norm"``).

    Returns:
      An ``optax.GradientTransformation``; ``ClipStats.clipped_fraction`` is the fraction of
      leaves clipped and ``threshold`` the smallest per-leaf threshold.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"body": jnp.array([3.0, 4.0]), "head": jnp.array([6.0, 8.0])}
      >>> clipper = optaxclip.clip_by_leaf_norm({"body": 1.0, "head": 5.0})
      >>> clipped, state = clipper.update(grads, clipper.init(grads))
      >>> print(clipped["body"], clipped["head"])
      [0.6 0.8] [3. 4.]
      >>> print(float(state.stats.clipped_fraction))
      1.0

    References:
      Keras ``Optimizer(clipnorm=...)``; ``tf.clip_by_norm``.
    """
    threshold = Threshold(max_norm, "max_norm", per_leaf=True)
    return _per_leaf_norm_clipper(
        threshold,
        normalize_ord(ord),
        check_nonfinite(nonfinite),
        axis_name,
        layout,
        check_name(name, "clip_by_leaf_norm"),
        rms=False,
    )


def clip_by_block_rms(
    threshold: ThresholdLike,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Bounds the root mean square of each leaf: ``g_i / max(1, rms(g_i) / threshold_i)``.

    Same semantics as ``optax.clip_by_block_rms`` (the update clipping of Adafactor), with an
    exact float32 RMS for low-precision leaves, per-leaf thresholds and stats.

    Args:
      threshold: the RMS bound; a number, a schedule, a pytree of numbers (or prefix) or a
        function ``(path, leaf) -> number``.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split across
        (the RMS then uses the full leaf size).
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        :func:`clip_by_global_norm`.
      name: label for :func:`clip_stats` (default ``"clip_by_block_rms"``).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"w": jnp.full((4,), 2.0)}
      >>> clipper = optaxclip.clip_by_block_rms(1.0)
      >>> clipped, _ = clipper.update(grads, clipper.init(grads))
      >>> print(clipped["w"])
      [1. 1. 1. 1.]

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
      ICML 2018 (https://arxiv.org/abs/1804.04235).
    """
    spec = Threshold(threshold, "threshold", per_leaf=True)
    return _per_leaf_norm_clipper(
        spec,
        2.0,
        check_nonfinite(nonfinite),
        axis_name,
        layout,
        check_name(name, "clip_by_block_rms"),
        rms=True,
    )


# --- clip_by_value's statistics ---------------------------------------------------------------
# The clipped fraction and the post-clip norm are reductions over every entry, next to the clamp.
# XLA:CPU runs a reduction at memory speed only as one fused loop of plain arithmetic: a
# comparison, select or clamp op in it is first written out in full, and so is a full-size
# broadcast that another fused computation shares. XLA merges equal computations first, so two
# reductions (or a reduction and the clamp) that broadcast equal scalars share one broadcast:
# equal bounds, or a scalar of one that happens to equal a scalar of another (a clamp to 0.5 and
# a reduction that halves). So the statistics are arithmetic only, and every scalar they
# broadcast is multiplied by a unit of its own: an entry of a vector of ones that XLA cannot
# see as constants (``_numerics.computed_once``), picked by the statistic and by the reduced
# array's twin index (see _numerics.Transform): one pair per leaf, so that no two twins share a
# unit, nor the count and the post-clip norm of one array (the count's scale 2^-17 equals a
# bound of 2^-17). The clamps of the output broadcast their bounds as constants, which no
# statistic then shares.

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
    ``unit`` is a runtime 1 (see the section comment above).
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

    ``cap`` is taken times ``unit``, a runtime 1 (see the section comment above).
    """
    acc = accumulation_dtype(x.dtype)
    return jnp.minimum(jnp.abs(x.astype(acc)), cap.astype(acc) * unit.astype(acc))


def _value_terms(
    lo: jax.Array,
    hi: jax.Array,
    known_lo: float | None,
    known_hi: float | None,
    symmetric: bool,
    units: jax.Array,
) -> tuple[Any, Any]:
    """The count term and the clamp (for the post-clip norm) of one pair of bounds.

    ``units``: runtime ones, two per twin index: the count takes ``units[2 * twin]``, the
    post-clip norm ``units[2 * twin + 1]`` (see the section comment above).
    """

    def count(x: jax.Array, twin: int) -> jax.Array:
        return _count_outside(x, lo, hi, (known_lo, known_hi), units[2 * twin])

    def capped(x: jax.Array, twin: int) -> jax.Array:
        return _capped_magnitude(x, hi, units[2 * twin + 1])

    def clamp(x: jax.Array, twin: int) -> jax.Array:
        acc = accumulation_dtype(x.dtype)
        unit = units[2 * twin + 1].astype(acc)
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
    costs several times ``optax.clip``, which reports nothing (README, Performance).

    Args:
      max_delta: the upper bound (>= 0 when ``min_delta`` is None).
      min_delta: the lower bound; must not exceed ``max_delta``. Defaults to ``-max_delta``.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) for the reported norms and
        fraction.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        :func:`clip_by_global_norm`.
      name: label for :func:`clip_stats` (default ``"clip_by_value"``).

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
    upper = Threshold(
        max_delta, "max_delta", per_leaf=True, minimum=0.0 if symmetric else -math.inf
    )
    lower = (
        None if symmetric else Threshold(min_delta, "min_delta", per_leaf=True, minimum=-math.inf)
    )
    policy = check_nonfinite(nonfinite)
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
        _check_real_leaves(jax.tree_util.tree_leaves_with_path(params), "params", label)
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
        _check_real_leaves(zip(paths, leaves, strict=True), "updates", label)
        count = state.stats.count
        lows, highs = bounds(updates, count)
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        known_highs = upper.known_per_leaf(updates)
        known_lows = (
            [None if h is None else -h for h in known_highs]
            if lower is None
            else lower.known_per_leaf(updates)
        )
        # Runtime ones for the statistics, two per possible twin index (a twin index is below
        # the number of leaves; see the comment on clip_by_value's statistics). The conditional
        # behind them (XLA:CPU only) reads the last step's norm, a runtime value.
        units = computed_once(
            lambda _: jnp.ones((2 * max(len(leaves), 1),), jnp.float32),
            None,
            state.stats.pre_clip_norm,
        )
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
                shared[key] = _value_terms(lo_x, hi_x, known_lo, known_hi, symmetric, units)
            count_term, clamp = shared[key]
            counts.append(count_term)
            clamps.append(clamp)
        pre = norm_of_leaves(leaves, 2.0, leaf_axes)
        finite = jnp.isfinite(pre)
        raise_if_nonfinite(policy, finite, paths, leaves, label)
        # The norm of the clamped leaves, measured on the inputs (clamped as they are read):
        # measuring the output instead would give it a second consumer besides the
        # optimizer that follows, and XLA would then write it out in full (and copy the
        # optimizer state) rather than fuse the clamp into the optimizer's update.
        post_if_finite = norm_of_leaves(leaves, 2.0, leaf_axes, transforms=clamps, view=1)
        n_clipped = sum_of_leaves(leaves, leaf_axes, counts, view=2)
        # Each clamp may be written over its (donated) input, so every reduction reading that
        # input must run first; ``ready`` ties them in (a count is never negative, and NaN only
        # when the norm is not finite either). Without this, XLA copies every leaf first.
        ready = finite & (post_if_finite >= 0) & (n_clipped >= 0)
        out = select_leaves(leaves, clamped, policy, ready)
        total = sum_across_devices([jnp.asarray(x.size, jnp.float32) for x in leaves], leaf_axes)
        fraction = n_clipped / jnp.maximum(total, 1)
        post = jnp.where(finite, post_if_finite, 0 if policy == "zero" else pre)
        fraction = jnp.where(finite, fraction, 1.0 if policy == "zero" else 0.0)
        limit = jnp.min(stack_scalars(highs)) if highs else jnp.asarray(jnp.inf)
        stats = make_stats(
            label,
            count=count + 1,
            pre_clip_norm=pre,
            post_clip_norm=post,
            threshold=limit,
            clipped_fraction=fraction,
        )
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
