"""Data- and model-parallel training of a Flax NNX model, with exact gradient clipping.

The mesh has a ``data`` axis (the batch is split across it) and a ``model`` axis (the hidden
layer is split across it, Megatron style: the first kernel by output features, the second
by input features). Biases of the output layer stay replicated.

Part 1 uses ``jax.jit`` on arrays with a ``NamedSharding``: XLA sees whole arrays, so the
clipper needs no extra argument and its norm is that of the whole gradient. XLA adds scalar
partial sums across the devices; no gradient is gathered.

Part 2 writes the same step by hand inside ``jax.shard_map``, where every device only sees
its blocks. The clipper then gets ``axis_name=("data", "model")`` and adds the partial sums
itself, counting replicated leaves once (read from JAX's types, or from ``layout=``).

Run: ``python examples/sharded_training.py [--out DIR]`` (CPU is fine: it asks XLA for 8 host
devices). It writes ``sharded_norms.png`` (the pre-clip norm and threshold per step, both
ways) and ``summary.json`` into ``--out`` (default ``examples/output/sharded_training``).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Must happen before JAX starts; a real cluster already has its devices.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import math
import re
from pathlib import Path
from typing import Any

import _common  # examples/_common.py: output folder, summary, plotting
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip

D_IN, D_HIDDEN, D_OUT, BATCH, STEPS = 16, 64, 4, 32, 5


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.up = nnx.Linear(
            D_IN,
            D_HIDDEN,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            D_HIDDEN,
            D_OUT,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("model", None)),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jnp.tanh(self.up(x)))


def batches(mesh: jax.sharding.Mesh) -> list[tuple[jax.Array, jax.Array]]:
    """A few batches split along ``data``; the fourth one has a spike in its targets."""
    rng = np.random.default_rng(0)
    sharding = NamedSharding(mesh, P("data"))
    out = []
    for step in range(STEPS):
        x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
        y = rng.normal(size=(BATCH, D_OUT)).astype(np.float32) * (20.0 if step == 3 else 1.0)
        out.append((jax.device_put(x, sharding), jax.device_put(y, sharding)))
    return out


def part1_gspmd(mesh: jax.sharding.Mesh) -> dict[str, list[float]]:
    print("== 1. jax.jit + NamedSharding: chain(clip_by_global_norm, adamw)")
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
        tx = optax.chain(optaxclip.clip_by_global_norm(2.0), optax.adamw(1e-2))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> Any:
            def loss_fn(model: MLP) -> jax.Array:
                return jnp.mean((model(x) - y) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss, optaxclip.clip_stats(optimizer)

        record: dict[str, list[float]] = {"loss": [], "pre_clip_norm": [], "threshold": []}
        for step, (x, y) in enumerate(batches(mesh)):
            loss, stats = train_step(model, optimizer, x, y)
            pre = float(stats["clip_by_global_norm/pre_clip_norm"])
            record["loss"].append(float(loss))
            record["pre_clip_norm"].append(pre)
            record["threshold"].append(float(stats["clip_by_global_norm/threshold"]))
            print(
                f"step {step}: loss {float(loss):9.4f}  pre_clip_norm {pre:8.4f}  "
                f"scale {float(stats['clip_by_global_norm/scale']):.4f}  "
                f"clipped {float(stats['clip_by_global_norm/clipped_fraction']):.0f}"
            )
        kernel = nnx.state(model, nnx.Param)["up"]["kernel"][...]
        print(f"  'up' kernel stays sharded: {kernel.sharding.spec}")
        check_update_collectives(tx, nnx.state(model, nnx.Param))
    return record


COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter|"
    r"collective-broadcast|ragged-all-to-all)(?:-start)?\("
)


def check_update_collectives(tx: optax.GradientTransformation, params: Any) -> None:
    """Compiles ``tx.update`` on sharded gradients and checks what crosses devices.

    The clipper must move no gradient data between devices: only all-reduces of scalars.
    """
    state = tx.init(params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    ops = []
    for line in compiled.as_text().splitlines():
        match = COLLECTIVE.search(line)
        if match and "=" in line[: match.start()]:
            ops.append((match.group(1), line.strip()))
    for op, line in ops:
        if op != "all-reduce" or re.search(r"\[[0-9]", line.split(" all-reduce")[0]):
            raise SystemExit(f"the clipped update moves more than scalars across devices: {line}")
    print(f"  the clipped update's only cross-device ops: {len(ops)} all-reduces of scalars")


def forward_on_blocks(params: Any, x: jax.Array) -> jax.Array:
    """The MLP on this device's blocks: one all-reduce over 'model' after the second layer."""
    h = jnp.tanh(x @ params["up"]["kernel"][...] + params["up"]["bias"][...])
    partial = h @ params["down"]["kernel"][...]
    return lax.psum(partial, "model") + params["down"]["bias"][...]


