"""The runs behind the equivalence record: configurations, inputs, and how a run is stored.

``record_run.py`` (a script) writes ``recorded_run.npz`` from these runs; ``test_equivalence.py``
reruns them with whatever ``optaxclip`` is importable and compares. Both import this module, so
the runs they build are the same by construction. Only the public API (``optaxclip.<name>``) is
used, so that the runs do not depend on where the implementation lives inside the package.

A run: one transform (or norm function), jitted once, fed ``N_STEPS`` gradients from a fixed
seed on one CPU device, with a fixed parameter tree. The gradients go through ordinary steps
with a drifting norm, spikes of 1e3 and 1e6, a spike in one leaf, NaN and Inf entries, an
all-zero step, a tiny (1e-30) and a huge (1e30) step, and a quiet stretch.

What is stored per run, for the input (gradients and loss), every output and every state (the
state after ``init`` and after each step), as the leaves of ``jax.tree_util.tree_leaves``:

* ``<config>/<part>/leaves``: one line per leaf, ``"<path> <dtype> <shape>"``;
* ``<config>/<part>/digest``: per step, a SHA-256 over all leaves in order, each leaf hashed as
  its dtype name, its shape and its bytes;
* ``<config>/<part>/small``: per step, the bytes of every leaf of at most ``SMALL_LIMIT``
  entries, concatenated in leaf order (exact values, in the leaf's own dtype);
* ``<config>/<part>/big_digest`` and ``<config>/<part>/big_sums``: per step, for each larger
  leaf, its own SHA-256 (same form) and the float64 sum and sum of squares of its entries.

The input part keeps only its digest and leaf lines: it is regenerated, and checking it tells a
change of the inputs apart from a change of the library. The arrays are stacked over the steps
(one zip member per array rather than one per step, which would make the file several times
larger); row ``k`` of an output is step ``k``, row 0 of a state is the state after ``init`` and
row ``k + 1`` the state after step ``k``.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip

N_STEPS = 60
SEED = 7919
# Leaves with more entries than this are stored as a digest, a sum and a sum of squares.
SMALL_LIMIT = 10_000
# The tolerance of the escape hatch in the test: four float32 ulps, relative.
ROUNDING_RTOL = 4 * float(np.finfo(np.float32).eps)

# The gradient tree: small leaves of varied ranks (the library joins these into one buffer per
# dtype before reducing them) and one leaf above 65,536 entries (which it reduces in place).
SHAPES: dict[str, Any] = {
    "big": (300, 300),
    "block": {"w": (8, 8), "b": (3,)},
    "conv": (2, 3, 4),
    "mat": (4, 5),
    "scalar": (),
}
# Typical entry size per leaf, so that the leaves' norms differ and per-leaf clippers clip some
# leaves and not others.
LEAF_SCALES: dict[str, Any] = {
    "big": 0.005,
    "block": {"w": 0.05, "b": 0.1},
    "conv": 0.05,
    "mat": 0.1,
    "scalar": 0.3,
}


def _step_kinds() -> tuple[str, ...]:
    """What each step's gradient is; the schedule every run follows."""
    kinds = ["normal"] * N_STEPS
    special = {
        12: "spike1e3",
        16: "nan",
        19: "inf",
        22: "spike1e6",
        24: "zero",
        25: "tiny",
        27: "huge",
        29: "leaf_spike",
        33: "neg_inf",
        56: "nan_big",
    }
    for step, kind in special.items():
        kinds[step] = kind
    for step in range(40, 46):
        kinds[step] = "quiet"
    return tuple(kinds)


STEP_KINDS = _step_kinds()


def _tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    return jax.tree.map(fn, *trees, is_leaf=lambda x: isinstance(x, tuple))


def _numpy_inputs(seed: int) -> tuple[list[Any], Any, np.ndarray]:
    """Float64 NumPy gradients per step, parameters and losses (before any dtype cast)."""
    rng = np.random.default_rng(seed)
    params = _tree_map(lambda shape: rng.standard_normal(shape) * 0.5, SHAPES)
    # Zero weights in some AGC units, so that its eps floor on the weight norm is exercised.
    params["big"][:, :7] = 0.0
    params["scalar"] = np.zeros(())
    grads_seq = []
    for step, kind in enumerate(STEP_KINDS):
        drift = math.exp(0.02 * step) * (1.0 + 0.3 * math.sin(step / 3.0))
        grads = _tree_map(
            lambda shape, scale, d=drift: rng.standard_normal(shape) * scale * d,
            SHAPES,
            LEAF_SCALES,
        )
        factor = {
            "spike1e3": 1e3,
            "spike1e6": 1e6,
            "zero": 0.0,
            "tiny": 1e-30,
            "huge": 1e30,
            "quiet": 1e-2,
        }.get(kind, 1.0)
        grads = jax.tree.map(lambda x, f=factor: x * f, grads)
        if kind == "nan":
            grads["block"]["w"][2, 3] = np.nan
        elif kind == "inf":
            grads["big"][100, 200] = np.inf
        elif kind == "neg_inf":
            grads["mat"][1, 1] = -np.inf
        elif kind == "nan_big":
            grads["big"][5, 5] = np.nan
        elif kind == "leaf_spike":
            grads["conv"] = grads["conv"] * 1e3
        grads_seq.append(grads)
    losses = 2.0 * np.exp(-0.01 * np.arange(N_STEPS)) + 0.01 * rng.standard_normal(N_STEPS)
    # A loss spike on a step whose gradient is ordinary, and a NaN loss, for skip_spikes(loss=).
    losses[36] *= 10.0
    losses[52] = np.nan
    return grads_seq, params, losses


