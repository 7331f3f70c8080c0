"""``ClipStats``: what a clipper did on its last step, and ``clip_stats`` to read it back."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

_FIELDS = ("pre_clip_norm", "post_clip_norm", "threshold", "scale", "clipped_fraction", "steps")


class ClipStats(NamedTuple):
    """What a clipper did on its most recent update; every clipper's state carries one.

    All fields are scalars. The float fields are float32; ``steps`` is int32, because a
    float32 counter stops increasing at 2**24 steps.

    Every field means the same thing for every clipper. The clippers come in four kinds:
    *global* (``clip_by_global_norm``, ``autoclip``, ``quantile_clip``, ``zclip``) scale the
    whole gradient by one factor; *per-leaf* (``clip_by_leaf_norm``, ``clip_by_block_rms``,
    ``adagc``) scale each leaf by its own factor; *per-unit* (``adaptive_grad_clip``) scale
    each unit, a slice of a leaf; *value* (``clip_by_value``) clamps each element. The norms
    are always norms of the whole gradient the clipper acts on (for AGC, the leaves it does
    not exclude), so they can be compared across clippers and with
    [`global_norm`][optaxclip.global_norm].

    On a step whose gradient holds NaN or Inf, ``pre_clip_norm`` is not finite and the
    ``nonfinite=`` policy decides the rest, the same way for every clipper:

    * ``"propagate"``: the gradient passes through unchanged, so ``post_clip_norm`` equals
      ``pre_clip_norm``, ``scale`` is 1 and ``clipped_fraction`` 0.
    * ``"zero"``: the update is all zeros, so ``post_clip_norm`` and ``scale`` are 0 and
      ``clipped_fraction`` is 1.
    * ``"error"``: the update raises; under ``jit``, where the error surfaces when the
      result is read, the stats are those of ``"propagate"``.

    ``threshold`` is the one the step would have used; adaptive clippers leave their running
    statistics as they were.

    Attributes:
      pre_clip_norm: the norm of the incoming gradient: in the clipper's ``ord`` for
        ``clip_by_global_norm``, ``autoclip``, ``quantile_clip`` and ``clip_by_leaf_norm``,
        the L2 norm for the others.
      post_clip_norm: the same norm of the outgoing gradient. Global, per-leaf and per-unit
        clippers derive it from the scale factors, without another pass over the gradient.
      threshold: the bound in effect this step, in the units of what the clipper compares
        with it. Global clippers: the norm above which the gradient is scaled (for
        ``zclip``, the spike boundary). Per-leaf clippers: the smallest per-leaf bound on a
        leaf's norm, which is the threshold itself when it is uniform; for
        ``clip_by_block_rms`` that is the L2 norm a leaf may reach, ``threshold_i *
        sqrt(size_i)``, not the RMS bound, so that it reads in the units of the two norms.
        Per-unit: the smallest unit limit ``clipping * max(||W_i||, eps)``. Value: the
        smallest per-leaf upper bound ``max_delta``, an element bound.
      scale: ``post_clip_norm / pre_clip_norm``, 1 when ``pre_clip_norm`` is 0. For global
        clippers it is exactly the factor every leaf was multiplied by; for the others, how
        much the gradient's norm shrank as a whole. A factor below float32's smallest normal
        number (a norm more than 2^126 times the threshold) reads 0 here, as XLA on CPU
        flushes it; the leaves themselves are then multiplied in two steps, so they still
        come out at the threshold.
      clipped_fraction: the fraction of what the clipper decides on that was clipped: 0 or 1
        for global clippers (and ``adagc`` during its warm-up), the fraction of leaves
        (per-leaf), units (per-unit) or elements (value clipping).
      steps: the number of updates seen, this one included. (Named ``steps``, not
        ``count``, so that ``optax.tree_utils.tree_get(state, "count")`` still finds only
        the optimizer's own counter.)
      name: a static label used by [`clip_stats`][optaxclip.clip_stats] as the key prefix; it is
        pytree metadata, not an array, so it does not travel through ``jit`` as data.
    """

    pre_clip_norm: jax.Array
    post_clip_norm: jax.Array
    threshold: jax.Array
    scale: jax.Array
    clipped_fraction: jax.Array
    steps: jax.Array
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
    """The stats a clipper holds before its first update.

    Every field is an array of its own, not one shared zero: a state whose leaves share a
    buffer cannot be donated to a jitted update (XLA refuses to donate a buffer twice).
    """
    return ClipStats(
        pre_clip_norm=jnp.zeros((), jnp.float32),
        post_clip_norm=jnp.zeros((), jnp.float32),
        threshold=jnp.zeros((), jnp.float32),
        scale=jnp.ones((), jnp.float32),
        clipped_fraction=jnp.zeros((), jnp.float32),
        steps=jnp.zeros((), jnp.int32),
        name=name,
    )


def make_stats(
    name: str,
    *,
    steps: ArrayLike,
    pre_clip_norm: ArrayLike,
    post_clip_norm: ArrayLike,
    threshold: ArrayLike,
    clipped_fraction: ArrayLike,
) -> ClipStats:
    """Builds a ClipStats; ``scale`` is derived as post/pre.

    Where that ratio is not a number, ``scale`` follows what the step did: 0 for a
    non-finite ``pre`` with a ``post`` of 0, the update that ``nonfinite="zero"`` zeroed;
    1 otherwise (a zero ``pre``: nothing to scale; a non-finite one passed through).
    """
    pre = jnp.asarray(pre_clip_norm, jnp.float32)
    post = jnp.asarray(post_clip_norm, jnp.float32)
    usable = (pre > 0) & jnp.isfinite(pre) & jnp.isfinite(post)
    zeroed = ~jnp.isfinite(pre) & (post == 0)
    scale = jnp.where(usable, post / jnp.where(usable, pre, 1), jnp.where(zeroed, 0, 1))
    return ClipStats(
        pre_clip_norm=pre,
        post_clip_norm=post,
        threshold=jnp.asarray(threshold, jnp.float32),
        scale=scale.astype(jnp.float32),
        clipped_fraction=jnp.asarray(clipped_fraction, jnp.float32),
        steps=jnp.asarray(steps, jnp.int32),
        name=name,
    )


def nothing_clipped(name: str, steps: ArrayLike) -> ClipStats:
    """The stats of a step with no leaf to clip (an empty tree, or every leaf excluded)."""
    return make_stats(
        name,
        steps=steps,
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
    """Collects every [`ClipStats`][optaxclip.ClipStats] inside an optimizer state into a flat dict.

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