def part2_shard_map(mesh: jax.sharding.Mesh) -> dict[str, list[float]]:
    print("== 2. jax.shard_map by hand: zclip + adamw with axis_name=('data', 'model')")
    with jax.set_mesh(mesh):
        params = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
    # The PartitionSpec of every parameter, read from its NamedSharding. The gradients have
    # the same layout, so this is also the clipper's layout= (check_vma=True would find the
    # replicated 'down' bias by itself; layout= makes it explicit and is checked against it).
    specs = optaxclip.layout_from_shardings(params)
    axes = ("data", "model")
    tx = optax.chain(
        optaxclip.zclip(warmup_steps=3, z_thresh=2.0, axis_name=axes, layout=specs),
        optax.adamw(1e-2),
    )
    opt_state = tx.init(params)
    # adamw's moments are laid out like the parameters; everything else (zclip's statistics,
    # step counts) is replicated, and stays identical on every device.
    state_specs = optax.tree_utils.tree_map_params(
        tx, lambda _, spec: spec, opt_state, specs, transform_non_params=lambda _: P()
    )
    opt_state = jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), opt_state, state_specs
    )

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        def loss_fn(params: Any) -> jax.Array:
            # Sum over this device's rows / the global batch: the psum over 'data' that JAX
            # inserts for the replicated parameters' gradients then gives the global mean.
            return jnp.sum((forward_on_blocks(params, x) - y) ** 2) / (BATCH * D_OUT)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, lax.psum(loss, "data")

    train_step = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(specs, state_specs, P("data"), P("data")),
            out_specs=(specs, state_specs, P()),
        )
    )
    record: dict[str, list[float]] = {"loss": [], "pre_clip_norm": [], "threshold": []}
    for t, (x, y) in enumerate(batches(mesh)):
        params, opt_state, loss = train_step(params, opt_state, x, y)
        stats = optaxclip.clip_stats(opt_state)
        pre = float(stats["zclip/pre_clip_norm"])
        record["loss"].append(float(loss))
        record["pre_clip_norm"].append(pre)
        record["threshold"].append(float(stats["zclip/threshold"]))
        print(
            f"step {t}: loss {float(loss):9.4f}  pre_clip_norm {pre:8.4f}  "
            f"threshold {float(stats['zclip/threshold']):8.4f}  "
            f"scale {float(stats['zclip/scale']):.4f}"
        )
    return record


def plot(out: Path, runs: dict[str, dict[str, list[float]]]) -> str:
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, record), marker in zip(runs.items(), ("o", "s"), strict=True):
        steps = np.arange(1, len(record["pre_clip_norm"]) + 1)
        ax.plot(steps, record["pre_clip_norm"], marker=marker, label=f"{label}: pre-clip norm")
        ax.plot(steps, record["threshold"], linestyle="--", label=f"{label}: threshold")
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient norm")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "sharded_norms.png"
    fig.savefig(out / name, dpi=80)
    plt.close(fig)
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(_common.DEFAULT_OUTPUT / "sharded_training"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="accepted for uniformity: the run is already smoke-sized",
    )
    args = parser.parse_args(argv)
    out = _common.output_dir(args.out)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")
    gspmd = part1_gspmd(mesh)
    manual = part2_shard_map(mesh)
    # Both start from the same parameters and batch, so the first norms are the same number:
    # the norm of the whole gradient, whichever way it was sharded.
    first_jit, first_manual = gspmd["pre_clip_norm"][0], manual["pre_clip_norm"][0]
    print(f"first-step gradient norm: jit {first_jit:.6f}, shard_map {first_manual:.6f}")
    runs = {"jit + NamedSharding, clip_by_global_norm": gspmd, "shard_map, zclip": manual}
    files = [plot(out, runs)]
    _common.write_summary(
        out,
        {
            "files": files,
            "clipped_methods": ["jit_clip_by_global_norm", "shard_map_zclip"],
            "methods": {
                "jit_clip_by_global_norm": {"final_losses": gspmd["loss"][-1], **gspmd},
                "shard_map_zclip": {"final_losses": manual["loss"][-1], **manual},
            },
            "first_step_norms_agree": math.isclose(first_jit, first_manual, rel_tol=1e-5),
        },
    )
    if not math.isclose(first_jit, first_manual, rel_tol=1e-5):
        raise SystemExit("the two ways of sharding disagree on the gradient norm")


if __name__ == "__main__":
    main()
