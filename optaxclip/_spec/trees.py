"""Per-leaf specs given as pytrees: broadcasting a prefix spec to every leaf of a tree."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from optaxclip._spec.validation import path_str


class _Box:
    """Holds one spec entry as an opaque pytree leaf while a prefix spec is broadcast."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def broadcast_prefix(
    spec: Any,
    tree: Any,
    *,
    message: str,
    tree_name: str,
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """One entry of ``spec`` per leaf of ``tree`` (``tree_leaves`` order).

    ``spec`` has the structure of ``tree`` or of a prefix of it; ``is_leaf`` says what counts
    as one entry. A mismatch raises ``ValueError`` starting with ``message`` and naming the
    first path where the two differ.
    """
    try:
        expanded = jax.tree.map(
            lambda entry, subtree: jax.tree.map(lambda _: _Box(entry), subtree),
            spec,
            tree,
            is_leaf=is_leaf,
        )
    except (ValueError, TypeError) as error:
        mismatch = describe_mismatch(spec, tree, tree_name, is_leaf)
        raise ValueError(f"{message} {mismatch} (JAX said: {error})") from None
    return [box.value for box in jax.tree_util.tree_leaves(expanded)]


def describe_mismatch(
    spec: Any, tree: Any, tree_name: str, is_leaf: Callable[[Any], bool] | None = None
) -> str:
    """Names the first path where a per-leaf ``spec`` pytree and ``tree`` disagree.

    Args:
      spec: the pytree given by the user (the structure of ``tree`` or a prefix of it).
      tree: the tree it should fit (gradients or parameters).
      tree_name: what ``tree`` is, for the message (``"gradient"``, ``"parameter"``).
      is_leaf: what counts as one entry of ``spec`` (as in ``jax.tree_util``).

    Returns:
      One or two sentences: a spec entry with no counterpart in ``tree`` and/or a leaf of
      ``tree`` that no spec entry covers; a generic sentence when the paths all match but
      the container types differ.
    """
    spec_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(spec, is_leaf)]
    tree_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]

    def covers(prefix: str, path: str) -> bool:
        return prefix == "<root>" or path.startswith(prefix)

    extra = [s for s in spec_paths if not any(covers(s, p) for p in tree_paths)]
    uncovered = [p for p in tree_paths if not any(covers(s, p) for s in spec_paths)]
    parts = []
    if extra:
        parts.append(f"Spec entry {extra[0]} has no counterpart in the {tree_name} tree.")
    if uncovered:
        parts.append(f"{tree_name.capitalize()} leaf {uncovered[0]} is not covered by the spec.")
    return " ".join(parts) if parts else "The container types or structures differ."
