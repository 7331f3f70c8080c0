"""Compiles every transform on 8 host devices, in four kinds of sharded program, and pickles
the cross-device operations of each compiled step.

Usage (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before start):

    python dist_collectives.py OUT.pkl [--leaves N]

Program kinds, on a (data=2, model=4) mesh:

* ``auto``: ``jax.jit`` on arrays with a ``NamedSharding`` of a ``jax.sharding.Mesh`` (Auto
  axes: the shardings are not part of the traced types);
* ``explicit``: the same on a ``jax.make_mesh`` mesh with Explicit axes;
* ``explicit_set_mesh``: the explicit program traced and compiled under ``jax.set_mesh``;
* ``partial_shard_map``: ``jax.shard_map`` manual over "data" only (``axis_names={"data"}``),
  with "model" left to the partitioner; the transforms get ``axis_name="data"``.

Trees: ``mixed`` (FSDP x TP: leaves split over both axes, below and above the size up to which
small leaves are joined, split along either dimension, replicated) and ``many_small`` (many
(32, 32) leaves split along "model"). Every transform runs alone and chained with Adam. The
script only records; ``tests/test_distributed.py`` asserts.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers.hlo import collectives

import optaxclip

AXES = ("data", "model")
MIXED_SPECS: dict[str, Any] = {
    "qkv": P("data", "model"),  # 64 x 192: below the join size, FSDP x TP
    "up": P("data", "model"),  # 64 x 2048: above it
    "down": P("model", "data"),  # 2048 x 64: split along the other dimensions
    "head": P(None, "model"),  # 32 x 32, split along its units
    "bias": P("model"),  # 256, split
    "scale": P(),  # 64, replicated
}
MIXED_SHAPES = {
    "qkv": (64, 192),
    "up": (64, 2048),
    "down": (2048, 64),
    "head": (32, 32),
    "bias": (256,),
    "scale": (64,),
}


def trees(n_small: int) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    small_shapes = {f"w{i:04d}": (32, 32) for i in range(n_small)}
    small_specs = {k: P(None, "model") for k in small_shapes}
    return {"mixed": (MIXED_SHAPES, MIXED_SPECS), "many_small": (small_shapes, small_specs)}


def _only(spec: P, keep: set[str]) -> P:
    """The spec with only the axes in ``keep`` (the manual axes of a shard_map)."""

    def entry(e: Any) -> Any:
        if e is None:
            return None
        names = (e,) if isinstance(e, str) else tuple(e)
        kept = tuple(n for n in names if n in keep)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return P(*(entry(e) for e in spec))


def transforms(axis_name: Any, layout: Any) -> dict[str, tuple[Any, bool]]:
    """name -> (transform, needs params). AGC gets the layout, which it needs when split."""
    kw = {"axis_name": axis_name, "layout": layout if axis_name else None}
    no_layout = {"axis_name": axis_name}
    return {
        "clip_by_global_norm": (optaxclip.clip_by_global_norm(1.0, **no_layout), False),
        "clip_by_global_norm_inf": (
            optaxclip.clip_by_global_norm(1.0, ord="inf", **no_layout),
            False,
        ),
        "clip_by_leaf_norm": (optaxclip.clip_by_leaf_norm(0.5, **no_layout), False),
        "clip_by_block_rms": (optaxclip.clip_by_block_rms(0.1, **no_layout), False),
        "clip_by_value": (optaxclip.clip_by_value(0.05, **no_layout), False),
        "adaptive_grad_clip": (optaxclip.adaptive_grad_clip(0.05, **kw), True),
        "autoclip": (optaxclip.autoclip(50.0, history_size=8, **no_layout), False),
        "zclip": (optaxclip.zclip(warmup_steps=2, **no_layout), False),
        "adagc": (optaxclip.adagc(warmup_steps=2, **no_layout), False),
        "quantile_clip": (optaxclip.quantile_clip(**no_layout), False),
        "global_norm": (_logged(optaxclip.global_norm, axis_name), False),
        "leaf_norms": (_logged(optaxclip.leaf_norms, axis_name), False),
        "skip_nonfinite": (
            optaxclip.skip_nonfinite(optax.sgd(0.1), axis_name=axis_name),
            False,
        ),
        "skip_spikes": (
            optaxclip.skip_spikes(optax.sgd(0.1), window=4, min_history=2, **no_layout),
            False,
        ),
    }


def _logged(norm: Any, axis_name: Any) -> optax.GradientTransformation:
    """The gradient passed on unchanged, its norm(s) kept in the state (a logging step).

    The norms are kept as one vector, not in the parameters' structure, so that they are not
    taken for parameter-shaped state.
    """
    per_leaf = norm is optaxclip.leaf_norms

    def init(params: Any) -> Any:
        return jnp.zeros((len(jax.tree.leaves(params)) if per_leaf else 1,), jnp.float32)

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        del state, params
        return updates, jnp.stack(jax.tree.leaves(norm(updates, axis_name=axis_name)))

    return optax.GradientTransformation(init, update)


def _step(tx: Any, needs_params: bool, chained: bool) -> Any:
    opt = optax.chain(tx, optax.adam(1e-3)) if chained else tx

    def step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = opt.update(grads, state, params if needs_params or chained else None)
        if chained:
            return optax.apply_updates(params, updates), state
        return updates, state

    return opt, step


def _arrays(shapes: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def compile_one(kind: str, tree: str, name: str, chained: bool, n_small: int) -> dict[str, Any]:
    shapes, specs = trees(n_small)[tree]
    devices = np.asarray(jax.devices()).reshape(2, 4)
    if kind == "auto" or kind == "partial_shard_map":
        mesh = jax.sharding.Mesh(devices, AXES)
    else:
        mesh = jax.make_mesh((2, 4), AXES, axis_types=(AxisType.Explicit,) * 2)
    manual = kind == "partial_shard_map"
    axis_name = "data" if manual else None
    layout = {k: _only(s, {"data"}) for k, s in specs.items()} if manual else None
    tx, needs_params = transforms(axis_name, layout)[name]
    opt, step = _step(tx, needs_params, chained)
    params = _arrays(shapes, 0)
    grads = _arrays(shapes, 1)
    state = opt.init(params)

    def put(tree_: Any, specs_: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree_, specs_)

    # Optimizer moments are laid out like the parameters; the rest of the state is replicated.
    state_specs = optax.tree_utils.tree_map_params(
        opt, lambda _, spec: spec, state, specs, transform_non_params=lambda _: P()
    )
    args = (put(grads, specs), put(state, state_specs), put(params, specs))
    if manual:
        data_specs = {k: _only(s, {"data"}) for k, s in specs.items()}
        data_state_specs = jax.tree.map(
            lambda s: _only(s, {"data"}), state_specs, is_leaf=lambda x: isinstance(x, P)
        )
        fn = jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(data_specs, data_state_specs, data_specs),
            out_specs=(data_specs, data_state_specs),
            axis_names={"data"},
            check_vma=True,
        )
    else:
        fn = step
    if kind == "explicit_set_mesh":
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*args).compile()
    else:
        compiled = jax.jit(fn).lower(*args).compile()
    ops = collectives(compiled.as_text())
    gradient_entries = {k: int(np.prod(s)) for k, s in shapes.items()}
    return {"ops": [tuple(op) for op in ops], "leaf_entries": gradient_entries}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--leaves", type=int, default=64, help="leaves of the many_small tree")
    parser.add_argument("--kinds", default="auto,explicit,explicit_set_mesh,partial_shard_map")
    parser.add_argument("--trees", default="mixed,many_small")
    parser.add_argument("--names", default="")
    parser.add_argument("--alone-only", action="store_true")
    parser.add_argument("--table", help="also write a markdown table of what crosses devices")
    args = parser.parse_args()
    if jax.device_count() != 8:
        raise SystemExit("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    names = args.names.split(",") if args.names else list(transforms(None, None))
    results: dict[Any, Any] = {}
    for kind in args.kinds.split(","):
        for tree in args.trees.split(","):
            for name in names:
                for chained in (False,) if args.alone_only else (False, True):
                    key = (kind, tree, name, chained)
                    try:
                        results[key] = compile_one(kind, tree, name, chained, args.leaves)
                    except Exception:
                        results[key] = {"error": traceback.format_exc(limit=-4)}
    with open(args.out, "wb") as f:
        pickle.dump(results, f)
    if args.table:
        Path(args.table).write_text(table(results, args.leaves))


def table(results: dict[Any, Any], n_small: int) -> str:
    """Per transform and program kind: the cross-device ops of one step and their bytes."""
    kinds = sorted({k[0] for k in results}, key=lambda k: list(KINDS).index(k))
    lines = [
        f"Trees: `mixed` ({len(MIXED_SHAPES)} leaves, FSDP x TP) and `many_small` ({n_small} "
        "leaves of 32 x 32 split along `model`), on a (data=2, model=4) mesh. Each cell: "
        "all-reduces / bytes they carry / other collectives, for one step of the transform "
        "alone (chained with Adam in brackets).",
        "",
        "| transform | tree | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    names = list(dict.fromkeys(k[2] for k in results))
    trees_ = list(dict.fromkeys(k[1] for k in results))
    for name in names:
        for tree in trees_:
            cells = []
            for kind in kinds:
                parts = []
                for chained in (False, True):
                    record = results.get((kind, tree, name, chained))
                    if record is None:
                        continue
                    if "error" in record:
                        parts.append("error")
                        continue
                    ops = record["ops"]
                    reduces = [op for op in ops if op[0] == "all-reduce"]
                    others = len(ops) - len(reduces)
                    parts.append(f"{len(reduces)} / {sum(op[2] for op in reduces)} B / {others}")
                cells.append(parts[0] + (f" ({parts[1]})" if len(parts) > 1 else ""))
            lines.append(f"| `{name}` | {tree} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


KINDS = ("auto", "explicit", "explicit_set_mesh", "partial_shard_map")


if __name__ == "__main__":
    main()
