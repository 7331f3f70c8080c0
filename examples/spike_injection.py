"""Gradient spikes injected on purpose: how well does each clipper (and skip_spikes) recover?

A small MLP (Flax NNX) trains on scikit-learn's digits. On a few random steps the gradient
is multiplied by a factor between 100 and 1000 (log-uniform), the kind of isolated spike
that a bad batch or a numerical accident produces. Every method sees the same spikes on the
same seeds (vectorised with ``jax.vmap``):

* no clipping, ``clip_by_global_norm(1.0)`` (a fixed threshold),
* the adaptive clippers ``autoclip``, ``zclip``, ``adagc`` and ``quantile_clip``,

each alone and wrapped in ``skip_spikes`` (which drops a step whose gradient norm is far
above its recent history). A run without spikes and without clipping is the reference.

Printed table and ``summary.json``: final test accuracy and training loss, the highest
loss reached after a spike, the loss in excess of the spike-free run (averaged over the steps
after the first spike), and how many spikes (and ordinary steps) ``skip_spikes`` dropped.
``spike_injection.png`` shows the loss curves with the spike steps marked. Everything goes
into ``--out`` (default ``examples/output/spike_injection/``).

References:
  Kumar, Owen, Roy Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training", 2025 (https://arxiv.org/abs/2504.02507).
  Wang et al., "AdaGC: Improving Training Stability for Large Language Model Pretraining",
  2025 (https://arxiv.org/abs/2502.11034).
  Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
  Separation Networks", IEEE MLSP 2020 (https://arxiv.org/abs/2007.14469).
  Andrew, Thakkar, McMahan & Ramaswamy, "Differentially Private Learning with Adaptive
  Clipping", NeurIPS 2021 (https://arxiv.org/abs/1905.03871).
"""

from __future__ import annotations

import argparse
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

CLIPPERS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "none": ("no clipping", optax.identity),
    "clip_by_global_norm": (
        "clip_by_global_norm(1.0)",
        lambda: optaxclip.clip_by_global_norm(1.0),
    ),
    "autoclip": ("autoclip()", lambda: optaxclip.autoclip()),
    "zclip": ("zclip()", lambda: optaxclip.zclip()),
    "adagc": ("adagc()", lambda: optaxclip.adagc()),
    "quantile_clip": ("quantile_clip()", lambda: optaxclip.quantile_clip()),
}
PEAK_WINDOW = 20  # steps after a spike in which its loss peak is looked for


class MLP(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs) -> None:
        self.layer1 = nnx.Linear(64, width, rngs=rngs)
        self.layer2 = nnx.Linear(width, width, rngs=rngs)
        self.output = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.layer1(x))
        x = jax.nn.relu(self.layer2(x))
        return self.output(x)


def spike_schedule(args: argparse.Namespace) -> np.ndarray:
    """Gradient multiplier per step: 1, or log-uniform in [100, 1000] on spike steps."""
    rng = np.random.default_rng(args.spike_seed)
    factors = np.ones(args.steps, np.float32)
    candidates = np.arange(args.first_spike, args.steps)
    count = min(args.spikes, len(candidates))
    steps = np.sort(rng.choice(candidates, size=count, replace=False))
    factors[steps] = 10.0 ** rng.uniform(2.0, 3.0, size=count)
    return factors


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    if args.optimizer == "adam":
        return optax.adam(args.lr)
    return optax.sgd(args.lr, momentum=0.9)