def _cast(tree: Any, tree_kind: str) -> Any:
    """The NumPy tree as JAX arrays of the run's dtypes, on the CPU device."""
    cpu = jax.devices("cpu")[0]

    def dtype_of(path: Any) -> Any:
        # The bfloat16 tree keeps the scalar in float32, so that the joined small leaves come
        # in two dtypes.
        if tree_kind == "bf16" and jax.tree_util.keystr(path) != "['scalar']":
            return jnp.bfloat16
        return jnp.float32

    # Cast by NumPy (ml_dtypes for bfloat16), on the host, before the arrays reach JAX.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(np.asarray(x, dtype_of(path)), cpu), tree
    )


_INPUTS: dict[str, tuple[list[Any], Any, Any]] = {}


def inputs(tree_kind: str) -> tuple[list[Any], Any, Any]:
    """``(gradients per step, params, losses)`` for ``"f32"`` or ``"bf16"`` trees."""
    if tree_kind not in _INPUTS:
        grads_seq, params, losses = _numpy_inputs(SEED)
        _INPUTS[tree_kind] = (
            [_cast(g, tree_kind) for g in grads_seq],
            _cast(params, tree_kind),
            np.asarray(losses, np.float32),
        )
    return _INPUTS[tree_kind]


# ------------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Config:
    """One recorded run.

    ``make`` builds the transform (``kind == "tx"``) or the function of the gradient tree
    (``kind == "fn"``, no state). ``loss`` passes the step's loss as ``loss=``.
    """

    make: Callable[[], Any]
    tree: str = "f32"
    kind: str = "tx"
    loss: bool = False


def _norms() -> Callable[[Any], Any]:
    def fn(grads: Any) -> Any:
        ords = {"l2": 2, "l1": 1, "linf": math.inf, "l3": 3}
        return {
            "global": {k: optaxclip.global_norm(grads, ord=p) for k, p in ords.items()},
            "leaf": {k: optaxclip.leaf_norms(grads, ord=p) for k, p in ords.items()},
        }

    return fn


def _adam() -> optax.GradientTransformation:
    return optax.adam(1e-2)


