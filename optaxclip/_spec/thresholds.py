"""One way to say "a threshold": a number, a schedule, or (per leaf) a pytree or a function.

Every clipper resolves its thresholds here, so validation and error messages are the same
everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optaxclip._spec.trees import broadcast_prefix
from optaxclip._spec.validation import check_number, is_concrete_number, path_str

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


class Threshold:
    """A validated threshold specification.

    Kinds: ``"constant"`` (a number or traced scalar), ``"schedule"`` (``step -> value``),
    ``"tree"`` (a pytree of numbers, per leaf) and ``"function"`` (``(path, leaf) -> number``,
    per leaf).
    """

    def __init__(
        self, value: ThresholdLike, name: str, *, per_leaf: bool, minimum: float = 0.0
    ) -> None:
        self.name = name
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
                    f"{name} got a callable of two arguments, which means a per-leaf threshold "
                    f"(path, leaf) -> value; this clipper takes a single global threshold: pass "
                    f"a number or a schedule step -> value."
                )
            else:
                raise TypeError(
                    f"{name} must be a number, a schedule (a callable step -> value)"
                    + (
                        ", a pytree of numbers or a callable (path, leaf) -> value"
                        if per_leaf
                        else ""
                    )
                    + f"; got a callable with an unsupported signature: {value!r}."
                )
        elif is_concrete_number(value) or isinstance(value, (jax.core.Tracer, bool)):
            self.kind = "constant"
            check_number(value, name, minimum=minimum)
        elif per_leaf:
            self.kind = "tree"
            leaves = jax.tree_util.tree_leaves_with_path(value)
            if not leaves:
                raise ValueError(
                    f"{name} is an empty pytree; give one number per leaf or a prefix."
                )
            for path, leaf in leaves:
                check_number(leaf, name, path=path_str(path), minimum=minimum)
        else:
            raise TypeError(
                f"{name} must be a number or a schedule (a callable step -> value), "
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
                check_number(first, f"{self.name} (schedule value at step 0)", minimum=self.minimum)

    def scalar(self, count: jax.Array) -> jax.Array:
        """The global threshold at step ``count`` (number of updates before this one)."""
        if self.kind == "schedule":
            return jnp.asarray(self.value(count), jnp.float32)
        return jnp.asarray(self.value, jnp.float32)

    def per_leaf_values(self, tree: Any, count: jax.Array) -> list[jax.Array]:
        """One float32 threshold per leaf of ``tree`` (in ``tree_leaves`` order).

        Raises ValueError naming the parameter and leaf path if a pytree spec does not match
        ``tree`` or a value is invalid.
        """
        paths_leaves = jax.tree_util.tree_leaves_with_path(tree)
        if self.kind in ("constant", "schedule"):
            value = self.scalar(count)
            return [value] * len(paths_leaves)
        return [jnp.asarray(v, jnp.float32) for v in self._leaf_numbers(tree)]

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
                    f"{self.name} returned a callable for leaf {path_str(path)}; "
                    f"a per-leaf function must return a number."
                )
            check_number(value, self.name, path=path_str(path), minimum=self.minimum)
            out.append(value)
        return out

    def per_leaf_vector(self, tree: Any, count: jax.Array) -> jax.Array:
        """``per_leaf_values`` as one float32 vector.

        Built as a constant (or one broadcast) rather than by stacking one scalar per leaf,
        which XLA compiles slowly on trees with thousands of leaves.
        """
        if self.kind in ("constant", "schedule"):
            n = len(jax.tree_util.tree_leaves(tree))
            return jnp.broadcast_to(self.scalar(count), (n,))
        values = self._leaf_numbers(tree)
        if all(is_concrete_number(v) for v in values):
            return jnp.asarray(np.asarray(values, np.float32).reshape(-1))
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])

    def _broadcast(self, tree: Any) -> list[Any]:
        """Broadcasts a pytree spec (the tree's structure or a prefix) to every leaf."""
        values = broadcast_prefix(
            self.value,
            tree,
            message=(
                f"{self.name}: the per-leaf threshold pytree must match the gradient tree or be "
                f"a prefix of it."
            ),
            tree_name="gradient",
            is_leaf=lambda x: x is None,
        )
        for (path, _), value in zip(jax.tree_util.tree_leaves_with_path(tree), values, strict=True):
            if value is None:
                raise ValueError(
                    f"{self.name}: no threshold for gradient leaf {path_str(path)}: the spec holds "
                    f"None there. Give a number (inf for no clipping)."
                )
        return values

    def validate_for(self, tree: Any) -> None:
        """Checks the spec against a tree (at ``init``), naming the offending path."""
        self.check_schedule_start()
        if self.is_per_leaf:
            self.per_leaf_values(tree, jnp.zeros((), jnp.int32))