def train(
    clipper: str,
    skip: bool,
    factors: np.ndarray,
    args: argparse.Namespace,
    graphdef: Any,
    params: Any,
    data: tuple[jax.Array, ...],
) -> dict[str, np.ndarray]:
    """Trains all seeds with one (clipper, skip) pair; returns per-step arrays (seeds, steps)."""
    x_train, y_train, x_test, y_test = data
    inner = optax.chain(CLIPPERS[clipper][1](), make_optimizer(args))
    tx = optaxclip.skip_spikes(inner) if skip else inner

    def cross_entropy(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def run(p: Any, key: jax.Array) -> dict[str, jax.Array]:
        def step(carry: Any, inputs: tuple[jax.Array, jax.Array]) -> tuple[Any, Any]:
            p, state = carry
            step_key, factor = inputs
            idx = jax.random.randint(step_key, (args.batch_size,), 0, x_train.shape[0])
            loss, grads = jax.value_and_grad(cross_entropy)(p, x_train[idx], y_train[idx])
            grads = jax.tree.map(lambda g: g * factor, grads)  # the injected spike
            if skip:
                updates, state = tx.update(grads, state, p, loss=loss)
                skipped = state.skipped
            else:
                updates, state = tx.update(grads, state, p)
                skipped = jnp.asarray(False)
            return (optax.apply_updates(p, updates), state), (loss, skipped)

        keys = jax.random.split(key, args.steps)
        (p, _), (losses, skipped) = jax.lax.scan(
            step, (p, tx.init(p)), (keys, jnp.asarray(factors))
        )
        logits = nnx.merge(graphdef, p)(x_test)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y_test)
        return {"loss": losses, "skipped": skipped, "test_accuracy": accuracy}

    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(11), s))(jnp.arange(args.seeds))
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(run))(params, keys))


