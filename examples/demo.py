"""Gradient clipping rescues a vanilla RNN on the addition problem.

A tanh RNN (Flax NNX) reads a sequence of (value, marker) pairs and must output the sum of
the two marked values: the long-range task Hochreiter & Schmidhuber (1997) designed and
Pascanu, Mikolov & Bengio (2013) used to show that exploding gradients wreck training and
that rescaling the gradient's norm fixes it. The learning rate is deliberately high: without
clipping, the gradient norm shoots up by twenty orders of magnitude and most runs end in NaN.

Every method trains the same seeds (same initial weights, same data stream); the seeds are
vectorised with ``jax.vmap`` and the steps run in ``jax.lax.scan`` chunks, so each method
compiles once. The defaults take about a minute on two CPU cores (a few minutes when the
machine is busy). Results: ``docs/examples/index.md``.

Writes into ``--out`` (default ``./demo_output``):

* ``loss_curves.png``: training loss of every seed, one panel per method;
* ``grad_norms.png``: the pre-clip gradient norm with the clipper's threshold (both read from
  ``optaxclip.clip_stats``), one panel per method;
* ``summary.json`` and ``results.md``: the table printed at the end.

Run ``python examples/demo.py --help`` for the options (``--quick`` is a smoke run).

References:
  Hochreiter & Schmidhuber, "Long short-term memory", Neural Computation 1997.
  Pascanu, Mikolov & Bengio, "On the difficulty of training recurrent neural networks",
  ICML 2013 (https://arxiv.org/abs/1211.5063).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optaxclip

# A constant prediction of 1 (the mean target) has MSE 1/6, the variance of the sum of two
# U(0, 1) values; a run "diverged" if it ends worse than that, and is "solved" once its
# running-mean training MSE drops below SOLVED_MSE (6% of that variance).
BASELINE_MSE = 1.0 / 6.0
SOLVED_MSE = 0.01
SMOOTHING = 100  # steps in the running mean used for "solved" and the final loss

# name -> (label shown in the table, factory). Each method is the clipper chained before
# SGD with momentum; "none" has no clipper at all. DEFAULT_METHODS run unless --methods says
# otherwise; the variants after them are there to be asked for (see docs/examples/index.md).
METHODS: dict[str, tuple[str, Callable[[], optax.GradientTransformation]]] = {
    "none": ("no clipping", optax.identity),
    "clip_by_value": ("clip_by_value(0.1)", lambda: optaxclip.clip_by_value(0.1)),
    "clip_by_global_norm": (
        "clip_by_global_norm(1.0)",
        lambda: optaxclip.clip_by_global_norm(1.0),
    ),
    "autoclip": ("autoclip(percentile=10)", lambda: optaxclip.autoclip(percentile=10.0)),
    "zclip": ("zclip()", lambda: optaxclip.zclip()),
    "adagc": ("adagc()", lambda: optaxclip.adagc()),
    # Variants: ZClip with the reference code's fixed cap, AdaGC with a faster-growing
    # threshold, and the quantile-tracking threshold.
    "zclip_capped": ("zclip(max_grad_norm=1.0)", lambda: optaxclip.zclip(max_grad_norm=1.0)),
    "adagc_fast": (
        "adagc(relative_factor=1.2)",
        lambda: optaxclip.adagc(relative_factor=1.2),
    ),
    "quantile_clip": ("quantile_clip(0.5)", lambda: optaxclip.quantile_clip(0.5)),
}
DEFAULT_METHODS = ("none", "clip_by_value", "clip_by_global_norm", "autoclip", "zclip", "adagc")


class TanhRNN(nnx.Module):
    """h_t = tanh(W_in x_t + W_rec h_{t-1} + b); the prediction is a linear readout of h_T."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs) -> None:
        self.inputs = nnx.Linear(2, hidden, rngs=rngs)
        self.recurrent = nnx.Param(nnx.initializers.orthogonal()(rngs.params(), (hidden, hidden)))
        self.readout = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        drive = jnp.swapaxes(self.inputs(x), 0, 1)  # (time, batch, hidden)
        w_rec = self.recurrent[...]

        def step(h: jax.Array, drive_t: jax.Array) -> tuple[jax.Array, None]:
            return jnp.tanh(drive_t + h @ w_rec), None

        h0 = jnp.zeros(drive.shape[1:], drive.dtype)
        h_last, _ = jax.lax.scan(step, h0, drive)
        return self.readout(h_last)[:, 0]


