"""AdaGC: per-tensor clipping against an EMA of each tensor's own (clipped) gradient norm."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optaxclip._engine.clip import check_params, flatten_updates, global_scale, scale_per_leaf
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.arithmetic import (
    ScaledNorm,
    combine_norms,
    combine_scaled_norms,
    scaled_post_norm,
    shrink_factors,
)
from optaxclip._numerics.reductions import scaled_norms_per_leaf
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats, nothing_clipped
from optaxclip._spec.validation import (
    check_count,
    check_name,
    check_number,
    check_open_unit,
    check_positive,
)


class AdaGCState(NamedTuple):
    """State of [`adagc`][optaxclip.adagc].

    Attributes:
      norm_ema: float32 vector with one entry per gradient leaf (``tree_leaves`` order): the
        reference norm ``gamma_i`` of each leaf. During the warm-up it is the smallest
        nonzero norm seen so far (after the global clip); afterwards an EMA of the clipped
        norm. 0 means "not set yet" (the leaf has only had zero gradients).
      finite_count: the number of finite steps seen; the warm-up lasts while it is below
        ``warmup_steps``. Non-finite steps are not counted.
      stats: what the last update did ([`ClipStats`][optaxclip.ClipStats]).
    """

    norm_ema: jax.Array
    finite_count: jax.Array
    stats: ClipStats


def ratio_limits(
    gamma: jax.Array, norms: jax.Array, relative_factor: Any
) -> tuple[jax.Array, jax.Array]:
    """The reference norms and the thresholds ``relative_factor * reference``, elementwise.

    The reference is ``gamma`` where it is set (> 0) and the norm itself where it is not, so
    that a norm without history takes its own value as the reference.
    """
    reference = jnp.where(gamma > 0, gamma, norms)
    return reference, jnp.asarray(relative_factor, jnp.float32) * reference


def ema_of_clipped_norm(
    reference: jax.Array, norms: jax.Array, limits: jax.Array, over: jax.Array, beta: Any
) -> jax.Array:
    """``beta * reference + (1 - beta) * clipped``: the EMA step of the clipped norms.

    The clipped norm is ``limits`` where ``over`` (the norm was scaled down to it) and the
    norm itself elsewhere.
    """
    b = jnp.asarray(beta, jnp.float32)
    return b * reference + (1 - b) * jnp.where(over, limits, norms)


def ema_ratio_step(
    norms: jax.Array, gamma: jax.Array, relative_factor: Any, beta: Any
) -> tuple[jax.Array, jax.Array]:
    """The threshold ``relative_factor * gamma`` (inf where gamma is not set) and the next gamma.

    The per-leaf rule of :func:`adagc` after its warm-up, written as a threshold rule: a norm
    without a gamma yet is not clipped and starts its gamma. A step with a non-finite norm
    keeps gamma as it is.
    """
    reference, limits = ratio_limits(gamma, norms, relative_factor)
    threshold = jnp.where(gamma > 0, limits, jnp.inf)
    moved = ema_of_clipped_norm(reference, norms, limits, norms > threshold, beta)
    # Near the top of the range the sum can round past the largest float, and an infinite
    # gamma would switch the clipping off for good.
    moved = jnp.minimum(moved, jnp.finfo(jnp.float32).max)
    keep = jnp.all(jnp.isfinite(norms))
    return threshold, jnp.where(keep, moved, gamma).astype(jnp.float32)


def adagc(
    relative_factor: float = 1.04,
    beta: float = 0.99,
    warmup_steps: int = 100,
    warmup_max_norm: float = 1.0,
    eps: float = 1e-6,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """AdaGC: clips each leaf against an EMA of its own past (clipped) norms.

    For each leaf ``i`` with norm ``n_i`` and reference norm ``gamma_i``:

    * if ``n_i > relative_factor * gamma_i``, the leaf is multiplied by
      ``relative_factor * gamma_i / (n_i + eps)`` and counts as having norm
      ``relative_factor * gamma_i``; otherwise it is left unchanged;
    * then ``gamma_i <- beta * gamma_i + (1 - beta) * min(n_i, relative_factor * gamma_i)``.

    A spike in one leaf rescales that leaf only; the others keep their values bit for bit.

    During the warm-up (the first ``warmup_steps`` finite steps) the whole gradient is
    clipped by its global norm at ``warmup_max_norm`` (exactly, as
    [`clip_by_global_norm`][optaxclip.clip_by_global_norm]) and each ``gamma_i`` becomes the
    smallest per-leaf norm measured *after* that global clip. This follows the authors' Megatron
    code (``relative_factor=1.04``, ``beta=0.99``, 100 warm-up steps of global clipping at
    1.0); the paper's first version and third-party ports use 1.05 / 0.98.

    Differences from the reference code, all on edge cases: a warm-up step where a leaf's
    norm is exactly 0 does not set its ``gamma_i`` to 0 (which would zero that leaf's
    gradient for the rest of training); a leaf with no nonzero norm yet takes its first
    nonzero norm after the warm-up as ``gamma_i``, as the reference does for leaves
    without state. Steps with a NaN/Inf norm change no statistic and do not count towards
    the warm-up; the gradient is handled by the ``nonfinite`` policy.

    Args:
      relative_factor: how far above its reference norm a leaf may go (> 0).
      beta: the EMA decay of the reference norms, in (0, 1).
      warmup_steps: the number of finite steps of global clipping before the per-leaf rule
        starts (>= 0; 0 starts the per-leaf rule at once, each ``gamma_i`` being set from
        its first nonzero norm).
      warmup_max_norm: the global-norm threshold during the warm-up (> 0; ``inf`` turns the
        warm-up clipping off).
      eps: added to ``n_i`` in the divisor of the per-leaf scale, as in the reference
        (>= 0; 0 gives exact scaling to ``relative_factor * gamma_i``).
      nonfinite: what a gradient holding NaN or Inf becomes: ``"propagate"`` (default)
        passes it through unscaled, ``"zero"`` makes the update all zeros, ``"error"``
        raises ``FloatingPointError`` naming the first non-finite leaf.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split
        across; each leaf's norm is then that of the whole leaf.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"adagc"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is an [`AdaGCState`][optaxclip.AdaGCState].
      Its ``ClipStats`` report global norms before and after (the latter from the per-leaf
      scales), ``threshold`` = ``warmup_max_norm`` during the warm-up and afterwards the
      smallest per-leaf threshold ``relative_factor * gamma_i`` over the leaves whose
      ``gamma_i`` is set (``inf`` if none), and ``clipped_fraction`` = the fraction of
      leaves scaled (0 or 1 during the warm-up).

    Raises:
      ValueError: ``relative_factor <= 0``, ``beta`` outside (0, 1), ``warmup_steps < 0``,
        ``warmup_max_norm <= 0``, ``eps < 0``, an unknown ``nonfinite``; at ``update``, a
        gradient with a different number of leaves than the ``init`` parameters.
      TypeError: ``warmup_steps`` not an integer, a non-float leaf (names its path).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> clipper = optaxclip.adagc(warmup_steps=1)
      >>> grads = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([0.0, 0.2])}
      >>> state = clipper.init(grads)
      >>> update = jax.jit(clipper.update)
      >>> _, state = update(grads, state)  # warm-up: gamma = (0.5, 0.2)
      >>> spiky = {"a": jnp.array([30.0, 40.0]), "b": jnp.array([0.0, 0.2])}
      >>> out, state = update(spiky, state)
      >>> print(round(float(jnp.linalg.norm(out["a"])), 4), out["b"])  # only "a" is clipped
      0.52 [0.  0.2]
      >>> print(float(state.stats.clipped_fraction))
      0.5

    References:
      Wang, Li, Chen, Zeng, Yang, Yu, Ma & Shen, "AdaGC: Improving Training Stability for
      Large Language Model Pretraining", 2025 (https://arxiv.org/abs/2502.11034); reference
      code https://github.com/lishuai-97/AdaGC (``megatron/optimizer/clip_grads.py``).
    """
    call = "adagc"
    check_positive(relative_factor, "relative_factor", call=call)
    check_open_unit(beta, "beta", call=call)
    warmup = check_count(warmup_steps, "warmup_steps", minimum=0, call=call)
    check_positive(warmup_max_norm, "warmup_max_norm", allow_inf=True, call=call)
    check_number(eps, "eps", allow_inf=False, call=call)
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "adagc")

    def init_fn(params: Any) -> AdaGCState:
        check_params(params)
        size = len(jax.tree_util.tree_leaves(params))
        return AdaGCState(
            norm_ema=jnp.zeros((size,), jnp.float32),
            finite_count=jnp.zeros((), jnp.int32),
            stats=initial_stats(label),
        )

    def update_fn(updates: Any, state: AdaGCState, params: Any = None) -> tuple[Any, AdaGCState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        if len(leaves) != state.norm_ema.shape[-1]:
            raise ValueError(
                f"{label}: the gradient has {len(leaves)} leaves but the state was initialised "
                f"for {state.norm_ema.shape[-1]}; call init with parameters shaped like the "
                f"gradient."
            )
        count = state.stats.steps + 1
        if not leaves:
            stats = nothing_clipped(label, count)
            return updates, state._replace(stats=stats)

        f32 = jnp.float32
        scaled = scaled_norms_per_leaf(leaves, 2.0, leaf_reduction_axes(updates, axis_name, layout))
        global_norm = combine_scaled_norms(scaled, 2.0)
        total = global_norm.value
        # The rule reads a norm past float32's range as its largest number; the scale factors
        # come from the scaled form, so such a leaf is still clipped exactly.
        n = scaled.saturated.astype(f32)
        finite = jnp.all(scaled.finite)
        in_warmup = state.finite_count < warmup
        gamma = state.norm_ema

        # Warm-up: one global scale; gamma_i tracks the smallest nonzero clipped leaf norm.
        cap = jnp.asarray(warmup_max_norm, f32)
        warm_coarse, warm_fine, warm_clipped = global_scale(global_norm, cap)
        after = scaled_post_norm(scaled, warm_coarse, warm_fine).astype(f32)
        warm_gamma = jnp.where(
            after > 0, jnp.where(gamma > 0, jnp.minimum(gamma, after), after), gamma
        )

        # After the warm-up: per-leaf scale against relative_factor * gamma_i.
        reference, limits = ratio_limits(gamma, n, relative_factor)
        over = n > limits
        ema_gamma = ema_of_clipped_norm(reference, n, limits, over, beta)

        new_gamma = jnp.where(finite, jnp.where(in_warmup, warm_gamma, ema_gamma), gamma)

        def leaf_factors(operands: Any) -> tuple[jax.Array, jax.Array]:
            limits, n, over, warm_coarse, warm_fine, in_warmup = operands
            past = jnp.isinf(scaled.value) & scaled.finite
            with_eps = ScaledNorm(
                jnp.where(past, scaled.divisor, 1).astype(f32),
                jnp.where(past, scaled.root, n + jnp.asarray(eps, f32)).astype(f32),
            )
            leaf_coarse, leaf_fine = shrink_factors(limits, with_eps, over)
            coarse = jnp.where(in_warmup, warm_coarse, leaf_coarse)
            fine = jnp.where(in_warmup, warm_fine, leaf_fine)
            return coarse, fine

        warm = (warm_coarse.astype(f32), warm_fine.astype(f32))
        out, (coarse, fine) = scale_per_leaf(
            policy,
            label,
            paths,
            leaves,
            finite,
            leaf_factors,
            (limits, n, over, *warm, in_warmup),
            total,
        )
        post = policy.report(
            finite,
            combine_norms(
                scaled_post_norm(scaled, coarse.astype(total.dtype), fine.astype(total.dtype)),
                2.0,
            ),
            if_zeroed=0,
            if_passed=total,
        )
        fraction = jnp.where(in_warmup, warm_clipped.astype(f32), jnp.mean(over.astype(f32)))
        fraction = policy.report(finite, fraction, if_zeroed=1.0, if_passed=0.0)
        set_limits = jnp.where(reference > 0, limits, jnp.inf)
        threshold = jnp.where(in_warmup, cap, jnp.min(set_limits))
        stats = make_stats(
            label,
            steps=count,
            pre_clip_norm=total,
            post_clip_norm=post,
            threshold=threshold,
            clipped_fraction=fraction,
        )
        new_state = AdaGCState(
            norm_ema=new_gamma.astype(f32),
            finite_count=state.finite_count + finite.astype(jnp.int32),
            stats=stats,
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)
