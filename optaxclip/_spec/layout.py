"""Which devices hold which part of each gradient leaf, so that norms count every entry once.

Under ``jax.jit`` with ``NamedSharding`` nothing is needed: XLA sees whole arrays and computes
the norm of the whole gradient, adding scalar partial sums across devices itself.

Inside ``jax.shard_map`` or ``jax.pmap`` every device holds a block of each leaf, and the
clipper must add the per-device partial sums itself. ``axis_name`` names the mapped axes it
may add across. Along each of them a leaf is either

* split: each device holds a different block, so the partial sums must be added; or
* replicated: every device holds the same values, so adding would count the leaf once per
  device (a factor ``sqrt(axis size)`` in the L2 norm).

How the split is known, per leaf:

1. ``layout=``, when given: the leaf's ``PartitionSpec`` (the one in ``shard_map``'s
   ``in_specs``, or ``NamedSharding.spec``; see :func:`layout_from_shardings`), a prefix pytree
   of them, a function ``(path, leaf) -> spec``, or an axis name / tuple of axis names that
   every leaf is split along.
2. Otherwise, inside ``shard_map`` with ``check_vma=True`` (JAX's default), from the leaf's
   type: JAX records the manual axes along which a value varies, and a value that does not vary
   along an axis is the same on every device of that axis. Replicated leaves are then counted
   once without any ``layout``.
3. Otherwise (``pmap``, ``shard_map(check_vma=False)``): every leaf is taken as split along all
   of ``axis_name``, as in fully sharded (ZeRO/FSDP-style) data parallelism.

The gradient a clipper receives must already be the gradient of the global loss: reduced
(``psum``/``pmean``) across the data-parallel axes, as JAX does by itself for replicated
parameters under ``shard_map(check_vma=True)``. Unreduced partial gradients are rejected
where JAX's types say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from optaxclip._spec.validation import path_str

AxisName = str | tuple[str, ...] | None
# None | PartitionSpec | NamedSharding | str | tuple[str, ...] | a pytree of those (the gradient
# tree or a prefix of it) | (path, leaf) -> one of those.
Layout = Any


def normalize_axis_names(axis_name: AxisName) -> tuple[str, ...]:
    """``None`` -> ``()``, ``"x"`` -> ``("x",)``; tuples and lists of names as tuples.

    Raises:
      TypeError: if a name is not a string.
      ValueError: if a name is empty or repeated.
    """
    if axis_name is None:
        return ()
    if isinstance(axis_name, str):
        names: tuple[Any, ...] = (axis_name,)
    elif isinstance(axis_name, (tuple, list)):
        names = tuple(axis_name)
    else:
        raise TypeError(
            f"axis_name must be a string or a tuple of strings, got {type(axis_name).__name__} "
            f"{axis_name!r}."
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"axis_name must be a string or a tuple of strings, got {axis_name!r}.")
        if not name:
            raise ValueError("axis_name must not contain an empty string.")
    if len(set(names)) != len(names):
        raise ValueError(f"axis_name repeats an axis: {axis_name!r}.")
    return names


class _Split(NamedTuple):
    """One leaf's layout: the axes it is split along and, if known, per dimension."""

    axes: frozenset[str]
    dims: tuple[tuple[str, ...], ...] | None  # None: which dimension is not known


def _is_spec(x: Any) -> bool:
    """A layout leaf: a PartitionSpec, NamedSharding, axis name or tuple of axis names."""
    if isinstance(x, (PartitionSpec, NamedSharding, str)):
        return True
    return (
        isinstance(x, tuple)
        and not hasattr(x, "_fields")
        and len(x) > 0
        and all(isinstance(n, str) for n in x)
    )


def _parse_spec(spec: Any, path: Any) -> _Split:
    """Turns one leaf's layout entry into a _Split (Python-side, with precise errors)."""
    where = path_str(path)
    if isinstance(spec, NamedSharding):
        spec = spec.spec
    if isinstance(spec, str):
        return _Split(frozenset((spec,)), None)
    if isinstance(spec, tuple) and _is_spec(spec):
        return _Split(frozenset(spec), None)
    if not isinstance(spec, PartitionSpec):
        raise TypeError(
            f"layout at leaf {where}: expected a PartitionSpec, NamedSharding, axis name or "
            f"tuple of axis names, got {type(spec).__name__} {spec!r}."
        )
    unreduced = frozenset(getattr(spec, "unreduced", ()) or ())
    if unreduced:
        raise ValueError(
            f"layout at leaf {where}: {spec} marks the gradient as unreduced (partial sums) "
            f"along {sorted(unreduced)}; reduce it (lax.psum) before clipping, since the norm "
            f"of the summed gradient cannot be formed from the partial ones."
        )
    dims: list[tuple[str, ...]] = []
    for entry in spec:
        if entry is None:
            dims.append(())
            continue
        names = (entry,) if isinstance(entry, str) else entry
        if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
            raise TypeError(
                f"layout at leaf {where}: every entry of {spec} must be None, an axis name or a "
                f"tuple of axis names, got {entry!r}."
            )
        dims.append(tuple(names))
    split_along: frozenset[str] = frozenset(name for entry in dims for name in entry)
    return _Split(split_along, tuple(dims))


