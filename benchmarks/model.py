"""The model of the train_step section: a small GPT-like transformer, in Flax NNX and in PyTorch.

Both frameworks build the same architecture from one :class:`GPTConfig`: token and position
embeddings, pre-LayerNorm blocks of causal multi-head attention (one fused qkv projection) and
a GELU MLP, a final LayerNorm and an untied output projection. The loss is the
cross-entropy of the next token summed over the batch's tokens, and the steps cycle through
a few batches of random tokens made in advance, which the model cannot learn: the gradient's
global norm stays well above 1, so a clip at 1 acts on every step. A training step is
forward, backward, an optional clip, AdamW and the parameter update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of the model and of one batch."""

    vocab: int
    seq: int
    d_model: int
    heads: int
    layers: int
    batch: int

    @property
    def n_params(self) -> int:
        d = self.d_model
        block = (
            2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
        )
        return self.vocab * d + self.seq * d + self.layers * block + 2 * d + d * self.vocab

    @property
    def n_leaves(self) -> int:
        return 2 + 12 * self.layers + 2 + 1

    def summary(self) -> str:
        return (
            f"GPT-like, {self.layers} blocks, d_model {self.d_model}, {self.heads} heads, "
            f"vocab {self.vocab}; {self.n_params / 1e6:.1f}M params in {self.n_leaves} leaves; "
            f"batch {self.batch} x {self.seq} tokens"
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Sizes by name (``--train-model``): "small" is the CPU suite's (a step of a few hundred
# milliseconds on two cores), "tiny" the smoke run's, "gpt2" GPT-2 small's shapes for a GPU.
TRAIN_MODELS = {
    "tiny": GPTConfig(vocab=256, seq=32, d_model=64, heads=2, layers=2, batch=2),
    "small": GPTConfig(vocab=2048, seq=128, d_model=256, heads=4, layers=4, batch=2),
    "gpt2": GPTConfig(vocab=50304, seq=1024, d_model=768, heads=12, layers=12, batch=8),
}

INIT_STD = 0.02
N_BATCHES = 8
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
MAX_NORM = 1.0


# --------------------------------------------------------------------------------------
# Flax NNX
# --------------------------------------------------------------------------------------


def flax_model(cfg: GPTConfig, seed: int = 0) -> Any:
    """The Flax NNX model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    init = nnx.initializers.normal(INIT_STD)

    def linear(n_in: int, n_out: int, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
        return nnx.Linear(n_in, n_out, use_bias=bias, kernel_init=init, rngs=rngs)

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            d = cfg.d_model
            self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.qkv = linear(d, 3 * d, rngs)
            self.out = linear(d, d, rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.fc1 = linear(d, 4 * d, rngs)
            self.fc2 = linear(4 * d, d, rngs)

        def __call__(self, x: jax.Array) -> jax.Array:
            b, t, d = x.shape
            heads = (b, t, cfg.heads, d // cfg.heads)
            q, k, v = (y.reshape(heads) for y in jnp.split(self.qkv(self.ln1(x)), 3, axis=-1))
            attended = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
            x = x + self.out(attended)
            return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=True))

    class GPT(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=init, rngs=rngs)
            self.pos_embed = nnx.Embed(cfg.seq, cfg.d_model, embedding_init=init, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(cfg.layers)])
            self.final_ln = nnx.LayerNorm(cfg.d_model, epsilon=1e-5, rngs=rngs)
            self.head = linear(cfg.d_model, cfg.vocab, rngs, bias=False)

        def __call__(self, tokens: jax.Array) -> jax.Array:
            x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))
            for block in self.blocks:
                x = block(x)
            return self.head(self.final_ln(x))

    return GPT(nnx.Rngs(seed))


def flax_batches(cfg: GPTConfig, seed: int = 0) -> list[tuple[Any, Any]]:
    """``N_BATCHES`` batches of random input tokens and their next-token targets."""
    import jax

    key = jax.random.key(seed)
    out = []
    for i in range(N_BATCHES):
        shape = (cfg.batch, cfg.seq + 1)
        tokens = jax.random.randint(jax.random.fold_in(key, i), shape, 0, cfg.vocab)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return jax.block_until_ready(out)


def flax_train_step(graphdef: Any, tx: Any, batches: list[tuple[Any, Any]]):
    """(step, donate_argnums, feed) of one whole training step on (params, opt_state, batch).

    ``step`` rebuilds the model from ``graphdef`` and the parameters, takes the gradient of
    the loss, runs ``tx`` (AdamW, or a clip chained with it) and applies the update. The
    parameters and the optimizer state are donated and fed back with the next of
    ``batches`` (start with ``batches[0]``).
    """
    import itertools

    import jax
    import optax
    from flax import nnx

    def loss_fn(params: Any, inputs: Any, targets: Any) -> Any:
        model = nnx.merge(graphdef, params)
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()

    def step(params: Any, opt_state: Any, batch: tuple[Any, Any]) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    upcoming = itertools.cycle(batches[1:] + batches[:1])

    def feed(args: tuple[Any, ...], out: Any) -> tuple[Any, ...]:
        return out[0], out[1], next(upcoming)

    return step, (0, 1), feed


def last_pre_clip_norm(opt_state: Any) -> float | None:
    """The gradient norm optaxclip's clip saw on the last step, from its ClipStats."""
    import jax

    import optaxclip

    found = [
        x
        for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optaxclip.ClipStats))
        if isinstance(x, optaxclip.ClipStats)
    ]
    return float(found[0].pre_clip_norm) if found else None


