"""ZClip: clip the global norm when it is an outlier against an EMA of its mean and variance."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optaxclip._engine.clip import check_params, clip_to_global_norm, flatten_updates
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.arithmetic import power_of_two_divisor, safe_divide, safe_root
from optaxclip._numerics.reductions import scaled_norm_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats
from optaxclip._spec.validation import (
    check_count,
    check_name,
    check_number,
    check_open_unit,
    check_positive,
)

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")
_LARGEST = float(jnp.finfo(jnp.float32).max)


class ZClipState(NamedTuple):
    """State of :func:`zclip`. All statistics are float32, counters int32.

    Attributes:
      mean: the EMA of the gradient norm (meaningful once the warm-up is over).
      std: the square root of the EMA of its variance (stored as a standard deviation,
        which stays finite for every finite norm where the variance would overflow).
      warmup_norms: the finite norms seen during the warm-up (``warmup_steps`` slots).
      warmup_count: how many of them have been collected; the warm-up is over when it
        reaches ``warmup_steps``. Non-finite steps are not counted.
      stats: what the last update did (:class:`ClipStats`).
    """

    mean: jax.Array
    std: jax.Array
    warmup_norms: jax.Array
    warmup_count: jax.Array
    stats: ClipStats


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    *,
    mode: str = "zscore",
    clip_option: str = "adaptive_scaling",
    clip_factor: float = 1.0,
    max_grad_norm: float | None = None,
    skip_update_on_spike: bool = False,
    eps: float = 1e-6,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """ZClip: z-score based adaptive clipping of the global gradient norm.

    The global L2 norm ``g`` is tracked by an exponential moving average of its mean ``mu``
    and variance ``v`` (``sigma = sqrt(v)``). A step is a *spike* when ``g`` is an outlier:

    * ``mode="zscore"``: ``z = (g - mu) / (sigma + eps) > z_thresh``. The gradient is then
      scaled to the norm ``T``:

      - ``clip_option="adaptive_scaling"`` (the paper's "reciprocal" clipping):
        ``T = (mu + z_thresh**2 * sigma / z) * clip_factor``; the larger the outlier, the
        closer ``T`` is to ``mu``;
      - ``clip_option="mean"``: ``T = mu``.

    * ``mode="percentile"``: ``T = mu + z_thresh * sigma`` and the step is a spike when
      ``g > T`` (``clip_option`` is not used).

    The statistics are then updated with ``x = T`` on a spike and ``x = g`` otherwise:
    ``mu <- alpha * mu + (1 - alpha) * x`` and ``v <- alpha * v + (1 - alpha) * (x - mu)**2``
    with the *updated* ``mu``, as in the reference code. With ``skip_update_on_spike`` the
    statistics are left as they are on spikes. The state holds ``sigma`` rather than ``v``,
    updated as ``sqrt(alpha * sigma**2 + (1 - alpha) * (x - mu)**2)`` on terms divided by a
    power of two, so that the statistics stay finite for every finite norm (``v`` itself
    overflows float32 once ``sigma`` passes the square root of the largest float).

    For the first ``warmup_steps`` (finite) steps the raw norms are stored; when the
    buffer is full, ``mu`` and ``v`` start as their mean and population variance. No
    adaptive clipping happens during the warm-up.

    ``max_grad_norm`` is an extra fixed cap on every step (warm-up included). The
    reference implementation turns it on at 1.0 by default, which makes its defaults a
    fixed clip at 1.0 plus ZClip; here it defaults to ``None`` (off), so ``zclip()`` is
    pure ZClip. Pass ``max_grad_norm=1.0`` to get the reference's default behaviour. The
    cap does not change what enters the statistics (as in the reference).

    A step whose norm is NaN or Inf changes no statistic and does not count towards the
    warm-up; the gradient is handled by the ``nonfinite`` policy.

    The scaling is exact (``T / g``); the reference divides by ``g + 1e-6``.

    Args:
      alpha: the EMA decay, in (0, 1).
      z_thresh: the z-score above which a step is a spike (> 0); in percentile mode the
        number of standard deviations above the mean.
      warmup_steps: the number of finite steps whose norms initialise the statistics (>= 1).
      mode: ``"zscore"`` (default) or ``"percentile"``.
      clip_option: in zscore mode, ``"adaptive_scaling"`` (default) or ``"mean"``.
      clip_factor: multiplies the whole adaptive-scaling threshold (> 0); values below 1
        clip harder.
      max_grad_norm: an optional fixed cap on the global norm, applied on every step;
        ``None`` (default) disables it.
      skip_update_on_spike: if True, spikes do not update the statistics.
      eps: added to ``sigma`` in the z-score denominator (>= 0).
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``; see
        :mod:`optaxclip._engine.nonfinite`.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is split
        across; the norm is then that of the whole gradient.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        :func:`optaxclip.clip_by_global_norm`.
      name: label for :func:`optaxclip.clip_stats` (default ``"zclip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ZClipState`. Its
      ``ClipStats.threshold`` is the norm above which the step counts as clipped: during the
      warm-up ``max_grad_norm`` (``inf`` without it); afterwards the spike boundary
      (``mu + z_thresh * (sigma + eps)`` in zscore mode, ``mu + z_thresh * sigma`` in
      percentile mode), capped by ``max_grad_norm``. On a spike, ``post_clip_norm`` is
      the norm the gradient was scaled to.

    Raises:
      ValueError: ``alpha`` outside (0, 1), ``z_thresh <= 0``, ``clip_factor <= 0``,
        ``max_grad_norm <= 0``, ``eps < 0``, an unknown ``mode``, ``clip_option`` or
        ``nonfinite``.
      TypeError: ``warmup_steps`` not an integer, ``skip_update_on_spike`` not a bool,
        a non-float gradient leaf (names its path).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> clipper = optaxclip.zclip(warmup_steps=3)
      >>> state = clipper.init({"w": jnp.zeros(2)})
      >>> update = jax.jit(clipper.update)
      >>> for g in [1.0, 1.2, 0.8, 1.1]:  # three warm-up steps, then one normal step
      ...     _, state = update({"w": jnp.array([g, 0.0])}, state)
      >>> spike, state = update({"w": jnp.array([100.0, 0.0])}, state)
      >>> print(float(state.stats.pre_clip_norm), bool(state.stats.clipped_fraction))
      100.0 True
      >>> print(round(float(spike["w"][0]), 4))  # pulled back near the running mean
      1.0047

    References:
      Kumar, Owen, Roy Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training", 2025 (https://arxiv.org/abs/2504.02507); reference code
      https://github.com/bluorion-com/ZClip.
    """
    call = "zclip"
    check_open_unit(alpha, "alpha", call=call)
    check_positive(z_thresh, "z_thresh", call=call)
    warmup = check_count(warmup_steps, "warmup_steps", minimum=1, call=call)
    if mode not in _MODES:
        raise ValueError(f"zclip(mode=...): must be one of {_MODES}, got {mode!r}.")
    if clip_option not in _CLIP_OPTIONS:
        raise ValueError(
            f"zclip(clip_option=...): must be one of {_CLIP_OPTIONS}, got {clip_option!r}."
        )
    check_positive(clip_factor, "clip_factor", call=call)
    if max_grad_norm is not None:
        check_positive(max_grad_norm, "max_grad_norm", allow_inf=True, call=call)
    if not isinstance(skip_update_on_spike, (bool, np.bool_)):
        raise TypeError(
            f"zclip(skip_update_on_spike=...): must be a bool, got "
            f"{type(skip_update_on_spike).__name__}."
        )
    check_number(eps, "eps", allow_inf=False, call=call)
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "zclip")

    def init_fn(params: Any) -> ZClipState:
        check_params(params)
        # Every field gets its own buffer, so that the state can be donated to a jitted update.
        return ZClipState(
            mean=jnp.zeros((), jnp.float32),
            std=jnp.zeros((), jnp.float32),
            warmup_norms=jnp.zeros((warmup,), jnp.float32),
            warmup_count=jnp.zeros((), jnp.int32),
            stats=initial_stats(label),
        )

    def update_fn(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        scaled = scaled_norm_of_leaves(leaves, 2.0, leaf_reduction_axes(updates, axis_name, layout))
        norm = scaled.saturated
        f32 = jnp.float32
        g = norm.astype(f32)
        finite = jnp.isfinite(g)
        in_warmup = state.warmup_count < warmup
        cap = jnp.asarray(math.inf if max_grad_norm is None else max_grad_norm, f32)

        mean, std = state.mean, state.std
        z_th = jnp.asarray(z_thresh, f32)
        if mode == "zscore":
            denominator = std + jnp.asarray(eps, f32)
            # z of an exactly constant history (sigma + eps == 0) is +-inf or 0.
            z = jnp.where(
                denominator > 0,
                safe_divide(g - mean, denominator),
                jnp.where(g > mean, jnp.inf, jnp.where(g < mean, -jnp.inf, 0.0)),
            )
            spike = z > z_th
            boundary = mean + z_th * denominator
            if clip_option == "adaptive_scaling":
                # Grouped as the reference writes it: on a spike z_th * std < g - mean and
                # z / z_th > 1, so no intermediate exceeds the norm (z_th**2 * std could).
                target = (mean + z_th * std / (jnp.where(spike, z, 1) / z_th)) * jnp.asarray(
                    clip_factor, f32
                )
            else:
                target = mean
        else:
            boundary = mean + z_th * std
            spike = g > boundary
            target = boundary
        spike = spike & ~in_warmup & finite

        limit = jnp.where(spike, jnp.minimum(target, cap), cap)
        out, stats = clip_to_global_norm(
            paths, leaves, scaled, limit, policy, label, state.stats.steps + 1
        )
        reported = jnp.where(in_warmup, cap, jnp.minimum(boundary, cap))
        stats = stats._replace(threshold=reported.astype(f32))

        # Running statistics: untouched by non-finite steps and (optionally) by spikes.
        a = jnp.asarray(alpha, f32)
        # A clip_factor above 1 can carry the target past the largest float near the top of
        # the range; an infinite mean would switch the clipping off for good.
        x = jnp.where(spike, jnp.minimum(target, _LARGEST), g)
        ema_mean = a * mean + (1 - a) * x
        # sqrt(a * std**2 + (1 - a) * deviation**2), on terms divided by a power of two near
        # the larger one: the squares of norms beyond the square root of the largest float
        # would overflow, and an infinite std would switch the clipping off for good.
        deviation = x - ema_mean
        spread = power_of_two_divisor(jnp.maximum(std, jnp.abs(deviation)))
        ema_std = spread * safe_root(
            a * jnp.square(std / spread) + (1 - a) * jnp.square(deviation / spread), 2.0
        )
        update_ema = finite & ~in_warmup
        if skip_update_on_spike:
            update_ema = update_ema & ~spike

        collect = finite & in_warmup
        slot = jnp.minimum(state.warmup_count, warmup - 1)
        norms = state.warmup_norms.at[slot].set(jnp.where(collect, g, state.warmup_norms[slot]))
        count = state.warmup_count + collect.astype(jnp.int32)
        start = collect & (count == warmup)
        # The mean and the population standard deviation of the warm-up norms, each summed
        # on values divided by a power of two so that neither the sum nor the squares overflow.
        scale = power_of_two_divisor(jnp.max(norms))
        first_mean = scale * jnp.mean(norms / scale)
        deviations = norms - first_mean
        first_spread = power_of_two_divisor(jnp.max(jnp.abs(deviations)))
        first_std = first_spread * safe_root(jnp.mean(jnp.square(deviations / first_spread)), 2.0)

        new_mean = jnp.where(start, first_mean, jnp.where(update_ema, ema_mean, mean))
        new_std = jnp.where(start, first_std, jnp.where(update_ema, ema_std, std))
        new_state = ZClipState(
            mean=new_mean.astype(f32),
            std=new_std.astype(f32),
            warmup_norms=norms,
            warmup_count=count,
            stats=stats,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
