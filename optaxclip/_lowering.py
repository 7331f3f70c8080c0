"""Backend devices: every program shape chosen for one XLA backend, gathered in one place.

The numerics say what to compute; this module says how some of it is laid out where XLA's own
passes gave a slow program or a slow compile. Each device has a name that says which XLA
behaviour it answers, a paragraph on why, and the test that pins it. No other module uses
``lax.optimization_barrier`` or ``lax.platform_dependent``.

Each device was measured on XLA:CPU and applies only there: structural ones (joins, barriers,
stacks) by ``jax.default_backend()`` at trace time, conditionals by ``lax.platform_dependent``
at lowering. Elsewhere the plain formulation runs and XLA's fusion is trusted;
:func:`plain_lowering` forces it for tests. Devices change how values are computed, not which:
both formulations agree to float rounding (``test_plain_lowering_gives_the_same_values``).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_plain_forced = False


@contextlib.contextmanager
def plain_lowering() -> Iterator[None]:
    """Programs first traced in this context use no device (JAX reuses earlier traces)."""
    global _plain_forced
    previous, _plain_forced = _plain_forced, True
    try:
        yield
    finally:
        _plain_forced = previous


def devices_apply() -> bool:
    """Whether the structural devices apply to the program being traced (XLA:CPU)."""
    return not _plain_forced and jax.default_backend() == "cpu"


# An elementwise function a reduction applies to an array as it reads it, given the array and
# its twin index: its position among the arrays of one shape and dtype that the reduction
# reads for one group of device axes, so that a caller can keep the constants of twin arrays
# apart (see DistinctOnes).
Transform = Callable[[jax.Array, int], jax.Array]


class ReadView(enum.IntEnum):
    """Which reduction of a step reads an fp16/bf16 gradient (see ``convert_per_reader``).

    Every reduction of one step over the same low-precision leaves needs a view of its own.
    ``NORM``: the gradient's norm, the one every clip and a logged ``global_norm`` share.
    ``CLAMPED_NORM`` and ``OUTSIDE_COUNT``: clip_by_value's post-clip norm and count.
    ``FINITE_CHECK``: skip_nonfinite's check.
    """

    NORM = 0
    CLAMPED_NORM = 1
    OUTSIDE_COUNT = 2
    FINITE_CHECK = 3


def convert_per_reader(x: jax.Array, view: ReadView | int) -> jax.Array:
    """Device *a conversion shared by two reductions is written out*: one barrier per view.

    XLA merges equal expressions, equal barriers of one array included. Two reductions that
    convert the same fp16/bf16 array to float32 then share one conversion, and XLA:CPU writes
    it out in full rather than fuse it into both, since its reduction fusions take no producer
    that another fusion also reads. Reductions that read an array through different numbers of
    barriers each convert as they read. Other dtypes pass as they are. Pinned by
    ``test_bfloat16_leaves_are_never_copied_to_float32`` and
    ``test_nonfinite_guard_beside_a_logged_global_norm_makes_no_float32_copy``.
    """
    return _behind_barriers(x, int(view))


def _behind_barriers(x: jax.Array, depth: int) -> jax.Array:
    if not devices_apply() or x.dtype not in (jnp.float16, jnp.bfloat16):
        return x
    for _ in range(depth):
        x = lax.optimization_barrier(x)
    return x


def converted_apart_from_the_output(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """Device *a clip's output multiply and its norm share one conversion*: one barrier each.

    A clip multiplies ``x.astype(float32)`` by its scale. XLA merges that conversion with the
    norm's own and writes a float32 copy of the whole gradient for the two consumers. Behind a
    barrier (one per leaf, so that inside ``shard_map`` each output keeps its own leaf's
    device-variance type), each reads and converts for itself. Pinned by
    ``test_bfloat16_leaves_are_never_copied_to_float32``.
    """
    return [_behind_barriers(x, 1) for x in leaves]


def read_apart_from_the_optimizer(x: jax.Array) -> jax.Array:
    """Device *a norm's squares merged with Adam's*: a float leaf reduced in place.

    XLA merges equal expressions, and XLA:CPU writes out in full an array that a reduction's
    fusion shares with another fusion. A norm's squares ``x * x`` are the squares Adam computes
    for its second moment when the same step updates with that leaf, so a step that logs
    ``global_norm(grads)`` beside Adam writes every large leaf's squares out. Read through a
    barrier of its own, the norm squares apart. Two of our reductions read the same barrier,
    so a logged norm and a clip's norm are still computed once. Joined leaves and fp16/bf16
    leaves need none. Pinned by ``test_a_norm_logged_beside_adam_writes_no_leaf_sized_array``
    and ``test_a_global_norm_logged_beside_the_global_clip_is_computed_once``.
    """
    if not devices_apply() or x.dtype in (jnp.float16, jnp.bfloat16):
        return x
    return lax.optimization_barrier(x)


def stack_against_chain_rewrite(values: Sequence[Any]) -> jax.Array:
    """Device *a reduction of stacked scalars rewritten into a chain*: the stack as one buffer.

    XLA rewrites a reduction of stacked scalars into a chain of scalar operations and fuses
    that chain into every consumer of the result, so a flag or a sum over n leaves that
    reaches each leaf's kernel makes the program grow as n^2. Behind a barrier the stack is
    built once and reduced as a vector. Pinned by
    ``test_scale_factors_reach_the_leaves_computed_not_recomputed_in_each_kernel``.
    """
    stacked = jnp.stack([jnp.asarray(v) for v in values])
    return lax.optimization_barrier(stacked) if devices_apply() else stacked


def one_buffer(vector: jax.Array) -> jax.Array:
    """Device *a joined vector split back into its pieces*: keeps a small vector whole.

    XLA splits a reduction or a gather over a joined vector back into one piece per source,
    or copies a permutation's index table into every kernel that reads the result. A barrier
    keeps the vector one small buffer. Pinned by
    ``test_scale_factors_reach_the_leaves_computed_not_recomputed_in_each_kernel``.
    """
    return lax.optimization_barrier(vector) if devices_apply() else vector


def computed_before_fusion(fn: Callable[[Any], Any], operands: Any, anchor: jax.Array) -> Any:
    """Device *producers recomputed inside each consumer*: ``fn(operands)``, computed once.

    XLA fuses elementwise producers into their consumers and recomputes them per element of
    each consumer: a per-leaf scale made of a division and a dozen selects was recomputed for
    every element of every leaf, and copied into each of Adam's kernels in a chain. On XLA:CPU
    barriers are removed before fusion and a conditional that returns its operands is folded,
    but the results of a conditional whose two branches both compute ``fn`` are not fused.
    Its predicate comes from ``anchor``, any floating-point runtime scalar, so that XLA cannot
    fold it. Other platforms inline ``fn``: a GPU conditional may wait on the host to read its
    predicate, and recomputing a few scalar operations per element costs a GPU nothing. Pinned
    by ``test_scale_factors_reach_the_leaves_computed_not_recomputed_in_each_kernel`` and
    ``test_conditionals_that_only_serve_xla_cpu_are_not_lowered_for_gpus``.
    """
    if _plain_forced:
        return fn(operands)

    def on_cpu(operands: Any, anchor: jax.Array) -> Any:
        return lax.cond(jnp.isnan(anchor), fn, fn, operands)

    def elsewhere(operands: Any, anchor: jax.Array) -> Any:
        del anchor
        return fn(operands)

    return lax.platform_dependent(operands, anchor, cpu=on_cpu, default=elsewhere)


_POSITIONS_PER_COND = 64  # buffer assignment is superlinear in one conditional's outputs


def positions_opaque_to_fusion(positions: Sequence[int], anchor: jax.Array) -> tuple[Any, ...]:
    """Device *one kernel per constant slice*: integers XLA treats as runtime values.

    A per-leaf slice of a shared vector at a constant offset is fused into the leaf's kernel,
    so every leaf gets a kernel of its own and XLA:CPU compiles each one. Positions that come
    out of a conditional (see ``computed_before_fusion``; both branches return the same
    positions) are opaque, and every leaf of one shape runs the same kernel. Pinned by
    ``test_scale_factors_reach_the_leaves_computed_not_recomputed_in_each_kernel``.
    """
    positions = list(positions)
    out: list[Any] = []
    for start in range(0, len(positions), _POSITIONS_PER_COND):
        chunk = positions[start : start + _POSITIONS_PER_COND]

        def constants(_: None, chunk: list[int] = chunk) -> tuple[jax.Array, ...]:
            return tuple(jnp.asarray(i, jnp.int32) for i in chunk)

        out.extend(computed_before_fusion(constants, None, anchor))
    return tuple(out)


def entries_per_leaf(vectors: Sequence[jax.Array]) -> list[list[jax.Array]]:
    """``[[v[i] for i in range(n)] for v in vectors]`` at opaque positions."""
    n = int(vectors[0].shape[0])
    if n <= 1:
        return [[v[i] for i in range(n)] for v in vectors]
    index = positions_opaque_to_fusion(range(n), vectors[0][0])
    return [
        [lax.dynamic_index_in_dim(v, index[i], keepdims=False) for i in range(n)] for v in vectors
    ]


class DistinctOnes:
    """Device *a broadcast shared by two reductions is written out*: runtime ones per reader.

    XLA:CPU runs a reduction at memory speed only as one fused loop of plain arithmetic, and
    writes out in full a broadcast that another fused computation shares. XLA merges equal
    computations first, so two reductions that broadcast equal scalars (equal bounds, or a
    scale of one that happens to equal a bound of another) would share one broadcast. Each
    reduction multiplies every scalar it broadcasts by a one of its own, picked by its
    ``slot`` and the reduced array's twin index from a vector XLA cannot see as constants.
    Pinned by ``test_value_clip_writes_no_full_size_temporary_beyond_optax_clip``.
    """

    def __init__(self, slots: int, twins: int, anchor: jax.Array) -> None:
        self.slots = slots
        size = slots * max(twins, 1)
        self.ones = computed_before_fusion(lambda _: jnp.ones((size,), jnp.float32), None, anchor)

    def one(self, slot: int, twin: int) -> jax.Array:
        return self.ones[self.slots * twin + slot]


def after_reads(flag: jax.Array, nonnegatives: Sequence[jax.Array]) -> jax.Array:
    """Device *a donated input copied before it is overwritten*: ties reductions to ``flag``.

    An output written over its donated input must wait for every reduction that reads that
    input; when XLA cannot see the order it copies every leaf first. ``flag`` is returned
    unchanged (each value is >= 0, or NaN only where ``flag`` is already False) but now
    depends on the reductions. Pinned by
    ``test_value_clip_writes_no_full_size_temporary_beyond_optax_clip``.
    """
    for value in nonnegatives:
        flag = flag & (value >= 0)
    return flag


# --- Joins: many small leaves reduced as one array -----------------------------------------
# Device *compile time superlinear in the number of reduction loops*. XLA compiles one loop per
# reduction, and its fusion pass takes time that grows faster than linearly with the number of
# loops in a program. Leaves of at most _SMALL_LEAF entries are therefore reduced together:
# raveled and concatenated per dtype for one norm of all leaves, stacked as rows of one size
# for one norm per leaf, stacked as unit matrices of one shape for per-unit norms. The copy
# is limited to _CONCAT_BYTES per reduction: XLA:CPU allocates its scratch memory afresh on
# every call, and a block above glibc's mmap threshold is faulted in again on every step.
# XLA:CPU emits a concatenation element by element, so at most _MAX_JOINED leaves go into
# one; unit matrices only up to _JOIN_UNITS_UP_TO entries. Raveling a block split across
# devices makes the SPMD partitioner gather it onto every device, so a leaf is joined only
# where that provably moves no data (_joins_move_no_data). Pinned by
# ``test_value_clip_statistics_reduce_small_leaves_together_not_one_loop_each``,
# ``test_norms_match_reference_however_leaves_are_batched`` and, for sharded leaves,
# ``test_no_gradient_data_crosses_devices``.
_SMALL_LEAF = 1 << 16
_CONCAT_BYTES = 24 << 20
_MAX_JOINED = 512
_JOIN_UNITS_UP_TO = 1 << 12


def _joins_move_no_data(x: jax.Array) -> bool:
    """Whether raveling ``x`` into a concatenation keeps every device's data where it is.

    True with one device in the whole program (nothing can be split), inside a ``shard_map``
    whose every mesh axis is manual (``x`` is this device's own block), and for a value typed
    as replicated on a mesh with no automatic axis (explicit sharding says so). Under ``jit`` on
    a mesh with automatic axes a value's split is not known while tracing, so it is never
    joined there.
    """
    if jax.device_count() == 1:
        return True
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and context.are_all_axes_manual:
        return True
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or mesh.empty or mesh.auto_axes:
        return False
    manual = set(mesh.manual_axes)
    named = {n for e in spec if e is not None for n in ((e,) if isinstance(e, str) else e)}
    return named <= manual


class _Budget:
    """Bytes of small leaves one reduction may still copy."""

    def __init__(self) -> None:
        self.left = _CONCAT_BYTES if devices_apply() else 0

    def take(self, x: jax.Array, size: int, *, up_to: int | None = None) -> bool:
        nbytes = size * x.dtype.itemsize
        limit = _SMALL_LEAF if up_to is None else min(up_to, _SMALL_LEAF)
        if 0 < x.size <= limit and nbytes <= self.left and _joins_move_no_data(x):
            self.left -= nbytes
            return True
        return False


def _join(parts: list[jax.Array]) -> jax.Array:
    if len(parts) == 1:
        return parts[0]
    # lax rather than jnp: the same program, without jnp's per-call dispatch on every leaf.
    return lax.concatenate([lax.reshape(x, (x.size,)) for x in parts], 0)


def joined_buckets(
    leaves: Sequence[jax.Array], transforms: Sequence[Transform | None], view: ReadView | int
) -> list[tuple[jax.Array, Transform | None, int]]:
    """The arrays one reduction over ``leaves`` reads: (array, transform, twin index).

    Small leaves of one dtype sharing one transform object are joined, and reductions sharing
    a transform join the same arrays in the same order, so XLA computes each join once.
    """
    budget = _Budget()
    alone: list[tuple[jax.Array, Transform | None]] = []
    joined: dict[tuple[Any, int], tuple[Transform | None, list[jax.Array]]] = {}
    for x, transform in zip(leaves, transforms, strict=True):
        if x.size == 0:
            continue
        if budget.take(x, x.size):
            _, parts = joined.setdefault((x.dtype, id(transform)), (transform, []))
            parts.append(x)
            if len(parts) == _MAX_JOINED:
                alone.append((_join(parts), transform))
                parts.clear()
        else:
            alone.append((read_apart_from_the_optimizer(x), transform))
    arrays = alone + [(_join(parts), f) for f, parts in joined.values() if parts]
    twins: dict[Any, int] = {}
    out = []
    for a, f in arrays:
        a = convert_per_reader(a, view)
        key = (a.shape, a.dtype)
        out.append((a, f, twins.get(key, 0)))
        twins[key] = twins.get(key, 0) + 1
    return out


def row_blocks(
    leaves: Sequence[jax.Array], leaf_axes: Sequence[tuple[str, ...]]
) -> tuple[list[tuple[list[int], tuple[str, ...]]], int, np.ndarray]:
    """How per-leaf reductions are batched: blocks of leaf indices, and the output order.

    A block is one leaf reduced in place, or the small leaves of one device-axes group, dtype
    and size, stacked as rows. Returns the blocks (those reduced in place first), how many are
    single leaves reduced in place, and the permutation that puts the block results back in
    leaf order.
    """
    budget = _Budget()
    blocks: list[tuple[list[int], tuple[str, ...]]] = []
    rows: dict[Any, list[int]] = {}
    for i, (x, axes) in enumerate(zip(leaves, leaf_axes, strict=True)):
        if budget.take(x, int(x.size)):
            rows.setdefault((axes, x.dtype, x.size), []).append(i)
        else:
            blocks.append(([i], axes))
    n_alone = len(blocks)
    blocks += [(idx, key[0]) for key, idx in rows.items()]
    order = np.array([i for idx, _ in blocks for i in idx], dtype=np.int64)
    return blocks, n_alone, np.argsort(order)


def block_rows(
    leaves: Sequence[jax.Array], idx: list[int], stacked: bool
) -> tuple[jax.Array, int | None]:
    """One row block as an array and the axis to reduce along (None: all of it)."""
    if not stacked:
        return read_apart_from_the_optimizer(leaves[idx[0]]), None
    size = int(leaves[idx[0]].size)
    flat = [leaves[i].ravel() for i in idx]
    return (flat[0] if len(flat) == 1 else jnp.concatenate(flat)).reshape(len(idx), size), 1


def stacked_unit_groups(
    arrays: Sequence[jax.Array], weights: Sequence[jax.Array], keys: Sequence[Any]
) -> tuple[list[int], list[list[int]]]:
    """Which leaves reduce their unit norms alone, and which are stacked, per group.

    Leaves with equal ``keys`` (shape, dtype, unit axes and device layout) and at most
    ``_JOIN_UNITS_UP_TO`` entries are stacked, at most ``_MAX_JOINED`` per group. Only leaves
    of one shape are stacked: XLA:CPU reads a concatenation of operands of different widths
    element by element, choosing the operand each time.
    """
    budget = _Budget()
    alone: list[int] = []
    stacked: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        if _joins_move_no_data(weights[i]) and budget.take(x, int(x.size), up_to=_JOIN_UNITS_UP_TO):
            stacked.setdefault(keys[i], []).append(i)
        else:
            alone.append(i)
    groups = [
        idx[start : start + _MAX_JOINED]
        for idx in stacked.values()
        for start in range(0, len(idx), _MAX_JOINED)
    ]
    return alone, groups


class JoinedVectors(NamedTuple):
    """``columns[k]``: column k of ``pieces`` (indices), end to end from ``offsets``."""

    columns: list[jax.Array]
    pieces: list[int]
    offsets: list[int]


def joined_vectors(
    pieces: Sequence[Sequence[jax.Array]], keys: Sequence[Any]
) -> list[JoinedVectors]:
    """Small per-leaf vectors (unit norms, limits) joined, so that they cost a few kernels.

    Pieces with equal ``keys`` (device axes, dtype) are joined, at most ``_MAX_JOINED`` at a
    time, each joined column kept one buffer (``one_buffer``); pieces that may be split across
    devices stay on their own. Without the devices every piece stays on its own.
    """
    out: list[JoinedVectors] = []
    groups: dict[Any, list[int]] = {}
    for k, key in enumerate(keys):
        groups.setdefault(key, []).append(k)
    for idx in groups.values():
        joinable = [k for k in idx if devices_apply() and all(map(_joins_move_no_data, pieces[k]))]
        for k in idx:
            if k not in joinable:
                out.append(JoinedVectors(list(pieces[k]), [k], [0]))
        for start in range(0, len(joinable), _MAX_JOINED):
            chunk = joinable[start : start + _MAX_JOINED]
            if len(chunk) == 1:
                out.append(JoinedVectors([c.ravel() for c in pieces[chunk[0]]], chunk, [0]))
                continue
            offsets = [int(s) for s in np.cumsum([0] + [pieces[k][0].size for k in chunk])[:-1]]
            # One barrier per column: a shared one would give every output the union of their
            # device-variance types inside shard_map.
            columns = [
                one_buffer(jnp.concatenate([pieces[k][c].ravel() for k in chunk]))
                for c in range(len(pieces[chunk[0]]))
            ]
            out.append(JoinedVectors(columns, chunk, offsets))
    return out
