"""The public norm functions: global_norm and leaf_norms of a pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optaxclip._numerics.reductions import norm_of_leaves, norms_per_leaf
from optaxclip._spec.layout import AxisName, Layout, leaf_reduction_axes
from optaxclip._spec.validation import check_float_leaves, normalize_ord


class _Required:
    """The default of an argument that may come under either of two names, but must come."""

    def __repr__(self) -> str:
        return "<required>"


_REQUIRED: Any = _Required()


def _tree_or_updates(tree: Any, updates: Any) -> Any:
    """The pytree given to :func:`global_norm` by position, as ``tree=`` or as ``updates=``."""
    if tree is not _REQUIRED and updates is not _REQUIRED:
        raise TypeError(
            "global_norm(tree=..., updates=...): give the pytree once, by position, as tree= "
            "or as updates=, not both."
        )
    if tree is _REQUIRED and updates is _REQUIRED:
        raise TypeError(
            "global_norm(): missing the pytree; give it by position, as tree= or as updates=."
        )
    return updates if tree is _REQUIRED else tree


def _flatten_checked(tree: Any, name: str) -> tuple[list[Any], list[jax.Array], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [jnp.asarray(x) if not hasattr(x, "dtype") else x for _, x in paths_leaves]
    check_float_leaves(((p, x) for (p, _), x in zip(paths_leaves, leaves, strict=True)), name)
    return [p for p, _ in paths_leaves], leaves, treedef


def global_norm(
    tree: Any = _REQUIRED,
    ord: float | int | str | None = 2,
    *,
    updates: Any = _REQUIRED,
    axis_name: AxisName = None,
    layout: Layout = None,
) -> jax.Array:
    """The p-norm of all leaves of a pytree taken together, computed exactly.

    Unlike ``optax.global_norm``, the reduction accumulates in float32 (float64 for float64
    leaves) whatever the leaf dtype, and never overflows or underflows where the true norm
    fits in float32: an fp16 tree of 1e5 ones gives 316.23, float32 leaves of magnitude
    1e25 give their finite norm. Complex leaves contribute ``|x|``. ``None`` leaves and
    empty trees contribute nothing (an empty tree has norm 0). The gradient is finite
    everywhere, including at an all-zero tree.

    Args:
      tree: a pytree of floating-point or complex arrays.
      ord: the order p of the norm: 1, 2, ``math.inf`` (the max norm) or any real p >= 1.
      updates: the same pytree under the name ``optax.global_norm`` gives it, so that
        ``global_norm(updates=grads)`` works as it does there; give ``tree`` or ``updates``,
        not both.
      axis_name: inside ``shard_map`` or ``pmap``, the mapped axis name (or tuple of names)
        across which the leaves are split; the partial sums are added across those devices,
        so every device gets the norm of the whole, unsharded tree.
      layout: with ``axis_name``, how each leaf is laid out: a PartitionSpec (or a prefix
        pytree of them, or ``(path, leaf) -> spec``) naming the axes the leaf is split along;
        leaves replicated along an axis are counted once, not once per device. See
        [`layout_from_shardings`][optaxclip.layout_from_shardings].

    Returns:
      A float32 scalar (float64 if any leaf is float64).

    Raises:
      TypeError: if a leaf is not a floating-point or complex array (names its path), or the
        pytree is given both as ``tree`` and as ``updates``, or not at all.
      ValueError: if ``ord`` is below 1 or NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> tree = {"w": jnp.ones(100_000, jnp.float16)}
      >>> print(f"{float(optaxclip.global_norm(tree)):.2f}")
      316.23
      >>> print(float(optaxclip.global_norm({"a": jnp.array([3.0, -4.0])}, ord=1)))
      7.0
      >>> print(float(optaxclip.global_norm(updates={"a": jnp.array([3.0, -4.0])})))
      5.0
    """
    tree = _tree_or_updates(tree, updates)
    p = normalize_ord(ord, call="global_norm")
    _, leaves, _ = _flatten_checked(tree, "tree")
    return norm_of_leaves(leaves, p, leaf_reduction_axes(tree, axis_name, layout))


def leaf_norms(
    tree: Any,
    ord: float | int | str | None = 2,
    *,
    axis_name: AxisName = None,
    layout: Layout = None,
) -> Any:
    """One p-norm per leaf, as a pytree of scalars with the structure of ``tree``.

    Same accuracy rules as [`global_norm`][optaxclip.global_norm] (float32 accumulation, no
    overflow, finite gradients).

    Args:
      tree: a pytree of floating-point or complex arrays.
      ord: the order p of the norm: 1, 2, ``math.inf`` or any real p >= 1.
      axis_name: inside ``shard_map``/``pmap``, the axis name(s) across which each leaf is
        split; partial sums are added across them.
      layout: per-leaf PartitionSpecs, as for [`global_norm`][optaxclip.global_norm].

    Returns:
      A pytree with the structure of ``tree`` whose leaves are float32 (or float64) scalars.

    Examples:
      >>> import jax.numpy as jnp
      >>> import optaxclip
      >>> norms = optaxclip.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(4)})
      >>> print({k: float(v) for k, v in norms.items()})
      {'a': 5.0, 'b': 2.0}
    """
    p = normalize_ord(ord, call="leaf_norms")
    _, leaves, treedef = _flatten_checked(tree, "tree")
    vector = norms_per_leaf(leaves, p, leaf_reduction_axes(tree, axis_name, layout))
    return jax.tree_util.tree_unflatten(treedef, [vector[i] for i in range(len(leaves))])
