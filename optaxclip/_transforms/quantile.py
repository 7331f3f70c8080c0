"""Quantile clipping: a global threshold that tracks a quantile of the norm by geometric steps."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optaxclip._spec.layout import AxisName, Layout
from optaxclip._spec.stats import ClipStats
from optaxclip._spec.validation import (
    check_closed_interval,
    check_name,
    check_number,
    check_positive,
)
from optaxclip._transforms import rules
from optaxclip._transforms.rule import rule_transform


class QuantileClipState(NamedTuple):
    """State of [`quantile_clip`][optaxclip.quantile_clip].

    Attributes:
      threshold: float32, the clipping threshold C the next update will use.
      stats: what the last update did; ``stats.steps`` counts every update, the non-finite
        ones included, and ``stats.threshold`` is the C that update used.
    """

    threshold: jax.Array
    stats: ClipStats


def quantile_clip(
    target_quantile: float = 0.5,
    learning_rate: float = 0.2,
    initial_threshold: float = 1.0,
    *,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clips the global norm to a threshold that tracks a quantile of the norms.

    The geometric quantile update of Andrew et al., applied to the global norm of one
    gradient per step and without the privacy noise:

        g_t <- g_t * min(1, C_t / ||g_t||)           (clip with the current C)
        b_t  = 1 if ||g_t|| <= C_t else 0
        C_{t+1} = C_t * exp(-learning_rate * (b_t - target_quantile))

    C shrinks after an unclipped step and grows after a clipped one; it settles where a
    fraction ``target_quantile`` of the steps are unclipped, i.e. at that quantile of the
    norm distribution, moving by at most a factor ``exp(learning_rate)`` per step. A
    non-finite norm leaves C unchanged. C is kept within the positive normal float32 range.

    Args:
      target_quantile: gamma in [0, 1], the fraction of steps to leave unclipped (0.5: clip
        to the running median).
      learning_rate: eta >= 0, the step size in log space (0.2 as in the paper; 0 keeps the
        threshold fixed).
      initial_threshold: C_0 > 0. It only matters for the first ~log(ratio)/eta steps.
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the gradient is split across.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"quantile_clip"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a ``QuantileClipState``.

    Raises:
      ValueError: ``target_quantile`` outside [0, 1], a negative ``learning_rate``, a
        ``initial_threshold`` that is not finite and > 0, bad ``ord`` or ``nonfinite``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tx = optaxclip.quantile_clip(0.5, learning_rate=0.2, initial_threshold=1.0)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> clipped, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> print(clipped["w"], round(float(state.threshold), 4))  # clipped: C grows by e^0.1
      [0.6 0.8] 1.1052

    References:
      Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
      Clipping", NeurIPS 2021 (https://arxiv.org/abs/1905.03871).
    """
    call = "quantile_clip"
    check_closed_interval(target_quantile, "target_quantile", 0.0, 1.0, call=call)
    check_number(learning_rate, "learning_rate", allow_inf=False, call=call)
    check_positive(initial_threshold, "initial_threshold", call=call)
    return rule_transform(
        rules.quantile(target_quantile, learning_rate, initial_threshold),
        scope="global",
        ord=ord,
        nonfinite=nonfinite,
        axis_name=axis_name,
        layout=layout,
        label=check_name(name, "quantile_clip"),
        call=call,
        pack=lambda threshold, stats: QuantileClipState(threshold=threshold, stats=stats),
        unpack=lambda state: (state.threshold, state.stats),
    )
