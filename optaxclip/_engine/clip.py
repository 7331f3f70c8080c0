"""The clip engine: "scale these leaves by these factors, under this non-finite policy".

Every clipper that scales its gradient goes through :func:`scale_under_policy` once; the global
clippers through :func:`clip_to_global_norm`, which also builds their :class:`ClipStats`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optaxclip import _lowering as lowering
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.arithmetic import (
    ScaledNorm,
    combine_norms,
    combine_scaled_norms,
    scaled_post_norm,
    shrink_factors,
)
from optaxclip._spec.stats import ClipStats, make_stats
from optaxclip._spec.validation import check_float_leaves

# Given the scale factors (any pytree of arrays) as computed, returns for every leaf its
# ``(coarse, fine)`` factors: the same two for each leaf of a global clip, one entry each of
# per-leaf vectors, or per-unit slices.
Distribute = Callable[[Any], tuple[Sequence[jax.Array], Sequence[jax.Array]]]


def flatten_updates(updates: Any, name: str = "updates") -> tuple[list[Any], list[jax.Array], Any]:
    """Flattens a gradient pytree, checking that every leaf is floating point."""
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    check_float_leaves(paths_leaves, name)
    return [p for p, _ in paths_leaves], [x for _, x in paths_leaves], treedef


def check_params(params: Any) -> None:
    """At ``init``: the parameters the gradients will mirror must be floating point."""
    check_float_leaves(jax.tree_util.tree_leaves_with_path(params), "params")


def global_scale(
    norm: jax.Array | ScaledNorm, threshold: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``min(1, threshold / norm)`` as factors ``(coarse, fine)``, and whether it clipped.

    The factors are those of ``shrink_factors``: their product is the scale, and kept apart a
    ratio below 2^-126 is not flushed to 0.
    """
    value = norm.value if isinstance(norm, ScaledNorm) else norm
    over = value > threshold.astype(value.dtype)
    coarse, fine = shrink_factors(threshold, norm, over)
    return coarse, fine, over


def scale_under_policy(
    policy: NonfinitePolicy,
    label: str,
    paths: Sequence[Any],
    leaves: Sequence[jax.Array],
    finite: jax.Array,
    factors: Callable[[Any], Any],
    operands: Any,
    anchor: jax.Array,
    distribute: Distribute,
) -> tuple[list[jax.Array], Any]:
    """Scales ``leaves`` by ``factors(operands)``, applying ``policy`` where not ``finite``.

    Raises under ``nonfinite="error"``; computes the factors once, before any leaf reads them
    (``anchor``: any runtime float scalar of the step, see
    ``lowering.computed_before_fusion``); multiplies each leaf by what ``distribute`` gives
    it. Returns the scaled leaves and the factors as the policy left them.
    """
    policy.raise_if_nonfinite(finite, paths, leaves, label)

    def under_policy(both: Any) -> Any:
        operands, ok = both
        return policy.factors(ok, factors(operands))

    computed = lowering.computed_before_fusion(under_policy, (operands, finite), anchor)
    coarse, fine = distribute(computed)
    return policy.scale(leaves, fine, finite, coarse), computed


def clip_to_global_norm(
    paths: list[Any],
    leaves: list[jax.Array],
    norm: ScaledNorm,
    limit: jax.Array,
    policy: NonfinitePolicy,
    label: str,
    count: jax.Array,
) -> tuple[list[jax.Array], ClipStats]:
    """Scales ``leaves`` (whose global norm is ``norm``) down to ``limit`` if above it.

    The one implementation of "clip by a global threshold" that every global clipper, static
    or adaptive, goes through: double-where scale, non-finite policy, dtype-preserving
    multiply and the ClipStats (``count`` is the value to store, this step included). A
    finite gradient whose norm passes the dtype's range is clipped like any other; its
    ``pre_clip_norm`` reads inf.
    """
    finite = norm.finite
    value = norm.value

    def factors(operands: Any) -> tuple[jax.Array, jax.Array]:
        norm, limit = operands
        coarse, fine, _ = global_scale(norm, limit)
        return coarse, fine

    n = len(leaves)
    out, (coarse, fine) = scale_under_policy(
        policy,
        label,
        paths,
        leaves,
        finite,
        factors,
        (norm, limit),
        value,
        lambda both: ([both[0]] * n, [both[1]] * n),
    )
    scale = coarse * fine
    applied = policy.report(finite, scale, if_zeroed=0, if_passed=1)
    post = policy.report(finite, scaled_post_norm(norm, coarse, fine), if_zeroed=0, if_passed=value)
    stats = make_stats(
        label,
        steps=count,
        pre_clip_norm=value,
        post_clip_norm=post,
        threshold=limit,
        clipped_fraction=(applied < 1).astype(jnp.float32),
    )
    return out, stats._replace(scale=applied.astype(jnp.float32))


def scale_per_leaf(
    policy: NonfinitePolicy,
    label: str,
    paths: Sequence[Any],
    leaves: Sequence[jax.Array],
    finite: jax.Array,
    factors: Callable[[Any], tuple[jax.Array, jax.Array]],
    operands: Any,
    anchor: jax.Array,
) -> tuple[list[jax.Array], tuple[jax.Array, jax.Array]]:
    """``scale_under_policy`` with one ``(coarse, fine)`` pair of factor vectors, one per leaf.

    Leaf i reads entry i of each vector (see ``lowering.entries_per_leaf``).
    """

    def per_leaf(both: Any) -> tuple[Sequence[jax.Array], Sequence[jax.Array]]:
        coarse_of, fine_of = lowering.entries_per_leaf(list(both))
        return coarse_of, fine_of

    return scale_under_policy(
        policy, label, paths, leaves, finite, factors, operands, anchor, per_leaf
    )


def clip_to_leaf_norms(
    paths: Sequence[Any],
    leaves: Sequence[jax.Array],
    norms: ScaledNorm,
    limits: jax.Array,
    policy: NonfinitePolicy,
    label: str,
    steps: jax.Array,
    p: float,
) -> tuple[list[jax.Array], ClipStats]:
    """Scales each leaf down to its entry of ``limits`` if its norm (``norms``) is above it.

    The per-leaf counterpart of ``clip_to_global_norm``, for every clipper with one threshold
    per leaf. A limit of 0 zeroes its leaf, also one whose norm rounds to 0. The stats give the
    global norms before and after, the smallest limit and the fraction of leaves clipped; a
    NaN or Inf in any leaf makes the whole step non-finite.
    """
    values = norms.value
    over = values > limits
    finite = jnp.all(norms.finite)
    pre = combine_scaled_norms(norms, p).value

    def leaf_factors(operands: Any) -> tuple[jax.Array, jax.Array]:
        norms, limits, over = operands
        coarse, fine = shrink_factors(limits, norms, over)
        return coarse, jnp.where(limits == 0, 0, fine)

    out, (coarse, fine) = scale_per_leaf(
        policy, label, paths, leaves, finite, leaf_factors, (norms, limits, over), pre
    )
    post_if_finite = combine_norms(scaled_post_norm(norms, coarse, fine), p)
    post = policy.report(finite, post_if_finite, if_zeroed=0, if_passed=pre)
    clipped = policy.report(
        finite, jnp.mean(over.astype(jnp.float32)), if_zeroed=1.0, if_passed=0.0
    )
    stats = make_stats(
        label,
        steps=steps,
        pre_clip_norm=pre,
        post_clip_norm=post,
        threshold=jnp.min(limits),
        clipped_fraction=clipped,
    )
    return out, stats
