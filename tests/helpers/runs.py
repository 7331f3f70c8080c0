"""Drivers of transformations that the tests share.

Runs of training steps, a jitted ``lax.scan`` over recorded gradients, ``vmap`` batching,
Orbax checkpoint round trips, a Flax NNX training step, and tracing inside ``shard_map`` on a
one-device mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh


def apply_once(tx: optax.GradientTransformation, tree: Any) -> tuple[Any, Any]:
    """``tx.update`` of ``tree`` from a fresh ``tx.init(tree)``: (updates, state)."""
    return tx.update(tree, tx.init(tree))


def step_slices(stacked: Any, steps: Sequence[int]) -> list[Any]:
    """The gradients of the given steps from a pytree of arrays stacked along axis 0."""
    return [jax.tree.map(lambda v, t=t: v[t], stacked) for t in steps]


@functools.partial(jax.jit, static_argnums=0)
def _train_step(tx: Any, params: Any, state: Any, grads: Any, extra: dict[str, Any]) -> Any:
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state


def run_steps(
    tx: Any, params: Any, state: Any, grads_seq: Sequence[Any], losses: Any = None
) -> tuple[Any, Any]:
    """``tx.update`` then ``optax.apply_updates`` for each gradient in turn (one jitted step).

    With ``losses``, step ``i`` also passes ``loss=losses[i]`` to ``tx.update``.
    """
    for i, grads in enumerate(grads_seq):
        extra = {} if losses is None else {"loss": losses[i]}
        params, state = _train_step(tx, params, state, grads, extra)
    return params, state


def run_updates(tx: Any, params: Any, grads_seq: Sequence[Any]) -> list[tuple[Any, Any]]:
    """``(updates, state)`` after each step of ``jax.jit(tx.update)`` with fixed ``params``."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        out.append((updates, state))
    return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _scan(tx: Any, grads: Any, loss: Any, with_loss: bool) -> Any:
    def body(state: Any, inputs: Any) -> Any:
        g, value = inputs
        kwargs = {"loss": value} if with_loss else {}
        out, state = tx.update(g, state, None, **kwargs)
        return state, (out, state)

    first = {k: jnp.zeros(v.shape[1:]) for k, v in grads.items()}
    return jax.lax.scan(body, tx.init(first), (grads, loss))[1]


def run_scan(tx: Any, grads: dict[str, Any], loss: Any = None) -> Any:
    """All steps in one jitted scan (compiled once per ``tx``): outputs and states, as NumPy.

    ``grads`` is a dict of arrays stacked along the step axis; ``loss``, if given, one value
    per step passed as ``loss=``.
    """
    steps = len(next(iter(grads.values())))
    values = np.zeros(steps, np.float32) if loss is None else loss
    return jax.tree.map(np.asarray, _scan(tx, grads, values, loss is not None))


def batched(tx: Any, axis_name: str | None = None) -> optax.GradientTransformation:
    """``tx`` applied independently along a leading axis of every leaf (and of the state)."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update, axis_name=axis_name))


def orbax_roundtrip(tree: Any, path: Any) -> Any:
    """``tree`` saved with Orbax's StandardCheckpointer and restored from its abstract shape."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


def resume_from_checkpoint(
    tx: Any, params: Any, grads_seq: Sequence[Any], split: int, path: Any, losses: Any = None
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Trains ``split`` steps, checkpoints ``(params, state)``, then finishes the run twice.

    Returns ``(full, resumed)``, each ``(params, state)`` after all of ``grads_seq``: ``full``
    continued in memory, ``resumed`` continued from the restored checkpoint.
    """
    first = None if losses is None else losses[:split]
    rest = None if losses is None else losses[split:]
    mid = run_steps(tx, params, tx.init(params), grads_seq[:split], first)
    full = run_steps(tx, *mid, grads_seq[split:], rest)
    resumed = run_steps(tx, *orbax_roundtrip(mid, path), grads_seq[split:], rest)
    return full, resumed


def nnx_linear(tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """A Flax NNX ``Linear(3, 2)`` (seed 0) and an ``nnx.Optimizer`` with ``tx`` over its Params."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def nnx_train_step(loss_of_model: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """An ``nnx.jit`` step: gradient of ``loss_of_model``, ``optimizer.update``.

    The step returns the gradients as a plain pytree of arrays.
    """
    from flax import nnx

    @nnx.jit
    def train_step(model: Any, optimizer: Any) -> Any:
        grads = nnx.grad(loss_of_model)(model)
        optimizer.update(model, grads)
        return nnx.as_pure(nnx.state(grads, nnx.Param))

    return train_step


def one_device_mesh(*names: str) -> Mesh:
    """A mesh of this process's first device, with an axis of size 1 for each name."""
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


def trace_in_shard_map(fn: Any, tree: Any, specs: Any, mesh: Mesh, check_vma: bool = True) -> Any:
    """Traces ``fn(tree)`` inside shard_map (no compile); returns what fn returned at trace."""
    seen = []

    def body(t: Any) -> Any:
        seen.append(fn(t))
        return t

    jax.make_jaxpr(
        jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=specs, check_vma=check_vma)
    )(tree)
    return seen[0]
