"""Data, model, measures and plots of ``examples/lm_stability.py`` (not part of optaxclip).

* ``stdlib_bytes``: the source of Python's own standard library (it ships with every Python,
  so nothing is downloaded), as bytes, split into training and validation files by a hash of
  each file's path;
* ``bad_batches``: the corrupted batches injected during training;
* ``GPT``: a byte-level, pre-LayerNorm GPT with learned positions, in Flax NNX, and
  ``next_byte_loss``, its training and validation loss;
* ``bad_batch_events``, ``lr_sensitivity``, ``largest_rise``: the measures in the tables;
* ``plot_bad_batches``, ``plot_lr_sensitivity``: the two figures; ``tables`` and
  ``DEFINITIONS``: the text of ``results.md``.
"""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

VOCAB = 256  # one token per byte
BAD_KINDS = ("random bytes", "one byte per sequence", "one byte for the whole batch")


def stdlib_bytes(validation_share: int = 10) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """The standard library's ``.py`` files as two uint8 arrays: training and validation.

    Test suites (``test``/``tests``/``idle_test`` folders) and ``site-packages`` are left
    out. A file belongs to the validation split when the CRC-32 of its path relative to the
    standard library's root is divisible by ``validation_share``: the split is fixed and does
    not depend on which other files exist. Files are read in sorted order and joined with a
    blank line.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    train: list[bytes] = []
    valid: list[bytes] = []
    for path in files:
        name = path.relative_to(root).as_posix()
        split = valid if zlib.crc32(name.encode()) % validation_share == 0 else train
        split.append(path.read_bytes())
    info = {
        "root": str(root),
        "files": len(files),
        "validation_files": len(valid),
        "train_bytes": sum(len(b) for b in train),
        "validation_bytes": sum(len(b) for b in valid),
    }

    def join(parts: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"\n\n".join(parts), np.uint8).copy()

    return join(train), join(valid), info


def validation_slice(valid: np.ndarray, sequences: int, context: int) -> np.ndarray:
    """``sequences`` windows of ``context + 1`` bytes at evenly spaced offsets (fixed)."""
    starts = np.linspace(0, valid.size - context - 2, sequences).astype(np.int64)
    return valid[starts[:, None] + np.arange(context + 1)]


def bad_batches(
    train: np.ndarray, count: int, batch: int, context: int, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """``count`` corrupted batches, the kinds cycling through ``BAD_KINDS``.

    * random bytes: every byte uniform over 0..255;
    * one byte per sequence: each sequence is a single byte repeated (a different byte in
      each sequence, drawn from the bytes of the training text), like files of padding;
    * one byte for the whole batch: every position of every sequence is the same byte,
      a run of ``batch * (context + 1)`` identical tokens.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, context + 1)
    out = np.empty((count, *shape), np.uint8)
    kinds = []
    for i in range(count):
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        if kind == "random bytes":
            out[i] = rng.integers(0, 256, shape)
        elif kind == "one byte per sequence":
            out[i] = rng.choice(train, size=(batch, 1))
        else:
            out[i] = rng.choice(train)
        kinds.append(kind)
    return out, kinds


class Block(nnx.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, layers: int, *, rngs: nnx.Rngs) -> None:
        # GPT-2 initialisation: N(0, 0.02), the residual projections scaled by 1/sqrt(2 layers).
        init = nnx.initializers.normal(0.02)
        residual = nnx.initializers.normal(0.02 / np.sqrt(2 * layers))
        self.heads = heads
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, kernel_init=init, rngs=rngs)
        self.attn_out = nnx.Linear(width, width, kernel_init=residual, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 4 * width, kernel_init=init, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * width, width, kernel_init=residual, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.heads
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((length, length), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.attn_out(mixed.reshape(batch, length, width))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm2(x))))