def _match_prefix(layout: Any, paths_leaves: Sequence[tuple[Any, Any]]) -> list[Any]:
    """For each gradient leaf, the layout entry whose key path is a prefix of the leaf's path.

    Matching by key path, not by tree structure, lets a plain nested dict of specs describe,
    for example, a ``flax.nnx.State`` of gradients, and ignores specs for parameters that have
    no gradient here (e.g. masked out by ``optax.masked``).
    """
    entries = {
        tuple(p): spec for p, spec in jax.tree_util.tree_leaves_with_path(layout, is_leaf=_is_spec)
    }
    for p, spec in entries.items():
        if not _is_spec(spec):
            raise TypeError(
                f"layout at {path_str(p)}: expected a PartitionSpec, NamedSharding, axis name or "
                f"tuple of axis names, got {type(spec).__name__} {spec!r}."
            )
    out = []
    for path, _ in paths_leaves:
        path = tuple(path)
        for k in range(len(path), -1, -1):
            if path[:k] in entries:
                out.append(entries[path[:k]])
                break
        else:
            raise ValueError(
                f"layout has no entry for gradient leaf {path_str(path)}; give a PartitionSpec "
                f"for every leaf (PartitionSpec() for a replicated one), as a pytree matching "
                f"the gradient tree or a prefix of it."
            )
    return out


def _leaf_splits(paths_leaves: Sequence[tuple[Any, Any]], layout: Layout) -> list[_Split] | None:
    """The layout of every leaf, or None when no layout was given."""
    if layout is None:
        return None
    if _is_spec(layout):
        specs = [layout] * len(paths_leaves)
    elif callable(layout):
        fn: Callable[[Any, Any], Any] = layout
        specs = [fn(path, leaf) for path, leaf in paths_leaves]
    else:
        specs = _match_prefix(layout, paths_leaves)
    splits = []
    for spec, (path, leaf) in zip(specs, paths_leaves, strict=True):
        split = _parse_spec(spec, path)
        if split.dims is not None and len(split.dims) > np.ndim(leaf):
            raise ValueError(
                f"layout at leaf {path_str(path)}: {spec} has {len(split.dims)} entries but the "
                f"leaf has {np.ndim(leaf)} dimensions."
            )
        splits.append(split)
    return splits


class _Types(NamedTuple):
    """Stand-in for JAX's manual-axis type where only ``.vma`` exists (older JAX)."""

    varying: frozenset[str]
    unreduced: frozenset[str]


