"""How each leaf is laid out across the mapped axes of ``shard_map``/``pmap``.

Inside ``shard_map`` every device sees only its block of a leaf. A norm over the whole
gradient must add the partial sums across the axes the leaf is *split* along, and must not
add them across axes it is *replicated* along (that would count it once per device).

``axis_name`` names the mapped axes the reduction may use. ``layout`` says, per leaf, which
of them the leaf is split along. It is the same PartitionSpec you gave ``shard_map``'s
``in_specs`` for that leaf (or a prefix pytree of them), a tuple of axis names, or a function
``(path, leaf) -> PartitionSpec``. Without ``layout`` every leaf is taken as split along all
of ``axis_name`` (the data-parallel gradient pattern of ``pmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec

from optaxclip._validation import path_str

AxisName = str | tuple[str, ...] | None
Layout = Any  # None | PartitionSpec | tuple[str, ...] | pytree of those | (path, leaf) -> spec


def normalize_axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """``None`` -> (), ``"x"`` -> ("x",), tuples and lists as tuples."""
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        return (axis_name,)
    names = tuple(axis_name)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"axis_name must be a string or a tuple of strings, got {axis_name!r}.")
    return names


def _is_spec(x: Any) -> bool:
    return (
        x is None
        or isinstance(x, (PartitionSpec, str))
        or (
            isinstance(x, tuple)
            and all(isinstance(n, str) for n in x)
            and not hasattr(x, "_fields")
        )
    )


def _names_in(spec: Any, path: Any, mapped: Sequence[str]) -> tuple[str, ...]:
    """Mapped axis names mentioned by one leaf's spec, in ``mapped`` order."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        entries: list[Any] = [spec]
    else:
        entries = list(spec)
    names: set[str] = set()
    for entry in entries:
        if entry is None:
            continue
        for name in (entry,) if isinstance(entry, str) else tuple(entry):
            if not isinstance(name, str):
                raise TypeError(
                    f"layout at leaf {path_str(path)}: entries must be axis names, got {entry!r}."
                )
            names.add(name)
    unknown = names - set(mapped)
    if unknown and mapped:
        # Axes not in axis_name are simply not reduced over (e.g. an axis handled outside).
        names -= unknown
    return tuple(n for n in mapped if n in names)


def leaf_reduction_axes(tree: Any, axis_name: AxisName, layout: Layout) -> list[tuple[str, ...]]:
    """For each leaf of ``tree`` (``tree_leaves`` order), the axes to sum its partial norm over.

    Raises:
      ValueError: if a ``layout`` pytree does not match ``tree`` (names the paths).
    """
    mapped = normalize_axis_names(axis_name)
    paths_leaves = jax.tree_util.tree_leaves_with_path(tree)
    if layout is None or not mapped:
        return [mapped] * len(paths_leaves)
    if callable(layout) and not _is_spec(layout):
        fn: Callable[[Any, Any], Any] = layout
        return [_names_in(fn(path, leaf), path, mapped) for path, leaf in paths_leaves]
    if _is_spec(layout):
        return [_names_in(layout, path, mapped) for path, _ in paths_leaves]
    try:
        expanded = jax.tree.map(
            lambda spec, subtree: jax.tree.map(lambda _: spec, subtree),
            layout,
            tree,
            is_leaf=lambda x: _is_spec(x) and x is not None,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"layout must match the gradient tree or be a prefix of it ({error})."
        ) from None
    specs = jax.tree_util.tree_leaves(expanded, is_leaf=lambda x: _is_spec(x) and x is not None)
    if len(specs) != len(paths_leaves):
        raise ValueError(
            f"layout gives {len(specs)} specs for {len(paths_leaves)} gradient leaves; "
            f"use None-free PartitionSpec() for replicated leaves."
        )
    return [
        _names_in(spec, path, mapped) for spec, (path, _) in zip(specs, paths_leaves, strict=True)
    ]
