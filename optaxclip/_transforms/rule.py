"""``clip_by_rule``: a clipper from a threshold rule, with everything else shared.

A rule says only how the threshold follows from the norms seen so far. The engine supplies
the rest: exact norms in any dtype (overflow included), the non-finite policy, statistics that
no NaN enters, :class:`ClipStats`, sharding (``axis_name``, ``layout``, GSPMD) and a state
that checkpoints as a pytree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._engine.clip import (
    check_params,
    clip_to_global_norm,
    clip_to_leaf_norms,
    flatten_updates,
)
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.reductions import scaled_norm_of_leaves, scaled_norms_per_leaf
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats, nothing_clipped
from optaxclip._spec.validation import check_name, normalize_ord

_SCOPES = ("global", "per_leaf")


class ClipRule(NamedTuple):
    """A threshold rule: how the clip threshold follows from the norms seen so far.

    In the spirit of ``optax.GradientTransformation``, a pair of pure functions:

    * ``init(norms) -> rule_state``: ``norms`` is a float32 zero array shaped like the norms
      the rule will see, a scalar for the global scope and one entry per leaf for the per-leaf
      scope;
    * ``update(norms, rule_state, step) -> (threshold, new_rule_state)``: ``norms`` are this
      step's norms (float32; a finite norm past float32's range reads as its largest number),
      ``step`` the number of updates before this one (int32). The threshold broadcasts against
      ``norms``. Written with broadcasting, one rule serves both scopes.

    The engine keeps ``new_rule_state`` only on steps whose gradient is finite; on other steps
    it keeps the state it had and applies the non-finite policy. The threshold returned on such
    a step is only reported (the policy decides the update), so a rule whose threshold reads
    the current norm should not let a non-finite one in (the rules of
    [`optaxclip.rules`][optaxclip.rules] do not). A threshold below 0 acts as 0, and a NaN one as
    0 too: the update is zeroed.
    """

    init: Callable[[jax.Array], Any]
    update: Callable[[jax.Array, Any, jax.Array], tuple[Any, Any]]


class RuleClipState(NamedTuple):
    """State of [`clip_by_rule`][optaxclip.clip_by_rule]: the rule's state and the last report.

    Attributes:
      rule_state: the state of the [`ClipRule`][optaxclip.ClipRule], as its ``update`` returned
        it on the last finite step.
      stats: what the last update did ([`ClipStats`][optaxclip.ClipStats]).
    """

    rule_state: Any
    stats: ClipStats


def _safe(threshold: jax.Array) -> jax.Array:
    """A threshold below 0 acts as 0, a NaN one as 0 (no step rather than an unclipped one)."""
    return jnp.where(jnp.isnan(threshold), 0, jnp.maximum(threshold, 0))


def rule_transform(
    rule: ClipRule,
    *,
    scope: str,
    ord: float | int | str | None,
    nonfinite: str,
    axis_name: AxisName,
    layout: Layout,
    label: str,
    call: str,
    pack: Callable[[Any, ClipStats], Any] = RuleClipState,
    unpack: Callable[[Any], tuple[Any, ClipStats]] = tuple,
) -> optax.GradientTransformation:
    """The transformation behind :func:`clip_by_rule` and the adaptive clippers built on it.

    ``pack``/``unpack`` convert between ``(rule_state, stats)`` and the state type the public
    clipper exposes, so that a clipper keeps its own named state.
    """
    if not isinstance(rule, ClipRule):
        raise TypeError(
            f"{call}(rule=...): expected an optaxclip.ClipRule(init, update), got "
            f"{type(rule).__name__}."
        )
    if scope not in _SCOPES:
        raise ValueError(f"{call}(scope=...): must be one of {_SCOPES}, got {scope!r}.")
    p = normalize_ord(ord, call=call)
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    per_leaf = scope == "per_leaf"

    def init_fn(params: Any) -> Any:
        check_params(params)
        n = len(jax.tree_util.tree_leaves(params))
        norms = jnp.zeros((n,) if per_leaf else (), jnp.float32)
        return pack(rule.init(norms), initial_stats(label))

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        rule_state, stats = unpack(state)
        paths, leaves, treedef = flatten_updates(updates)
        steps = stats.steps
        axes = leaf_reduction_axes(updates, axis_name, layout)
        if per_leaf and not leaves:
            return updates, pack(rule_state, nothing_clipped(label, steps + 1))
        scaled = (
            scaled_norms_per_leaf(leaves, p, axes)
            if per_leaf
            else scaled_norm_of_leaves(leaves, p, axes)
        )
        finite = jnp.all(scaled.finite)
        threshold, proposed = rule.update(scaled.saturated.astype(jnp.float32), rule_state, steps)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), proposed, rule_state)
        limit = _safe(jnp.asarray(threshold)).astype(scaled.root.dtype)
        if per_leaf:
            limits = jnp.broadcast_to(limit, scaled.root.shape)
            out, new_stats = clip_to_leaf_norms(
                paths, leaves, scaled, limits, policy, label, steps + 1, p
            )
        else:
            out, new_stats = clip_to_global_norm(
                paths, leaves, scaled, limit, policy, label, steps + 1
            )
        return jax.tree_util.tree_unflatten(treedef, out), pack(kept, new_stats)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_rule(
    rule: ClipRule,
    *,
    scope: str = "global",
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Clips to the threshold a [`ClipRule`][optaxclip.ClipRule] sets from the norms seen so far.

    With ``scope="global"`` the rule sees the global norm ``||g||`` and the gradient is
    multiplied by ``min(1, threshold / ||g||)``; with ``scope="per_leaf"`` it sees one norm
    per leaf and leaf ``i`` is multiplied by ``min(1, threshold_i / ||g_i||)``. The rule's
    state advances only on steps whose gradient is finite; the ``nonfinite`` policy handles
    the others. The norms are exact in every dtype, past float32's range included, and
    collectives carry scalars or one value per leaf only.

    Args:
      rule: a [`ClipRule`][optaxclip.ClipRule], such as one from
        [`optaxclip.rules`][optaxclip.rules].
      scope: ``"global"`` (one threshold for the whole gradient) or ``"per_leaf"``.
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or any real
        p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the gradient is split across.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"clip_by_rule"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      [`RuleClipState`][optaxclip.RuleClipState]: ``rule_state`` and the
      [`ClipStats`][optaxclip.ClipStats] of the last update (``threshold`` is the threshold in
      effect, the smallest one per leaf).

    Raises:
      TypeError: ``rule`` is not a ``ClipRule``; a non-float gradient leaf (names its path).
      ValueError: an unknown ``scope``, ``ord < 1`` or ``nonfinite``.

    Examples:
      A rule that clips at twice the running mean of past norms:

      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> def init(norms):
      ...     return (jnp.zeros_like(norms), jnp.zeros_like(norms))  # sum, count
      >>> def update(norms, state, step):
      ...     total, seen = state
      ...     mean = jnp.where(seen > 0, total / jnp.maximum(seen, 1), jnp.inf)
      ...     return 2.0 * mean, (total + norms, seen + 1)
      >>> tx = optaxclip.clip_by_rule(optaxclip.ClipRule(init, update))
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in (1.0, 1.0, 10.0):
      ...     clipped, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> print(clipped["w"], float(state.stats.threshold))
      [2. 0.] 2.0

    References:
      Optax's ``GradientTransformation`` (init/update pairs), which the rule protocol follows.
    """
    label = check_name(name, "clip_by_rule")
    return rule_transform(
        rule,
        scope=scope,
        ord=ord,
        nonfinite=nonfinite,
        axis_name=axis_name,
        layout=layout,
        label=label,
        call="clip_by_rule",
    )
