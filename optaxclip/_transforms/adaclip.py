"""AdaClip: clip each entry against an EMA of its leaf's largest magnitude (Stable-SPAM)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip import _lowering as lowering
from optaxclip._engine.clip import check_params, flatten_updates
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._lowering import ReadView
from optaxclip._numerics.arithmetic import (
    abs_max_for_scaling,
    accumulation_dtype,
    pmax,
    safe_divide,
)
from optaxclip._numerics.reductions import norm_of_leaves, sum_across_devices, sum_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats, nothing_clipped
from optaxclip._spec.validation import (
    check_name,
    check_open_unit,
    check_real_leaves,
    is_concrete_number,
)


class AdaClipState(NamedTuple):
    """State of [`adaclip`][optaxclip.adaclip].

    Attributes:
      max_ema: float32 vector with one entry per gradient leaf (``tree_leaves`` order): the
        EMA ``m_i`` of the leaf's largest magnitude, before bias correction.
      finite_steps: int32 number of steps whose gradient was entirely finite, the ``t`` of the
        bias correction. Non-finite steps are not counted.
      stats: what the last update did ([`ClipStats`][optaxclip.ClipStats]); ``stats.steps`` counts
        every update, the non-finite ones included.
    """

    max_ema: jax.Array
    finite_steps: jax.Array
    stats: ClipStats


def _decay_terms(theta: Any) -> tuple[Any, Any]:
    """``1 - theta`` and the log of the decay the EMA then applies, ``log(1 - (1 - theta))``.

    From a Python number both are formed in float64 and rounded once: ``1 - theta`` rounded from
    float32's ``theta`` would lose most of its digits for theta near 1. The log is that of the
    rounded gap, so that the bias correction divides out the decay the EMA really applies.
    """
    if is_concrete_number(theta):
        rounded = np.float32(1.0 - float(theta))
        return rounded, np.float32(math.log1p(-float(rounded)))
    gap = 1 - jnp.asarray(theta, jnp.float32)
    return gap, jnp.log1p(-gap)


def _clip_entries(x: jax.Array, limit: jax.Array, scale: jax.Array) -> jax.Array:
    """Entries above ``limit`` in magnitude times ``scale``, in float32 (float64 for float64)."""
    wide = x.astype(accumulation_dtype(x.dtype))
    return jnp.where(
        jnp.abs(wide) > limit.astype(wide.dtype), wide * scale.astype(wide.dtype), wide
    )


def adaclip(
    theta: float = 0.999,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """AdaClip: clips each entry against a bias-corrected EMA of its leaf's largest magnitude.

    For each leaf ``i``, on a step whose gradient is entirely finite, with ``t`` the number of
    such steps (this one included):

        p_i    = max_j |g_ij|
        m_i   <- theta * m_i + (1 - theta) * p_i
        mhat_i = m_i / (1 - theta**t)
        g_ij  <- g_ij * mhat_i / p_i      where |g_ij| > mhat_i  (other entries unchanged)

    As in the reference code, the EMA takes this step's maximum first and the threshold is
    formed from the updated EMA, so on the first step ``mhat_i = p_i`` and nothing is clipped.
    Every entry above the threshold is multiplied by the same factor, so the entries keep their
    order and the largest lands on ``mhat_i``: this is a rescaling, not an element-wise clamp.
    Entries at or below ``mhat_i`` are returned bit for bit, and a leaf of zeros is unchanged.

    It fills the gap between [`clip_by_value`][optaxclip.clip_by_value], whose element bound is a
    fixed number chosen in advance, and the adaptive norm clippers
    ([`autoclip`][optaxclip.autoclip], [`zclip`][optaxclip.zclip], [`adagc`][optaxclip.adagc]),
    which scale whole tensors: the bound is on single entries and follows each leaf's own history,
    so a spike in a few entries is pulled back while the rest of the leaf keeps its values.
    Stable-SPAM applies it before Adam, followed by a normalisation of each tensor's norm (AdaGN),
    which this transform does not include.

    Departures from the reference code, on edge cases only: a step holding NaN or Inf changes
    no statistic and does not advance ``t`` (``nonfinite`` decides what happens to the
    gradient); a leaf whose ``mhat_i`` is 0 (only zero gradients so far, or an EMA of
    magnitudes below float32's normal range, which XLA on CPU flushes to 0) is not clipped.

    Args:
      theta: the EMA decay, in (0, 1) (the reference's ``gamma3``).
      nonfinite: what a gradient holding NaN or Inf becomes: ``"propagate"`` (default)
        passes it through unscaled, ``"zero"`` makes the update all zeros, ``"error"``
        raises ``FloatingPointError`` naming the first non-finite leaf.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split across;
        each leaf's largest magnitude is then that of the whole leaf.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"adaclip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is an
      [`AdaClipState`][optaxclip.AdaClipState]. Its ``ClipStats`` report the global L2 norms before
      and after, ``threshold`` = the smallest ``mhat_i`` over the leaves where it is above 0
      (``inf`` if none; on a non-finite step, that of the statistics kept), and ``clipped_fraction``
      = the fraction of all entries scaled. Each output leaf keeps its dtype; fp16/bf16 leaves are
      clipped in float32 and rounded once.

    Raises:
      ValueError: ``theta`` outside (0, 1) or NaN, an unknown ``nonfinite``; at ``update``, a
        gradient with a different number of leaves than the ``init`` parameters.
      TypeError: an integer or complex leaf (names its path).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> clipper = optaxclip.adaclip(theta=0.5)  # a short memory, for the example
      >>> state = clipper.init({"w": jnp.zeros(3)})
      >>> _, state = clipper.update({"w": jnp.array([1.0, -0.5, 0.25])}, state)
      >>> print(round(float(state.stats.threshold), 4))  # the first step's own max |g|
      1.0
      >>> clipped, state = clipper.update({"w": jnp.array([4.0, -3.5, 2.0])}, state)
      >>> print(round(float(state.stats.threshold), 4))  # (0.25 * 1 + 0.5 * 4) / 0.75
      3.0
      >>> print(jnp.round(clipped["w"], 4))  # 4 and -3.5 times 3 / 4
      [ 3.    -2.625  2.   ]
      >>> print(round(float(state.stats.clipped_fraction), 4))
      0.6667

    References:
      Huang, Lv, Zhang, Wang, Yin, Pechenizkiy, Wang & Liu, "Stable-SPAM: How to Train in 4-Bit
      More Stably than 16-Bit Adam", 2025 (https://arxiv.org/abs/2502.17055); reference code
      https://github.com/TianjinYellow/StableSPAM (``galore_torch/stablespam.py``).
    """
    check_open_unit(theta, "theta", call="adaclip")
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "adaclip")
    gap, log_decay = _decay_terms(theta)

    def statistics(operands: Any) -> tuple[jax.Array, ...]:
        """The new EMA and count, and each leaf's threshold and scale, as vectors."""
        ema, count, peaks, finite = operands
        f32 = jnp.float32
        count = count + finite.astype(jnp.int32)
        # theta * m + (1 - theta) * p, written with the gap alone: theta itself, rounded to
        # float32, is not needed.
        ema = jnp.where(finite, ema + jnp.asarray(gap, f32) * (peaks - ema), ema)
        debias = -jnp.expm1(count.astype(f32) * jnp.asarray(log_decay, f32))
        # On the first finite step the bias correction undoes the EMA's weight exactly, and the
        # threshold is that step's own maximum: a rounded quotient could fall below it and
        # clip the largest entry by one ulp where the method clips nothing.
        corrected = jnp.where(finite & (count == 1), peaks, safe_divide(ema, debias))
        limits = jnp.where(corrected > 0, corrected, jnp.inf)
        scales = jnp.where(peaks > limits, safe_divide(corrected, peaks), 1)
        return ema, count, limits.astype(f32), scales.astype(f32)

    def init_fn(params: Any) -> AdaClipState:
        check_params(params)
        check_real_leaves(jax.tree_util.tree_leaves_with_path(params), "params", label)
        # Every field gets its own buffer, so that the state can be donated to a jitted update.
        return AdaClipState(
            max_ema=jnp.zeros((len(jax.tree_util.tree_leaves(params)),), jnp.float32),
            finite_steps=jnp.zeros((), jnp.int32),
            stats=initial_stats(label),
        )

    def update_fn(
        updates: Any, state: AdaClipState, params: Any = None
    ) -> tuple[Any, AdaClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        check_real_leaves(zip(paths, leaves, strict=True), "updates", label)
        if len(leaves) != state.max_ema.shape[-1]:
            raise ValueError(
                f"{label}: the gradient has {len(leaves)} leaves but the state was initialised "
                f"for {state.max_ema.shape[-1]}; call init with parameters shaped like the "
                f"gradient."
            )
        steps = state.stats.steps + 1
        if not leaves:
            return updates, state._replace(stats=nothing_clipped(label, steps))

        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        # Each leaf's largest magnitude over all its blocks; NaN or Inf anywhere shows in it
        # (XLA's maximum propagates NaN, and ``pmax`` keeps it across devices), so one plain
        # reduction suffices, without the full-size temporary of ``abs_max``.
        peaks = lowering.stack_against_chain_rewrite(
            [
                pmax(abs_max_for_scaling(x, jnp.dtype(jnp.float32)), axes)
                for x, axes in zip(leaves, leaf_axes, strict=True)
            ]
        )
        finite = jnp.all(jnp.isfinite(peaks))
        policy.raise_if_nonfinite(finite, paths, leaves, label)
        ema, count, limits, scales = lowering.computed_before_fusion(
            statistics, (state.max_ema, state.finite_steps, peaks, finite), peaks[0]
        )
        limit_of, scale_of = lowering.entries_per_leaf([limits, scales])

        def clipped_term(i: int) -> Any:
            return lambda x, twin: _clip_entries(x, limit_of[i], scale_of[i])

        def count_term(i: int) -> Any:
            def count(x: jax.Array, twin: int) -> jax.Array:
                wide = jnp.abs(x.astype(accumulation_dtype(x.dtype)))
                return jnp.sum(wide > limit_of[i].astype(wide.dtype), dtype=jnp.float32)

            return count

        pre = norm_of_leaves(leaves, 2.0, leaf_axes)
        # The post-clip norm and the count are measured on the inputs, clipped as they are
        # read, so that the output has no consumer besides what follows the clipper.
        post_if_finite = norm_of_leaves(
            leaves,
            2.0,
            leaf_axes,
            transforms=[clipped_term(i) for i in range(len(leaves))],
            view=ReadView.CLAMPED_NORM,
        )
        n_clipped = sum_of_leaves(
            leaves,
            leaf_axes,
            [count_term(i) for i in range(len(leaves))],
            view=ReadView.OUTSIDE_COUNT,
        )
        # Each output may be written over its donated input, so every reduction reading that
        # input runs first.
        ready = lowering.after_reads(finite, [post_if_finite, n_clipped])
        clipped = [
            _clip_entries(x, limit, scale).astype(x.dtype)
            for x, limit, scale in zip(leaves, limit_of, scale_of, strict=True)
        ]
        out = policy.select(leaves, clipped, ready)
        total = sum_across_devices([jnp.asarray(x.size, jnp.float32) for x in leaves], leaf_axes)
        fraction = policy.report(
            finite, n_clipped / jnp.maximum(total, 1), if_zeroed=1.0, if_passed=0.0
        )
        stats = make_stats(
            label,
            steps=steps,
            pre_clip_norm=pre,
            post_clip_norm=policy.report(finite, post_if_finite, if_zeroed=0, if_passed=pre),
            threshold=jnp.min(limits),
            clipped_fraction=fraction,
        )
        new_state = AdaClipState(max_ema=ema, finite_steps=count, stats=stats)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
