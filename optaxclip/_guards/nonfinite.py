"""skip_nonfinite: skip the optimizer step when the gradient or the loss holds NaN or Inf."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._guards.common import (
    check_inner,
    guarded_update,
    increment,
    loss_is_finite,
)
from optaxclip._lowering import ReadView
from optaxclip._numerics.reductions import scaled_norm_of_leaves
from optaxclip._spec.layout import AxisName, normalize_axis_names
from optaxclip._spec.validation import check_count


def _all_finite(leaves: list[jax.Array], axes: tuple[str, ...]) -> jax.Array:
    """Whether every entry of every leaf is finite, on every device along ``axes``.

    Read from the leaves' 2-norm in its scaled form: a NaN or an infinity makes its root
    non-finite, while finite entries never do, even where the norm itself passes float32's
    range (the rescaled pass divides by the largest entry first). The norm is the one
    reduction XLA:CPU reads without extra work in a training step: a sum of ``x * 0`` makes
    it fault in a second leaf-sized block of pages on every call, and ``all(isfinite(x))``
    per leaf writes each leaf's flags out in full.
    """
    if not leaves:
        return jnp.asarray(True)
    n = len(leaves)
    return scaled_norm_of_leaves(leaves, 2.0, [axes] * n, view=ReadView.FINITE_CHECK).finite


class SkipNonfiniteState(NamedTuple):
    """State of [`skip_nonfinite`][optaxclip.skip_nonfinite].

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
    max_consecutive_errors: int | None = None,
    *,
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
      max_consecutive_errors: None (never apply a non-finite step) or an integer >= 1. It
        may be given by position, as in ``optax.apply_if_finite(inner, 3)``.
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is
        split across, so that every device takes the same decision when only one shard
        holds a NaN. (Under ``jit`` with sharded arrays no argument is needed.)

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      [`SkipNonfiniteState`][optaxclip.SkipNonfiniteState].

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
    guarded = check_inner(inner)
    limit = (
        None
        if max_consecutive_errors is None
        else check_count(
            max_consecutive_errors,
            "max_consecutive_errors",
            minimum=1,
            call="skip_nonfinite",
            injectable=False,
        )
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
        finite = loss_is_finite(extra_args) & _all_finite(leaves, axes)
        consecutive = jnp.where(finite, 0, increment(state.consecutive_errors, ~finite))
        give_up = ~finite & (consecutive > limit) if limit is not None else jnp.asarray(False)
        new_updates, inner_state = guarded_update(
            guarded, finite | give_up, updates, state.inner_state, params, extra_args
        )
        return new_updates, SkipNonfiniteState(
            inner_state=inner_state,
            consecutive_errors=jnp.where(give_up, 0, consecutive).astype(jnp.int32),
            total_errors=increment(state.total_errors, ~finite),
            last_finite=finite,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
