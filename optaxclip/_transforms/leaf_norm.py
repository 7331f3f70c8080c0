"""Per-leaf norm clippers: clip_by_leaf_norm and clip_by_block_rms (Adafactor's update clip)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from optaxclip._engine.clip import (
    check_params,
    clip_to_leaf_norms,
    flatten_updates,
)
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.reductions import group_by_axes, scaled_norms_per_leaf
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipState, initial_stats, nothing_clipped
from optaxclip._spec.thresholds import Threshold, ThresholdLike
from optaxclip._spec.validation import check_name, normalize_ord


def _per_leaf_norm_clipper(
    threshold: Threshold,
    p: float,
    policy: NonfinitePolicy,
    axis_name: AxisName,
    layout: Layout,
    label: str,
    rms: bool,
) -> optax.GradientTransformation:
    """Shared body of clip_by_leaf_norm and clip_by_block_rms (RMS = L2 norm / sqrt(size))."""

    normalize_axis_names(axis_name)

    def init_fn(params: Any) -> ClipState:
        check_params(params)
        threshold.validate_for(params)
        return ClipState(stats=initial_stats(label))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        count = state.stats.steps
        leaf_axes = leaf_reduction_axes(updates, axis_name, layout)
        scaled = scaled_norms_per_leaf(leaves, p, leaf_axes)
        norms = scaled.value
        if not leaves:
            return updates, ClipState(stats=nothing_clipped(label, count + 1))
        limit_vector = threshold.per_leaf_vector(updates, count, norms.dtype)
        if rms:
            sizes = jnp.asarray(np.array([max(x.size, 1) for x in leaves], np.float64), norms.dtype)
            for axes, idx in group_by_axes(leaf_axes).items():
                if axes:
                    mask = np.zeros(len(leaves), bool)
                    mask[idx] = True
                    sizes = jnp.where(mask, sizes * lax.psum(1, axes), sizes)
            norm_limits = limit_vector * jnp.sqrt(sizes)
        else:
            norm_limits = limit_vector
        out, stats = clip_to_leaf_norms(
            paths, leaves, scaled, norm_limits, policy, label, count + 1, p
        )
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_leaf_norm(
    max_norm: ThresholdLike,
    *,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Bounds each leaf by its own norm: ``g_i * min(1, max_norm_i / ||g_i||)``.

    This is Keras ``clipnorm`` and ``tf.clip_by_norm`` applied to every leaf. Leaves under
    their threshold are returned bit for bit (subnormal entries aside, as for
    [`clip_by_global_norm`][optaxclip.clip_by_global_norm]).

    Args:
      max_norm: a number, a schedule ``step -> value``, a pytree of numbers matching the
        gradient tree (or a prefix of it, e.g. ``{"head": 10.0, "body": 1.0}``), or a function
        ``(path, leaf) -> number`` (e.g. a wider range for the output layer).
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or any real
        p >= 1.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split across.
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"clip_by_leaf_norm"``).

    Returns:
      An ``optax.GradientTransformation``; ``ClipStats.clipped_fraction`` is the fraction of
      leaves clipped and ``threshold`` the smallest per-leaf threshold.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"body": jnp.array([3.0, 4.0]), "head": jnp.array([6.0, 8.0])}
      >>> clipper = optaxclip.clip_by_leaf_norm({"body": 1.0, "head": 5.0})
      >>> clipped, state = clipper.update(grads, clipper.init(grads))
      >>> print(clipped["body"], clipped["head"])
      [0.6 0.8] [3. 4.]
      >>> print(float(state.stats.clipped_fraction))
      1.0

    References:
      Keras ``Optimizer(clipnorm=...)``; ``tf.clip_by_norm``.
    """
    threshold = Threshold(max_norm, "max_norm", per_leaf=True, call="clip_by_leaf_norm")
    return _per_leaf_norm_clipper(
        threshold,
        normalize_ord(ord, call="clip_by_leaf_norm"),
        NonfinitePolicy(nonfinite),
        axis_name,
        layout,
        check_name(name, "clip_by_leaf_norm"),
        rms=False,
    )


def clip_by_block_rms(
    threshold: ThresholdLike,
    *,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Bounds the root mean square of each leaf: ``g_i / max(1, rms(g_i) / threshold_i)``.

    Same semantics as ``optax.clip_by_block_rms`` (the update clipping of Adafactor), with an
    exact float32 RMS for low-precision leaves, per-leaf thresholds and stats.

    Args:
      threshold: the RMS bound; a number, a schedule, a pytree of numbers (or prefix) or a
        function ``(path, leaf) -> number``.
      nonfinite: ``"propagate"`` (default), ``"zero"`` or ``"error"``.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) the leaves are split across
        (the RMS then uses the full leaf size).
      layout: with ``axis_name``, the PartitionSpec of each leaf; see
        [`clip_by_global_norm`][optaxclip.clip_by_global_norm].
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"clip_by_block_rms"``).

    Returns:
      An ``optax.GradientTransformation``. Its ``ClipStats`` report L2 norms throughout:
      ``pre_clip_norm`` and ``post_clip_norm`` are the L2 norms of the whole gradient, and
      ``threshold`` is the smallest per-leaf bound on a leaf's L2 norm, ``threshold_i *
      sqrt(size_i)`` (an RMS bound of 1 on a leaf of 4 entries reads 2). ``clipped_fraction``
      is the fraction of leaves clipped.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> grads = {"w": jnp.full((4,), 2.0)}
      >>> clipper = optaxclip.clip_by_block_rms(1.0)
      >>> clipped, state = clipper.update(grads, clipper.init(grads))
      >>> print(clipped["w"])
      [1. 1. 1. 1.]
      >>> print(float(state.stats.pre_clip_norm), float(state.stats.threshold))
      4.0 2.0

    References:
      Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
      ICML 2018 (https://arxiv.org/abs/1804.04235).
    """
    spec = Threshold(threshold, "threshold", per_leaf=True, call="clip_by_block_rms")
    return _per_leaf_norm_clipper(
        spec,
        2.0,
        NonfinitePolicy(nonfinite),
        axis_name,
        layout,
        check_name(name, "clip_by_block_rms"),
        rms=True,
    )
