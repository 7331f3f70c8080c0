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
    """State of [`zclip`][optaxclip.zclip]. All statistics are float32, counters int32.

    Attributes:
      mean: the EMA of the gradient norm (meaningful once the warm-up is over).
      std: the square root of the EMA of its variance (stored as a standard deviation,
        which stays finite for every finite norm where the variance would overflow).
      warmup_norms: the finite norms seen during the warm-up (``warmup_steps`` slots).
      warmup_count: how many of them have been collected; the warm-up is over when it
        reaches ``warmup_steps``. Non-finite steps are not counted.
      stats: what the last update did ([`ClipStats`][optaxclip.ClipStats]).
    """

    mean: jax.Array
    std: jax.Array
    warmup_norms: jax.Array
    warmup_count: jax.Array
    stats: ClipStats


class ZScoreStatistics(NamedTuple):
    """The running statistics of ZClip: the state of :func:`optaxclip.rules.zscore`.

    Each statistic is shaped like the norms it follows (a scalar for one global norm, one
    entry per leaf for per-leaf norms); the warm-up buffer has a leading axis of
    ``warmup_steps`` slots and the warm-up count is one scalar for all of them.

    Attributes:
      mean: the EMA of the norm (meaningful once the warm-up is over).
      std: the square root of the EMA of its variance (stored as a standard deviation,
        which stays finite for every finite norm where the variance would overflow).
      warmup_norms: the finite norms seen during the warm-up.
      warmup_count: how many steps have been collected; the warm-up is over when it reaches
        ``warmup_steps``. Non-finite steps are not counted.
    """

    mean: jax.Array
    std: jax.Array
    warmup_norms: jax.Array
    warmup_count: jax.Array


class ZScoreSettings(NamedTuple):
    """ZClip's hyperparameters, validated by :func:`zscore_settings`."""

    alpha: Any
    z_thresh: Any
    warmup: int
    mode: str
    clip_option: str
    clip_factor: Any
    cap: Any
    skip_update_on_spike: bool
    eps: Any


class SpikeTest(NamedTuple):
    """What ZClip decides on one step, elementwise over the norms.

    Attributes:
      in_warmup: whether the statistics are still being collected (a scalar).
      spike: whether the norm is an outlier (never during the warm-up or on a non-finite
        step).
      boundary: the norm above which a step is an outlier.
      target: the norm a spike is scaled to (before the cap).
    """

    in_warmup: jax.Array
    spike: jax.Array
    boundary: jax.Array
    target: jax.Array


def zscore_settings(
    alpha: Any,
    z_thresh: Any,
    warmup_steps: Any,
    mode: Any,
    clip_option: Any,
    clip_factor: Any,
    max_grad_norm: Any,
    skip_update_on_spike: Any,
    eps: Any,
    *,
    call: str,
) -> ZScoreSettings:
    """Checks ZClip's hyperparameters; messages start with ``call``, the function called."""
    check_open_unit(alpha, "alpha", call=call)
    check_positive(z_thresh, "z_thresh", call=call)
    warmup = check_count(warmup_steps, "warmup_steps", minimum=1, call=call)
    if mode not in _MODES:
        raise ValueError(f"{call}(mode=...): must be one of {_MODES}, got {mode!r}.")
    if clip_option not in _CLIP_OPTIONS:
        raise ValueError(
            f"{call}(clip_option=...): must be one of {_CLIP_OPTIONS}, got {clip_option!r}."
        )
    check_positive(clip_factor, "clip_factor", call=call)
    if max_grad_norm is not None:
        check_positive(max_grad_norm, "max_grad_norm", allow_inf=True, call=call)
    if not isinstance(skip_update_on_spike, (bool, np.bool_)):
        raise TypeError(
            f"{call}(skip_update_on_spike=...): must be a bool, got "
            f"{type(skip_update_on_spike).__name__}."
        )
    check_number(eps, "eps", allow_inf=False, call=call)
    cap = math.inf if max_grad_norm is None else max_grad_norm
    skip = bool(skip_update_on_spike)
    return ZScoreSettings(alpha, z_thresh, warmup, mode, clip_option, clip_factor, cap, skip, eps)


