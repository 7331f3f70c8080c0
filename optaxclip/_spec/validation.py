"""Checks on user input that run in Python, at construction or at trace time.

This module is part of the bottom layer: it imports nothing else of ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def path_str(path: tuple[Any, ...]) -> str:
    """Formats a pytree key path the way ``jax.tree_util.keystr`` does, ``<root>`` if empty."""
    text = jax.tree_util.keystr(path)
    return text if text else "<root>"


def is_real_dtype(dtype: Any) -> bool:
    """True for integer and floating dtypes, bfloat16 and the other ``ml_dtypes`` included.

    NumPy's own ``np.issubdtype(bfloat16, np.number)`` is False: those types live outside its
    type hierarchy, and ``jnp.issubdtype`` is the test that knows them.
    """
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def is_concrete_number(value: Any) -> bool:
    """True for Python numbers, NumPy scalars and concrete (non-traced) 0-d arrays.

    NumPy scalars include those of ``ml_dtypes`` such as ``bfloat16``, which are not
    ``np.number``.
    """
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return True
    if isinstance(value, np.generic):
        return is_real_dtype(np.asarray(value).dtype)
    return isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0


def subject(name: str, call: str | None, where: str = "") -> str:
    """How a message names the argument: ``zclip(alpha=...):`` with ``call``, else ``alpha``.

    ``call`` is the public function the user called, so that the message starts with what
    they wrote; ``where`` (such as `` at leaf ['w']``) follows the argument.
    """
    if call is None:
        return f"{name}{where}"
    return f"{call}({name}=...){where}:"


def check_number(
    value: Any,
    name: str,
    *,
    path: str | None = None,
    allow_inf: bool = True,
    minimum: float = 0.0,
    call: str | None = None,
) -> None:
    """Raises if a concrete hyperparameter is not a real number >= ``minimum``.

    Traced values (for example from ``optax.inject_hyperparams`` under ``jit``) cannot be
    inspected in Python and are accepted as they are. ``call`` names the public function in
    the message (see ``subject``).
    """
    who = subject(name, call, f" at leaf {path}" if path is not None else "")
    if isinstance(value, bool) or (
        isinstance(value, (np.ndarray, np.generic, jax.Array))
        and not isinstance(value, jax.core.Tracer)
        and np.asarray(value).dtype == np.bool_
    ):
        raise TypeError(f"{who} must be a real number, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return
    # NumPy scalars go through the array branch too: those of ml_dtypes (bfloat16) are
    # np.generic but neither np.integer nor np.floating.
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if np.ndim(value) != 0:
            raise ValueError(f"{who} must be a scalar, got an array of shape {np.shape(value)}.")
        if not is_real_dtype(np.asarray(value).dtype):
            raise TypeError(f"{who} must be a real number, got dtype {np.asarray(value).dtype}.")
        number = float(np.asarray(value))
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise TypeError(f"{who} must be a real number, got {type(value).__name__} {value!r}.")
    if math.isnan(number):
        raise ValueError(f"{who} must not be NaN.")
    if not allow_inf and math.isinf(number):
        raise ValueError(f"{who} must be finite, got {number}.")
    if number < minimum:
        raise ValueError(f"{who} must be >= {minimum:g}, got {number:g}.")


def _concrete(value: Any) -> float | None:
    """The value as a float, or None when it is traced (checked by JAX, not by us)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return float(np.asarray(value))


def check_positive(
    value: Any, name: str, *, allow_inf: bool = False, call: str | None = None
) -> None:
    """Raises unless ``value`` is a real number > 0 (traced values are accepted)."""
    # No lower bound in check_number: its message would say ">= 0", and 0 is refused here.
    check_number(value, name, allow_inf=allow_inf, minimum=-math.inf, call=call)
    number = _concrete(value)
    if number is not None and number <= 0:
        raise ValueError(f"{subject(name, call)} must be > 0, got {number:g}.")


def check_open_unit(value: Any, name: str, *, call: str | None = None) -> None:
    """Raises unless ``0 < value < 1`` (traced values are accepted)."""
    check_number(value, name, allow_inf=False, minimum=-math.inf, call=call)
    number = _concrete(value)
    if number is not None and not 0.0 < number < 1.0:
        raise ValueError(f"{subject(name, call)} must be in (0, 1), got {number:g}.")