def _manual_axis_types(x: Any) -> Any:
    """The manual-axis type of a traced value (``jax.typeof(x).mat``, ``.vma`` before), or None."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return mat
    vma = getattr(aval, "vma", None)
    return None if vma is None else _Types(frozenset(vma), frozenset())


def _is_bound(name: str) -> bool:
    try:
        lax.axis_index(name)
    except NameError:
        return False
    return True


def _tracks_varying(names: Sequence[str]) -> bool:
    """Whether JAX records, here, along which of ``names`` values vary (shard_map + check_vma).

    ``lax.axis_index`` varies along its axis by definition; where the type says otherwise
    (``pmap``, ``check_vma=False``) the information is not tracked.
    """
    for name in names:
        types = _manual_axis_types(lax.axis_index(name))
        if types is None or name not in types.varying:
            return False
    return True


def _check_bound(names: Sequence[str]) -> None:
    for name in names:
        if not _is_bound(name):
            raise ValueError(
                f"axis_name {name!r} is not a mapped axis here. axis_name is for use inside "
                f"jax.shard_map or jax.pmap over that axis; under jax.jit with NamedSharding leave "
                f"it None (XLA then computes the norm of the whole sharded gradient itself)."
            )


DimAxes = tuple[tuple[str, ...], ...]


def _resolve(
    tree: Any, axis_name: AxisName, layout: Layout
) -> list[tuple[tuple[str, ...], DimAxes | None]]:
    """Per leaf: the mapped axes it is split along, and the same per dimension if known."""
    mapped = normalize_axis_names(axis_name)
    paths_leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not mapped:
        if layout is not None:
            raise ValueError(
                "layout was given without axis_name. A layout only says how leaves are split "
                "across the mapped axes of shard_map/pmap named by axis_name; under jax.jit "
                "with NamedSharding neither is needed."
            )
        return [((), ((),) * np.ndim(x)) for _, x in paths_leaves]
    _check_bound(mapped)
    tracking = _tracks_varying(mapped)
    splits = _leaf_splits(paths_leaves, layout)
    result: list[tuple[tuple[str, ...], DimAxes | None]] = []
    for i, (path, leaf) in enumerate(paths_leaves):
        types = _manual_axis_types(leaf) if tracking else None
        if types is not None:
            unreduced = set(getattr(types, "unreduced", ())) & set(mapped)
            if unreduced:
                raise ValueError(
                    f"gradient leaf {path_str(path)} is unreduced (holds partial sums) along "
                    f"{sorted(unreduced)}; reduce it with lax.psum before clipping."
                )
        if splits is None:
            if types is None:
                result.append((mapped, None))
            else:
                axes = tuple(n for n in mapped if n in types.varying)
                local: DimAxes | None = None if axes else ((),) * np.ndim(leaf)
                result.append((axes, local))
            continue
        split = splits[i]
        for name in sorted(split.axes - set(mapped)):
            if _is_bound(name):
                raise ValueError(
                    f"layout says gradient leaf {path_str(path)} is split along the mapped axis "
                    f"{name!r}, which is not in axis_name={mapped!r}; add it to axis_name, "
                    f"or the norm would miss the blocks held by the other devices."
                )
        axes = tuple(n for n in mapped if n in split.axes)
        if types is not None:
            same = [n for n in axes if n not in types.varying]
            if same:
                raise ValueError(
                    f"layout says gradient leaf {path_str(path)} is split along {same}, but JAX "
                    f"types it as identical on every device along {same} (replicated); adding "
                    f"its blocks would count it once per device. Its PartitionSpec should not "
                    f"name {same}."
                )
        dims: DimAxes | None = None
        if split.dims is not None:
            padded = split.dims + ((),) * (np.ndim(leaf) - len(split.dims))
            dims = tuple(tuple(n for n in d if n in mapped) for d in padded)
        result.append((axes, dims))
    return result


def leaf_reduction_axes(tree: Any, axis_name: AxisName, layout: Layout) -> list[tuple[str, ...]]:
    """For each leaf of ``tree`` (``tree_leaves`` order), the axes to add its partial norm over.

    Call it at trace time inside the mapped function (it checks that the axes are bound).

    Args:
      tree: the gradient pytree (the per-device blocks).
      axis_name: the mapped axis name(s), or None outside ``shard_map``/``pmap``.
      layout: see the module docstring.

    Returns:
      A list with one tuple of axis names per leaf, in ``axis_name`` order.

    Raises:
      ValueError: an axis that is not bound here, a ``layout`` without ``axis_name``, a layout
        pytree with no entry for a leaf, a spec naming a mapped axis missing from
        ``axis_name``, a spec that contradicts the leaf's type (split along an axis where it is
        replicated), or an unreduced gradient.
      TypeError: a layout entry that is not a spec.
    """
    return [axes for axes, _ in _resolve(tree, axis_name, layout)]


def leaf_dim_axes(tree: Any, axis_name: AxisName, layout: Layout) -> list[DimAxes | None]:
    """For each leaf, per dimension, the mapped axes that dimension is split along.

    Clippers that reduce over some dimensions only (per-unit norms) need this: a partial
    reduction must be added across the axes of the reduced dimensions and not across those of
    the kept ones (there the devices hold different units). An entry is None when the leaf is
    split but the layout does not say along which dimension (no PartitionSpec given).

    Args:
      tree: the gradient pytree (the per-device blocks).
      axis_name: the mapped axis name(s), or None.
      layout: see the module docstring.

    Returns:
      A list with, per leaf, a tuple (one entry per dimension) of tuples of axis names, or None.

    Raises:
      ValueError, TypeError: as :func:`leaf_reduction_axes`.
    """
    return [dims for _, dims in _resolve(tree, axis_name, layout)]
