"""AutoClip: clip to a percentile of the gradient norms seen so far."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._engine.clip import check_params, clip_to_global_norm, flatten_updates
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.reductions import scaled_norm_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats
from optaxclip._spec.validation import (
    check_closed_interval,
    check_count,
    check_name,
    normalize_ord,
)


class AutoClipState(NamedTuple):
    """State of :func:`autoclip`.

    Attributes:
      history: float32 ring buffer of the last ``history_size`` finite global norms (the
        entries past ``filled`` are unused).
      next_slot: int32 index the next finite norm is written to.
      filled: int32 number of valid entries, ``min(finite norms recorded, history_size)``.
      stats: what the last update did; ``stats.steps`` counts every update, the non-finite
        ones included.
    """

    history: jax.Array
    next_slot: jax.Array
    filled: jax.Array
    stats: ClipStats


def history_percentile(history: jax.Array, filled: jax.Array, percentile: Any) -> jax.Array:
    """The ``percentile``-th percentile of ``history[:filled]``, like ``numpy.percentile``.

    Linear interpolation between the two nearest ranks (NumPy's default ``"linear"``
    method). The unused entries are masked with +inf so a single sort of the fixed-size
    buffer puts the valid values first; the rank index is computed from ``filled``, so the
    function jits with a traced ``filled`` and ``percentile``. Returns +inf when ``filled``
    is 0.
    """
    size = history.shape[0]
    ordered = jnp.sort(jnp.where(jnp.arange(size) < filled, history, jnp.inf))
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


def autoclip(
    percentile: float = 10.0,
    *,
    history_size: int = 1000,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clips the global norm to a percentile of the norms seen so far (AutoClip).

    At each step the current global norm ``||g_t||`` is recorded first, then the threshold
    is the ``percentile``-th percentile (NumPy's linear interpolation) of the recorded
    norms, and the whole gradient is scaled down to it::

        history <- history + [||g_t||]          (the last history_size finite norms)
        eta_t    = percentile(history, p)
        g_t     <- g_t * min(1, eta_t / ||g_t||)

    Because the current norm is included, step 1 is never clipped (the threshold is that
    norm). Once ``history_size`` norms are recorded, each new norm overwrites the oldest, so
    the threshold follows a sliding window. Multiplying the loss by a constant multiplies
    every norm and therefore the threshold by it: the fraction of steps clipped does not
    depend on the loss scale. A non-finite norm is never recorded: on such a step the
    history is unchanged, the threshold is that of the recorded norms, and ``nonfinite``
    decides what happens to the gradient.

    Args:
      percentile: p in [0, 100]. The paper recommends 10 (about 90% of steps clipped);
        100 never clips, 0 clips every step to the smallest norm in the window.
      history_size: the window length (number of past norms kept), a static int >= 1. With
        ``optax.inject_hyperparams`` pass ``static_args=("history_size",)``.
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the gradient is split across.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        :func:`clip_by_global_norm`.
      name: label for :func:`clip_stats` (default ``"autoclip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is an ``AutoClipState`` (a float32
      buffer of ``history_size`` norms, two int32 counters and the stats; ``threshold`` in
      the stats is the percentile used this step).

    Raises:
      ValueError: ``percentile`` outside [0, 100] or NaN, ``history_size < 1``, bad ``ord``
        or ``nonfinite``.
      TypeError: a non-int or traced ``history_size``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.autoclip(50.0, history_size=100)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in (1.0, 3.0, 2.0):
      ...     clipped, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      ...     print(float(state.stats.threshold), clipped["w"])
      1.0 [1. 0.]
      2.0 [2. 0.]
      2.0 [2. 0.]

    References:
      Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for
      Source Separation Networks", IEEE MLSP 2020 (https://arxiv.org/abs/2007.14469).
    """
    call = "autoclip"
    check_closed_interval(percentile, "percentile", 0.0, 100.0, call=call)
    size = check_count(history_size, "history_size", minimum=1, call=call)
    p = normalize_ord(ord, call=call)
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "autoclip")

    def init_fn(params: Any) -> AutoClipState:
        check_params(params)
        return AutoClipState(
            history=jnp.zeros((size,), jnp.float32),
            next_slot=jnp.zeros((), jnp.int32),
            filled=jnp.zeros((), jnp.int32),
            stats=initial_stats(label),
        )

    def update_fn(
        updates: Any, state: AutoClipState, params: Any = None
    ) -> tuple[Any, AutoClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        scaled = scaled_norm_of_leaves(leaves, p, leaf_reduction_axes(updates, axis_name, layout))
        recorded = scaled.saturated.astype(jnp.float32)
        keep = jnp.isfinite(recorded)
        history = jnp.where(keep, state.history.at[state.next_slot].set(recorded), state.history)
        next_slot = jnp.where(keep, (state.next_slot + 1) % size, state.next_slot)
        filled = jnp.where(keep, jnp.minimum(state.filled + 1, size), state.filled)
        limit = history_percentile(history, filled, percentile)
        out, stats = clip_to_global_norm(
            paths, leaves, scaled, limit, policy, label, state.stats.steps + 1
        )
        new_state = AutoClipState(
            history=history,
            next_slot=next_slot.astype(jnp.int32),
            filled=filled.astype(jnp.int32),
            stats=stats,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
