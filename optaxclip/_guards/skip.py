"""Guards: wrappers that skip a whole optimizer step (zero update, frozen inner state).

A skipped step is invisible to the wrapped optimizer: its moments, its step count (and so
its bias correction and any schedule it holds) and any clipper statistics inside it stay
bit for bit what they were. The guard itself keeps the counters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optaxclip._numerics.reductions import accumulation_dtype, norm_of_leaves, sum_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.validation import check_count, check_positive, normalize_ord
from optaxclip._transforms.static import flatten_updates

_INT32_MAX = jnp.iinfo(jnp.int32).max

# Relative floor on the window's standard deviation: a perfectly flat history would
# otherwise flag any rounding-level increase as a spike.
_STD_FLOOR = 1e-6
_TINY = 1e-30


def _increment(counter: jax.Array, condition: jax.Array) -> jax.Array:
    """``counter + 1`` where ``condition``, saturating at the int32 maximum."""
    return jnp.where(condition & (counter < _INT32_MAX), counter + 1, counter)


def _check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"inner must be an optax.GradientTransformation, got {type(inner).__name__}."
        )
    return optax.with_extra_args_support(inner)


def _loss_is_finite(extra_args: dict[str, Any]) -> jax.Array:
    loss = extra_args.get("loss")
    if loss is None:
        return jnp.asarray(True)
    return jnp.all(jnp.isfinite(jnp.asarray(loss)))


# The reductions of one step that read the same fp16/bf16 gradient must each read it through
# barriers of their own depth (see _numerics.behind_barriers): norm_of_leaves takes 0 (a
# global_norm of the gradient logged in the same step, a clip outside the guard) and
# clip_by_value's statistics 0 to 2. (The inner update runs inside the guard's conditional,
# apart from the check.)
_FINITE_CHECK_VIEW = 3


def _times_zero(x: jax.Array, twin: int) -> jax.Array:
    """The sum of ``x * 0``: 0 when every entry of ``x`` is finite, NaN otherwise."""
    del twin
    acc = accumulation_dtype(x.dtype)
    if jnp.iscomplexobj(x):
        return jnp.sum(jnp.real(x).astype(acc) * 0 + jnp.imag(x).astype(acc) * 0)
    return jnp.sum(x.astype(acc) * 0)


def _all_finite(leaves: list[jax.Array], axes: tuple[str, ...]) -> jax.Array:
    """Whether every entry of every leaf is finite, on every device along ``axes``.

    First the leaves' 2-norm, computed as every norm of ours is: a NaN or an infinity makes
    it non-finite, and finite entries do so only when the norm itself passes the float32
    range. Only when it is not finite, a conditional sums ``x * 0`` over the leaves (0 exactly
    when every entry is finite, NaN otherwise), so that a tree of huge but finite values is
    not taken for a non-finite one. The norm is the one reduction XLA:CPU reads without extra
    work in a training step: with the gradient computed in the same program, the sum of
    ``x * 0`` faulted in a second leaf-sized block of pages on every call (a guarded Adam step
    took 1.8x Adam's time on one 64M leaf, 1.4x with the norm first), and per leaf,
    ``all(isfinite(x))`` writes each leaf's flags out in full.
    """
    if not leaves:
        return jnp.asarray(True)
    n = len(leaves)
    finite = jnp.isfinite(norm_of_leaves(leaves, 2.0, [axes] * n, view=_FINITE_CHECK_VIEW))

    def exact(operands: list[jax.Array]) -> jax.Array:
        total = sum_of_leaves(operands, [axes] * n, [_times_zero] * n, view=_FINITE_CHECK_VIEW)
        return total == 0

    # The first branch returns ``finite`` itself (True there), not a constant: inside
    # shard_map without axis_name the decision varies along the leaves' axes, and both
    # branches must carry the same device-variance type.
    return lax.cond(finite, lambda _: finite, exact, leaves)


def _zeros_like_type(x: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of x's shape and dtype that vary over the same shard_map axes as x.

    Both branches of ``lax.cond`` must have the same type, and inside
    ``shard_map(check_vma=True)`` that includes the manual axes a value varies along.
    """
    zeros = jnp.zeros(x.shape, x.dtype)
    mat = getattr(x, "manual_axis_type", None)  # older JAX: ``x.vma``
    varying = tuple(
        sorted(
            (getattr(mat, "varying", None) if mat is not None else getattr(x, "vma", None)) or ()
        )
    )
    if not varying:
        return zeros
    if hasattr(lax, "pcast"):
        return lax.pcast(zeros, varying, to="varying")
    return getattr(lax, "pvary")(zeros, varying)  # noqa: B009 (absent from newer JAX)


def _guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    apply: jax.Array,
    updates: Any,
    inner_state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """Runs ``inner.update`` when ``apply``; otherwise zeros and the unchanged inner state."""

    def run() -> tuple[Any, Any]:
        return inner.update(updates, inner_state, params, **extra_args)

    # The zeros take the shapes and dtypes of what the inner update would return.
    shapes, _ = jax.eval_shape(run)

    def skip() -> tuple[Any, Any]:
        return jax.tree.map(_zeros_like_type, shapes), inner_state

    return lax.cond(apply, run, skip)


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`.

    Attributes:
      inner_state: the wrapped optimizer's state (unchanged by skipped steps).
      consecutive_errors: non-finite steps in a row so far (int32); reset to 0 by a finite
        step and by a give-up step.
      total_errors: all non-finite steps since ``init`` (int32, never reset).
      last_finite: whether the last step's gradient (and loss) was finite (bool).
    """

    inner_state: Any
    consecutive_errors: jax.Array
    total_errors: jax.Array
    last_finite: jax.Array


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    max_consecutive_errors: int | None = None,
    axis_name: AxisName = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips the optimizer step when the gradient (or the loss) holds NaN or Inf.

    On such a step the update is all zeros and the whole inner state is left exactly as it
    was: Adam's moments *and* its step count, so bias correction and schedules resume where
    they stopped. ``update`` accepts an optional ``loss=`` keyword; a non-finite loss skips
    too. Every extra keyword (``loss`` included) is forwarded to ``inner`` if it accepts
    extra arguments (``optax.GradientTransformationExtraArgs``), and dropped otherwise.

    Give-up (``max_consecutive_errors=N``): the first ``N`` non-finite steps in a row are
    skipped; the next one is applied as it is (as ``optax.apply_if_finite`` does), and that
    step resets ``consecutive_errors`` to 0, so the following ``N`` non-finite steps are
    skipped again. With ``N=2`` and six non-finite steps in a row: skip, skip, apply, skip,
    skip, apply. (``optax.apply_if_finite`` does not reset its counter, so it applies every
    further non-finite step until a finite one arrives.) ``None`` (default) never gives up.

    Args:
      inner: the optimizer (any ``optax.GradientTransformation``) to guard.
      max_consecutive_errors: None (never apply a non-finite step) or an integer >= 1.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is
        split across, so that every device takes the same decision when only one shard
        holds a NaN. (Under ``jit`` with sharded arrays no argument is needed.)

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SkipNonfiniteState`.

    Raises:
      TypeError: ``inner`` is not a gradient transformation, or ``max_consecutive_errors``
        is not an integer.
      ValueError: ``max_consecutive_errors < 1``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optaxclip.skip_nonfinite(optax.adam(0.1))
      >>> params = {"w": jnp.ones(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
      >>> print(updates["w"], int(state.total_errors), int(state.inner_state[0].count))
      [0. 0.] 1 0

    References:
      ``optax.apply_if_finite``; reset semantics as proposed in optax PR #1746
      (https://github.com/google-deepmind/optax/pull/1746).
    """
    guarded = _check_inner(inner)
    limit = (
        None
        if max_consecutive_errors is None
        else check_count(max_consecutive_errors, "max_consecutive_errors", minimum=1)
    )
    axes = normalize_axis_names(axis_name)

    def init_fn(params: Any) -> SkipNonfiniteState:
        return SkipNonfiniteState(
            inner_state=guarded.init(params),
            consecutive_errors=jnp.zeros((), jnp.int32),
            total_errors=jnp.zeros((), jnp.int32),
            last_finite=jnp.asarray(True),
        )

    def update_fn(
        updates: Any, state: SkipNonfiniteState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SkipNonfiniteState]:
        leaves = jax.tree_util.tree_leaves(updates)
        finite = _loss_is_finite(extra_args) & _all_finite(leaves, axes)
        consecutive = jnp.where(finite, 0, _increment(state.consecutive_errors, ~finite))
        give_up = ~finite & (consecutive > limit) if limit is not None else jnp.asarray(False)
        new_updates, inner_state = _guarded_update(
            guarded, finite | give_up, updates, state.inner_state, params, extra_args
        )
        return new_updates, SkipNonfiniteState(
            inner_state=inner_state,
            consecutive_errors=jnp.where(give_up, 0, consecutive).astype(jnp.int32),
            total_errors=_increment(state.total_errors, ~finite),
            last_finite=finite,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipSpikesState(NamedTuple):
    """State of :func:`skip_spikes`. Windows are float32 ring buffers of accepted steps.

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
    size = values.shape[0]
    filled = jnp.minimum(count, size)
    mask = jnp.arange(size) < filled
    n = jnp.maximum(filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(mask, values, 0)) / n
    var = jnp.sum(jnp.where(mask, jnp.square(values - mean), 0)) / jnp.maximum(n - 1, 1)
    std = jnp.maximum(jnp.sqrt(var), jnp.maximum(_STD_FLOOR * jnp.abs(mean), _TINY))
    return jnp.where(filled >= min_history, mean + jnp.float32(k) * std, jnp.inf)


def _push(values: jax.Array, count: jax.Array, value: jax.Array, keep: jax.Array) -> tuple:
    slot = count % values.shape[0]
    values = values.at[slot].set(jnp.where(keep, value, values[slot]))
    return values, _increment(count, keep)


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
    floored at ``1e-6 * |mean|``). Norm and loss are tested separately: either spiking skips
    the step. A NaN/Inf norm or loss also skips, at any time. A skipped step gives a zero
    update and leaves the whole inner state unchanged, as :func:`skip_nonfinite` does.

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
        :func:`optaxclip.clip_by_global_norm`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`SkipSpikesState`
      (holding the last norm, thresholds and skipped flag). It carries no ``ClipStats``, so
      :func:`optaxclip.clip_stats` does not list it; read ``state.skipped``,
      ``state.last_norm`` and ``state.norm_threshold`` directly.

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
    guarded = _check_inner(inner)
    size = check_count(window, "window", minimum=2)
    check_positive(k, "k")
    history = check_count(min_history, "min_history", minimum=2)
    if history > size:
        raise ValueError(f"min_history ({history}) must not exceed window ({size}).")
    p = normalize_ord(ord)
    limit = (
        None
        if max_consecutive_skips is None
        else check_count(max_consecutive_skips, "max_consecutive_skips", minimum=1)
    )
    normalize_axis_names(axis_name)

    def init_fn(params: Any) -> SkipSpikesState:
        zero_f = jnp.zeros((), jnp.float32)
        zero_i = jnp.zeros((), jnp.int32)
        return SkipSpikesState(
            inner_state=guarded.init(params),
            norm_window=jnp.zeros((size,), jnp.float32),
            norm_count=zero_i,
            loss_window=jnp.zeros((size,), jnp.float32),
            loss_count=zero_i,
            last_norm=zero_f,
            norm_threshold=jnp.asarray(jnp.inf, jnp.float32),
            last_loss=jnp.zeros((), jnp.float32),
            loss_threshold=jnp.asarray(jnp.inf, jnp.float32),
            skipped=jnp.asarray(False),
            consecutive_skips=zero_i,
            total_skipped=zero_i,
        )

    def update_fn(
        updates: Any, state: SkipSpikesState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SkipSpikesState]:
        _, leaves, _ = flatten_updates(updates)
        axes = leaf_reduction_axes(updates, axis_name, layout)
        norm = norm_of_leaves(leaves, p, axes).astype(jnp.float32)
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

        new_updates, inner_state = _guarded_update(
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
            consecutive_skips=jnp.where(skip, _increment(state.consecutive_skips, skip), 0).astype(
                jnp.int32
            ),
            total_skipped=_increment(state.total_skipped, skip),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