def initial_statistics(norms: jax.Array, warmup: int) -> ZScoreStatistics:
    """Empty statistics for norms shaped like ``norms``, with ``warmup`` buffer slots."""
    # Every field gets its own buffer, so that the state can be donated to a jitted update.
    return ZScoreStatistics(
        mean=jnp.zeros(norms.shape, jnp.float32),
        std=jnp.zeros(norms.shape, jnp.float32),
        warmup_norms=jnp.zeros((warmup, *norms.shape), jnp.float32),
        warmup_count=jnp.zeros((), jnp.int32),
    )


def spike_test(
    g: jax.Array, finite: jax.Array, stats: ZScoreStatistics, settings: ZScoreSettings
) -> SpikeTest:
    """ZClip's outlier test of the float32 norms ``g`` against the running statistics."""
    f32 = jnp.float32
    mean, std = stats.mean, stats.std
    z_th = jnp.asarray(settings.z_thresh, f32)
    if settings.mode == "zscore":
        denominator = std + jnp.asarray(settings.eps, f32)
        # z of an exactly constant history (sigma + eps == 0) is +-inf or 0.
        z = jnp.where(
            denominator > 0,
            safe_divide(g - mean, denominator),
            jnp.where(g > mean, jnp.inf, jnp.where(g < mean, -jnp.inf, 0.0)),
        )
        spike = z > z_th
        boundary = mean + z_th * denominator
        if settings.clip_option == "adaptive_scaling":
            # Grouped as the reference writes it: on a spike z_th * std < g - mean and
            # z / z_th > 1, so no intermediate exceeds the norm (z_th**2 * std could).
            target = (mean + z_th * std / (jnp.where(spike, z, 1) / z_th)) * jnp.asarray(
                settings.clip_factor, f32
            )
        else:
            target = mean
    else:
        boundary = mean + z_th * std
        spike = g > boundary
        target = boundary
    in_warmup = stats.warmup_count < settings.warmup
    return SpikeTest(in_warmup, spike & ~in_warmup & finite, boundary, target)


def clip_limit(test: SpikeTest, settings: ZScoreSettings) -> jax.Array:
    """The norm ZClip clips to: the capped target on a spike, the cap alone otherwise."""
    cap = jnp.asarray(settings.cap, jnp.float32)
    return jnp.where(test.spike, jnp.minimum(test.target, cap), cap)


def ema_statistics(
    x: jax.Array, mean: jax.Array, std: jax.Array, alpha: Any
) -> tuple[jax.Array, jax.Array]:
    """One EMA step of the mean and of the standard deviation towards ``x``.

    The variance's EMA uses the updated mean, as the reference code does.
    """
    a = jnp.asarray(alpha, jnp.float32)
    ema_mean = a * mean + (1 - a) * x
    # sqrt(a * std**2 + (1 - a) * deviation**2), on terms divided by a power of two near
    # the larger one: the squares of norms beyond the square root of the largest float
    # would overflow, and an infinite std would switch the clipping off for good.
    deviation = x - ema_mean
    spread = power_of_two_divisor(jnp.maximum(std, jnp.abs(deviation)))
    ema_std = spread * safe_root(
        a * jnp.square(std / spread) + (1 - a) * jnp.square(deviation / spread), 2.0
    )
    return ema_mean, ema_std