def addition_batch(key: jax.Array, batch_size: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """One batch of the addition problem.

    Each sequence holds ``seq_len`` pairs (value ~ U(0, 1), marker in {0, 1}); exactly two
    markers are set, one in each half of the sequence, and the target is the sum of the two
    marked values.
    """
    k_values, k_first, k_second = jax.random.split(key, 3)
    values = jax.random.uniform(k_values, (batch_size, seq_len))
    half = seq_len // 2
    first = jax.random.randint(k_first, (batch_size,), 0, half)
    second = jax.random.randint(k_second, (batch_size,), half, seq_len)
    markers = jax.nn.one_hot(first, seq_len) + jax.nn.one_hot(second, seq_len)
    return jnp.stack([values, markers], axis=-1), jnp.sum(values * markers, axis=-1)


def train_method(
    name: str,
    args: argparse.Namespace,
    graphdef: Any,
    params: Any,
    data_keys: jax.Array,
    progress: tqdm,
) -> dict[str, np.ndarray]:
    """Trains all seeds with one method; returns per-step arrays of shape (seeds, steps)."""
    clipper = METHODS[name][1]()
    tx = optax.chain(clipper, optax.sgd(args.lr, momentum=args.momentum))

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def one_step(carry: Any, step: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        p, opt_state, key = carry
        x, y = addition_batch(jax.random.fold_in(key, step), args.batch_size, args.seq_len)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        stats = optaxclip.clip_stats(opt_state)
        if name == "none":
            record = {
                "pre_clip_norm": optaxclip.global_norm(grads),
                "threshold": jnp.asarray(jnp.inf, jnp.float32),
                "clipped": jnp.asarray(0.0, jnp.float32),
            }
        else:
            (prefix,) = {label.rsplit("/", 1)[0] for label in stats}  # the one clipper
            record = {
                "pre_clip_norm": stats[f"{prefix}/pre_clip_norm"],
                "threshold": stats[f"{prefix}/threshold"],
                "clipped": stats[f"{prefix}/clipped_fraction"],
            }
        record["loss"] = loss
        return (p, opt_state, key), record

    @partial(jax.jit, static_argnums=4, donate_argnums=(0, 1))
    def run_chunk(p: Any, opt_state: Any, keys: jax.Array, start: jax.Array, length: int) -> Any:
        def per_seed(p: Any, opt_state: Any, key: jax.Array) -> Any:
            steps = start + jnp.arange(length)
            (p, opt_state, _), records = jax.lax.scan(one_step, (p, opt_state, key), steps)
            return p, opt_state, records

        return jax.vmap(per_seed)(p, opt_state, keys)

    opt_state = jax.vmap(tx.init)(params)
    params = jax.tree.map(jnp.copy, params)  # run_chunk donates its inputs
    chunks: list[dict[str, np.ndarray]] = []
    done = 0
    while done < args.steps:
        length = min(args.chunk, args.steps - done)
        params, opt_state, records = run_chunk(
            params, opt_state, data_keys, jnp.asarray(done), length
        )
        chunks.append(jax.tree.map(np.asarray, records))
        done += length
        progress.update(length)
    return {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}


def summarize(name: str, trace: dict[str, np.ndarray], wall_s: float) -> dict[str, Any]:
    """Per-method numbers for the table and summary.json."""
    loss = trace["loss"]
    smooth = _common.running_mean(loss, SMOOTHING)
    final = smooth[:, -1]
    nonfinite = ~np.isfinite(loss).all(axis=1)
    diverged = nonfinite | ~(final <= BASELINE_MSE)
    solved_at = [_common.first_step_below(curve, SOLVED_MSE) for curve in smooth]
    solved_steps = [s for s in solved_at if s is not None]
    return {
        "label": METHODS[name][0],
        "final_losses": final,  # per seed
        "median_final_loss": float(np.median(final)),
        "nonfinite_runs": int(nonfinite.sum()),
        "diverged_runs": int(diverged.sum()),
        "solved_runs": len(solved_steps),
        "steps_to_solve_per_seed": solved_at,
        "median_steps_to_solve": float(np.median(solved_steps)) if solved_steps else None,
        "fraction_steps_clipped": float(np.nanmean(trace["clipped"] > 0)),
        "max_pre_clip_norm": float(
            np.max(np.where(np.isnan(trace["pre_clip_norm"]), -np.inf, trace["pre_clip_norm"]))
        ),
        "wall_s": wall_s,
    }


def results_table(results: dict[str, dict[str, Any]], seeds: int) -> str:
    rows = []
    for r in results.values():
        rows.append(
            [
                r["label"],
                _common.fmt(r["median_final_loss"]),
                f"{r['diverged_runs']}/{seeds} ({r['nonfinite_runs']} NaN)",
                f"{r['solved_runs']}/{seeds}",
                _common.fmt(r["median_steps_to_solve"], ".0f"),
                f"{100 * r['fraction_steps_clipped']:.0f}%",
                f"{r['wall_s']:.1f}",
            ]
        )
    headers = [
        "method",
        "final loss (median)",
        "diverged (NaN)",
        "solved",
        "steps to solve (median)",
        "steps clipped",
        "wall s",
    ]
    return _common.markdown_table(headers, rows)


def plot_losses(out: Path, traces: dict[str, dict[str, np.ndarray]]) -> Path:
    plt = _common.pyplot()
    n = len(traces)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, sharey=True
    )
    for ax, (name, trace) in zip(axes.flat, traces.items(), strict=False):
        steps = np.arange(1, trace["loss"].shape[1] + 1)
        smooth = _common.running_mean(trace["loss"], 20)
        for seed_curve in smooth:
            ax.plot(steps, seed_curve, lw=0.9)
        blown = (~np.isfinite(trace["loss"]).all(axis=1)).sum()
        ax.axhline(BASELINE_MSE, color="grey", ls=":", lw=1, label="predict the mean")
        ax.axhline(SOLVED_MSE, color="black", ls="--", lw=1, label="solved")
        title = METHODS[name][0] + (f"  ({blown} NaN)" if blown else "")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 1e2)
        ax.set_xlabel("step")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("training MSE (20-step mean)")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Addition problem, tanh RNN, SGD: loss of each seed (a curve that stops = NaN)")
    fig.tight_layout()
    return _common.save_figure(fig, out / "loss_curves.png")


