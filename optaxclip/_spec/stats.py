"""``ClipStats``: what a clipper did on its last step, and ``clip_stats`` to read it back."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_FIELDS = ("pre_clip_norm", "post_clip_norm", "threshold", "scale", "clipped_fraction", "count")


class ClipStats(NamedTuple):
    """What a clipper did on its most recent update; every clipper's state carries one.

    All fields are scalars. The float fields are float32; ``count`` is int32, because a
    float32 counter stops increasing at 2**24 steps.

    Attributes:
      pre_clip_norm: the norm of the incoming gradient (in the clipper's ``ord``).
      post_clip_norm: the norm of the outgoing gradient. Global and per-leaf clippers derive
        it from the scale factors, without another pass over the gradient.
      threshold: the threshold in effect this step. For per-leaf and per-unit clippers it is
        the smallest per-leaf threshold, which is the threshold itself when it is uniform.
      scale: ``post_clip_norm / pre_clip_norm`` (1 when nothing was clipped or the norm is 0);
        for global clippers this is exactly the factor every leaf was multiplied by. A factor
        below float32's smallest normal number (a norm more than 2^126 times the threshold)
        reads 0 here, as XLA on CPU flushes it; the leaves themselves are then multiplied in
        two steps, so they still come out at the threshold.
      clipped_fraction: the fraction of what the clipper decides on that was clipped: 0 or 1
        for global clippers, the fraction of leaves (per-leaf), units (per-unit) or
        elements (value clipping).
      count: the number of updates seen, this one included.
      name: a static label used by :func:`clip_stats` as the key prefix; it is pytree
        metadata, not an array, so it does not travel through ``jit`` as data.
    """

    pre_clip_norm: jax.Array
    post_clip_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped_fraction: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count on purpose
    name: str = "clip"


def _flatten_with_keys(stats: ClipStats) -> tuple[tuple[tuple[Any, Any], ...], str]:
    children = tuple((jax.tree_util.GetAttrKey(f), getattr(stats, f)) for f in _FIELDS)
    return children, stats.name


def _unflatten(name: str, children: Any) -> ClipStats:
    return ClipStats(**dict(zip(_FIELDS, children, strict=True)), name=name)


# The name is static metadata, so ClipStats is registered explicitly (this takes precedence
# over JAX's generic NamedTuple handling, which would treat the string as a leaf).
jax.tree_util.register_pytree_with_keys(ClipStats, _flatten_with_keys, _unflatten)


def initial_stats(name: str) -> ClipStats:
    """The stats a clipper holds before its first update."""
    zero = jnp.zeros((), jnp.float32)
    return ClipStats(
        pre_clip_norm=zero,
        post_clip_norm=zero,
        threshold=zero,
        scale=jnp.ones((), jnp.float32),
        clipped_fraction=zero,
        count=jnp.zeros((), jnp.int32),
        name=name,
    )


def make_stats(
    name: str,
    *,
    count: ArrayLike,
    pre_clip_norm: ArrayLike,
    post_clip_norm: ArrayLike,
    threshold: ArrayLike,
    clipped_fraction: ArrayLike,
) -> ClipStats:
    """Builds a ClipStats; ``scale`` is derived as post/pre (1 where pre is 0 or not finite)."""
    pre = jnp.asarray(pre_clip_norm, jnp.float32)
    post = jnp.asarray(post_clip_norm, jnp.float32)
    usable = (pre > 0) & jnp.isfinite(pre) & jnp.isfinite(post)
    scale = jnp.where(usable, post / jnp.where(usable, pre, 1), 1)
    return ClipStats(
        pre_clip_norm=pre,
        post_clip_norm=post,
        threshold=jnp.asarray(threshold, jnp.float32),
        scale=scale.astype(jnp.float32),
        clipped_fraction=jnp.asarray(clipped_fraction, jnp.float32),
        count=jnp.asarray(count, jnp.int32),
        name=name,
    )


def nothing_clipped(name: str, count: ArrayLike) -> ClipStats:
    """The stats of a step with no leaf to clip (an empty tree, or every leaf excluded)."""
    return make_stats(
        name,
        count=count,
        pre_clip_norm=0.0,
        post_clip_norm=0.0,
        threshold=jnp.inf,
        clipped_fraction=0.0,
    )


def _unwrap(value: Any) -> Any:
    """Returns the array inside framework wrappers such as ``flax.nnx`` variables."""
    for _ in range(4):
        if isinstance(value, (jax.Array, np.ndarray, np.generic)):
            return value
        if hasattr(value, "get_value"):
            value = value.get_value()
        elif hasattr(value, "value"):
            value = value.value
        else:
            return value
    return value


def _find_all(tree: Any) -> list[ClipStats]:
    if hasattr(tree, "opt_state") and not isinstance(tree, tuple):
        tree = tree.opt_state  # a flax.nnx.Optimizer (or anything shaped like one)
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, ClipStats))
        if isinstance(leaf, ClipStats)
    ]
    return found


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Collects every :class:`ClipStats` inside an optimizer state into a flat dict.

    Works through ``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
    ``optax.masked``, ``optax.partition`` and any other pytree state, and accepts a
    ``flax.nnx.Optimizer`` (or its ``opt_state``), whose arrays are wrapped in nnx variables.
    Keys are ``"<name>/<field>"``. Clippers that share a name get ``_1``, ``_2``... suffixes in
    the order they appear in the state, so keys stay distinct; pass ``name=`` to a clipper to
    choose its label.

    Args:
      opt_state: an optimizer state, or an object with an ``opt_state`` attribute.

    Returns:
      ``dict[str, jax.Array]`` ready for a metrics logger (no host transfer is done).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optaxclip
      >>> tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.array([3.0, 4.0])}
      >>> state = tx.init(params)
      >>> _, state = tx.update(params, state, params)
      >>> stats = optaxclip.clip_stats(state)
      >>> print(float(stats["clip_by_global_norm/pre_clip_norm"]))
      5.0
      >>> print(round(float(stats["clip_by_global_norm/scale"]), 6))
      0.2
    """
    result: dict[str, jax.Array] = {}
    used: set[str] = set()
    for stats in _find_all(opt_state):
        # The suffix loop also steps over a user's own name that looks like a suffixed one
        # (two "clip" and one "clip_1" give clip, clip_1, clip_1_1), so nothing is overwritten.
        label, suffix = stats.name, 0
        while label in used:
            suffix += 1
            label = f"{stats.name}_{suffix}"
        used.add(label)
        for field in _FIELDS:
            result[f"{label}/{field}"] = _unwrap(getattr(stats, field))
    return result


class ClipState(NamedTuple):
    """State of a static clipper: only what it did on its last step."""

    stats: ClipStats
