"""AGC's units: which axes of each parameter form a unit, and which leaves AGC leaves alone."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._spec.trees import broadcast_prefix
from optaxclip._spec.validation import path_str

_PREFIX_MESSAGE = "{} must have the keys of the parameter tree or of a prefix of it."

UNIT_AXES_PRESETS = ("flax", "equinox", "torch", "whole")

UnitAxes = Any  # preset name | int | tuple[int, ...] | pytree (prefix) of those | callable


def unit_reduction_axes(preset: str, ndim: int) -> tuple[int, ...]:
    """The axes a ``unit_axes`` preset reduces over for a leaf of rank ``ndim``.

    Rank 0 and rank 1 leaves (scalars, biases, scales) are one unit under every preset.

    Args:
      preset: ``"flax"`` (reduce every axis but the last: one unit per output feature of an
        ``(in, out)`` kernel or an ``(H, W, I, O)`` conv kernel), ``"equinox"`` or ``"torch"``
        (reduce every axis but the first: one unit per row of an ``(out, in)`` weight, an
        ``(out, in, k...)`` conv or a ``(vocab, dim)`` embedding), or ``"whole"`` (one unit
        per leaf).
      ndim: the rank of the leaf.

    Returns:
      The axes to reduce over, sorted.

    Raises:
      ValueError: an unknown preset name.

    Examples:
      >>> import optaxclip
      >>> optaxclip.unit_reduction_axes("flax", 4)
      (0, 1, 2)
      >>> optaxclip.unit_reduction_axes("equinox", 2)
      (1,)
      >>> optaxclip.unit_reduction_axes("torch", 1)
      (0,)
    """
    if preset not in UNIT_AXES_PRESETS:
        raise ValueError(
            f"unit_axes: unknown preset {preset!r}; choose one of {UNIT_AXES_PRESETS}, or give "
            f"the axes to reduce over as a tuple of ints."
        )
    everything = tuple(range(ndim))
    if ndim <= 1 or preset == "whole":
        return everything
    if preset == "flax":
        return everything[:-1]
    return everything[1:]


def _is_axes_entry(x: Any) -> bool:
    """A leaf of a ``unit_axes`` spec: a preset name, an int or a tuple of ints."""
    if isinstance(x, (str, int, np.integer)) or x is None:
        return True
    return (
        isinstance(x, tuple)
        and not hasattr(x, "_fields")
        and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in x)
    )


def _check_axes_entry(value: Any, where: str, name: str = "unit_axes") -> None:
    """Checks a ``unit_axes`` entry that does not depend on a leaf's rank."""
    if isinstance(value, str):
        unit_reduction_axes(value, 0)
        return
    if isinstance(value, bool) or not _is_axes_entry(value) or value is None:
        raise TypeError(
            f"{name}{where} must be a preset name {UNIT_AXES_PRESETS}, an int or a tuple of "
            f"ints (the axes to reduce over), got {value!r}."
        )


def _axes_for_leaf(value: Any, path: Any, ndim: int, name: str) -> tuple[int, ...]:
    """Resolves one ``unit_axes`` entry for a leaf of rank ``ndim``."""
    where = f" at leaf {path_str(path)}"
    _check_axes_entry(value, where, name)
    if isinstance(value, str):
        return unit_reduction_axes(value, ndim)
    entries = (value,) if isinstance(value, (int, np.integer)) else value
    axes = []
    for axis in entries:
        if not -ndim <= int(axis) < ndim:
            raise ValueError(
                f"{name}{where}: axis {int(axis)} is out of range for a leaf of rank {ndim}."
            )
        axes.append(int(axis) % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}{where}: repeated axis in {value!r}.")
    return tuple(sorted(axes))


def validate_unit_axes(unit_axes: UnitAxes) -> None:
    """Construction-time checks of a ``unit_axes`` spec (its structure is checked at init)."""
    if callable(unit_axes):
        return
    if _is_axes_entry(unit_axes):
        _check_axes_entry(unit_axes, "")
        return
    for path, entry in jax.tree_util.tree_leaves_with_path(unit_axes, _is_axes_entry):
        _check_axes_entry(entry, f" at {path_str(path)}")


def validate_exclude(exclude: Any) -> None:
    if exclude is None or callable(exclude):
        return
    for path, entry in jax.tree_util.tree_leaves_with_path(exclude, lambda x: x is None):
        if not isinstance(entry, (bool, np.bool_)):
            raise TypeError(
                f"exclude at {path_str(path)} must be a bool (True leaves the leaf unclipped), "
                f"got {entry!r}."
            )


def resolve_units(
    unit_axes: UnitAxes, exclude: Any, params: Any, *, name: str = "unit_axes"
) -> tuple[list[tuple[int, ...]], list[bool]]:
    """Per leaf of ``params``: the axes to reduce over, and whether the leaf is excluded.

    ``name`` is how messages about the axes refer to the argument the user gave them in.
    """
    paths_leaves = jax.tree_util.tree_leaves_with_path(params)
    if callable(unit_axes):
        entries = [unit_axes(path, leaf) for path, leaf in paths_leaves]
    elif _is_axes_entry(unit_axes):
        entries = [unit_axes] * len(paths_leaves)
    else:
        entries = broadcast_prefix(
            unit_axes,
            params,
            message=_PREFIX_MESSAGE.format(name),
            tree_name="parameter",
            is_leaf=_is_axes_entry,
        )
    axes = [
        _axes_for_leaf(entry, path, jnp.ndim(leaf), name)
        for entry, (path, leaf) in zip(entries, paths_leaves, strict=True)
    ]
    if exclude is None:
        flags = [False] * len(paths_leaves)
    elif callable(exclude):
        flags = []
        for path, leaf in paths_leaves:
            flag = exclude(path, leaf)
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(
                    f"exclude returned {flag!r} for leaf {path_str(path)}; it must return a "
                    f"Python bool."
                )
            flags.append(bool(flag))
    else:
        flags = [
            bool(f)
            for f in broadcast_prefix(
                exclude,
                params,
                message=_PREFIX_MESSAGE.format("exclude"),
                tree_name="parameter",
                is_leaf=lambda x: x is None,
            )
        ]
    return axes, flags