CONFIGS: dict[str, Config] = {
    "global_l2": Config(lambda: optaxclip.clip_by_global_norm(1.0)),
    "global_l1": Config(lambda: optaxclip.clip_by_global_norm(300.0, ord=1)),
    "global_linf": Config(lambda: optaxclip.clip_by_global_norm(0.5, ord=math.inf)),
    "global_l3": Config(lambda: optaxclip.clip_by_global_norm(0.8, ord=3)),
    "global_l2_zero": Config(lambda: optaxclip.clip_by_global_norm(1.0, nonfinite="zero")),
    "global_schedule": Config(
        lambda: optaxclip.clip_by_global_norm(optax.linear_schedule(5.0, 0.5, 40))
    ),
    # The chains with Adam zero a non-finite gradient: passed on, it would leave NaN in Adam's
    # moments, and every later step of the run would record NaN.
    "global_adam": Config(
        lambda: optax.chain(optaxclip.clip_by_global_norm(1.0, nonfinite="zero"), _adam())
    ),
    "leaf_norm_dict": Config(
        lambda: optaxclip.clip_by_leaf_norm(
            {"big": 2.0, "block": {"w": 0.5, "b": 0.1}, "conv": 0.3, "mat": 0.5, "scalar": 0.2}
        )
    ),
    "block_rms": Config(lambda: optaxclip.clip_by_block_rms(0.05)),
    "value_sym": Config(lambda: optaxclip.clip_by_value(0.05)),
    "value_asym": Config(lambda: optaxclip.clip_by_value(0.05, min_delta=-0.01)),
    "value_per_leaf": Config(
        lambda: optaxclip.clip_by_value(
            {"big": 0.01, "block": 0.05, "conv": 0.08, "mat": 0.1, "scalar": 0.2}
        )
    ),
    "agc_flax": Config(lambda: optaxclip.adaptive_grad_clip(0.01, unit_axes="flax")),
    "agc_equinox_exclude": Config(
        lambda: optaxclip.adaptive_grad_clip(
            0.02,
            unit_axes="equinox",
            exclude={"big": False, "block": False, "conv": False, "mat": True, "scalar": False},
        )
    ),
    "agc_adam": Config(
        lambda: optax.chain(optaxclip.adaptive_grad_clip(0.01, nonfinite="zero"), _adam())
    ),
    "autoclip": Config(lambda: optaxclip.autoclip(10.0, history_size=16)),
    "zclip_adaptive": Config(lambda: optaxclip.zclip(warmup_steps=10)),
    "zclip_mean": Config(lambda: optaxclip.zclip(warmup_steps=10, clip_option="mean")),
    "zclip_percentile_cap": Config(
        lambda: optaxclip.zclip(warmup_steps=10, mode="percentile", max_grad_norm=1.0)
    ),
    "adagc": Config(lambda: optaxclip.adagc(warmup_steps=10)),
    "quantile_clip": Config(lambda: optaxclip.quantile_clip(0.5, 0.2, 1.0)),
    "skip_nonfinite_adam": Config(
        lambda: optaxclip.skip_nonfinite(optax.chain(optaxclip.clip_by_global_norm(1.0), _adam()))
    ),
    "skip_spikes_adam": Config(lambda: optaxclip.skip_spikes(_adam(), window=8, min_history=4)),
    "skip_spikes_adam_loss": Config(
        lambda: optaxclip.skip_spikes(_adam(), window=8, min_history=4), loss=True
    ),
    "norms": Config(_norms, kind="fn"),
    "global_l2_bf16": Config(lambda: optaxclip.clip_by_global_norm(1.0), tree="bf16"),
    "value_sym_bf16": Config(lambda: optaxclip.clip_by_value(0.05), tree="bf16"),
    "agc_flax_bf16": Config(lambda: optaxclip.adaptive_grad_clip(0.01), tree="bf16"),
    "norms_bf16": Config(_norms, tree="bf16", kind="fn"),
}

PARTS = ("in", "out", "state")


# ------------------------------------------------------------------------------------ storage


def _cpu_description() -> list[str]:
    """The CPU model and its vector instruction sets, which XLA:CPU compiles for."""
    model, features = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    features = sorted(
                        flag for flag in value.split() if flag.startswith(VECTOR_FEATURES)
                    )
                    break
    except OSError:
        pass
    return [f"cpu {model}", f"vector features {' '.join(features)}"]


# Instruction-set flags (as /proc/cpuinfo names them) that change the code XLA:CPU generates.
VECTOR_FEATURES = ("sse", "ssse", "avx", "fma", "f16c", "amx", "asimd", "sve", "neon")


def _cpus_available() -> int | None:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def environment() -> list[str]:
    """What, besides optaxclip, decides the bits of a run.

    The library versions, and the CPUs: XLA:CPU splits large reductions across a thread pool
    with one thread per CPU the process may run on, and the partial sums are added in an order
    that depends on the number of threads; the vector width it compiles for changes the order
    too. A record reproduces bit for bit only where all of these are the same.
    """
    import jaxlib

    return [
        f"jax {jax.__version__}",
        f"jaxlib {jaxlib.__version__}",
        f"numpy {np.__version__}",
        f"optax {optax.__version__}",
        f"cpus available {_cpus_available()}",
        *_cpu_description(),
    ]


def leaf_line(path: Any, x: np.ndarray) -> str:
    return f"{jax.tree_util.keystr(path)} {x.dtype.name} {tuple(x.shape)}"


def _hash_leaf(h: Any, x: np.ndarray) -> None:
    h.update(f"{x.dtype.name}{tuple(x.shape)}".encode())
    h.update(np.ascontiguousarray(x).tobytes())


def leaf_digest(x: np.ndarray) -> bytes:
    h = hashlib.sha256()
    _hash_leaf(h, x)
    return h.digest()


