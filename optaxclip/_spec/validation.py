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


def is_concrete_number(value: Any) -> bool:
    """True for Python numbers, NumPy scalars and concrete (non-traced) 0-d arrays."""
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return True
    return isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0


def check_number(
    value: Any, name: str, *, path: str | None = None, allow_inf: bool = True, minimum: float = 0.0
) -> None:
    """Raises if a concrete hyperparameter is not a real number >= ``minimum``.

    Traced values (for example from ``optax.inject_hyperparams`` under ``jit``) cannot be
    inspected in Python and are accepted as they are.
    """
    where = f" at leaf {path}" if path is not None else ""
    if isinstance(value, bool) or (
        isinstance(value, (np.ndarray, jax.Array))
        and not isinstance(value, jax.core.Tracer)
        and np.asarray(value).dtype == np.bool_
    ):
        raise TypeError(f"{name}{where} must be a real number, got the bool {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (np.ndarray, jax.Array)):
        if np.ndim(value) != 0:
            raise ValueError(
                f"{name}{where} must be a scalar, got an array of shape {np.shape(value)}."
            )
        if not np.issubdtype(np.asarray(value).dtype, np.number) or np.iscomplexobj(value):
            raise TypeError(
                f"{name}{where} must be a real number, got dtype {np.asarray(value).dtype}."
            )
        number = float(np.asarray(value))
    elif isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
    else:
        raise TypeError(
            f"{name}{where} must be a real number, got {type(value).__name__} {value!r}."
        )
    if math.isnan(number):
        raise ValueError(f"{name}{where} must not be NaN.")
    if not allow_inf and math.isinf(number):
        raise ValueError(f"{name}{where} must be finite, got {number}.")
    if number < minimum:
        raise ValueError(f"{name}{where} must be >= {minimum:g}, got {number:g}.")


def _concrete(value: Any) -> float | None:
    """The value as a float, or None when it is traced (checked by JAX, not by us)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return float(np.asarray(value))


def check_positive(value: Any, name: str, *, allow_inf: bool = False) -> None:
    """Raises unless ``value`` is a real number > 0 (traced values are accepted)."""
    check_number(value, name, allow_inf=allow_inf)
    number = _concrete(value)
    if number is not None and number <= 0:
        raise ValueError(f"{name} must be > 0, got {number:g}.")


def check_open_unit(value: Any, name: str) -> None:
    """Raises unless ``0 < value < 1`` (traced values are accepted)."""
    check_number(value, name, allow_inf=False)
    number = _concrete(value)
    if number is not None and not 0.0 < number < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {number:g}.")


def check_count(value: Any, name: str, *, minimum: int) -> int:
    """Returns ``value`` as an int; it must be an integer >= ``minimum``.

    Accepts Python and NumPy integers and concrete 0-d integer arrays (what
    ``optax.inject_hyperparams`` passes at ``init``). Counts fix the size of state arrays, so
    they must be static: a traced value raises, telling to pass it through ``static_args``.
    """
    hint = f"with optax.inject_hyperparams pass static_args=({name!r},)."
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python integer (it sets the size of the state), not a "
            f"traced value; {hint}"
        )
    if (
        isinstance(value, (np.ndarray, jax.Array))
        and np.ndim(value) == 0
        and np.issubdtype(np.asarray(value).dtype, np.integer)
    ):
        value = np.asarray(value).item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"{name} must be a Python integer (it sets the size of the state), got "
            f"{type(value).__name__} {value!r}; {hint}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def normalize_ord(ord: Any, name: str = "ord") -> float:
    """Returns the norm order as a float (``math.inf`` for the max norm).

    Accepts None (meaning 2), 1, 2, ``inf`` (also the string ``"inf"``) and any real p >= 1.
    None is the default in signatures so that ``optax.inject_hyperparams``, which injects
    every numeric default, leaves the order static.
    """
    if ord is None:
        return 2.0
    if isinstance(ord, str) and ord.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(ord, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python number, not a traced value; with "
            f"optax.inject_hyperparams pass static_args=({name!r},)."
        )
    if isinstance(ord, (np.ndarray, jax.Array)) and np.ndim(ord) == 0:
        ord = np.asarray(ord).item()
    if isinstance(ord, bool) or not isinstance(ord, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number >= 1 or inf, got {ord!r}.")
    p = float(ord)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"{name} must be >= 1 (a norm), got {ord!r}.")
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
