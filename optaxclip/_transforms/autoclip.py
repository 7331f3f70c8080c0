"""AutoClip: clip to a percentile of the gradient norms seen so far."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optaxclip._spec.layout import AxisName, Layout
from optaxclip._spec.stats import ClipStats
from optaxclip._spec.validation import (
    check_closed_interval,
    check_count,
    check_name,
)
from optaxclip._transforms import rules
from optaxclip._transforms.rule import rule_transform


class AutoClipState(NamedTuple):
    """State of [`autoclip`][optaxclip.autoclip].

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
    norms, and the whole gradient is scaled down to it:

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
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"autoclip"``).

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
    return rule_transform(
        rules.percentile(percentile, size),
        scope="global",
        ord=ord,
        nonfinite=nonfinite,
        axis_name=axis_name,
        layout=layout,
        label=check_name(name, "autoclip"),
        call=call,
        pack=lambda rule_state, stats: AutoClipState(
            rule_state.history, rule_state.next_slot, rule_state.filled, stats
        ),
        unpack=lambda state: (
            rules.PercentileState(state.history, state.next_slot, state.filled),
            state.stats,
        ),
    )