def check_params_match(updates: Any, params: Any, label: str) -> list[jax.Array]:
    """The parameter leaves, after checking they mirror the gradient leaves."""
    if params is None:
        raise ValueError(
            f"{label}: adaptive gradient clipping compares each gradient with its parameters, "
            f"so it needs them: call tx.update(grads, state, params)."
        )
    grad_paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)]
    param_items = jax.tree_util.tree_leaves_with_path(params)
    param_paths = [path_str(p) for p, _ in param_items]
    grad_structure: Any = jax.tree.structure(updates)
    if grad_structure != jax.tree.structure(params):
        missing = [p for p in grad_paths if p not in param_paths]
        extra = [p for p in param_paths if p not in grad_paths]
        details = []
        if missing:
            details.append(f"gradient leaf {missing[0]} has no parameter")
        if extra:
            details.append(f"parameter leaf {extra[0]} has no gradient")
        detail = "; ".join(details) or "the container types differ"
        raise ValueError(f"{label}: params and gradients must have the same tree ({detail}).")
    grad_leaves = jax.tree_util.tree_leaves(updates)
    for path, (_, param), grad in zip(param_paths, param_items, grad_leaves, strict=True):
        if jnp.shape(param) != jnp.shape(grad):
            raise ValueError(
                f"{label}: at leaf {path} the parameter has shape {jnp.shape(param)} but the "
                f"gradient has shape {jnp.shape(grad)}."
            )
    return [jnp.asarray(x) for _, x in param_items]


class Unset:
    """The default of an argument the caller left out; its repr says what takes its place."""

    __slots__ = ("meaning",)

    def __init__(self, meaning: str) -> None:
        self.meaning = meaning

    def __repr__(self) -> str:
        return self.meaning


# Distinct objects, not None or "flax": ``axis=None`` has a meaning of its own (Optax's rule),
# and an explicit ``unit_axes`` must be told apart from the default to catch a conflict.
AXIS_UNSET = Unset("<unit_axes decides>")
UNIT_AXES_UNSET = Unset('<"flax" unless axis is given>')
AXIS_CALL = "adaptive_grad_clip(axis=...)"


def optax_unit_axes(path: Any, leaf: Any) -> tuple[int, ...]:
    """Optax's rule for ``axis=None``: the axes to reduce over, from the leaf's shape.

    A leaf with at most one axis longer than 1 is one unit; rank 2 and 3 reduce over axis 0,
    rank 4 and 5 over every axis but the last. Optax has no rule for higher ranks.
    """
    shape = np.shape(leaf)
    everything = tuple(range(len(shape)))
    if sum(n != 1 for n in shape) <= 1:
        return everything
    if len(shape) in (2, 3):
        return (0,)
    if len(shape) in (4, 5):
        return everything[:-1]
    raise ValueError(
        f"{AXIS_CALL}: parameter leaf {path_str(path)} has shape {shape}, and with axis=None "
        f"(Optax's rule) only ranks up to 5 have default units; give axis= or unit_axes= the "
        f"axes to reduce over."
    )


def _as_axis_set(value: Any) -> frozenset[int] | None:
    """The axes an int or a tuple of ints names, or None for anything else."""

    def is_int(i: Any) -> bool:
        return isinstance(i, (int, np.integer)) and not isinstance(i, bool)

    if is_int(value):
        return frozenset((int(value),))
    if isinstance(value, tuple) and all(is_int(i) for i in value):
        return frozenset(int(i) for i in value)
    return None


def unit_spec(axis: Any, unit_axes: UnitAxes) -> tuple[UnitAxes, str]:
    """The units that ``axis`` and ``unit_axes`` ask for together, and the argument to name.

    Both name the axes each unit's norm reduces over; ``axis`` is Optax's spelling.

    Raises:
      TypeError: ``axis`` is not None, an int or a tuple of ints (an array asks for
        ``static_args``).
      ValueError: ``axis`` and ``unit_axes`` are both given and name different axes.
    """
    if axis is AXIS_UNSET:
        return ("flax" if unit_axes is UNIT_AXES_UNSET else unit_axes), "unit_axes"
    if isinstance(axis, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{AXIS_CALL}: the axes must be a static int or tuple of ints, got an array; with "
            f"optax.inject_hyperparams pass static_args=('axis',)."
        )
    if axis is not None and _as_axis_set(axis) is None:
        raise TypeError(
            f"{AXIS_CALL}: expected None, an int or a tuple of ints (the axes each unit's norm "
            f"reduces over), got {type(axis).__name__} {axis!r}."
        )
    if unit_axes is not UNIT_AXES_UNSET and (
        axis is None or _as_axis_set(unit_axes) != _as_axis_set(axis)
    ):
        raise ValueError(
            f"adaptive_grad_clip(axis=..., unit_axes=...): both name the axes each unit's norm "
            f"reduces over, and they differ (axis={axis!r}, unit_axes={unit_axes!r}); give one "
            f"of them."
        )
    return (optax_unit_axes if axis is None else axis), AXIS_CALL
