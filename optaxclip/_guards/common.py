"""What both guards share: the wrapped optimizer, counters, and the skipped step itself.

A skipped step is invisible to the wrapped optimizer: its moments, its step count (and so its
bias correction and any schedule it holds) and any clipper statistics inside it stay bit for
bit what they were. The guard itself keeps the counters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax


def increment(counter: jax.Array, condition: jax.Array) -> jax.Array:
    """``counter + 1`` where ``condition``, saturating at the int32 maximum."""
    return jnp.where(condition, optax.safe_increment(counter), counter)


def check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(
            f"inner must be an optax.GradientTransformation, got {type(inner).__name__}."
        )
    return optax.with_extra_args_support(inner)


def loss_is_finite(extra_args: dict[str, Any]) -> jax.Array:
    loss = extra_args.get("loss")
    if loss is None:
        return jnp.asarray(True)
    return jnp.all(jnp.isfinite(jnp.asarray(loss)))


def _zeros_of_type(x: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of the shape, dtype, sharding and device-variance type of ``x``.

    ``jnp.zeros_like`` (as ``optax.tree.zeros_like`` calls it) keeps an Explicit mesh's
    sharding, but refuses a type that varies along the manual axes of a ``shard_map``; there
    the zeros are cast to vary along the same axes instead.
    """
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return jnp.zeros_like(x)
    types = getattr(x, "manual_axis_type", None)
    varying = getattr(types, "varying", None) if types is not None else getattr(x, "vma", None)
    zeros = jnp.zeros(x.shape, x.dtype)
    if not varying:
        return zeros
    if hasattr(lax, "pcast"):
        return lax.pcast(zeros, tuple(sorted(varying)), to="varying")
    return getattr(lax, "pvary")(zeros, tuple(sorted(varying)))  # noqa: B009 (older JAX)


def guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    apply: jax.Array,
    updates: Any,
    inner_state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """Runs ``inner.update`` when ``apply``; otherwise zeros and the unchanged inner state."""

    def run() -> tuple[Any, Any]:
        return inner.update(updates, inner_state, params, **extra_args)

    # The zeros take the types of what the inner update would return, as both branches of
    # the conditional must.
    shapes, _ = jax.eval_shape(run)

    def skip() -> tuple[Any, Any]:
        return jax.tree.map(_zeros_of_type, shapes), inner_state

    return lax.cond(apply, run, skip)