def check_closed_interval(
    value: Any, name: str, low: float, high: float, *, call: str | None = None
) -> None:
    """Raises unless ``low <= value <= high`` (traced values are accepted)."""
    check_number(value, name, allow_inf=False, minimum=-math.inf, call=call)
    number = _concrete(value)
    if number is not None and not low <= number <= high:
        raise ValueError(f"{subject(name, call)} must be in [{low:g}, {high:g}], got {number:g}.")


def check_count(
    value: Any, name: str, *, minimum: int, call: str | None = None, injectable: bool = True
) -> int:
    """Returns ``value`` as an int; it must be an integer >= ``minimum``.

    Accepts Python and NumPy integers and concrete 0-d integer arrays (what
    ``optax.inject_hyperparams`` passes at ``init``). Counts fix the size of state arrays, so
    they must be static. ``injectable`` says whether the function can be wrapped in
    ``optax.inject_hyperparams`` (a clipper can, a guard wrapping an optimizer cannot); only
    then do the messages say why the count must be static and point at ``static_args``.
    """
    who = subject(name, call)
    why, hint = "", ""
    if injectable:
        why = " (it sets the size of the state)"
        hint = f"; with optax.inject_hyperparams pass static_args=({name!r},)"
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{who} must be a static Python integer{why}, not a traced value{hint}.")
    if (
        isinstance(value, (np.ndarray, jax.Array))
        and np.ndim(value) == 0
        and np.issubdtype(np.asarray(value).dtype, np.integer)
    ):
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{who} must be a Python integer{why}, got {type(value).__name__} {value!r}{hint}."
        )
    if value < minimum:
        raise ValueError(f"{who} must be >= {minimum}, got {value}.")
    return int(value)


def normalize_ord(ord: Any, name: str = "ord", *, call: str | None = None) -> float:
    """Returns the norm order as a float (``math.inf`` for the max norm).

    Accepts None (meaning 2), 1, 2, ``inf`` (also the string ``"inf"``) and any real p >= 1.
    None is the default in signatures so that ``optax.inject_hyperparams``, which injects
    every numeric default, leaves the order static.
    """
    who = subject(name, call)
    if ord is None:
        return 2.0
    if isinstance(ord, str) and ord.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(ord, jax.core.Tracer):
        raise TypeError(
            f"{who} must be a static Python number, not a traced value; with "
            f"optax.inject_hyperparams pass static_args=({name!r},)."
        )
    if isinstance(ord, (np.ndarray, jax.Array)) and np.ndim(ord) == 0:
        ord = np.asarray(ord).item()
    if isinstance(ord, bool) or not isinstance(ord, (int, float, np.integer, np.floating)):
        raise TypeError(f"{who} must be a real number >= 1 or inf, got {ord!r}.")
    p = float(ord)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"{who} must be >= 1 (a norm), got {ord!r}.")
    return p


def check_float_leaves(paths_and_leaves: Iterable[tuple[Any, Any]], name: str) -> None:
    """Raises TypeError naming the first leaf whose dtype is not floating or complex."""
    for path, leaf in paths_and_leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(
                f"{name} leaf {path_str(path)} is not an array: got {type(leaf).__name__}."
            )
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name} leaf {path_str(path)} has dtype {dtype}; gradient "
                f"clipping needs floating-point (or complex) leaves."
            )


NONFINITE_POLICIES = ("propagate", "zero", "error")


def check_nonfinite(value: Any) -> str:
    """Validates the ``nonfinite`` policy name."""
    if value not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {value!r}.")
    return str(value)


def check_name(value: Any, default: str) -> str:
    """Validates a clipper's ``name=``; None gives ``default``."""
    if value is None:
        return default
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"name must be a non-empty string without '/', got {value!r}.")
    return value


def check_real_leaves(paths_and_leaves: Any, name: str, label: str) -> None:
    """Raises for a complex leaf: bounding entries by magnitude in order needs real values."""
    for path, leaf in paths_and_leaves:
        if jnp.iscomplexobj(leaf):
            raise TypeError(
                f"{label}: {name} leaf {path_str(path)} has the complex dtype {leaf.dtype}; "
                f"{label} needs real values (use a norm clipper such as clip_by_leaf_norm)."
            )