def threshold_label(name: str) -> str:
    if name == "clip_by_value":
        return "bound on each |g_i|"
    if name.startswith("adagc"):
        return "smallest per-leaf threshold"
    return "threshold"


def plot_grad_norms(out: Path, traces: dict[str, dict[str, np.ndarray]]) -> Path:
    plt = _common.pyplot()
    n = len(traces)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, trace) in zip(axes.flat, traces.items(), strict=False):
        steps = np.arange(1, trace["loss"].shape[1] + 1)
        for seed_norm in trace["pre_clip_norm"][1:]:
            ax.plot(steps, seed_norm, lw=0.5, alpha=0.35, color="grey")
        ax.plot(steps, trace["pre_clip_norm"][0], lw=0.7, color="C0", label="norm (seed 0)")
        threshold = trace["threshold"][0]
        if np.isfinite(threshold).any():
            shown = np.where(np.isfinite(threshold), threshold, np.nan)
            ax.plot(steps, shown, lw=1.3, ls="--", color="C3", label=threshold_label(name))
        ax.set_title(METHODS[name][0], fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("pre-clip gradient norm")
    fig.suptitle(
        "Global gradient norm before clipping (seed 0 in blue, other seeds grey) "
        "and seed 0's threshold"
    )
    fig.tight_layout()
    return _common.save_figure(fig, out / "grad_norms.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    parser.add_argument("--hidden", type=int, default=32, help="RNN width (default 32)")
    parser.add_argument("--seq-len", type=int, default=20, help="sequence length (default 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated list from: {', '.join(METHODS)} "
        f"(default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--out", default="demo_output", help="output folder (default ./demo_output)"
    )
    parser.add_argument("--chunk", type=int, default=100, help="steps per compiled chunk")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: defaults become 2 seeds, 40 steps, sequence length 8",
    )
    args = _common.parse_with_quick(
        parser, argv, {"seeds": 2, "steps": 40, "seq_len": 8, "chunk": 20}
    )
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.methods = methods
    for flag in ("seeds", "steps", "hidden", "batch_size", "chunk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        parser.error("--seq-len must be >= 2 (one marker in each half)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = _common.output_dir(args.out)
    print(
        f"Addition problem: tanh RNN (hidden {args.hidden}), sequence length {args.seq_len}, "
        f"SGD lr {args.lr} momentum {args.momentum}, batch {args.batch_size}, "
        f"{args.steps} steps x {args.seeds} seeds (vmapped), methods: {', '.join(args.methods)}"
    )
    models = [TanhRNN(args.hidden, rngs=nnx.Rngs(seed)) for seed in range(args.seeds)]
    graphdef = nnx.graphdef(models[0])
    params = _common.stack_trees([nnx.state(m, nnx.Param) for m in models])
    data_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(2013), s))(
        jnp.arange(args.seeds)
    )

    traces: dict[str, dict[str, np.ndarray]] = {}
    results: dict[str, dict[str, Any]] = {}
    total = args.steps * len(args.methods)
    start_all = time.perf_counter()
    with tqdm(total=total, unit="step", desc="training", dynamic_ncols=True) as progress:
        for name in args.methods:
            progress.set_description(name)
            start = time.perf_counter()
            traces[name] = train_method(name, args, graphdef, params, data_keys, progress)
            results[name] = summarize(name, traces[name], time.perf_counter() - start)
    total_s = time.perf_counter() - start_all

    table = results_table(results, args.seeds)
    print()
    print(table)
    print(
        f"\nfinal loss = {SMOOTHING}-step running mean of the training MSE at the last step; "
        f"diverged = NaN/Inf or final loss above {BASELINE_MSE:.3f} (predicting the mean); "
        f"solved = running mean below {SOLVED_MSE}. Wall time includes compilation. "
        f"Total {total_s:.1f} s."
    )
    files = [plot_losses(out, traces), plot_grad_norms(out, traces)]
    (out / "results.md").write_text(table + "\n")
    summary = {
        "example": "demo",
        "config": {k: v for k, v in vars(args).items()},
        "baseline_mse": BASELINE_MSE,
        "solved_mse": SOLVED_MSE,
        "total_wall_s": total_s,
        "methods": results,
        "clipped_methods": [m for m in args.methods if m != "none"],
        "files": [f.name for f in files],
    }
    _common.write_summary(out, summary)
    print("wrote " + ", ".join(str(f) for f in [*files, out / "results.md", out / "summary.json"]))
    return summary


if __name__ == "__main__":
    main()