# --------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------


def torch_model(cfg: GPTConfig, seed: int = 0) -> Any:
    """The same architecture in PyTorch (GELU with the tanh approximation, as in Flax)."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = cfg.d_model
            self.ln1 = nn.LayerNorm(d, eps=1e-5)
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d, eps=1e-5)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = (
                y.view(b, t, cfg.heads, d // cfg.heads).transpose(1, 2)
                for y in self.qkv(self.ln1(x)).split(d, dim=-1)
            )
            attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
            self.pos_embed = nn.Embedding(cfg.seq, cfg.d_model)
            self.blocks = nn.ModuleList([Block() for _ in range(cfg.layers)])
            self.final_ln = nn.LayerNorm(cfg.d_model, eps=1e-5)
            self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

        def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.embed(tokens) + self.pos_embed(positions)
            for block in self.blocks:
                x = block(x)
            logits = self.head(self.final_ln(x))
            flat = logits.reshape(-1, cfg.vocab)
            return F.cross_entropy(flat, targets.reshape(-1), reduction="sum")

    torch.manual_seed(seed)
    model = GPT()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, INIT_STD)
            elif not name.endswith("weight"):
                p.zero_()
    return model


def torch_batches(cfg: GPTConfig, device: str, seed: int = 0) -> list[tuple[Any, Any]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N_BATCHES):
        tokens = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq + 1), generator=gen)
        out.append((tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)))
    return out


def torch_train_step(cfg: GPTConfig, clip: bool, device: str = "cpu", seed: int = 0):
    """(step, last_norm) of one whole PyTorch training step.

    ``step`` runs forward, backward, ``clip_grad_norm_`` (with ``clip``) and AdamW(fused) on
    the next batch; ``last_norm`` returns the gradient norm the clip saw on the last step
    (None without the clip).
    """
    import itertools

    import torch

    model = torch_model(cfg, seed).to(device)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)
    batches = itertools.cycle(torch_batches(cfg, device, seed))
    seen: list[Any] = [None]

    def step() -> None:
        inputs, targets = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = model(inputs, targets)
        loss.backward()
        if clip:
            seen[0] = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()

    def last_norm() -> float | None:
        return None if seen[0] is None else float(seen[0])

    return step, last_norm


def cost_fraction(with_clip: list[float], without: list[float]) -> dict[str, float]:
    """The clip's share of the step, (t_with - t_without) / t_with, from rounds in alternation.

    One fraction per round (both steps ran in that round, so a slow drift of the machine
    cancels). Returns their median; ``low`` and ``high``, the order statistics that bound a
    95% confidence interval of that median whatever the distribution; the quartiles; and the
    same fraction of the two medians.
    """
    import statistics

    per_round = sorted((a - b) / a for a, b in zip(with_clip, without, strict=True))
    n = len(per_round)
    k = max(0, math.floor((n - 1.96 * math.sqrt(n)) / 2))
    q = statistics.quantiles(per_round, n=4) if n > 1 else per_round * 3
    med_with, med_without = statistics.median(with_clip), statistics.median(without)
    return {
        "median": statistics.median(per_round),
        "low": per_round[k],
        "high": per_round[n - 1 - k],
        "q25": q[0],
        "q75": q[-1],
        "of_medians": (med_with - med_without) / med_with,
        "rounds": n,
    }