@dataclass
class Part:
    """One part (input, output or state) of a run: leaf lines and per-step rows."""

    leaves: list[str]
    digest: list[bytes]
    small: list[bytes]
    big_digest: list[list[bytes]]
    big_sums: list[list[tuple[float, float]]]

    def add(self, tree: Any) -> None:
        paths_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
        arrays = [(path, np.asarray(x)) for path, x in paths_leaves]
        lines = [leaf_line(path, x) for path, x in arrays]
        if not self.digest:
            self.leaves = lines
        elif lines != self.leaves:
            raise AssertionError(f"the leaves changed during the run: {self.leaves} -> {lines}")
        h = hashlib.sha256()
        small, big_digest, big_sums = [], [], []
        for _, x in arrays:
            _hash_leaf(h, x)
            if x.size <= SMALL_LIMIT:
                small.append(np.ascontiguousarray(x).tobytes())
            else:
                big_digest.append(leaf_digest(x))
                values = x.astype(np.float64)
                big_sums.append((float(np.sum(values)), float(np.sum(values * values))))
        self.digest.append(h.digest())
        self.small.append(b"".join(small))
        self.big_digest.append(big_digest)
        self.big_sums.append(big_sums)

    def arrays(self, prefix: str, values: bool = True) -> dict[str, np.ndarray]:
        steps = len(self.digest)
        out = {
            f"{prefix}/leaves": np.array(self.leaves, dtype=str),
            f"{prefix}/digest": np.frombuffer(b"".join(self.digest), np.uint8).reshape(steps, 32),
        }
        if values:
            n_big = len(self.big_digest[0]) if steps else 0
            width = len(self.small[0]) if steps else 0
            out[f"{prefix}/small"] = np.frombuffer(b"".join(self.small), np.uint8).reshape(
                steps, width
            )
            out[f"{prefix}/big_digest"] = np.frombuffer(
                b"".join(b"".join(row) for row in self.big_digest), np.uint8
            ).reshape(steps, n_big, 32)
            out[f"{prefix}/big_sums"] = np.array(self.big_sums, np.float64).reshape(steps, n_big, 2)
        return out


def _new_part() -> Part:
    return Part([], [], [], [], [])


_INPUT_PARTS: dict[tuple[str, bool], Part] = {}


def _input_part(tree_kind: str, with_loss: bool) -> Part:
    """The stored form of a run's inputs, shared by the runs that have the same inputs."""
    key = (tree_kind, with_loss)
    if key not in _INPUT_PARTS:
        grads_seq, _, losses = inputs(tree_kind)
        part = _new_part()
        for step, grads in enumerate(grads_seq):
            part.add((grads, losses[step]) if with_loss else grads)
        _INPUT_PARTS[key] = part
    return _INPUT_PARTS[key]


def run(name: str) -> dict[str, np.ndarray]:
    """Runs configuration ``name``; returns its arrays, keyed as in the record."""
    config = CONFIGS[name]
    grads_seq, params, losses = inputs(config.tree)
    parts = {"in": _input_part(config.tree, config.loss), "out": _new_part()}
    parts["state"] = _new_part()
    with jax.default_device(jax.devices("cpu")[0]):
        if config.kind == "fn":
            fn = jax.jit(config.make())
            # A norm function has no state; its empty state part keeps the rows aligned.
            parts["state"].add(())
            for grads in grads_seq:
                parts["out"].add(fn(grads))
                parts["state"].add(())
        else:
            tx = config.make()
            # Committed to the device as the updates' states are, so that the update compiles
            # once rather than again at the second step.
            state = jax.device_put(tx.init(params), jax.devices("cpu")[0])
            parts["state"].add(state)
            if config.loss:
                update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p, loss=loss))
            else:
                update = jax.jit(lambda g, s, p, loss: tx.update(g, s, p))
            for step, grads in enumerate(grads_seq):
                out, state = update(grads, state, params, losses[step])
                parts["out"].add(out)
                parts["state"].add(state)
    arrays: dict[str, np.ndarray] = {}
    for part_name, part in parts.items():
        arrays.update(part.arrays(f"{name}/{part_name}", values=part_name != "in"))
    return arrays


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Leaf:
    """One leaf of a part, as its line in the record describes it."""

    path: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def small(self) -> bool:
        return self.size <= SMALL_LIMIT


def parse_leaves(lines: Any) -> list[Leaf]:
    """The leaves of a part from its ``leaves`` lines (``"<path> <dtype> <shape>"``)."""
    leaves = []
    for line in lines:
        match = re.fullmatch(r"(.*) (\S+) \(([0-9, ]*)\)", str(line))
        if match is None:
            raise ValueError(f"not a leaf line: {line!r}")
        path, dtype, dims = match.groups()
        shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
        leaves.append(Leaf(path, np.dtype(jnp.dtype(dtype)), shape))
    return leaves


def small_values(leaves: list[Leaf], row: np.ndarray) -> dict[int, np.ndarray]:
    """The small leaves of one stored row, by leaf index, as arrays of their own dtype."""
    values, offset = {}, 0
    data = row.tobytes()
    for i, leaf in enumerate(leaves):
        if leaf.small:
            n = leaf.size * leaf.dtype.itemsize
            values[i] = np.frombuffer(data[offset : offset + n], leaf.dtype).reshape(leaf.shape)
            offset += n
    if offset != len(data):
        raise ValueError(f"a row of {len(data)} bytes holds {offset} bytes of small leaves")
    return values