def summarize(
    trace: dict[str, np.ndarray], clean: dict[str, np.ndarray], factors: np.ndarray
) -> dict[str, Any]:
    spikes = np.flatnonzero(factors > 1)
    loss = trace["loss"]
    smooth = _common.running_mean(loss, 20)
    clean_smooth = _common.running_mean(clean["loss"], 20)
    after = slice(int(spikes[0]) if spikes.size else loss.shape[1], None)
    excess = np.mean(smooth[:, after] - clean_smooth[:, after], axis=1)
    peaks = [
        np.max(loss[:, s + 1 : s + 1 + PEAK_WINDOW], axis=1)
        for s in spikes
        if s + 1 < loss.shape[1]
    ]
    peak = np.max(np.stack(peaks), axis=0) if peaks else np.full(loss.shape[0], np.nan)
    skipped = trace["skipped"]
    return {
        "final_losses": smooth[:, -1],  # per seed
        "median_final_loss": float(np.median(smooth[:, -1])),
        "median_test_accuracy": float(np.median(trace["test_accuracy"])),
        "median_peak_loss_after_spike": float(np.median(peak)),
        "median_excess_loss": float(np.median(excess)),
        "nonfinite_runs": int((~np.isfinite(loss).all(axis=1)).sum()),
        "spikes_skipped": float(np.mean(skipped[:, spikes].sum(axis=1))) if spikes.size else 0.0,
        "normal_steps_skipped": float(np.mean(np.delete(skipped, spikes, axis=1).sum(axis=1))),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--steps", type=int, default=800, help="training steps (default 800)")
    parser.add_argument("--spikes", type=int, default=8, help="number of spikes (default 8)")
    parser.add_argument(
        "--first-spike",
        type=int,
        default=150,
        help="no spike before this step, so that every method's warm-up is over (150)",
    )
    parser.add_argument("--spike-seed", type=int, default=0, help="seed of the spike schedule")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--width", type=int, default=128, help="MLP width (default 128)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument(
        "--methods",
        default=",".join(CLIPPERS),
        help=f"comma-separated clippers from: {', '.join(CLIPPERS)} (default: all)",
    )
    parser.add_argument(
        "--out",
        default=str(_common.DEFAULT_OUTPUT / "spike_injection"),
        help="output folder (default examples/output/spike_injection)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: defaults become 2 seeds, 100 steps, 2 spikes, width 32",
    )
    args = _common.parse_with_quick(
        parser, argv, {"seeds": 2, "steps": 100, "spikes": 2, "first_spike": 70, "width": 32}
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CLIPPERS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(CLIPPERS)}")
    args.methods = methods
    for flag in ("seeds", "steps", "width", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.spikes < 0 or args.first_spike < 0:
        parser.error("--spikes and --first-spike must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = _common.output_dir(args.out)
    data = _common.digits_split()
    factors = spike_schedule(args)
    spike_steps = np.flatnonzero(factors > 1)
    models = [MLP(args.width, rngs=nnx.Rngs(seed)) for seed in range(args.seeds)]
    graphdef = nnx.graphdef(models[0])
    params = _common.stack_trees([nnx.state(m, nnx.Param) for m in models])
    print(
        f"digits MLP (width {args.width}), {args.optimizer} lr {args.lr}, {args.steps} steps x "
        f"{args.seeds} seeds; gradient multiplied by "
        + ", ".join(
            f"{f:.0f}x at step {s + 1}"
            for s, f in zip(spike_steps, factors[spike_steps], strict=True)
        )
    )

    no_spikes = np.ones_like(factors)
    runs = [(c, s) for c in args.methods for s in (False, True)]
    traces: dict[tuple[str, bool], dict[str, np.ndarray]] = {}
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(runs) + 1, desc="runs") as progress:
        clean = train("none", False, no_spikes, args, graphdef, params, data)
        progress.update(1)
        for clipper, skip in runs:
            start = time.perf_counter()
            trace = train(clipper, skip, factors, args, graphdef, params, data)
            key = f"{clipper}+skip_spikes" if skip else clipper
            results[key] = {
                "label": CLIPPERS[clipper][0],
                "skip_spikes": skip,
                **summarize(trace, clean, factors),
                "wall_s": time.perf_counter() - start,
            }
            traces[(clipper, skip)] = trace
            progress.update(1)
    clean_summary = summarize(clean, clean, factors)

    headers = [
        "clipper",
        "skip_spikes",
        "test acc",
        "final loss",
        "peak loss after a spike",
        "excess loss",
        "spikes skipped",
        "other steps skipped",
    ]
    rows = [
        [
            "(no spikes, no clipping)",
            "-",
            f"{100 * clean_summary['median_test_accuracy']:.1f}%",
            _common.fmt(clean_summary["median_final_loss"]),
            _common.fmt(clean_summary["median_peak_loss_after_spike"], ".3g"),
            "0",
            "-",
            "-",
        ]
    ]
    for r in results.values():
        rows.append(
            [
                r["label"],
                "yes" if r["skip_spikes"] else "no",
                f"{100 * r['median_test_accuracy']:.1f}%",
                _common.fmt(r["median_final_loss"]),
                _common.fmt(r["median_peak_loss_after_spike"], ".3g"),
                _common.fmt(r["median_excess_loss"], ".3f"),
                f"{r['spikes_skipped']:.1f}/{len(spike_steps)}" if r["skip_spikes"] else "-",
                f"{r['normal_steps_skipped']:.1f}" if r["skip_spikes"] else "-",
            ]
        )
    table = _common.markdown_table(headers, rows)
    print()
    print(table)
    print(
        f"\nmedians over {args.seeds} seeds. final loss: 20-step mean of the training loss at "
        f"the end; peak loss: highest training loss within {PEAK_WINDOW} steps after a spike; "
        "excess loss: 20-step mean loss minus the spike-free run's, averaged from the first "
        "spike on; skipped counts are means over seeds."
    )

    plt = _common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    for ax, skip in zip(axes, (False, True), strict=True):
        ax.plot(
            _common.running_mean(clean["loss"][0], 5),
            color="black",
            lw=1.0,
            label="no spikes, no clipping",
        )
        for i, clipper in enumerate(args.methods):
            curve = _common.running_mean(traces[(clipper, skip)]["loss"][0], 5)
            ax.plot(curve, lw=0.9, color=f"C{i}", label=CLIPPERS[clipper][0])
        for s in spike_steps:
            ax.axvline(s, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step (dotted: spike steps)")
        ax.set_title(("with" if skip else "without") + " skip_spikes", fontsize=10)
    axes[0].set_ylabel("training loss (5-step mean, seed 0)")
    axes[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Gradient x100..1000 on {len(spike_steps)} steps: digits MLP, {args.optimizer}")
    fig.tight_layout()
    files = [_common.save_figure(fig, out / "spike_injection.png")]
    (out / "results.md").write_text(table + "\n")
    summary = {
        "example": "spike_injection",
        "config": vars(args),
        "spike_steps": (spike_steps + 1).tolist(),
        "spike_factors": factors[spike_steps].tolist(),
        "reference": clean_summary,
        "methods": results,
        "clipped_methods": [k for k, r in results.items() if r["label"] != "no clipping"],
        "files": [f.name for f in files],
    }
    _common.write_summary(out, summary)
    print("wrote " + ", ".join(str(f) for f in [*files, out / "results.md", out / "summary.json"]))
    return summary


if __name__ == "__main__":
    main()