class GPT(nnx.Module):
    """Byte-level GPT: token and learned position embeddings, pre-LN blocks, a linear head."""

    def __init__(
        self, *, width: int, layers: int, heads: int, context: int, rngs: nnx.Rngs
    ) -> None:
        if width % heads:
            raise ValueError(f"GPT(width={width}, heads={heads}): width must divide by heads")
        init = nnx.initializers.normal(0.02)
        self.tokens = nnx.Embed(VOCAB, width, embedding_init=init, rngs=rngs)
        self.positions = nnx.Param(init(rngs.params(), (context, width)))
        self.blocks = nnx.List([Block(width, heads, layers, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, VOCAB, kernel_init=init, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tokens(tokens) + self.positions[...][: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def next_byte_loss(graphdef: Any, params: Any, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting each byte of ``tokens`` (batch, context + 1) from
    the bytes before it."""
    tokens = tokens.astype(jnp.int32)
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def parameter_count(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def bad_batch_events(
    probe: np.ndarray, measured: np.ndarray, bad_steps: np.ndarray, pre_window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Jump and recovery for every (run, bad batch): two arrays of shape (runs, bad batches).

    ``probe[r, t]`` is run ``r``'s probe loss ``P_t`` after update ``t`` (valid where
    ``measured[t]``) and ``b`` a bad batch's update. The pre-spike level is the mean of ``P``
    over the ``pre_window`` updates before ``b``. Over the measured ``t`` from ``b`` up to the
    next bad batch (or the end), the jump is ``max P_t - level``; the recovery is the first
    ``t`` at or after that maximum with ``P_t <= level``, counted as ``t - b`` updates (0 when
    the loss never rose above the level), NaN when the loss is not back there before the next
    bad batch. A run whose loss turns NaN/Inf gets an infinite jump and no recovery.
    """
    ends = [*bad_steps[1:], probe.shape[1]]
    jumps = np.full((probe.shape[0], bad_steps.size), np.nan)
    recovery = np.full_like(jumps, np.nan)
    for i, (b, end) in enumerate(zip(bad_steps, ends, strict=True)):
        level = probe[:, b - pre_window : b].mean(axis=1)
        steps = np.flatnonzero(measured[b:end]) + b
        for r in range(probe.shape[0]):
            after = probe[r, steps]
            if not np.isfinite(after).all():
                jumps[r, i] = np.inf
                continue
            peak = int(np.argmax(after))
            jumps[r, i] = after[peak] - level[r]
            if jumps[r, i] <= 0:
                recovery[r, i] = 0
                continue
            back = steps[peak:][after[peak:] <= level[r]]
            if back.size:
                recovery[r, i] = back[0] - b
    return jumps, recovery


def lr_sensitivity(final: np.ndarray, init: float) -> float:
    """Wortsman et al.'s LR sensitivity: mean over the grid of ``min(L, L_init) - min L``.

    ``final`` holds the final loss ``L`` at each learning rate of the grid; a NaN/Inf loss
    counts as ``L_init`` (``np.fmin`` keeps the number).
    """
    capped = np.fmin(np.asarray(final, np.float64), init)
    return float(np.mean(capped - capped.min()))


def largest_rise(probe: np.ndarray, measured: np.ndarray, start: int) -> np.ndarray:
    """Per run: the largest rise of the measured probe loss above its running minimum from
    update ``start`` on (``inf`` for a run whose loss turns NaN/Inf)."""
    values = probe[:, np.flatnonzero(measured[start:]) + start]
    finite = np.isfinite(values).all(axis=1)
    values = np.where(np.isfinite(values), values, np.inf)
    rise = values - np.minimum.accumulate(values, axis=1)
    return np.where(finite, np.nanmax(np.where(np.isfinite(rise), rise, 0.0), axis=1), np.inf)


def plot_bad_batches(
    path: Path,
    curves: dict[str, np.ndarray],
    clean: np.ndarray | None,
    measured: np.ndarray,
    bad_steps: np.ndarray,
    kinds: list[str],
    window: tuple[int, int],
    title: str,
) -> Path:
    """Left: the probe loss over training (mean over seeds) of each method, ``clean`` dashed.
    Then one panel per kind of bad batch (its first occurrence): the probe loss minus its
    pre-spike level from ``window[0]`` updates before to ``window[1]`` after."""
    plt = _common.pyplot()
    shown = min(len(set(kinds)), bad_steps.size)
    fig, axes = plt.subplots(1, 1 + shown, figsize=(4.2 * (1 + shown), 4.0), squeeze=False)
    axes = axes[0]
    steps = np.flatnonzero(measured)
    offsets = np.arange(-window[0], window[1])
    later = steps >= (bad_steps[0] - window[0] if bad_steps.size else 0)
    for m, (label, probe) in enumerate(curves.items()):
        axes[0].plot(steps + 1, probe[:, steps].mean(axis=0), lw=0.9, color=f"C{m}", label=label)
        for ax, b in zip(axes[1:], bad_steps[:shown], strict=True):
            near = offsets[b + offsets < probe.shape[1]]
            around = probe[:, b + near]
            level = around[:, : window[0]].mean(axis=1, keepdims=True)
            ax.plot(near, (around - level).mean(axis=0), lw=1.0, color=f"C{m}")
    if clean is not None:
        axes[0].plot(steps + 1, clean[steps], lw=0.9, ls="--", color="black", label="clean run")
    shown_values = np.concatenate([p[:, steps][:, later].mean(axis=0) for p in curves.values()])
    shown_values = shown_values[np.isfinite(shown_values)]
    if shown_values.size:
        axes[0].set_ylim(shown_values.min() - 0.02, shown_values.max() + 0.05)
    for b in bad_steps:
        axes[0].axvline(b + 1, color="grey", lw=0.6, ls=":")
    axes[0].set_xlabel("step (dotted: bad batches)")
    axes[0].set_ylabel("probe validation loss (mean over seeds)")
    axes[0].legend(fontsize=7)
    for ax, b, kind in zip(axes[1:], bad_steps[:shown], kinds, strict=False):
        ax.axhline(0, color="grey", lw=0.6)
        ax.axvline(0, color="grey", lw=0.6, ls=":")
        ax.set_title(f"step {b + 1}: {kind}", fontsize=9)
        ax.set_xlabel("updates after the bad batch")
    if shown:
        axes[1].set_ylabel("probe loss minus its pre-spike level")
    fig.suptitle(title)
    fig.tight_layout()
    return _common.save_figure(fig, path)


def plot_lr_sensitivity(
    path: Path, lr_grid: list[float], finals: dict[str, tuple[np.ndarray, float]], init: float
) -> Path:
    """Final loss (capped at the loss at init) against the peak learning rate, log-x, one
    curve per method; ``finals`` maps a label to (final losses, LR sensitivity)."""
    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    shown = []
    for m, (label, (final, sensitivity)) in enumerate(finals.items()):
        capped = np.fmin(final, init)
        shown.append(capped)
        label = f"{label}: {sensitivity:.3f}"
        ax.plot(lr_grid, capped, marker="o", ms=4, lw=1.0, color=f"C{m}", label=label)
    low, high = float(np.min(shown)), float(np.max(shown))
    margin = 0.05 * (high - low) + 0.02
    if high >= init - margin:
        ax.axhline(init, color="grey", lw=0.8, ls="--", label="loss at init")
    ax.set_ylim(low - margin, min(high, init) + margin)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss, capped at the loss at init")
    ax.set_title(
        f"LR sensitivity in the legend; loss at init {init:.2f}, NaN counts as that", fontsize=10
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _common.save_figure(fig, path)


def tables(results: list[dict[str, Any]], lr_grid: list[float], kinds: list[str]) -> str:
    """The Markdown tables of both experiments from the per-method summaries."""
    bad = []
    by_kind = []
    for r in results:
        bad.append(
            [
                r["label"],
                f"{_common.fmt(r['final_val_mean'])} ± {_common.fmt(r['final_val_std'], '.4f')}",
                f"{_common.fmt(r['largest_jump_mean'], '.3f')} / "
                f"{_common.fmt(r['largest_jump_max'], '.3f')}",
                _common.fmt(r["recovery_median"], ".0f"),
                f"{r['not_recovered']}/{r['events']}",
                f"{r['bad_batches_clipped']}/{r['events']}",
                f"{100 * r['fraction_steps_clipped']:.1f}%",
            ]
        )
        by_kind.append([r["label"], *(_common.fmt(v, ".3f") for v in r["jump_by_kind"].values())])
    lrs = [f"{lr:g}" for lr in lr_grid]
    sweep = []
    rise = []
    for r in results:
        finals = r["sweep_final_losses"]
        capped = np.fmin(finals, r["loss_at_init"])
        best = lr_grid[int(np.argmin(capped))]
        sweep.append(
            [
                r["label"],
                _common.fmt(r["lr_sensitivity"], ".3f"),
                f"{best:g}",
                *(_common.fmt(v, ".3f") for v in finals),
            ]
        )
        rise.append([r["label"], *(_common.fmt(v, ".3f") for v in r["sweep_largest_rise"])])
    bad_headers = [
        "method",
        "final val loss (mean ± sd)",
        "largest jump (mean / max)",
        "updates to recover (median)",
        "not recovered",
        "bad batches clipped",
        "steps clipped",
    ]
    return "\n\n".join(
        [
            "### Bad batches",
            _common.markdown_table(bad_headers, bad),
            "Mean jump by kind of bad batch (over seeds and the bad batches of that kind):",
            _common.markdown_table(["method", *kinds[:3]], by_kind),
            "### Learning-rate sensitivity",
            _common.markdown_table(
                ["method", "LR sensitivity", "best lr", *(f"lr {lr}" for lr in lrs)], sweep
            ),
            "Largest rise of the probe loss above its running minimum after the warm-up, in "
            "the clean runs (a measure of loss spikes that appear without bad batches):",
            _common.markdown_table(["method", *(f"lr {lr}" for lr in lrs)], rise),
        ]
    )


DEFINITIONS = """\
Definitions. `P_t` is the probe loss (validation loss on the fixed probe windows) after
update `t`, and `b` the update made with the bad batch.

- *final val loss*: validation loss on the final windows after the last step, mean and
  standard deviation over the seeds of part 1 (which include the bad batches).
- *largest jump*: for each bad batch, `max P_t - level` over the measured `t` from `b` to the
  next bad batch (or the end), where `level` is the mean of `P` over the {pre} updates before
  `b`; per seed the largest over its bad batches; the mean over seeds, then the largest of all.
  A jump comes from what the model learnt from the bad batch: the bad batch's own loss never
  enters `P`.
- *updates to recover*: the first measured `t` at or after that maximum with
  `P_t <= level`, counted as `t - b` (0 when the loss never rose above the level); median
  over the recovered events. *not recovered*: events where `P` did not get back to `level`
  before the next bad batch (or the end).
- *bad batches clipped*: the bad-batch updates that the method clipped (`skip_spikes`:
  skipped), out of seeds x bad batches. *steps clipped*: the share of all part-1 updates
  with `clipped_fraction > 0` in `optaxclip.clip_stats` (`skip_spikes`: `state.skipped`).
- *LR sensitivity* (Wortsman et al. 2023): over the learning-rate grid, the mean of
  `min(L(lr), L_init) - min_lr L(lr)`, where `L(lr)` is the final validation loss of the
  clean run at that peak learning rate (a NaN/Inf loss counts as `L_init`) and `L_init` the
  validation loss at initialisation ({init}).
"""
