"""Bad batches and learning-rate sensitivity of a small byte-level language model.

A byte-level GPT (Flax NNX, pre-LN, learned positions) is trained with AdamW on the source
of Python's own standard library, read from ``sysconfig.get_paths()["stdlib"]`` (it ships
with Python, so nothing is downloaded), with a fixed train/validation split by file. Each
method is the clipper chained before AdamW (``skip_spikes`` wraps AdamW instead):

* no clipping, ``clip_by_global_norm(1.0)``, ``zclip()``, ``adagc()``, ``autoclip()``,
  ``adaclip()`` and ``skip_spikes(adamw)``, all with their defaults.

Two experiments share one compiled program per method (``jax.vmap`` over the runs, the steps
in ``jax.lax.scan`` chunks):

1. Bad batches. Every ``--bad-every`` steps one corrupted batch replaces the real one
   (random bytes, one byte repeated in each sequence, one byte for the whole batch), on
   ``--seeds`` seeds at ``--lr``. Reported: the final validation loss, the largest jump of
   the validation loss after a bad batch, the steps until it is back at its pre-spike
   level, and the fraction of steps clipped (or skipped).
2. Learning-rate sensitivity (Wortsman et al. 2023): clean runs over ``--lr-grid``; the
   sensitivity is the mean over the grid of ``min(final loss, loss at init) - best final
   loss``.

Run ``python examples/lm_stability.py`` (about half an hour on two CPU cores) or add
``--quick`` for a smoke run of about a minute. It writes ``lm_bad_batches.png``,
``lm_lr_sensitivity.png``, ``results.md`` (every setting, the tables and the definitions) and
``summary.json`` into ``--out`` (default ``examples/output/lm_stability/``). Results:
``docs/examples/lm_stability.md``.

References:
  Wortsman et al., "Small-scale proxies for large-scale Transformer training
  instabilities", ICLR 2024 (https://arxiv.org/abs/2309.14322).
  Kumar, Owen, Roy Chowdhury & Güra, "ZClip: Adaptive Spike Mitigation for LLM
  Pre-Training", 2025 (https://arxiv.org/abs/2504.02507).
  Wang et al., "AdaGC: Improving Training Stability for Large Language Model Pretraining",
  2025 (https://arxiv.org/abs/2502.11034).
  Seetharaman, Wichern, Pardo & Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
  Separation Networks", IEEE MLSP 2020 (https://arxiv.org/abs/2007.14469).
  Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam", 2025
  (https://arxiv.org/abs/2502.17055).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import _common
import _lm
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optaxclip

# name -> (label, clipper factory). "none" and "skip_spikes" have no clipper: the first is
# plain AdamW, the second wraps AdamW in the step-skipping guard (its defaults).
METHODS: dict[str, tuple[str, Callable[[], optax.GradientTransformation] | None]] = {
    "none": ("no clipping", None),
    "clip_by_global_norm": (
        "clip_by_global_norm(1.0)",
        lambda: optaxclip.clip_by_global_norm(1.0),
    ),
    "zclip": ("zclip()", lambda: optaxclip.zclip()),
    "adagc": ("adagc()", lambda: optaxclip.adagc()),
    "autoclip": ("autoclip()", lambda: optaxclip.autoclip()),
    "adaclip": ("adaclip()", lambda: optaxclip.adaclip()),
    "skip_spikes": ("skip_spikes(adamw)", None),
}
METHODS_LABELS = {name: label for name, (label, _) in METHODS.items()}
BETA1, BETA2, EPS = 0.9, 0.95, 1e-8
FINAL_LR_FRACTION = 0.1  # the cosine decays the learning rate to 10% of its peak
DATA_KEY = 2023  # data order of seed s: fold_in(key(DATA_KEY), s); weights: nnx.Rngs(s)


@dataclass(frozen=True)
class Run:
    """One vmapped training run: which seed, peak learning rate and whether it gets bad
    batches (part 1) or is a clean run of the learning-rate sweep (part 2)."""

    seed: int
    lr: float
    bad: bool


def make_optimizer(name: str, peak_lr: Any, args: argparse.Namespace) -> Any:
    """The method's clipper chained before AdamW (warm-up, then cosine to 10% of the peak)."""
    unit = optax.warmup_cosine_decay_schedule(
        0.0, 1.0, args.warmup, args.steps, end_value=FINAL_LR_FRACTION
    )
    adamw = optax.adamw(
        lambda count: peak_lr * unit(count),
        b1=BETA1,
        b2=BETA2,
        eps=EPS,
        weight_decay=args.weight_decay,
        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
    )
    if name == "skip_spikes":
        return optaxclip.skip_spikes(adamw)
    clipper = METHODS[name][1]
    return adamw if clipper is None else optax.chain(clipper(), adamw)


