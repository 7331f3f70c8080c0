"""Trains a tiny sharded Flax NNX model with optaxclip, as one of several JAX processes.

Usage:

    python dist_multiprocess_worker.py OUT.pkl single
    python dist_multiprocess_worker.py OUT.pkl distributed COORDINATOR NUM_PROCESSES PROCESS_ID

``single``: one process, one device, no sharding (the reference). ``distributed``: joins a
``jax.distributed`` run (CPU collectives over gloo); with ``XLA_FLAGS`` giving every process 4
host devices, the (data, model) mesh spans all processes. Each run trains ``STEPS`` steps with
``chain(clip_by_global_norm, adamw)`` and with ``chain(zclip, adamw)`` and pickles the final
parameters and the clip statistics of every step (process 0 writes in distributed mode).
"""

from __future__ import annotations

import contextlib
import pickle
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

STEPS = 4
SPIKE_STEP = 2
BATCH, D_IN, D_HIDDEN, D_OUT = 8, 8, 16, 4


class MLP(nnx.Module):
    """Two dense layers: the first split by output features, the second by input features."""

    def __init__(self, sharded: bool, rngs: nnx.Rngs) -> None:
        def init(spec: tuple[Any, ...]) -> Any:
            base = nnx.initializers.lecun_normal()
            return nnx.with_partitioning(base, spec) if sharded else base

        self.up = nnx.Linear(D_IN, D_HIDDEN, kernel_init=init((None, "model")), rngs=rngs)
        self.down = nnx.Linear(D_HIDDEN, D_OUT, kernel_init=init(("model", None)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jnp.tanh(self.up(x)))


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
    y = rng.normal(size=(BATCH, D_OUT)).astype(np.float32)
    if step == SPIKE_STEP:
        y = 30.0 * y  # a loss spike, so that both clippers clip
    return x, y


def optimizers() -> dict[str, optax.GradientTransformation]:
    return {
        "global_norm": optax.chain(optaxclip.clip_by_global_norm(0.5), optax.adamw(1e-2)),
        "zclip": optax.chain(
            optaxclip.zclip(alpha=0.9, z_thresh=1.0, warmup_steps=2), optax.adamw(1e-2)
        ),
    }


def train(mesh: Any, fetch: Any) -> dict[str, Any]:
    """Trains one model per optimizer, all in one compiled step (one compile per process)."""
    sharded = mesh is not None
    with jax.set_mesh(mesh) if sharded else contextlib.nullcontext():
        models = {name: MLP(sharded, nnx.Rngs(0)) for name in optimizers()}
        opts = {
            name: nnx.Optimizer(models[name], tx, wrt=nnx.Param)
            for name, tx in optimizers().items()
        }

        @nnx.jit
        def step(models: dict[str, MLP], opts: dict[str, nnx.Optimizer], x: Any, y: Any) -> Any:
            out = {}
            for name, model in models.items():

                def loss_fn(model: MLP) -> jax.Array:
                    return jnp.mean((model(x) - y) ** 2)

                loss, grads = nnx.value_and_grad(loss_fn)(model)
                opts[name].update(model, grads)
                out[name] = {"loss": loss, **optaxclip.clip_stats(opts[name])}
            return out

        stats: dict[str, list[Any]] = {name: [] for name in models}
        for t in range(STEPS):
            x, y = batch(t)
            if sharded:
                data = NamedSharding(mesh, P("data"))
                x = jax.make_array_from_callback(x.shape, data, lambda i, x=x: x[i])
                y = jax.make_array_from_callback(y.shape, data, lambda i, y=y: y[i])
            for name, values in step(models, opts, x, y).items():
                stats[name].append({k: fetch(v) for k, v in values.items()})
        results = {}
        for name, model in models.items():
            params = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
            results[name] = {
                "params": {jax.tree_util.keystr(path): fetch(leaf) for path, leaf in params},
                "stats": stats[name],
                "specs": {
                    jax.tree_util.keystr(path): str(getattr(leaf, "sharding", None))
                    for path, leaf in params
                },
            }
    return results


def model_axis_across_processes() -> Mesh:
    """A (data=2, model=4) mesh whose every model row holds devices of both processes.

    So the norm's reduction over the model axis crosses the process boundary, not only the
    data-parallel gradient reduction.
    """
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    grid = np.array(devices, dtype=object).reshape(jax.process_count(), 2, -1)
    grid = grid.transpose(1, 0, 2).reshape(2, -1)
    return Mesh(grid, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def main(argv: list[str]) -> None:
    out_path, mode = argv[1], argv[2]
    if mode == "single":
        results = train(None, np.asarray)
        results["devices"] = jax.device_count()
    else:
        coordinator, num_processes, process_id = argv[3], int(argv[4]), int(argv[5])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=60,
        )
        from jax.experimental import multihost_utils

        def fetch(x: Any) -> np.ndarray:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        mesh = model_axis_across_processes()
        results = train(mesh, fetch)
        results["devices"] = jax.device_count()
        results["processes"] = jax.process_count()
        results["model_rows_processes"] = [
            sorted({d.process_index for d in row}) for row in mesh.devices
        ]
        if jax.process_index() != 0:
            jax.distributed.shutdown()
            return
        jax.distributed.shutdown()
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(sys.argv)
