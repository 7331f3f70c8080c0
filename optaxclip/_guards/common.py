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

    # The zeros take the shapes, dtypes, shardings and device-variance types of what the
    # inner update would return, as both branches of the conditional must.
    shapes, _ = jax.eval_shape(run)

    def skip() -> tuple[Any, Any]:
        return optax.tree.zeros_like(shapes), inner_state

    return lax.cond(apply, run, skip)