def probe_schedule(args: argparse.Namespace, bad_steps: np.ndarray) -> np.ndarray:
    """The steps after which the probe (validation) loss is measured: every step from
    ``--pre-window`` steps before each bad batch to ``--dense-after`` steps after it, every
    ``--probe-every`` steps otherwise, and the last step."""
    mask = np.zeros(args.steps, bool)
    mask[args.probe_every - 1 :: args.probe_every] = True
    mask[-1] = True
    for b in bad_steps:
        mask[max(0, b - args.pre_window) : b + args.dense_after] = True
    return mask


def train_method(
    name: str,
    args: argparse.Namespace,
    graphdef: Any,
    params: Any,
    runs: list[Run],
    data: dict[str, jax.Array],
    schedule: dict[str, np.ndarray],
    progress: tqdm,
) -> dict[str, Any]:
    """Trains every run with one method.

    Returns per-step arrays of shape (runs, steps) (training loss, gradient norm before
    clipping, whether the step was clipped or skipped, probe loss or NaN where not measured)
    and the final parameters under ``"params"``.
    """
    keys = jnp.stack([jax.random.fold_in(jax.random.key(DATA_KEY), r.seed) for r in runs])
    peaks = jnp.asarray([r.lr for r in runs], jnp.float32)
    gets_bad = jnp.asarray([r.bad for r in runs])
    context = args.context

    loss_fn = partial(_lm.next_byte_loss, graphdef)

    def train_step(p, state, key, peak, bad_run, step, bad_index, train, bad_batches):
        tx = make_optimizer(name, peak, args)
        starts = jax.random.randint(
            jax.random.fold_in(key, step), (args.batch_size, 1), 0, train.size - context - 1
        )
        clean = train[starts + jnp.arange(context + 1)]
        corrupted = bad_batches[jnp.maximum(bad_index, 0)]
        tokens = jnp.where(bad_run & (bad_index >= 0), corrupted, clean)
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        if name == "skip_spikes":
            updates, state = tx.update(grads, state, p, loss=loss)
            clipped = state.skipped
        else:
            updates, state = tx.update(grads, state, p)
            fractions = [
                v for k, v in optaxclip.clip_stats(state).items() if k.endswith("/clipped_fraction")
            ]
            clipped = fractions[0] > 0 if fractions else jnp.asarray(False)
        record = {
            "loss": loss,
            "grad_norm": optaxclip.global_norm(grads),
            "clipped": clipped.astype(jnp.float32),
        }
        return optax.apply_updates(p, updates), state, record

    @partial(jax.jit, donate_argnums=(0, 1))
    def run_chunk(p, state, xs, train, probe, bad_batches):
        batched_step = jax.vmap(train_step, in_axes=(0, 0, 0, 0, 0, None, None, None, None))

        def body(carry, x):
            p, state = carry
            step, probe_now, bad_index = x
            p, state, record = batched_step(
                p, state, keys, peaks, gets_bad, step, bad_index, train, bad_batches
            )
            record["probe"] = jax.lax.cond(
                probe_now,
                lambda q: jax.vmap(loss_fn, in_axes=(0, None))(q, probe),
                lambda q: jnp.full((len(runs),), jnp.nan, jnp.float32),
                p,
            )
            return (p, state), record

        return jax.lax.scan(body, (p, state), xs)

    state = jax.jit(jax.vmap(lambda p, lr: make_optimizer(name, lr, args).init(p)))(params, peaks)
    params = jax.tree.map(jnp.copy, params)  # run_chunk donates its inputs
    chunks = []
    for start in range(0, args.steps, args.chunk):
        window = slice(start, start + args.chunk)
        xs = (
            jnp.arange(start, start + args.chunk),
            jnp.asarray(schedule["probe"][window]),
            jnp.asarray(schedule["bad_index"][window]),
        )
        (params, state), records = run_chunk(
            params, state, xs, data["train"], data["probe"], data["bad"]
        )
        chunks.append(jax.tree.map(lambda a: np.asarray(a).T, records))  # (runs, chunk)
        progress.update(args.chunk)
    out = {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}
    out["params"] = params
    return out


