"""One way to say "a threshold": a number, a schedule, or (per leaf) a pytree or a function.

Every clipper resolves its thresholds here, so validation and error messages are the same
everywhere.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._spec.trees import broadcast_prefix
from optaxclip._spec.validation import check_number, is_concrete_number, path_str, subject

# What users may pass: a scalar, a schedule ``step -> value``, or for per-leaf clippers a
# pytree of scalars (matching the gradient tree or a prefix of it) or ``(path, leaf) -> value``.
ThresholdLike = Any


def _positional_arity(fn: Callable[..., Any]) -> int | None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    params = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values()):
        return None
    return len(params)


def _precision(leaf: Any) -> Any:
    """The dtype a leaf's threshold takes: float64 for float64 (and complex128) leaves, else
    float32, in which the narrower floating dtypes are compared and scaled."""
    return jnp.promote_types(jnp.finfo(leaf.dtype).dtype, jnp.float32)


class Threshold:
    """A validated threshold specification.

    Kinds: ``"constant"`` (a number or traced scalar), ``"schedule"`` (``step -> value``),
    ``"tree"`` (a pytree of numbers, per leaf) and ``"function"`` (``(path, leaf) -> number``,
    per leaf).
    """

    def __init__(
        self,
        value: ThresholdLike,
        name: str,
        *,
        per_leaf: bool,
        minimum: float = 0.0,
        call: str | None = None,
    ) -> None:
        self.name = name
        self.call = call
        # How messages name the argument: "clip_by_leaf_norm(max_norm=...):" given ``call``.
        who = subject(name, call)
        self.who = who
        self.minimum = minimum
        self.value = value
        if callable(value) and not isinstance(value, (jax.Array,)):
            arity = _positional_arity(value)
            if arity == 1:
                self.kind = "schedule"
            elif arity == 2 and per_leaf:
                self.kind = "function"
            elif arity == 2:
                raise TypeError(
                    f"{who} got a callable of two arguments, which means a per-leaf threshold "
                    f"(path, leaf) -> value; this clipper takes a single global threshold: pass "
                    f"a number or a schedule step -> value."
                )
            else:
                raise TypeError(
                    f"{who} must be a number, a schedule (a callable step -> value)"
                    + (
                        ", a pytree of numbers or a callable (path, leaf) -> value"
                        if per_leaf
                        else ""
                    )
                    + f"; got a callable with an unsupported signature: {value!r}."
                )
        elif is_concrete_number(value) or isinstance(value, (jax.core.Tracer, bool)):
            self.kind = "constant"
            check_number(value, name, minimum=minimum, call=call)
        elif per_leaf:
            self.kind = "tree"
            leaves = jax.tree_util.tree_leaves_with_path(value)
            if not leaves:
                raise ValueError(f"{who} is an empty pytree; give one number per leaf or a prefix.")
            for path, leaf in leaves:
                check_number(leaf, name, path=path_str(path), minimum=minimum, call=call)
        else:
            raise TypeError(
                f"{who} must be a number or a schedule (a callable step -> value), "
                f"got {type(value).__name__} {value!r}."
            )

    @property
    def is_per_leaf(self) -> bool:
        return self.kind in ("tree", "function")

    def check_schedule_start(self) -> None:
        """Evaluates a schedule at step 0 and validates the value, where it is concrete."""
        if self.kind == "schedule":
            first = self.value(0)
            if is_concrete_number(first):
                check_number(
                    first,
                    f"{self.name} (schedule value at step 0)",
                    minimum=self.minimum,
                    call=self.call,
                )

    def scalar(self, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """The global threshold at step ``count`` (number of updates before this one).

        In ``dtype``, converted from the value as given (a float64 gradient is clipped to a
        float64 threshold, not a float32 one). A value known only at run time (from a
        schedule, ``inject_hyperparams`` or a traced argument) goes through ``at_run_time``.
        """
        value = self.value(count) if self.kind == "schedule" else self.value
        return self._checked(value, dtype)

    def _checked(self, value: Any, dtype: Any) -> jax.Array:
        if is_concrete_number(value) and not isinstance(value, jax.Array):
            return jnp.asarray(value, dtype)
        return self.at_run_time(jnp.asarray(value).astype(dtype))

    def at_run_time(self, value: jax.Array) -> jax.Array:
        """A threshold only known at run time, made safe: below ``minimum`` it acts as
        ``minimum`` (a negative norm threshold as 0, which zeroes the update rather than
        flipping its sign), and NaN acts as 0 (no step is taken rather than an unclipped
        one). The stats report the value in effect.
        """
        if math.isfinite(self.minimum):
            value = jnp.maximum(value, jnp.asarray(self.minimum, value.dtype))
        return jnp.where(jnp.isnan(value), jnp.zeros_like(value), value)

    def per_leaf_values(self, tree: Any, count: jax.Array) -> list[jax.Array]:
        """One float32 threshold per leaf of ``tree`` (in ``tree_leaves`` order).

        Raises ValueError naming the parameter and leaf path if a pytree spec does not match
        ``tree`` or a value is invalid.
        """
        leaves = jax.tree_util.tree_leaves(tree)
        dtypes = [_precision(x) for x in leaves]
        if self.kind in ("constant", "schedule"):
            value = self.value(count) if self.kind == "schedule" else self.value
            by_dtype = {d: self._checked(value, d) for d in set(dtypes)}
            return [by_dtype[d] for d in dtypes]
        return [self._checked(v, d) for v, d in zip(self._leaf_numbers(tree), dtypes, strict=True)]

    def known_per_leaf(self, tree: Any) -> list[float | None]:
        """Each leaf's threshold as a Python float where the spec gives it as a plain number.

        ``None`` for a schedule and for array values: read from the spec itself, so it costs
        no device round-trip. For decisions made while tracing (the values still come from
        ``per_leaf_values``).
        """
        if self.kind == "schedule":
            return [None] * len(jax.tree_util.tree_leaves(tree))
        return [
            float(v) if isinstance(v, (int, float, np.number)) else None
            for v in self._leaf_numbers(tree)
        ]

    def _leaf_numbers(self, tree: Any) -> list[Any]:
        """The per-leaf values of a pytree or function spec, as given (checked numbers)."""
        if self.kind != "function":
            return self._broadcast(tree)
        out = []
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            value = self.value(path, leaf)
            if callable(value):
                raise TypeError(
                    f"{self.who} returned a callable for leaf {path_str(path)}; "
                    f"a per-leaf function must return a number."
                )
            check_number(
                value, self.name, path=path_str(path), minimum=self.minimum, call=self.call
            )
            out.append(value)
        return out

    def per_leaf_vector(self, tree: Any, count: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
        """``per_leaf_values`` as one vector in ``dtype``.

        Built as a constant (or one broadcast) rather than by stacking one scalar per leaf,
        which XLA compiles slowly on trees with thousands of leaves.
        """
        if self.kind in ("constant", "schedule"):
            n = len(jax.tree_util.tree_leaves(tree))
            return jnp.broadcast_to(self.scalar(count, dtype), (n,))
        values = self._leaf_numbers(tree)
        if all(is_concrete_number(v) and not isinstance(v, jax.Array) for v in values):
            return jnp.asarray(np.asarray(values, np.dtype(dtype)).reshape(-1))
        return jnp.stack([self._checked(v, dtype) for v in values])

    def _broadcast(self, tree: Any) -> list[Any]:
        """Broadcasts a pytree spec (the tree's structure or a prefix) to every leaf."""
        values = broadcast_prefix(
            self.value,
            tree,
            message=(
                f"{self.who.rstrip(':')}: the per-leaf threshold pytree must match the gradient tree or be "
                f"a prefix of it."
            ),
            tree_name="gradient",
            is_leaf=lambda x: x is None,
        )
        for (path, _), value in zip(jax.tree_util.tree_leaves_with_path(tree), values, strict=True):
            if value is None:
                raise ValueError(
                    f"{self.who.rstrip(':')}: no threshold for gradient leaf {path_str(path)}: the spec holds "
                    f"None there. Give a number (inf for no clipping)."
                )
        return values

    def validate_for(self, tree: Any) -> None:
        """Checks the spec against a tree (at ``init``), naming the offending path."""
        self.check_schedule_start()
        if self.is_per_leaf:
            self.per_leaf_values(tree, jnp.zeros((), jnp.int32))
