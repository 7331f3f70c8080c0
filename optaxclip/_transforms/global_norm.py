"""clip_by_global_norm: rescale the whole gradient when its global norm passes a threshold."""

from __future__ import annotations

from typing import Any

import jax
import optax

from optaxclip._engine.clip import check_params, clip_to_global_norm, flatten_updates
from optaxclip._engine.nonfinite import NonfinitePolicy
from optaxclip._numerics.reductions import scaled_norm_of_leaves
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes, normalize_axis_names
from optaxclip._spec.stats import ClipState, initial_stats
from optaxclip._spec.thresholds import Threshold, ThresholdLike
from optaxclip._spec.validation import check_name, normalize_ord


def clip_by_global_norm(
    max_norm: ThresholdLike,
    *,
    ord: float | int | str | None = None,
    nonfinite: str = "propagate",
    axis_name: AxisName = None,
    layout: Layout = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Rescales the whole gradient when its global norm exceeds ``max_norm``.

    If ``norm > max_norm``, every leaf is multiplied by ``max_norm / norm``; otherwise the
    leaves are returned bit for bit unchanged (subnormal entries aside, which XLA:CPU flushes
    to 0 in any multiplication, by 1 included). The norm is exact in fp16/bf16 (float32
    accumulation, no overflow), ``max_norm=0`` gives zeros (never NaN), derivatives through
    the update are finite everywhere, and each output leaf keeps its dtype. Same name and
    call shape as ``optax.clip_by_global_norm`` (and ``torch.nn.utils.clip_grad_norm_``).

    Args:
      max_norm: the threshold: a number >= 0 or a schedule ``step -> value`` (the step is
        counted in the state).
      ord: the norm's order: 1, 2 (the default, also given by None), ``inf`` or any real
        p >= 1.
      nonfinite: what a gradient holding NaN or Inf becomes. ``"propagate"`` (default)
        passes it through unscaled, so that a guard downstream (such as
        [`skip_nonfinite`][optaxclip.skip_nonfinite]) can skip the step without finite
        leaves being altered; ``"zero"`` makes the update all zeros; ``"error"`` raises
        ``FloatingPointError`` naming the first non-finite leaf (under ``jit``, when the
        result is read).
      axis_name: inside ``shard_map``/``pmap``, the mapped axis name(s) the gradient is split
        across; the norm is then that of the whole gradient.
      layout: with ``axis_name``, the PartitionSpec of each leaf (a prefix pytree of specs or
        ``(path, leaf) -> spec``), so that leaves replicated along an axis are counted once;
        see [`layout_from_shardings`][optaxclip.layout_from_shardings] and the
        [distributed training page](distributed.md). Default: inside
        ``shard_map(check_vma=True)`` read from JAX's types; elsewhere every leaf is taken as
        split along all of ``axis_name``.
      name: label for [`clip_stats`][optaxclip.clip_stats] (default ``"clip_by_global_norm"``).

    Returns:
      An ``optax.GradientTransformation`` whose state is a [`ClipState`][optaxclip.ClipState].

    Raises:
      ValueError: a negative or NaN ``max_norm``, ``ord < 1``, an unknown ``nonfinite``.
      TypeError: a non-float gradient leaf (names its path).

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> clipper = optaxclip.clip_by_global_norm(1.0)
      >>> grads = {"w": jnp.array([3.0, 4.0])}
      >>> state = clipper.init(grads)
      >>> clipped, state = clipper.update(grads, state)
      >>> print(clipped["w"], float(state.stats.pre_clip_norm))
      [0.6 0.8] 5.0

    References:
      Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
      ICML 2013 (https://arxiv.org/abs/1211.5063).
    """
    threshold = Threshold(max_norm, "max_norm", per_leaf=False, call="clip_by_global_norm")
    p = normalize_ord(ord, call="clip_by_global_norm")
    policy = NonfinitePolicy(nonfinite)
    normalize_axis_names(axis_name)
    label = check_name(name, "clip_by_global_norm")

    def init_fn(params: Any) -> ClipState:
        check_params(params)
        threshold.check_schedule_start()
        return ClipState(stats=initial_stats(label))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        paths, leaves, treedef = flatten_updates(updates)
        count = state.stats.steps
        norm = scaled_norm_of_leaves(leaves, p, leaf_reduction_axes(updates, axis_name, layout))
        limit = threshold.scalar(count, norm.root.dtype)
        out, stats = clip_to_global_norm(paths, leaves, norm, limit, policy, label, count + 1)
        return jax.tree_util.tree_unflatten(treedef, out), ClipState(stats=stats)

    return optax.GradientTransformation(init_fn, update_fn)