def summarize(
    trace: dict[str, np.ndarray],
    runs: list[Run],
    schedule: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Per-method numbers of both experiments for the tables and summary.json."""
    part1 = np.asarray([r.bad for r in runs])
    sweep = ~part1
    bad_steps = np.flatnonzero(schedule["bad_index"] >= 0)
    probe = trace["probe"]
    jumps, recovery = _lm.bad_batch_events(
        probe[part1], schedule["probe"], bad_steps, args.pre_window
    )
    clipped = trace["clipped"][part1] > 0
    final = trace["final_val"]
    sweep_final = final[sweep].reshape(args.sweep_seeds, len(args.lr_grid))
    init = float(np.mean(trace["init_val"][sweep]))
    rise = _lm.largest_rise(probe[sweep], schedule["probe"], args.warmup)
    return {
        "label": METHODS_LABELS[trace["name"]],
        "final_losses": final[part1],  # part 1, per seed
        "final_val_mean": float(np.mean(final[part1])),
        "final_val_std": float(np.std(final[part1])),
        "nonfinite_runs": int((~np.isfinite(trace["loss"][part1]).all(axis=1)).sum()),
        "jumps": jumps,  # (seeds, bad batches)
        "largest_jump_mean": float(np.mean(np.max(jumps, axis=1))),
        "largest_jump_max": float(np.max(jumps)),
        "jump_by_kind": {
            kind: float(np.mean(jumps[:, i :: len(_lm.BAD_KINDS)]))
            for i, kind in enumerate(schedule["kinds"][: len(_lm.BAD_KINDS)])
        },
        "recovery_steps": recovery,  # (seeds, bad batches), NaN = not recovered
        "recovery_median": float(np.nanmedian(recovery)) if np.isfinite(recovery).any() else None,
        "not_recovered": int(np.isnan(recovery).sum()),
        "events": int(recovery.size),
        "fraction_steps_clipped": float(np.mean(clipped)),
        "bad_batches_clipped": int(clipped[:, bad_steps].sum()),
        "lr_grid": args.lr_grid,
        "sweep_final_losses": np.mean(sweep_final, axis=0),  # per LR, mean over sweep seeds
        "loss_at_init": init,
        "lr_sensitivity": _lm.lr_sensitivity(np.mean(sweep_final, axis=0), init),
        "sweep_largest_rise": np.mean(rise.reshape(args.sweep_seeds, -1), axis=0),
        "wall_s": trace["wall_s"],
    }


def settings_text(
    args: argparse.Namespace,
    info: dict[str, Any],
    n_params: int,
    schedule: dict[str, Any],
    timing: dict[str, float],
) -> str:
    """Every setting of the run, as the Markdown list at the top of ``results.md``."""
    bad_steps = np.flatnonzero(schedule["bad_index"] >= 0)
    bad = ", ".join(f"{b + 1} ({schedule['kinds'][schedule['bad_index'][b]]})" for b in bad_steps)
    tokens = args.batch_size * args.context
    command = " ".join(["python examples/lm_stability.py", *args.argv])
    lines = [
        f"- Command: `{command}`",
        f"- Data: the `.py` files of Python {platform.python_version()}'s standard library "
        f"(`{info['root']}`, test suites and site-packages left out): {info['files']} files; "
        f"a file is in the validation split when the CRC-32 of its relative path is divisible "
        f"by 10 ({info['validation_files']} files, {info['validation_bytes']:,} bytes; "
        f"training {info['train_bytes']:,} bytes).",
        f"- Model: byte-level GPT, vocabulary 256, context {args.context} bytes, "
        f"pre-LN blocks: {args.layers}, width {args.width}, {args.heads} heads, MLP width "
        f"{4 * args.width}, GELU, learned positions, untied output layer, GPT-2 "
        f"initialisation; {n_params:,} parameters; float32.",
        f"- Optimizer: AdamW (b1 {BETA1}, b2 {BETA2}, eps {EPS:g}, weight decay "
        f"{args.weight_decay} on the matrices and embeddings only); the clipper is chained "
        "before it, `skip_spikes` wraps it.",
        f"- Schedule: linear warm-up from 0 over {args.warmup} steps, then cosine decay to "
        f"{FINAL_LR_FRACTION:g} x the peak at step {args.steps}.",
        f"- Training: {args.steps} steps, batch {args.batch_size} sequences of "
        f"{args.context + 1} bytes ({tokens} predicted tokens per step); each step draws "
        "uniformly random windows of the training text (the same ones for every method at a "
        "given seed).",
        f"- Part 1 (bad batches): peak lr {args.lr:g}, seeds {list(range(args.seeds))}; "
        f"the corrupted batch replaces the real one at steps {bad}. Random bytes: every byte "
        "uniform over 0..255; one byte per sequence: each sequence one byte repeated (a "
        "different byte in each, drawn from the training text); one byte for the whole "
        "batch: every position of every sequence the same byte.",
        f"- Probe: validation loss on {args.probe_sequences} fixed validation windows, "
        f"measured after every step from {args.pre_window} steps before to "
        f"{args.dense_after} steps after each bad batch and every {args.probe_every} steps "
        f"otherwise. Final validation loss: {args.val_sequences} fixed validation windows "
        "(evenly spaced over the validation text) after the last step.",
        "- Part 2 (LR sensitivity): clean runs (no bad batches) at peak lr "
        f"{', '.join(f'{lr:g}' for lr in args.lr_grid)}, seeds "
        f"{list(range(args.sweep_seeds))}.",
        "- Methods: "
        + ", ".join(f"`{METHODS_LABELS[name]}`" for name in args.methods)
        + " (all with their defaults).",
        f"- Time: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU time "
        f"(all threads) on {os.cpu_count()} cores; load average {timing['load_start']:.1f} "
        f"at the start, {timing['load_end']:.1f} at the end. JAX {jax.__version__}, Flax "
        f"{flax.__version__}, Optax {optax.__version__}, backend {jax.default_backend()}.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options = [  # flag, type, default, help
        ("--seeds", int, 3, "seeds of part 1"),
        ("--steps", int, 800, "training steps of every run"),
        ("--batch-size", int, 32, "sequences per batch"),
        ("--context", int, 32, "context length in bytes"),
        ("--width", int, 64, "model width"),
        ("--layers", int, 2, "transformer blocks"),
        ("--heads", int, 4, "attention heads"),
        ("--lr", float, 3e-3, "peak learning rate of part 1"),
        ("--lr-grid", str, "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1", "part 2 peak lrs"),
        ("--sweep-seeds", int, 1, "seeds per learning rate in part 2"),
        ("--warmup", int, 40, "linear warm-up steps"),
        ("--weight-decay", float, 0.1, "AdamW weight decay"),
        ("--bad-every", int, 200, "a bad batch every this many steps"),
        ("--pre-window", int, 10, "updates averaged into the pre-spike level"),
        ("--dense-after", int, 40, "probe after every update this long after a bad batch"),
        ("--probe-every", int, 10, "probe interval otherwise"),
        ("--probe-sequences", int, 32, "validation windows of the probe"),
        ("--val-sequences", int, 256, "validation windows of the final loss"),
        ("--chunk", int, 100, "steps per compiled scan"),
        ("--methods", str, ",".join(METHODS), "comma-separated subset of the methods"),
        ("--out", str, str(_common.DEFAULT_OUTPUT / "lm_stability"), "output folder"),
    ]
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} ({default})")
    parser.add_argument("--quick", action="store_true", help="smoke run of about a minute")
    quick = {
        "seeds": 2,
        "steps": 120,
        "batch_size": 8,
        "context": 16,
        "width": 32,
        "layers": 1,
        "heads": 2,
        "lr_grid": "1e-3,1e-2,1e-1",
        "warmup": 10,
        "bad_every": 40,
        "dense_after": 20,
        "probe_every": 5,
        "probe_sequences": 16,
        "val_sequences": 64,
        "chunk": 40,
    }
    args = _common.parse_with_quick(parser, argv, quick)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.lr_grid = sorted(float(v) for v in args.lr_grid.split(",") if v.strip())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    args.methods = methods
    for flag in ("seeds", "steps", "batch_size", "context", "width", "layers", "heads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.lr_grid or args.sweep_seeds < 1:
        parser.error("--lr-grid needs at least one learning rate, --sweep-seeds >= 1")
    if not args.pre_window < args.bad_every < args.steps:
        parser.error("--bad-every must lie between --pre-window and --steps")
    for flag in ("pre_window", "dense_after", "probe_every", "probe_sequences", "val_sequences"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    # One chunk length divides the steps, so that each method compiles once.
    args.chunk = next(c for c in range(min(args.chunk, args.steps), 0, -1) if args.steps % c == 0)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = _common.output_dir(args.out)
    wall0, cpu0, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    train, valid, info = _lm.stdlib_bytes()
    bad_steps = np.arange(args.bad_every, args.steps, args.bad_every) - 1  # update indices
    bad, kinds = _lm.bad_batches(train, bad_steps.size, args.batch_size, args.context)
    bad_index = np.full(args.steps, -1, np.int32)
    bad_index[bad_steps] = np.arange(bad_steps.size)
    schedule = {"bad_index": bad_index, "probe": probe_schedule(args, bad_steps), "kinds": kinds}
    data = {
        "train": jnp.asarray(train),
        "probe": jnp.asarray(_lm.validation_slice(valid, args.probe_sequences, args.context)),
        "bad": jnp.asarray(bad),
    }
    final_windows = jnp.asarray(_lm.validation_slice(valid, args.val_sequences, args.context))

    runs = [Run(s, args.lr, True) for s in range(args.seeds)]
    runs += [Run(s, lr, False) for s in range(args.sweep_seeds) for lr in args.lr_grid]
    models = {
        s: _lm.GPT(
            width=args.width,
            layers=args.layers,
            heads=args.heads,
            context=args.context,
            rngs=nnx.Rngs(s),
        )
        for s in sorted({r.seed for r in runs})
    }
    graphdef = nnx.graphdef(models[0])
    params = _common.stack_trees([nnx.state(models[r.seed], nnx.Param) for r in runs])
    n_params = _lm.parameter_count(models[0])

    evaluate = jax.jit(jax.vmap(partial(_lm.next_byte_loss, graphdef), in_axes=(0, None)))
    init_val = np.asarray(evaluate(params, final_windows))
    print(
        f"byte-level GPT, {n_params:,} parameters; {info['train_bytes']:,} training bytes "
        f"from {info['root']}; {len(runs)} runs per method ({args.seeds} with bad batches at "
        f"steps {(bad_steps + 1).tolist()}, {len(runs) - args.seeds} clean over the LR grid)"
    )

    traces: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(args.methods) * args.steps, unit="step") as progress:
        for name in args.methods:
            progress.set_description(name)
            start = time.perf_counter()
            trace = train_method(name, args, graphdef, params, runs, data, schedule, progress)
            trace["final_val"] = np.asarray(evaluate(trace.pop("params"), final_windows))
            trace.update(init_val=init_val, name=name, wall_s=time.perf_counter() - start)
            traces[name] = trace
            results[name] = summarize(trace, runs, schedule, args)
    timing = {
        "wall_s": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
    }

    part1 = np.asarray([r.bad for r in runs])
    twin = [i for i, r in enumerate(runs) if not r.bad and r.seed == 0 and r.lr == args.lr]
    init = float(np.mean([r["loss_at_init"] for r in results.values()]))
    files = [
        _lm.plot_bad_batches(
            out / "lm_bad_batches.png",
            {METHODS_LABELS[k]: t["probe"][part1] for k, t in traces.items()},
            traces["none"]["probe"][twin[0]] if twin and "none" in traces else None,
            schedule["probe"],
            bad_steps,
            [kinds[i] for i in range(bad_steps.size)],
            (args.pre_window, args.dense_after),
            f"Bad batches: byte-level GPT on Python's standard library, AdamW, lr {args.lr:g}, "
            f"{args.seeds} seeds (dashed: no clipping, no bad batches, seed 0)",
        ),
        _lm.plot_lr_sensitivity(
            out / "lm_lr_sensitivity.png",
            args.lr_grid,
            {r["label"]: (r["sweep_final_losses"], r["lr_sensitivity"]) for r in results.values()},
            init,
        ),
    ]
    text = "\n\n".join(
        [
            "## Bad batches and learning-rate sensitivity of a byte-level GPT",
            "### Settings\n\n" + settings_text(args, info, n_params, schedule, timing),
            _lm.tables(list(results.values()), args.lr_grid, kinds),
            _lm.DEFINITIONS.format(pre=args.pre_window, init=f"{init:.3f}").strip(),
        ]
    )
    (out / "results.md").write_text(text + "\n")
    print()
    print(text)
    summary = {
        "example": "lm_stability",
        "config": {k: v for k, v in vars(args).items() if k != "argv"},
        "data": info,
        "parameters": n_params,
        "bad_steps": (bad_steps + 1).tolist(),
        "bad_kinds": kinds,
        "runs": [vars(r) for r in runs],
        "timing": timing,
        "methods": results,
        "clipped_methods": [m for m in args.methods if m != "none"],
        "files": [f.name for f in files],
    }
    _common.write_summary(out, summary)
    print(
        f"\ntotal {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU; wrote "
        + ", ".join(str(f) for f in [*files, out / "results.md", out / "summary.json"])
    )
    return summary


if __name__ == "__main__":
    main()
