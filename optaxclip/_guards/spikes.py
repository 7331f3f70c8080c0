"""skip_spikes: skip the optimizer step when the gradient norm or the loss spikes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._engine.clip import flatten_updates
from optaxclip._guards.common import check_inner, guarded_update, increment
from optaxclip._numerics.arithmetic import window_mean_std
from optaxclip._numerics.reductions import scaled_norm_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.validation import check_count, check_positive, normalize_ord

# Relative floor on the window's standard deviation: a perfectly flat history would
# otherwise flag any rounding-level increase as a spike.
_STD_FLOOR = 1e-6
_TINY = 1e-30


class SkipSpikesState(NamedTuple):
    """State of [`skip_spikes`][optaxclip.skip_spikes]: windows of accepted steps, and counters.

    The windows are float32 ring buffers.

    Attributes:
      inner_state: the wrapped optimizer's state (unchanged by skipped steps).
      norm_window: global gradient norms of the last ``window`` accepted steps.
      norm_count: how many norms have been written (int32; the window holds the last
        ``min(norm_count, window)``).
      loss_window: losses of the last accepted steps that passed ``loss=``.
      loss_count: how many losses have been written (int32).
      last_norm: the global gradient norm of the last step.
      norm_threshold: the norm above which the last step would have been skipped
        (``inf`` before ``min_history`` accepted steps).
      last_loss: the loss of the last step (0 when none was passed).
      loss_threshold: the loss above which the last step would have been skipped
        (``inf`` before ``min_history`` losses, or when no loss was passed).
      skipped: whether the last step was skipped (bool).
      consecutive_skips: steps skipped in a row (int32).
      total_skipped: all skipped steps since ``init`` (int32).
    """

    inner_state: Any
    norm_window: jax.Array
    norm_count: jax.Array
    loss_window: jax.Array
    loss_count: jax.Array
    last_norm: jax.Array
    norm_threshold: jax.Array
    last_loss: jax.Array
    loss_threshold: jax.Array
    skipped: jax.Array
    consecutive_skips: jax.Array
    total_skipped: jax.Array


def _window_threshold(values: jax.Array, count: jax.Array, k: float, min_history: int) -> jax.Array:
    """``mean + k * std`` (Bessel-corrected, floored) of a ring buffer; inf if too short."""
    filled = jnp.minimum(count, values.shape[0])
    mean, std = window_mean_std(values, filled, ddof=1)
    std = jnp.maximum(std, jnp.maximum(_STD_FLOOR * jnp.abs(mean), _TINY))
    return jnp.where(filled >= min_history, mean + jnp.float32(k) * std, jnp.inf)


def _push(values: jax.Array, count: jax.Array, value: jax.Array, keep: jax.Array) -> tuple:
    slot = count % values.shape[0]
    values = values.at[slot].set(jnp.where(keep, value, values[slot]))
    return values, increment(count, keep)


def skip_spikes(
    inner: optax.GradientTransformation,
    *,
    window: int = 128,
    k: float = 6.0,
    min_history: int = 64,
    ord: float | int | str | None = None,
    max_consecutive_skips: int | None = None,
    axis_name: AxisName = None,
    layout: Layout = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the optimizer step when the gradient norm (or the loss) spikes.

    The guard keeps a rolling window of the global gradient norms (and of the losses, when
    ``update`` is given ``loss=``) of the last ``window`` *accepted* steps. Once at least
    ``min_history`` accepted values are in a window, a step is skipped when its value
    exceeds ``mean + k * std`` of that window (one-sided; std with Bessel's correction,
    floored at ``1e-6 * |mean|`` and at ``1e-30``). Norm and loss are tested separately:
    either spiking skips the step. A NaN/Inf norm or loss also skips, at any time. A skipped
    step gives a zero update and leaves the whole inner state unchanged, as
    [`skip_nonfinite`][optaxclip.skip_nonfinite] does. The window's sums run on values divided by a
    power of two near its largest, so the threshold is finite whenever its exact value is (the
    squares of values beyond the square root of the largest float would overflow).

    Only accepted steps enter the windows. OLMo-core, Levanter and MaxText append every
    step, spikes included; then one spike inflates the standard deviation for the next
    ``window`` steps and hides the spikes that follow it (they often come in bursts). The
    cost of the choice made here is that a lasting, legitimate jump in the norm (say, after
    a learning-rate or batch-size change) is skipped until ``max_consecutive_skips`` lets
    it through; set it when such jumps can happen.

    Args:
      inner: the optimizer (any ``optax.GradientTransformation``) to guard.
      window: the number of accepted steps the statistics cover (>= 2).
      k: how many standard deviations above the mean count as a spike (> 0).
      min_history: accepted steps needed before anything is skipped as a spike
        (2 <= ``min_history`` <= ``window``).
      ord: the order of the gradient norm (None means 2).
      max_consecutive_skips: None (default: never give up) or an integer >= 1: after that
        many spike skips in a row the next spike is applied (and enters the window), and the
        count restarts. Non-finite steps are always skipped.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is split
        across; the norm is then that of the whole gradient, the same on every device. A
        ``loss=`` passed there must already be the same on every device.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`SkipSpikesState`][optaxclip.SkipSpikesState] (holding the last norm, thresholds and skipped
      flag). It carries no ``ClipStats``, so [`clip_stats`][optaxclip.clip_stats] does not list it;
      read ``state.skipped``, ``state.last_norm`` and ``state.norm_threshold`` directly.

    Raises:
      TypeError: ``inner`` is not a gradient transformation, or a count is not an integer.
      ValueError: ``window < 2``, ``k <= 0``, ``min_history`` outside [2, ``window``],
        ``max_consecutive_skips < 1``, ``ord < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> import jax
      >>> tx = optaxclip.skip_spikes(optax.sgd(0.1), window=8, min_history=4)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05]:
      ...     _, state = update({"w": jnp.array([g, 0.0])}, state, params)
      >>> updates, state = update({"w": jnp.array([50.0, 0.0])}, state, params)
      >>> print(updates["w"], bool(state.skipped), int(state.total_skipped))
      [0. 0.] True 1

    References:
      OLMo-core ``SkipStepOptimizer`` (https://github.com/allenai/OLMo-core); Levanter
      ``skipstep.py``; MaxText ``skip_step_on_spikes``.
    """
    guarded = check_inner(inner)
    call = "skip_spikes"
    size = check_count(window, "window", minimum=2, call=call, injectable=False)
    check_positive(k, "k", call=call)
    history = check_count(min_history, "min_history", minimum=2, call=call, injectable=False)
    if history > size:
        raise ValueError(
            f"skip_spikes(min_history=...): must be <= window ({size}), got {history}."
        )
    p = normalize_ord(ord, call=call)
    limit = (
        None
        if max_consecutive_skips is None
        else check_count(
            max_consecutive_skips, "max_consecutive_skips", minimum=1, call=call, injectable=False
        )
    )
    normalize_axis_names(axis_name)

    def init_fn(params: Any) -> SkipSpikesState:
        # Every field gets its own buffer, so that the state can be donated to a jitted update.
        return SkipSpikesState(
            inner_state=guarded.init(params),
            norm_window=jnp.zeros((size,), jnp.float32),
            norm_count=jnp.zeros((), jnp.int32),
            loss_window=jnp.zeros((size,), jnp.float32),
            loss_count=jnp.zeros((), jnp.int32),
            last_norm=jnp.zeros((), jnp.float32),
            norm_threshold=jnp.asarray(jnp.inf, jnp.float32),
            last_loss=jnp.zeros((), jnp.float32),
            loss_threshold=jnp.asarray(jnp.inf, jnp.float32),
            skipped=jnp.asarray(False),
            consecutive_skips=jnp.zeros((), jnp.int32),
            total_skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: Any, state: SkipSpikesState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SkipSpikesState]:
        _, leaves, _ = flatten_updates(updates)
        axes = leaf_reduction_axes(updates, axis_name, layout)
        norm = scaled_norm_of_leaves(leaves, p, axes).saturated.astype(jnp.float32)
        norm_threshold = _window_threshold(state.norm_window, state.norm_count, k, history)
        spike = norm > norm_threshold
        finite = jnp.isfinite(norm)

        has_loss = extra_args.get("loss") is not None
        loss_threshold = _window_threshold(state.loss_window, state.loss_count, k, history)
        if has_loss:
            loss = jnp.asarray(extra_args["loss"], jnp.float32)
            if loss.ndim:
                raise ValueError(f"loss must be a scalar, got an array of shape {loss.shape}.")
            spike = spike | (loss > loss_threshold)
            finite = finite & jnp.isfinite(loss)
        else:
            loss = jnp.zeros((), jnp.float32)
            loss_threshold = jnp.asarray(jnp.inf, jnp.float32)

        spike = spike & finite
        if limit is not None:
            give_up = spike & (state.consecutive_skips >= limit)
        else:
            give_up = jnp.asarray(False)
        skip = ~finite | (spike & ~give_up)
        accept = ~skip

        new_updates, inner_state = guarded_update(
            guarded, accept, updates, state.inner_state, params, extra_args
        )
        norm_window, norm_count = _push(state.norm_window, state.norm_count, norm, accept)
        loss_window, loss_count = state.loss_window, state.loss_count
        if has_loss:
            loss_window, loss_count = _push(loss_window, loss_count, loss, accept)
        return new_updates, SkipSpikesState(
            inner_state=inner_state,
            norm_window=norm_window,
            norm_count=norm_count,
            loss_window=loss_window,
            loss_count=loss_count,
            last_norm=norm,
            norm_threshold=norm_threshold,
            last_loss=loss,
            loss_threshold=loss_threshold,
            skipped=skip,
            consecutive_skips=jnp.where(skip, increment(state.consecutive_skips, skip), 0).astype(
                jnp.int32
            ),
            total_skipped=increment(state.total_skipped, skip),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
