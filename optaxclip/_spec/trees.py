"""Per-leaf specs given as pytrees: broadcasting a prefix spec to every leaf of a tree.

A spec entry applies to every leaf whose key path starts with the entry's key path. Matching
by key path rather than by tree structure lets a plain nested dict describe any tree with the
same keys, such as the ``flax.nnx.State`` that ``nnx.Optimizer`` passes to a transformation,
where ``jax.tree.map`` would refuse the two container types.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from optaxclip._spec.validation import path_str

KeyPath = tuple[Any, ...]


def _has_no_leaves(x: Any) -> bool:
    return not jax.tree_util.tree_leaves(x)


def _leafless_parts(tree: Any) -> list[KeyPath]:
    """Key paths of the parts of ``tree`` that hold no leaf: None, empty containers, masked.

    A spec may name them (a full spec written for the whole model, used where
    ``optax.masked`` has replaced some leaves), although no leaf takes their entry.
    """
    return [
        tuple(path)
        for path, part in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_has_no_leaves)
        if _has_no_leaves(part)
    ]


def broadcast_prefix(
    spec: Any,
    tree: Any,
    *,
    message: str,
    tree_name: str,
    is_leaf: Callable[[Any], bool] | None = None,
) -> list[Any]:
    """One entry of ``spec`` per leaf of ``tree`` (``tree_leaves`` order).

    ``spec`` has the keys of ``tree`` or of a prefix of it; each leaf of ``tree`` takes the
    entry whose key path is a prefix of the leaf's own. Only the keys must agree, not the
    container types: a dict describes an ``nnx.State`` or any other node with the same keys.

    Args:
      spec: the pytree given by the user.
      tree: the tree it must fit (gradients or parameters).
      message: the start of the error message, naming the argument.
      tree_name: what ``tree`` is, for the message (``"gradient"``, ``"parameter"``).
      is_leaf: what counts as one entry of ``spec`` (as in ``jax.tree_util``).

    Returns:
      The entry of each leaf of ``tree``.

    Raises:
      ValueError: starting with ``message``, naming the first spec entry with no counterpart
        in ``tree`` and/or the first leaf of ``tree`` that no entry covers.
    """
    entries = {
        tuple(path): entry for path, entry in jax.tree_util.tree_leaves_with_path(spec, is_leaf)
    }
    used: set[KeyPath] = set()
    out: list[Any] = []
    uncovered: list[KeyPath] = []
    for path, _ in jax.tree_util.tree_leaves_with_path(tree):
        path = tuple(path)
        prefix = next((path[:k] for k in range(len(path), -1, -1) if path[:k] in entries), None)
        if prefix is None:
            uncovered.append(path)
            continue
        used.add(prefix)
        out.append(entries[prefix])
    unused = [path for path in entries if path not in used]
    if unused:
        leafless = _leafless_parts(tree)

        def within(a: KeyPath, b: KeyPath) -> bool:
            return a[: len(b)] == b

        unused = [p for p in unused if not any(within(p, e) or within(e, p) for e in leafless)]
    if not unused and not uncovered:
        return out
    parts = []
    if unused:
        parts.append(
            f"Spec entry {path_str(unused[0])} has no counterpart in the {tree_name} tree."
        )
    if uncovered:
        parts.append(
            f"{tree_name.capitalize()} leaf {path_str(uncovered[0])} is not covered by the spec."
        )
    raise ValueError(f"{message} {' '.join(parts)}")
