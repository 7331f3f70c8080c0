"""Clipping lets a deep MLP train at higher learning rates (scikit-learn's digits).

A deep, narrow ReLU MLP (Flax NNX) classifies the 8x8 digit images that ship with
scikit-learn (``sklearn.datasets.load_digits``, no download). Every configuration is trained
over a sweep of learning rates and a few seeds, all at once (``jax.vmap`` over the
(learning rate, seed) grid, one compilation per configuration):

* no clipping;
* ``clip_by_global_norm(1.0)``;
* per-layer thresholds with ``clip_by_leaf_norm``: each hidden layer's weights and biases are
  held to norm 1, the output layer gets a wider range (5), given as a function
  ``(path, leaf) -> threshold`` (a pytree of numbers matching the parameters works too).

Without clipping, the deep network blows up once the learning rate passes a point; the
clipped runs keep training at learning rates several times higher. The script prints the
test accuracy for every (configuration, learning rate) and the largest learning rate at
which every seed still trains, and writes ``digits_lr_sweep.png`` and ``summary.json`` into
``--out`` (default ``examples/output/digits/``).

References:
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013 (https://arxiv.org/abs/1211.5063).
  Zhang, He, Sra & Jadbabaie, "Why gradient clipping accelerates training: a theoretical
  justification for adaptivity", ICLR 2020 (https://arxiv.org/abs/1905.11881).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optaxclip

CHANCE_LOSS = math.log(10.0)  # cross-entropy of a uniform guess over 10 classes
TRAINS_ACCURACY = 0.9  # a run "trains" if its test accuracy reaches this


HIDDEN_MAX_NORM = 0.25  # per hidden-layer leaf (weights, biases)
OUTPUT_MAX_NORM = 1.0  # the output layer's leaves get a wider range


def per_layer_threshold(path: Any, leaf: jax.Array) -> float:
    """Threshold per parameter leaf: wider for the output layer than for hidden layers."""
    del leaf
    return OUTPUT_MAX_NORM if "output" in jax.tree_util.keystr(path) else HIDDEN_MAX_NORM


CONFIGS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "none": ("no clipping", optax.identity),
    "global_norm": ("clip_by_global_norm(1.0)", lambda: optaxclip.clip_by_global_norm(1.0)),
    "per_layer": (
        f"clip_by_leaf_norm(hidden {HIDDEN_MAX_NORM:g}, output {OUTPUT_MAX_NORM:g})",
        lambda: optaxclip.clip_by_leaf_norm(per_layer_threshold),
    ),
}


class DeepMLP(nnx.Module):
    """``depth`` hidden ReLU layers of width ``width``, then a linear output layer."""

    def __init__(self, depth: int, width: int, *, rngs: nnx.Rngs) -> None:
        sizes = [64] + [width] * depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])
        self.output = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.output(x)


def train_config(
    config: str,
    args: argparse.Namespace,
    graphdef: Any,
    params: Any,
    data: tuple[jax.Array, ...],
) -> dict[str, np.ndarray]:
    """Trains every (learning rate, seed) pair of one configuration in a single vmap."""
    x_train, y_train, x_test, y_test = data
    make_clipper = CONFIGS[config][1]

    def cross_entropy(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def run(lr: jax.Array, p: Any, key: jax.Array) -> dict[str, jax.Array]:
        tx = optax.chain(make_clipper(), optax.sgd(lr, momentum=args.momentum))

        def step(carry: Any, step_key: jax.Array) -> tuple[Any, jax.Array]:
            p, state = carry
            idx = jax.random.randint(step_key, (args.batch_size,), 0, x_train.shape[0])
            loss, grads = jax.value_and_grad(cross_entropy)(p, x_train[idx], y_train[idx])
            updates, state = tx.update(grads, state, p)
            return (optax.apply_updates(p, updates), state), loss

        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, args.steps))
        logits = nnx.merge(graphdef, p)(x_test)
        return {
            "train_loss": losses,
            "test_loss": optax.softmax_cross_entropy_with_integer_labels(logits, y_test).mean(),
            "test_accuracy": jnp.mean(jnp.argmax(logits, axis=-1) == y_test),
        }

    lrs = jnp.asarray(args.lrs, jnp.float32)
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(7), s))(jnp.arange(args.seeds))
    # Grid: learning rates (outer) x seeds (inner); every lr starts from the same seeds.
    sweep = jax.jit(jax.vmap(jax.vmap(run, in_axes=(None, 0, 0)), in_axes=(0, None, None)))
    return jax.tree.map(np.asarray, sweep(lrs, params, keys))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lrs",
        default="0.01,0.03,0.1,0.2,0.3,1",
        help="comma-separated learning rates (default 0.01,0.03,0.1,0.2,0.3,1)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per learning rate (3)")
    parser.add_argument("--steps", type=int, default=600, help="SGD steps (default 600)")
    parser.add_argument("--depth", type=int, default=8, help="hidden layers (default 8)")
    parser.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument(
        "--out",
        default=str(_common.DEFAULT_OUTPUT / "digits"),
        help="output folder (default examples/output/digits)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: defaults become 2 seeds, 30 steps, depth 3, 3 learning rates",
    )
    args = _common.parse_with_quick(
        parser, argv, {"seeds": 2, "steps": 30, "depth": 3, "lrs": "0.03,0.3,3"}
    )
    try:
        args.lrs = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if not args.lrs or any(not lr > 0 for lr in args.lrs):
        parser.error("--lrs must hold positive numbers")
    for flag in ("seeds", "steps", "depth", "width", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = _common.output_dir(args.out)
    data = _common.digits_split()
    models = [DeepMLP(args.depth, args.width, rngs=nnx.Rngs(seed)) for seed in range(args.seeds)]
    graphdef = nnx.graphdef(models[0])
    params = _common.stack_trees([nnx.state(m, nnx.Param) for m in models])
    print(
        f"digits: {data[0].shape[0]} train / {data[2].shape[0]} test images; MLP with "
        f"{args.depth} hidden layers of {args.width}; SGD momentum {args.momentum}, batch "
        f"{args.batch_size}, {args.steps} steps; learning rates {args.lrs} x {args.seeds} seeds"
    )

    results: dict[str, dict[str, Any]] = {}
    for config in tqdm(CONFIGS, desc="configurations"):
        start = time.perf_counter()
        trace = train_config(config, args, graphdef, params, data)
        final = _common.running_mean(trace["train_loss"], 20)[..., -1]  # (lrs, seeds)
        accuracy = trace["test_accuracy"]
        diverged = ~np.isfinite(trace["train_loss"]).all(axis=-1) | ~(final < CHANCE_LOSS)
        trains = (accuracy >= TRAINS_ACCURACY) & ~diverged
        ok_lrs = [lr for lr, row in zip(args.lrs, trains, strict=True) if row.all()]
        results[config] = {
            "label": CONFIGS[config][0],
            "lrs": args.lrs,
            "test_accuracy": accuracy,  # (lrs, seeds)
            "final_losses": final,  # (learning rates, seeds)
            "diverged": diverged,
            "largest_lr_all_seeds_train": max(ok_lrs) if ok_lrs else None,
            "wall_s": time.perf_counter() - start,
            "_curves": trace["train_loss"],
        }

    headers = ["configuration", *[f"lr {lr:g}" for lr in args.lrs], "largest lr that trains"]
    rows = []
    for r in results.values():
        cells = []
        for acc, div in zip(r["test_accuracy"], r["diverged"], strict=True):
            cell = f"{100 * np.median(acc):.1f}%"
            if div.any():
                cell += f" ({int(div.sum())} div)"
            cells.append(cell)
        best = r["largest_lr_all_seeds_train"]
        rows.append([r["label"], *cells, "-" if best is None else f"{best:g}"])
    table = _common.markdown_table(headers, rows)
    print()
    print(table)
    print(
        f"\ncells: median test accuracy over {args.seeds} seeds; (k div) = k seeds whose "
        f"training loss became NaN/Inf or ended above chance ({CHANCE_LOSS:.2f}). "
        f"'trains' = every seed reaches {100 * TRAINS_ACCURACY:.0f}% test accuracy."
    )

    plt = _common.pyplot()
    fig, (ax_acc, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    # Training curves at the largest learning rate where some clipped configuration still
    # trains on every seed: where the difference shows.
    trained = [r["largest_lr_all_seeds_train"] for r in results.values()]
    curve_lr = max((lr for lr in trained if lr is not None), default=args.lrs[-1])
    curve_index = args.lrs.index(curve_lr)
    for i, r in enumerate(results.values()):
        median = np.median(r["test_accuracy"], axis=1)
        ax_acc.plot(args.lrs, median, "o-", color=f"C{i}", label=r["label"])
        for j, lr in enumerate(args.lrs):
            ax_acc.scatter(
                [lr] * r["test_accuracy"].shape[1],
                r["test_accuracy"][j],
                s=8,
                color=f"C{i}",
                alpha=0.4,
            )
        curves = _common.running_mean(r["_curves"][curve_index], 20)
        for k, curve in enumerate(curves):
            ax_curve.plot(curve, color=f"C{i}", lw=1, label=r["label"] if k == 0 else None)
    ax_acc.set_xscale("log")
    ax_acc.set_xlabel("learning rate")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.axhline(0.1, color="grey", ls=":", lw=1)
    ax_acc.set_title("Test accuracy after training (dots: seeds, line: median)", fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower left")
    ax_curve.set_yscale("log")
    ax_curve.axhline(CHANCE_LOSS, color="grey", ls=":", lw=1, label="chance")
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("training loss (20-step mean)")
    ax_curve.set_ylim(1e-3, 1e3)
    ax_curve.set_title(f"Training loss at lr {curve_lr:g} (a curve that stops = NaN)", fontsize=10)
    ax_curve.legend(fontsize=8)
    fig.suptitle(f"Digits, {args.depth}-hidden-layer MLP, SGD with momentum: learning-rate sweep")
    fig.tight_layout()
    files = [_common.save_figure(fig, out / "digits_lr_sweep.png")]
    for r in results.values():
        r.pop("_curves")
    (out / "results.md").write_text(table + "\n")
    summary = {
        "example": "digits",
        "config": vars(args),
        "methods": results,
        "clipped_methods": [c for c in CONFIGS if c != "none"],
        "files": [f.name for f in files],
    }
    _common.write_summary(out, summary)
    print("wrote " + ", ".join(str(f) for f in [*files, out / "results.md", out / "summary.json"]))
    return summary


if __name__ == "__main__":
    main()
