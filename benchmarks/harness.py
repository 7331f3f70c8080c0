"""Shared pieces of the benchmark suite: trees, the timing protocol and the byte model.

The protocol (described in ``docs/performance.md``): inputs already on the device, an AOT
``lower().compile()`` (timed, lower and compile separately), one untimed first call, warm-up
calls, then ``reps`` timed calls that each end in ``block_until_ready``. In the donated mode
the buffers the step rewrites (params and optimizer state, or the gradients for a clipper
alone) are donated and the outputs are fed back in, so XLA updates them in place.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------

# Gradients are drawn N(0, sigma^2) with sigma = GRAD_NORM / sqrt(P), so the global norm is
# about GRAD_NORM whatever the size, and a max_norm of 1 clips on every step.
GRAD_NORM = 4.0
PARAM_STD = 0.02


@dataclass(frozen=True)
class TreeSpec:
    """A benchmark pytree: a name, a dtype and the (path, shape) of every leaf."""

    name: str
    dtype: str
    shapes: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]
    description: str

    @property
    def n_leaves(self) -> int:
        return len(self.shapes)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    @property
    def grad_std(self) -> float:
        return GRAD_NORM / math.sqrt(max(self.n_params, 1))

    def summary(self) -> str:
        mib = self.n_params * self.itemsize / 2**20
        return (
            f"{self.name}: {self.n_leaves} leaves, {self.n_params / 1e6:.2f}M params, "
            f"{self.dtype}, {mib:.0f} MiB per tree"
        )


def _round_dim(x: float, multiple: int = 8) -> int:
    return max(multiple, round(x / multiple) * multiple)


def transformer_shapes(
    scale: float = 1.0, layers: int = 16
) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """A GPT-like tree: 12 leaves per block plus embeddings and final norm.

    At scale 1 and 16 layers: d_model 512, MLP 2048, 196 leaves, about 51M parameters (the
    "transformer" tree of docs/performance.md). ``scale`` multiplies the parameter count (the
    widths grow with its square root), the number of leaves stays the same. Kernels are
    (in, out), as in Flax, so the last axis is the output unit.
    """
    d = _round_dim(512 * math.sqrt(scale))
    vocab = _round_dim(1024 * math.sqrt(scale))
    seq = _round_dim(256 * math.sqrt(scale))
    shapes: list[tuple[tuple[str, ...], tuple[int, ...]]] = [
        (("embed", "embedding"), (vocab, d)),
        (("pos_embed", "embedding"), (seq, d)),
    ]
    for i in range(layers):
        block = f"block_{i:02d}"
        shapes += [
            ((block, "ln1", "scale"), (d,)),
            ((block, "ln1", "bias"), (d,)),
            ((block, "attn", "qkv", "kernel"), (d, 3 * d)),
            ((block, "attn", "qkv", "bias"), (3 * d,)),
            ((block, "attn", "out", "kernel"), (d, d)),
            ((block, "attn", "out", "bias"), (d,)),
            ((block, "ln2", "scale"), (d,)),
            ((block, "ln2", "bias"), (d,)),
            ((block, "mlp", "fc1", "kernel"), (d, 4 * d)),
            ((block, "mlp", "fc1", "bias"), (4 * d,)),
            ((block, "mlp", "fc2", "kernel"), (4 * d, d)),
            ((block, "mlp", "fc2", "bias"), (d,)),
        ]
    shapes += [(("final_ln", "scale"), (d,)), (("final_ln", "bias"), (d,))]
    return shapes


def many_small_shapes(
    scale: float = 1.0, n_leaves: int = 2000
) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """``n_leaves`` small leaves of four mixed shapes (kernels and biases).

    At scale 1 and 2000 leaves: about 11.7M parameters (5.9K per leaf on average), the
    "many_small" tree of docs/performance.md.
    """
    d = _round_dim(88 * math.sqrt(scale), 4)
    cycle = [("kernel_a", (d, d)), ("bias_a", (d,)), ("kernel_b", (d, 2 * d)), ("bias_b", (2 * d,))]
    shapes = []
    for i in range(n_leaves):
        leaf, shape = cycle[i % len(cycle)]
        shapes.append(((f"module_{i // len(cycle):04d}", leaf), shape))
    return shapes


def single_shapes(scale: float = 1.0) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """One (8192, 8192) leaf (64M parameters, 256 MiB in float32) at scale 1."""
    d = _round_dim(8192 * math.sqrt(scale))
    return [(("kernel",), (d, d))]


def uniform_shapes(n_leaves: int, shape: tuple[int, ...] = (32, 32)):
    """``n_leaves`` leaves of the same shape (the compile-time trees: 1024-element leaves)."""
    return [((f"layer_{i:05d}", "kernel"), shape) for i in range(n_leaves)]


def tree_spec(name: str, scale: float, *, layers: int = 16, small_leaves: int = 2000) -> TreeSpec:
    """The named benchmark tree: transformer, transformer_bf16, many_small or single."""
    if name == "transformer":
        shapes, dtype = transformer_shapes(scale, layers), "float32"
        desc = f"GPT-like, {layers} blocks"
    elif name == "transformer_bf16":
        shapes, dtype = transformer_shapes(scale, layers), "bfloat16"
        desc = f"GPT-like, {layers} blocks, bfloat16"
    elif name == "many_small":
        shapes, dtype = many_small_shapes(scale, small_leaves), "float32"
        desc = "mixed small kernels and biases"
    elif name == "single":
        shapes, dtype = single_shapes(scale), "float32"
        desc = "one square matrix"
    else:
        raise ValueError(f"unknown tree {name!r}")
    return TreeSpec(name, dtype, tuple(shapes), desc)


def _nest(paths: Sequence[tuple[str, ...]], leaves: Sequence[Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


@partial(jax.jit, static_argnums=(1, 2))
def _normal(key: jax.Array, shape: tuple[int, ...], dtype: str) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def make_tree(spec: TreeSpec, seed: int, std: float) -> dict[str, Any]:
    """A nested dict of N(0, std^2) device arrays with ``spec``'s shapes and dtype.

    Generated on the device (one cached jitted call per distinct shape), so building a
    1B-parameter tree on a GPU does not go through host memory.
    """
    key = jax.random.key(seed)
    leaves = []
    for i, (_, shape) in enumerate(spec.shapes):
        x = _normal(jax.random.fold_in(key, i), shape, spec.dtype)
        leaves.append(x * jnp.asarray(std, spec.dtype))
    tree = _nest([p for p, _ in spec.shapes], leaves)
    jax.block_until_ready(tree)
    return tree


def abstract_tree(spec: TreeSpec) -> dict[str, Any]:
    """The tree of ``jax.ShapeDtypeStruct`` (for lowering without data)."""
    return _nest(
        [p for p, _ in spec.shapes],
        [jax.ShapeDtypeStruct(s, jnp.dtype(spec.dtype)) for _, s in spec.shapes],
    )


def fresh_copy(tree: Any) -> Any:
    """A copy with one distinct buffer per leaf (so that every leaf can be donated)."""
    out = jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
    jax.block_until_ready(out)
    return out


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@dataclass
class Timing:
    """The result of timing one jitted step."""

    median_ms: float
    min_ms: float
    max_ms: float
    n: int
    lower_s: float
    compile_s: float
    first_call_ms: float
    temp_mib: float | None
    faults_per_call: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def compile_step(
    fn: Callable[..., Any], args: tuple[Any, ...], donate_argnums: tuple[int, ...]
) -> tuple[Any, float, float, float | None]:
    """AOT lower + compile: (compiled, lower seconds, compile seconds, XLA temp MiB)."""
    jitted = jax.jit(fn, donate_argnums=donate_argnums)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    temp_mib = None
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            temp_mib = analysis.temp_size_in_bytes / 2**20
    except Exception:  # not every backend reports it
        temp_mib = None
    return compiled, t1 - t0, t2 - t1, temp_mib


def _summary(
    times: list[float], faults: float, lower_s: float, compile_s: float, first: float, temp
) -> Timing:
    return Timing(
        median_ms=statistics.median(times),
        min_ms=min(times),
        max_ms=max(times),
        n=len(times),
        lower_s=lower_s,
        compile_s=compile_s,
        first_call_ms=first,
        temp_mib=temp,
        faults_per_call=faults / max(len(times), 1),
    )


def _call(compiled: Any, args: tuple[Any, ...]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = compiled(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - start) * 1e3


def time_step(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    donate_argnums: tuple[int, ...],
    feed: Callable[[tuple[Any, ...], Any], tuple[Any, ...]],
    reps: int,
    warmup: int,
) -> tuple[Timing, tuple[Any, ...]]:
    """Times ``fn(*args)`` under jit with donation, feeding outputs back with ``feed``.

    Returns the timing and the last arguments (the caller drops them to free memory).
    """
    compiled, lower_s, compile_s, temp_mib = compile_step(fn, args, donate_argnums)
    out, first_call_ms = _call(compiled, args)
    args = feed(args, out)
    for _ in range(warmup):
        out, _ = _call(compiled, args)
        args = feed(args, out)
    times = []
    faults = _minor_faults()
    for _ in range(reps):
        out, ms = _call(compiled, args)
        times.append(ms)
        args = feed(args, out)
    faults = _minor_faults() - faults
    del out
    return _summary(times, faults, lower_s, compile_s, first_call_ms, temp_mib), args


@dataclass
class Member:
    """One step of an interleaved comparison: its compiled function, arguments and feed."""

    compiled: Any
    args: tuple[Any, ...]
    feed: Callable[[tuple[Any, ...], Any], tuple[Any, ...]]
    lower_s: float
    compile_s: float
    temp_mib: float | None


def alternate(
    calls: Sequence[Callable[[], float]], *, reps: int, warmup: int
) -> tuple[list[float], list[list[float]]]:
    """Runs several timed calls in alternation: round r makes every call once.

    Each call runs one step and returns its own time in ms. Returns the time of each call's
    first (untimed) run and, per call, its ``reps`` timed runs in round order.

    Each round takes its own order, a shuffle drawn from a fixed seed. Slow drifts of a
    shared machine (other jobs, frequency changes) then hit every call alike, so the ratios
    of the medians are much steadier than those of separate runs. A shuffle rather than a
    rotation: a rotation keeps the cyclic order, so each call always runs right after the
    same other one, and pays for what that one leaves behind (a step whose large temporaries
    the allocator has just returned to the system makes the next step fault its pages back
    in, which a fixed order would charge to the same call every round).
    """
    rng = random.Random(0)
    first = [call() for call in calls]
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        order = list(range(len(calls)))
        rng.shuffle(order)
        for i in order:
            times[i].append(calls[i]())
    return first, times


def time_interleaved(members: list[Member], *, reps: int, warmup: int) -> list[Timing]:
    """Times several jitted steps in alternation (see :func:`alternate`)."""
    _, timings = interleaved_samples(members, reps=reps, warmup=warmup)
    return timings


def interleaved_samples(
    members: list[Member], *, reps: int, warmup: int
) -> tuple[list[list[float]], list[Timing]]:
    """Like :func:`time_interleaved`, and also the timed calls of each member, round by round."""

    def caller(m: Member) -> Callable[[], float]:
        def call() -> float:
            out, ms = _call(m.compiled, m.args)
            m.args = m.feed(m.args, out)
            return ms

        return call

    first, times = alternate([caller(m) for m in members], reps=reps, warmup=warmup)
    timings = [
        _summary(t, 0.0, m.lower_s, m.compile_s, f, m.temp_mib)
        for t, m, f in zip(times, members, first, strict=True)
    ]
    return times, timings


def python_caller(step: Callable[[], None], sync: Callable[[], None] | None = None):
    """A call for :func:`alternate` that runs a Python step (the PyTorch cases) and times it."""
    sync = sync or (lambda: None)

    def call() -> float:
        start = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - start) * 1e3

    return call


def python_summary(times: list[float], first_ms: float) -> Timing:
    """The statistics of a Python step's timed calls (no compile, no XLA figures)."""
    return _summary(times, 0.0, 0.0, 0.0, first_ms, None)