def warmup_moments(norms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and the population standard deviation of a warm-up buffer along axis 0.

    Each is summed on values divided by a power of two, so that neither the sum nor the
    squares overflow.
    """
    scale = power_of_two_divisor(jnp.max(norms, axis=0))
    mean = scale * jnp.mean(norms / scale, axis=0)
    deviations = norms - mean
    spread = power_of_two_divisor(jnp.max(jnp.abs(deviations), axis=0))
    return mean, spread * safe_root(jnp.mean(jnp.square(deviations / spread), axis=0), 2.0)


def advance_statistics(
    g: jax.Array,
    finite: jax.Array,
    test: SpikeTest,
    stats: ZScoreStatistics,
    settings: ZScoreSettings,
) -> ZScoreStatistics:
    """The statistics after a step: warm-up collection, then the EMA.

    Untouched by non-finite steps and (with ``skip_update_on_spike``) by spikes. The EMA is
    fed the target on a spike and the norm otherwise; the cap does not enter it.
    """
    f32 = jnp.float32
    # A clip_factor above 1 can carry the target past the largest float near the top of
    # the range; an infinite mean would switch the clipping off for good.
    x = jnp.where(test.spike, jnp.minimum(test.target, _LARGEST), g)
    ema_mean, ema_std = ema_statistics(x, stats.mean, stats.std, settings.alpha)
    update_ema = finite & ~test.in_warmup
    if settings.skip_update_on_spike:
        update_ema = update_ema & ~test.spike

    warmup = settings.warmup
    collect = finite & test.in_warmup
    slot = jnp.minimum(stats.warmup_count, warmup - 1)
    norms = stats.warmup_norms.at[slot].set(jnp.where(collect, g, stats.warmup_norms[slot]))
    count = stats.warmup_count + collect.astype(jnp.int32)
    start = collect & (count == warmup)
    first_mean, first_std = warmup_moments(norms)

    new_mean = jnp.where(start, first_mean, jnp.where(update_ema, ema_mean, stats.mean))
    new_std = jnp.where(start, first_std, jnp.where(update_ema, ema_std, stats.std))
    return ZScoreStatistics(
        mean=new_mean.astype(f32), std=new_std.astype(f32), warmup_norms=norms, warmup_count=count
    )


def zscore_step(
    g: jax.Array, stats: ZScoreStatistics, settings: ZScoreSettings
) -> tuple[SpikeTest, ZScoreStatistics]:
    """One step of ZClip on the float32 norms ``g``: the outlier test and the new statistics.

    A step counts as finite when every norm is.
    """
    finite = jnp.all(jnp.isfinite(g))
    test = spike_test(g, finite, stats, settings)
    return test, advance_statistics(g, finite, test, stats, settings)


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
      nonfinite: what a gradient holding NaN or Inf becomes: ``"propagate"`` (default)
        passes it through unscaled, ``"zero"`` makes the update all zeros, ``"error"``
        raises ``FloatingPointError`` naming the first non-finite leaf.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is split
        across; the norm is then that of the whole gradient.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"zclip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a [`ZClipState`][optaxclip.ZClipState]. Its
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
    settings = zscore_settings(
        alpha,
        z_thresh,
        warmup_steps,
        mode,
        clip_option,
        clip_factor,
        max_grad_norm,
        skip_update_on_spike,
        eps,
        call="zclip",
    )
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "zclip")

    def init_fn(params: Any) -> ZClipState:
        check_params(params)
        return ZClipState(
            **initial_statistics(jnp.zeros((), jnp.float32), settings.warmup)._asdict(),
            stats=initial_stats(label),
        )

    def update_fn(updates: Any, state: ZClipState, params: Any = None) -> tuple[Any, ZClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        scaled = scaled_norm_of_leaves(leaves, 2.0, leaf_reduction_axes(updates, axis_name, layout))
        statistics = ZScoreStatistics(state.mean, state.std, state.warmup_norms, state.warmup_count)
        test, statistics = zscore_step(scaled.saturated.astype(jnp.float32), statistics, settings)
        limit = clip_limit(test, settings)
        out, stats = clip_to_global_norm(
            paths, leaves, scaled, limit, policy, label, state.stats.steps + 1
        )
        cap = jnp.asarray(settings.cap, jnp.float32)
        reported = jnp.where(test.in_warmup, cap, jnp.minimum(test.boundary, cap))
        stats = stats._replace(threshold=reported.astype(jnp.float32))
        new_state = ZClipState(**statistics._asdict(), stats=stats)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
