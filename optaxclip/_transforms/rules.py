"""Ready threshold rules for [`clip_by_rule`][optaxclip.clip_by_rule], as ``optaxclip.rules``.

Each function returns a [`ClipRule`][optaxclip.ClipRule]. The rules are written with
broadcasting, so each serves both scopes: with ``scope="global"`` the state holds one value
per statistic, with ``scope="per_leaf"`` one per leaf.

* [`constant`][optaxclip.rules.constant]: a number or a schedule ``step -> value``
  (``clip_by_global_norm`` and ``clip_by_leaf_norm``);
* [`percentile`][optaxclip.rules.percentile]: the ``p``-th percentile of past norms (AutoClip);
* [`quantile`][optaxclip.rules.quantile]: a threshold that tracks a quantile of the norms in log
  space (Andrew et al.);
* [`zscore`][optaxclip.rules.zscore]: the limit ZClip clips an outlier to, from an EMA of the mean
  and std;
* [`ema_ratio`][optaxclip.rules.ema_ratio]: a multiple of an EMA of past clipped norms (AdaGC,
  OLMo);
* [`mean_std`][optaxclip.rules.mean_std]: mean + k std of the last norms (Levanter's update-norm
  clipping).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optaxclip._numerics.arithmetic import window_mean_std
from optaxclip._spec.thresholds import Threshold
from optaxclip._spec.validation import (
    check_closed_interval,
    check_count,
    check_number,
    check_open_unit,
    check_positive,
)
from optaxclip._transforms.adagc import ema_ratio_step
from optaxclip._transforms.rule import ClipRule
from optaxclip._transforms.zclip import clip_limit, initial_statistics, zscore_settings, zscore_step

# The quantile rule's threshold stays within the positive normal float32 range, so a long run
# of zero gradients cannot drive it to 0 (from which a geometric update never recovers).
_SMALLEST = float(jnp.finfo(jnp.float32).tiny)
_LARGEST = float(jnp.finfo(jnp.float32).max)


def constant(value: Any) -> ClipRule:
    """A threshold that is a number (>= 0) or a schedule ``step -> value``.

    ``clip_by_rule(constant(c))`` clips as ``clip_by_global_norm(c)``, and with
    ``scope="per_leaf"`` as ``clip_by_leaf_norm(c)``.

    Args:
      value: a number >= 0, or a callable ``step -> value`` (an Optax schedule).

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] with an empty state.

    Raises:
      ValueError: a negative or NaN number.
      TypeError: neither a number nor a schedule.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_rule(optaxclip.rules.constant(1.0))
      >>> print(tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))[0]["w"])
      [0.6 0.8]
    """
    threshold = Threshold(value, "value", per_leaf=False, call="rules.constant")
    threshold.check_schedule_start()

    def init(norms: jax.Array) -> tuple[()]:
        del norms
        return ()

    def update(norms: jax.Array, state: tuple[()], step: jax.Array) -> tuple[jax.Array, Any]:
        del norms
        return threshold.scalar(step), state

    return ClipRule(init, update)


class PercentileState(NamedTuple):
    """State of [`percentile`][optaxclip.rules.percentile]: a ring buffer of past finite norms."""

    history: jax.Array
    next_slot: jax.Array
    filled: jax.Array


def history_percentile(history: jax.Array, filled: jax.Array, percentile: Any) -> jax.Array:
    """The ``percentile``-th percentile of ``history[:filled]`` along axis 0, like NumPy's.

    Linear interpolation between the two nearest ranks (NumPy's default ``"linear"``
    method). The unused entries are masked with +inf so a single sort of the fixed-size
    buffer puts the valid values first; the rank index is computed from ``filled``, so the
    function jits with a traced ``filled`` and ``percentile``. Returns +inf when ``filled``
    is 0.
    """
    size = history.shape[0]
    used = (jnp.arange(size) < filled).reshape((size,) + (1,) * (history.ndim - 1))
    ordered = jnp.sort(jnp.where(used, history, jnp.inf), axis=0)
    last = jnp.maximum(filled - 1, 0)
    position = jnp.asarray(percentile, jnp.float32) * last.astype(jnp.float32) / 100.0
    position = jnp.clip(position, 0.0, last.astype(jnp.float32))
    lower = jnp.floor(position)
    weight = position - lower
    low_index = lower.astype(jnp.int32)
    below = ordered[low_index]
    above = ordered[jnp.minimum(low_index + 1, last)]
    # NumPy's two-sided lerp, exact at both ends of the interval.
    value = jnp.where(
        weight < 0.5, below + (above - below) * weight, above - (above - below) * (1 - weight)
    )
    return jnp.where(filled > 0, value, jnp.inf)


def percentile(p: float = 10.0, history_size: int = 1000) -> ClipRule:
    """AutoClip's rule: the ``p``-th percentile of the norms seen so far, this one included.

        history <- history + [norms]          (the last history_size finite steps)
        threshold = percentile(history, p)

    Only finite steps are recorded (a step counts as finite when all its norms are); before
    any, the threshold is +inf.

    Args:
      p: the percentile, in [0, 100].
      history_size: how many past steps the percentile covers (>= 1).

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] whose state is a
      [`PercentileState`][optaxclip.rules.PercentileState].

    Raises:
      ValueError: ``p`` outside [0, 100], ``history_size < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> rule = optaxclip.rules.percentile(50.0, history_size=10)
      >>> tx = optaxclip.clip_by_rule(rule, scope="per_leaf")
      >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
      >>> for a, b in ((1.0, 4.0), (3.0, 2.0)):
      ...     clipped, state = tx.update({"a": jnp.array([a]), "b": jnp.array([b])}, state)
      >>> print(clipped["a"], clipped["b"])
      [2.] [2.]

    References:
      Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for
      Source Separation Networks", IEEE MLSP 2020 (https://arxiv.org/abs/2007.14469).
    """
    call = "rules.percentile"
    check_closed_interval(p, "p", 0.0, 100.0, call=call)
    size = check_count(history_size, "history_size", minimum=1, call=call)

    def init(norms: jax.Array) -> PercentileState:
        return PercentileState(
            history=jnp.zeros((size, *norms.shape), jnp.float32),
            next_slot=jnp.zeros((), jnp.int32),
            filled=jnp.zeros((), jnp.int32),
        )

    def update(
        norms: jax.Array, state: PercentileState, step: jax.Array
    ) -> tuple[jax.Array, PercentileState]:
        del step
        recorded = norms.astype(jnp.float32)
        keep = jnp.all(jnp.isfinite(recorded))
        history = jnp.where(keep, state.history.at[state.next_slot].set(recorded), state.history)
        next_slot = jnp.where(keep, (state.next_slot + 1) % size, state.next_slot)
        filled = jnp.where(keep, jnp.minimum(state.filled + 1, size), state.filled)
        threshold = history_percentile(history, filled, p)
        return threshold, PercentileState(
            history=history,
            next_slot=next_slot.astype(jnp.int32),
            filled=filled.astype(jnp.int32),
        )

    return ClipRule(init, update)


def quantile(
    target_quantile: float = 0.5, learning_rate: float = 0.2, initial_threshold: float = 0.1
) -> ClipRule:
    """The rule of Andrew et al.: a threshold that settles at a quantile of the norms.

        threshold = C_t
        b_t  = 1 if norm_t <= C_t else 0
        C_{t+1} = C_t * exp(-learning_rate * (b_t - target_quantile))

    C is kept within the positive normal float32 range; a step with a non-finite norm leaves
    it unchanged.

    Args:
      target_quantile: gamma in [0, 1], the fraction of steps to leave unclipped.
      learning_rate: eta >= 0, the step size in log space.
      initial_threshold: C_0 > 0.

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] whose state is the threshold C (an array shaped like the
      norms).

    Raises:
      ValueError: ``target_quantile`` outside [0, 1], a negative ``learning_rate``, an
        ``initial_threshold`` that is not > 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> rule = optaxclip.rules.quantile(0.5, learning_rate=0.2, initial_threshold=1.0)
      >>> tx = optaxclip.clip_by_rule(rule)
      >>> clipped, state = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> print(clipped["w"], round(float(state.rule_state), 4))
      [0.6 0.8] 1.1052

    References:
      Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
      Clipping", NeurIPS 2021 (https://arxiv.org/abs/1905.03871).
    """
    call = "rules.quantile"
    check_closed_interval(target_quantile, "target_quantile", 0.0, 1.0, call=call)
    check_number(learning_rate, "learning_rate", allow_inf=False, call=call)
    check_positive(initial_threshold, "initial_threshold", call=call)

    def init(norms: jax.Array) -> jax.Array:
        start = jnp.clip(jnp.asarray(initial_threshold, jnp.float32), _SMALLEST, _LARGEST)
        return jnp.full(norms.shape, start, jnp.float32)

    def update(norms: jax.Array, limit: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
        del step
        unclipped = (norms <= limit.astype(norms.dtype)).astype(jnp.float32)
        change = jnp.asarray(learning_rate, jnp.float32) * (
            unclipped - jnp.asarray(target_quantile, jnp.float32)
        )
        moved = jnp.clip(limit * jnp.exp(-change), _SMALLEST, _LARGEST)
        return limit, jnp.where(jnp.isfinite(norms), moved, limit).astype(jnp.float32)

    return ClipRule(init, update)


def zscore(
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
) -> ClipRule:
    """ZClip's rule: a norm that is an outlier against an EMA of its mean and std is clipped.

        z = (norm - mu) / (sigma + eps);  spike = z > z_thresh        (after the warm-up)
        T = (mu + z_thresh**2 * sigma / z) * clip_factor              (T = mu for "mean")
        threshold = min(T, max_grad_norm) on a spike, else max_grad_norm
        mu <- alpha * mu + (1 - alpha) * x
        sigma**2 <- alpha * sigma**2 + (1 - alpha) * (x - mu)**2      (with the new mu)

    with ``x = T`` on a spike, the norm otherwise; ``mode="percentile"`` has
    ``T = mu + z_thresh * sigma`` and ``spike = norm > T``. The first ``warmup_steps`` finite
    steps only collect norms; ``mu`` and ``sigma`` start as their mean and population std.
    These are the statistics of [`zclip`][optaxclip.zclip], whose ``ClipStats.threshold`` is the
    spike boundary where this rule's is the limit clipped to.

    Args:
      alpha: the EMA decay, in (0, 1).
      z_thresh: the z-score above which a norm is a spike (> 0).
      warmup_steps: finite steps whose norms start the statistics (>= 1).
      mode: ``"zscore"`` (default) or ``"percentile"``.
      clip_option: in zscore mode, ``"adaptive_scaling"`` (default) or ``"mean"``.
      clip_factor: multiplies the adaptive-scaling target (> 0).
      max_grad_norm: a fixed cap on every step (> 0), or None (default) for none.
      skip_update_on_spike: if True, spikes leave the statistics unchanged.
      eps: added to ``sigma`` in the z-score (>= 0).

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] whose state is a NamedTuple ``(mean, std, warmup_norms,
      warmup_count)``.

    Raises:
      ValueError, TypeError: as [`zclip`][optaxclip.zclip], naming ``rules.zscore``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_rule(optaxclip.rules.zscore(warmup_steps=3))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in [1.0, 1.2, 0.8, 1.1, 100.0]:  # three warm-up steps, one normal, one spike
      ...     clipped, state = tx.update({"w": jnp.array([g, 0.0])}, state)
      >>> print(round(float(clipped["w"][0]), 4), round(float(state.stats.threshold), 4))
      1.0047 1.0047

    References:
      Kumar, Owen, Roy Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM
      Pre-Training", 2025 (https://arxiv.org/abs/2504.02507).
    """
    args = (alpha, z_thresh, warmup_steps, mode, clip_option, clip_factor, max_grad_norm)
    settings = zscore_settings(*args, skip_update_on_spike, eps, call="rules.zscore")
    init = functools.partial(initial_statistics, warmup=settings.warmup)

    def update(norms: jax.Array, state: Any, step: jax.Array) -> tuple[jax.Array, Any]:
        del step
        test, statistics = zscore_step(norms, state, settings)
        return clip_limit(test, settings), statistics

    return ClipRule(init, update)


def ema_ratio(relative_factor: float = 1.05, beta: float = 0.98) -> ClipRule:
    """A multiple of an EMA of past clipped norms: AdaGC's rule, OLMo's ``max_grad_norm_ratio``.

        threshold = relative_factor * gamma             (+inf while gamma is 0: not set)
        gamma <- beta * gamma + (1 - beta) * min(norm, threshold)

    ``gamma`` starts at the first nonzero finite norm; a non-finite step changes nothing. Per
    leaf it is AdaGC's per-tensor rule after its warm-up, ``h_i = min(1, lambda_rel *
    gamma_i / ||g_i||)``, ``gamma_i <- beta * gamma_i + (1 - beta) * ||h_i g_i||`` (AdaGC-Global
    in the global scope); [`adagc`][optaxclip.adagc] adds a warm-up of global clipping that
    starts ``gamma_i`` at the smallest clipped norm. OLMo's ``max_grad_norm_ratio=r`` is this
    rule per parameter with ``relative_factor=r``, ``beta=max(beta1, beta2)`` of its AdamW.
    Both scale by ``threshold / (norm + 1e-6)``; the scaling here is exact.

    Args:
      relative_factor: how far above the EMA a norm may go (> 0).
      beta: the EMA decay, in (0, 1).

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] whose state is ``gamma`` (float32, shaped like the norms).

    Raises:
      ValueError: ``relative_factor <= 0``, ``beta`` outside (0, 1).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_rule(optaxclip.rules.ema_ratio(), scope="per_leaf")
      >>> state = tx.init({"a": jnp.zeros(1), "b": jnp.zeros(1)})
      >>> for a in (1.0, 1.0, 10.0):  # a spike in "a" only
      ...     clipped, state = tx.update({"a": jnp.array([a]), "b": jnp.array([2.0])}, state)
      >>> print(clipped["a"], clipped["b"])
      [1.05] [2.]

    References:
      Wang, Li, Chen, Zeng, Yang, Yu, Ma & Shen, "AdaGC: Improving Training Stability for
      Large Language Model Pretraining", 2025 (https://arxiv.org/abs/2502.11034); OLMo,
      ``olmo/optim.py`` (https://github.com/allenai/OLMo).
    """
    check_positive(relative_factor, "relative_factor", call="rules.ema_ratio")
    check_open_unit(beta, "beta", call="rules.ema_ratio")

    def update(norms: jax.Array, gamma: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
        del step
        return ema_ratio_step(norms, gamma, relative_factor, beta)

    return ClipRule(jnp.zeros_like, update)  # gamma 0: not set yet


class MeanStdState(NamedTuple):
    """State of [`mean_std`][optaxclip.rules.mean_std]: a ring buffer of the last finite norms.

    The norms are recorded unclipped.
    """

    history: jax.Array
    next_slot: jax.Array
    filled: jax.Array


def mean_std(k: float = 3.0, window: int = 128, min_history: int | None = None) -> ClipRule:
    """Levanter's update-norm rule: ``mean + k * std`` of the last norms, this one excluded.

        threshold = mean(history) + k * max(std(history), 1e-6)   (+inf before min_history)
        history <- history + [norms]                              (the last window finite steps)

    with the population std. Every finite norm is recorded unclipped, as Levanter does "to
    prevent collapse" (a history of clipped norms could only shrink). After the optimizer it
    clips the *update* as Levanter's ``clip_update_by_historical_norm`` does:
    ``optax.chain(optax.adam(lr), optaxclip.clip_by_rule(optaxclip.rules.mean_std()))``.
    Levanter also records non-finite norms and scales by ``threshold / max(norm, 1e-6)``;
    here the scaling is exact.

    Args:
      k: how many standard deviations above the mean a norm may go (>= 0).
      window: how many past steps the statistics cover (>= 2).
      min_history: norms needed before anything is clipped, in [1, ``window``]; None
        (default) means Levanter's ``max(2, window // 2)``.

    Returns:
      A [`ClipRule`][optaxclip.ClipRule] whose state is a
      [`MeanStdState`][optaxclip.rules.MeanStdState].

    Raises:
      ValueError: ``k < 0``, ``window < 2``, ``min_history`` outside [1, ``window``].
      TypeError: ``window`` or ``min_history`` not an integer.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.clip_by_rule(optaxclip.rules.mean_std(k=3.0, window=8, min_history=2))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for g in (1.0, 3.0, 10.0):  # then the threshold is 2 + 3 * 1
      ...     clipped, state = tx.update({"w": jnp.array([g, 0.0])}, state)
      >>> print(clipped["w"], float(state.stats.threshold))
      [5. 0.] 5.0

    References:
      Levanter, ``src/levanter/optim/clip_update_norm.py`` (github.com/stanford-crfm/levanter).
    """
    call = "rules.mean_std"
    check_number(k, "k", allow_inf=False, call=call)
    size = check_count(window, "window", minimum=2, call=call)
    needed = max(2, size // 2)
    if min_history is not None:
        needed = check_count(min_history, "min_history", minimum=1, call=call)
        check_closed_interval(needed, "min_history", 1, size, call=call)

    def init(norms: jax.Array) -> MeanStdState:
        history = jnp.zeros((size, *norms.shape), jnp.float32)
        return MeanStdState(history, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(norms: jax.Array, state: MeanStdState, step: jax.Array) -> tuple[Any, Any]:
        del step
        mean, std = window_mean_std(state.history, state.filled, ddof=0)
        threshold = mean + jnp.asarray(k, jnp.float32) * jnp.maximum(std, jnp.float32(1e-6))
        threshold = jnp.where(state.filled >= needed, threshold, jnp.inf)
        keep = jnp.all(jnp.isfinite(norms))
        history = jnp.where(keep, state.history.at[state.next_slot].set(norms), state.history)
        return threshold, MeanStdState(
            history,
            jnp.where(keep, (state.next_slot + 1) % size, state.next_slot),
            jnp.where(keep, jnp.minimum(state.filled + 1, size), state.filled),
        )

    return ClipRule(init, update)