# --------------------------------------------------------------------------------------
# Byte model (docs/performance.md): the minimum number of full passes over a tree
# --------------------------------------------------------------------------------------

# Passes for the optimizer alone: read g, m, v, p; write m, v, p.
ADAM_PASSES = 7


def gb_per_s(passes: float, n_params: int, itemsize: int, median_ms: float) -> float:
    """Achieved bandwidth under the byte model: passes * bytes per tree / time."""
    return passes * n_params * itemsize / (median_ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# Memory bandwidth references
# --------------------------------------------------------------------------------------


def bandwidth_cases(n_elements: int, dtype: str = "float32") -> list[dict[str, Any]]:
    """The reference kernels: read-only sum, in-place scale and triad, copy to a new buffer."""
    x_spec = TreeSpec("bw", dtype, ((("x",), (n_elements,)),), "flat buffer")

    def build_one() -> jax.Array:
        return make_tree(x_spec, 0, 1.0)["x"]

    return [
        {
            "name": "sum (read only)",
            "kind": "read",
            "passes": 1,
            "fn": lambda x: jnp.sum(x, dtype=jnp.float32),
            "make": lambda: (build_one(),),
            "donate": (),
            "feed": lambda args, out: args,
        },
        {
            "name": "x * s in place (donated)",
            "kind": "read+write",
            "passes": 2,
            "fn": lambda x: x * jnp.asarray(1.0000001, x.dtype),
            "make": lambda: (build_one(),),
            "donate": (0,),
            "feed": lambda args, out: (out,),
        },
        {
            "name": "triad x + s * y in place (donated)",
            "kind": "read+write",
            "passes": 3,
            "fn": lambda x, y: x + jnp.asarray(1e-7, x.dtype) * y,
            "make": lambda: (build_one(), build_one()),
            "donate": (0,),
            "feed": lambda args, out: (out, args[1]),
        },
        {
            "name": "copy to a new buffer",
            "kind": "read+write",
            "passes": 2,
            "fn": lambda x: jnp.copy(x),
            "make": lambda: (build_one(),),
            "donate": (),
            "feed": lambda args, out: args,
        },
    ]


def device_description() -> str:
    dev = jax.devices()[0]
    return f"{dev.platform}:{dev.device_kind} x{len(jax.devices())}"
