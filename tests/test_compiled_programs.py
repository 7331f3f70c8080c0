"""Compiled programs: what XLA makes of a step, read from its HLO text or its exported MLIR.

Each test compiles (or lowers) a step, alone or chained with Adam, and counts what the
program does per leaf: kernels, reductions, selects, conditionals, leaf-sized arrays written
out, float32 copies of low-precision leaves. These are properties of the compiled program,
not timings; each pins a device of ``optaxclip._lowering`` that keeps a step at memory speed
on XLA:CPU, or keeps a CPU-only device out of a GPU program.

Select or skip them with ``-m compiled_program`` or ``-m "not compiled_program"``.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip

pytestmark = [pytest.mark.compiled_program, pytest.mark.usefixtures("eager_ops")]


# --- reading a compiled step ------------------------------------------------------------------


def _step_and_args(tx, grads, chained, needs_params=False):
    """``tx.update`` alone, or ``chain(tx, adam)`` + apply_updates, with its arguments.

    Alone, the parameters (the gradients themselves) are passed only with ``needs_params``.
    """
    if not chained:
        if needs_params:
            return (lambda g, s, p: tx.update(g, s, p)), (grads, tx.init(grads), grads)
        return tx.update, (grads, tx.init(grads))
    tx = optax.chain(tx, optax.adam(1e-3))

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    return step, (grads, tx.init(grads), grads)


def _compiled(step, args):
    """The compiled step's HLO text (CPU, first two arguments donated) and its leaves' shapes."""
    text = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile().as_text()
    shapes = {",".join(map(str, x.shape)) for x in jax.tree_util.tree_leaves(args[0])}
    return text, shapes


def _entry(text):
    """The compiled program's entry computation (its top level), as HLO text."""
    entry = text[text.index("\nENTRY") :]
    return entry[: entry.index("\n}\n")]


def _full_size_arrays_computed(text, shapes):
    """How many arrays of a leaf's shape the compiled step computes at its top level.

    Parameters and reinterpretations (bitcasts) excluded: the outputs, and any full-size
    temporary XLA writes out beside them.
    """
    entry = _entry(text)
    return sum(
        1
        for line in entry.splitlines()[1:]
        if "parameter(" not in line
        and " bitcast(" not in line
        and any(re.search(rf"= \w+\[{shape}\]", line) for shape in shapes)
    )


def _leaf_sized_loops(text, shapes):
    """How many loops over a leaf-sized array the compiled step runs, in any computation.

    Each fused kernel of the compiled program is a computation of its own; those with a
    parameter or result of a leaf's shape each read or write a leaf-sized array once.
    """
    signatures = re.findall(r"^%fused\S* \((.*)\) -> (.*) \{$", text, re.M)
    return sum(
        1
        for params, result in signatures
        if any(re.search(rf"\w+\[{shape}\]", params + result) for shape in shapes)
    )


def _float32_arrays_of_size(text, size):
    """The float32 arrays of at least ``size`` entries the compiled step computes at top level."""
    entry = _entry(text)
    found = []
    for line in entry.splitlines()[1:]:
        match = re.search(r"= f32\[([\d,]*)\]", line)
        if "parameter(" in line or not match:
            continue
        if np.prod([int(d) for d in match.group(1).split(",") if d]) >= size:
            found.append(line.strip())
    return found


# --- scale factors and conditionals -----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: optaxclip.clip_by_global_norm(1.0),
        lambda: optaxclip.clip_by_leaf_norm(1.0),
        lambda: optaxclip.clip_by_block_rms(1.0),
        lambda: optaxclip.adagc(),
        lambda: optaxclip.adaptive_grad_clip(0.01),
    ],
    ids=["global", "leaf", "block_rms", "adagc", "agc"],
)
def test_scale_factors_reach_the_leaves_computed_not_recomputed_in_each_kernel(make):
    # XLA copies the elementwise ops that produce a leaf's scale into every kernel reading
    # it: recomputed there, the factors' dozen selects would sit in each leaf's kernel and in
    # each of Adam's, and chain(clip, adam) would compile that much more code per leaf. They
    # must arrive computed (see ``optaxclip._lowering.computed_before_fusion``); what is left
    # per leaf is the bounds select of a runtime slice, one per kernel. (A property of the
    # compiled program, not a timing.)
    def selects(n_leaves):
        tree = [jnp.ones((4, 4), jnp.float32) for _ in range(n_leaves)]
        opt = optax.chain(make(), optax.adam(1e-3))

        def step(p, s, g):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        compiled = jax.jit(step).lower(tree, opt.init(tree), tree).compile()
        return compiled.as_text().count(" select(")

    per_leaf = (selects(40) - selects(20)) / 20
    assert per_leaf <= 2, f"{per_leaf} selects per leaf in the compiled chain"


@pytest.mark.parametrize(
    "make",
    [
        lambda: optaxclip.clip_by_global_norm(1.0),
        lambda: optaxclip.clip_by_leaf_norm(1.0),
        lambda: optaxclip.adagc(),
        lambda: optaxclip.adaptive_grad_clip(0.01),
        lambda: optaxclip.clip_by_value(1.0),
    ],
    ids=["global", "leaf", "adagc", "agc", "value"],
)
def test_conditionals_that_only_serve_xla_cpu_are_not_lowered_for_gpus(make):
    # The scale factors are computed under a conditional on CPU (see
    # ``optaxclip._lowering.computed_before_fusion``); a GPU would pay for it (a conditional
    # may synchronize with the host to read its predicate) and gains nothing. The same step
    # lowered for CUDA (no GPU needed to lower) must hold fewer conditional ops than for CPU:
    # the CPU-only ones.
    tree = [jnp.ones((4, 4), jnp.float32) for _ in range(6)]
    tx = make()
    step = jax.jit(lambda g, s: tx.update(g, s, tree))

    def conditionals(platform):
        exported = jax.export.export(step, platforms=(platform,))(tree, tx.init(tree))
        return exported.mlir_module().count("stablehlo.case")

    assert conditionals("cuda") < conditionals("cpu")


# --- clip_by_value's statistics --------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: optaxclip.clip_by_value(1.0),
        lambda: optaxclip.clip_by_value(1.0, -0.5),
        lambda: optaxclip.clip_by_value(optax.linear_schedule(1.0, 0.5, 10)),
        lambda: optaxclip.clip_by_value(
            optax.linear_schedule(1.0, 0.5, 10), optax.linear_schedule(-1.0, -0.5, 10)
        ),
    ],
    ids=["symmetric", "asymmetric", "scheduled", "scheduled_asymmetric"],
)
def test_value_clip_statistics_reduce_small_leaves_together_not_one_loop_each(make):
    # XLA compiles one loop per reduction, and its fusion pass takes time that grows faster
    # than linearly with the number of loops (see the joins in ``optaxclip._lowering``): one
    # reduction per leaf for clip_by_value's count and post-clip norm would make its compile
    # time grow that way with the number of leaves. Small leaves sharing their bounds are
    # reduced as the concatenation the pre-clip norm already makes, so the number of
    # reductions in the compiled program does not grow with the number of leaves. (A
    # property of the compiled program, not a timing.)
    def reductions(n_leaves):
        tree = [jnp.ones((4, 4), jnp.float32) for _ in range(n_leaves)]
        tx = make()
        compiled = jax.jit(tx.update).lower(tree, tx.init(tree)).compile()
        return compiled.as_text().count(" reduce(")

    assert reductions(40) == reductions(20)


@pytest.mark.parametrize(
    ("max_delta", "min_delta"),
    [
        (0.3, None),
        (0.5, None),
        (2.0, None),
        (0.7, -0.3),
        (0.5, -0.5),
        (optax.linear_schedule(1.0, 0.5, 10), None),
        (2.0**-17, None),
    ],
    ids=["0.3", "0.5", "2.0", "asymmetric", "asymmetric_equal", "scheduled", "2^-17"],
)
@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
def test_value_clip_writes_no_full_size_temporary_beyond_optax_clip(max_delta, min_delta, chained):
    # XLA merges equal computations, and XLA:CPU writes out in full an array that a
    # reduction's fusion shares with another fusion. Scalars the statistics broadcast can
    # equal a bound or each other (0.5 is also a halving, 2.0 a doubling; the scheduled bound;
    # the asymmetric clamp); merged, they would make a full-size array that is written and
    # read on every step (see ``optaxclip._lowering.DistinctOnes``). The reference is a plain
    # clamp (optax.clip), which computes no statistics: the compiled step must compute no more
    # leaf-sized arrays than the plain clamp's. Twenty leaves of one shape, too large to be
    # joined, are reduced one by one, each with scalars of its own: a leaf that shared
    # another's scalars would show here. A bound of 2^-17 equals the scale of the count's
    # differences (``optaxclip._transforms.value._difference_scale``), which the post-clip
    # norm must not share.
    grads = [jnp.ones((256, 512), jnp.float32) for _ in range(20)]
    ours = optaxclip.clip_by_value(max_delta, min_delta)
    lo = -0.5 if min_delta is None else min_delta
    hi = 0.5 if callable(max_delta) else max_delta
    if min_delta is None:
        lo = -hi
    plain = optax.stateless(lambda g, p=None: jax.tree.map(lambda x: jnp.clip(x, lo, hi), g))

    def count(tx):
        return _full_size_arrays_computed(*_compiled(*_step_and_args(tx, grads, chained)))

    assert count(ours) == count(plain)


# --- leaf-sized work and float32 copies ------------------------------------------------------


@pytest.mark.parametrize(
    ("make_adaptive", "make_static"),
    [
        (lambda: optaxclip.autoclip(10.0), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.zclip(warmup_steps=2), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.quantile_clip(), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.adagc(warmup_steps=2), lambda: optaxclip.clip_by_leaf_norm(1.0)),
        (
            lambda: optaxclip.clip_by_rule(optaxclip.rules.constant(1.0)),
            lambda: optaxclip.clip_by_global_norm(1.0),
        ),
        (
            lambda: optaxclip.clip_by_rule(optaxclip.rules.zscore(warmup_steps=2)),
            lambda: optaxclip.clip_by_global_norm(1.0),
        ),
        (
            lambda: optaxclip.clip_by_rule(optaxclip.rules.mean_std(window=4)),
            lambda: optaxclip.clip_by_global_norm(1.0),
        ),
        (
            lambda: optaxclip.clip_by_rule(optaxclip.rules.percentile(10.0), scope="per_leaf"),
            lambda: optaxclip.clip_by_leaf_norm(1.0),
        ),
        (
            lambda: optaxclip.clip_by_rule(optaxclip.rules.ema_ratio(), scope="per_leaf"),
            lambda: optaxclip.clip_by_leaf_norm(1.0),
        ),
    ],
    ids=[
        "autoclip",
        "zclip",
        "quantile_clip",
        "adagc",
        "rule_constant",
        "rule_zscore",
        "rule_mean_std",
        "rule_percentile_per_leaf",
        "rule_ema_ratio_per_leaf",
    ],
)
@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
def test_adaptive_clippers_add_no_leaf_sized_work_to_their_static_counterpart(
    make_adaptive, make_static, chained
):
    # An adaptive clipper sets its threshold from scalars (the norm's history), so its cost
    # beyond the static clip it builds on (the global clip; the per-leaf clip for AdaGC's
    # per-tensor thresholds) is scalar work: it must read and write the leaves no more
    # often. Counted on the compiled program (leaf-sized loops and leaf-sized arrays written
    # at the top level), float32 and bfloat16 leaves too large to be joined.
    grads = [jnp.ones((256, 512), dtype) for dtype in (jnp.float32, jnp.bfloat16) for _ in range(3)]

    def counts(tx):
        compiled = _compiled(*_step_and_args(tx, grads, chained))
        return _leaf_sized_loops(*compiled), _full_size_arrays_computed(*compiled)

    adaptive_loops, adaptive_arrays = counts(make_adaptive())
    static_loops, static_arrays = counts(make_static())
    assert adaptive_loops <= static_loops
    assert adaptive_arrays <= static_arrays


@pytest.mark.parametrize(
    ("make", "needs_params"),
    [
        (lambda: optaxclip.clip_by_global_norm(1.0), False),
        (lambda: optaxclip.clip_by_leaf_norm(1.0), False),
        (lambda: optaxclip.clip_by_value(0.3), False),
        (lambda: optaxclip.clip_by_value(0.3, -0.2), False),
        (lambda: optaxclip.clip_by_block_rms(1.0), False),
        (lambda: optaxclip.adaptive_grad_clip(0.01), True),
        (lambda: optaxclip.autoclip(10.0), False),
        (lambda: optaxclip.zclip(warmup_steps=2), False),
        (lambda: optaxclip.adagc(warmup_steps=2), False),
        (lambda: optaxclip.quantile_clip(), False),
    ],
    ids=[
        "global",
        "leaf",
        "value",
        "value_asymmetric",
        "block_rms",
        "agc",
        "autoclip",
        "zclip",
        "adagc",
        "quantile_clip",
    ],
)
@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
def test_bfloat16_leaves_are_never_copied_to_float32(make, needs_params, chained):
    # Reductions accumulate in float32, converting bfloat16 entries as they read them. XLA
    # merges equal conversions, and XLA:CPU writes out in full a conversion that a reduction
    # shares with another fusion: clip_by_value's three statistics, AGC's gradient norms and
    # its output multiply, AGC's weight norms and Adam's update of the same weights. Each large
    # leaf would then get a float32 copy, written and read on every step; each reader converts
    # apart instead (see ``optaxclip._lowering.convert_per_reader``). Large leaves (reduced in
    # place) and small ones (joined) both present.
    grads = {
        "large": [jnp.ones((256, 512), jnp.bfloat16) for _ in range(3)],
        "small": [jnp.ones((64, 64), jnp.bfloat16) for _ in range(3)],
        "bias": jnp.ones((512,), jnp.bfloat16),
    }
    text, _ = _compiled(*_step_and_args(make(), grads, chained, needs_params))
    assert _float32_arrays_of_size(text, 256 * 512) == []


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_nonfinite_guard_writes_no_leaf_sized_flags_or_float32_copies(dtype):
    # skip_nonfinite's check reduces the leaves to scalars (see
    # ``optaxclip._guards.nonfinite._all_finite``): per leaf, all(isfinite(x)) would write each
    # leaf's flags out in full on XLA:CPU. On bfloat16 it must also convert the leaves apart
    # from the clip inside it, which reduces the same leaves.
    grads = [jnp.ones((256, 512), dtype) for _ in range(3)]
    tx = optaxclip.skip_nonfinite(optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3)))
    text, _ = _compiled(*_step_and_args(tx, grads, chained=False, needs_params=True))
    assert not re.search(r"= pred\[256,512\]", _entry(text))
    if dtype == jnp.bfloat16:
        # (The zeros a skipped step returns are a broadcast constant, not a copy.)
        copies = _float32_arrays_of_size(text, 256 * 512)
        assert [line for line in copies if "fusion(%constant" not in line] == []


def test_nonfinite_guard_beside_a_logged_global_norm_makes_no_float32_copy():
    # A step that also logs global_norm(grads) reduces the same bfloat16 leaves outside the
    # guard's conditional, in the same computation as the guard's check: the two must convert
    # the leaves apart (see ``optaxclip._lowering.convert_per_reader``), or XLA:CPU writes out
    # a float32 copy.
    grads = [jnp.ones((256, 512), jnp.bfloat16) for _ in range(3)]
    tx = optaxclip.skip_nonfinite(optax.adam(1e-3))

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, optaxclip.global_norm(g)

    text, _ = _compiled(step, (grads, tx.init(grads), grads))
    copies = _float32_arrays_of_size(text, 256 * 512)
    assert [line for line in copies if "fusion(%constant" not in line] == []


# --- norms logged beside the step ------------------------------------------------------------


@pytest.mark.parametrize(
    "norm",
    [optaxclip.global_norm, optaxclip.leaf_norms],
    ids=["global_norm", "leaf_norms"],
)
def test_a_norm_logged_beside_adam_writes_no_leaf_sized_array(norm):
    # A step that logs the gradient's norm beside Adam squares each entry twice in the same
    # program: the norm's g * g and Adam's second moment. Merged by XLA, the squares would be
    # written out in full by XLA:CPU, a leaf-sized array for each leaf on every step (see
    # ``optaxclip._lowering.read_apart_from_the_optimizer``). Logging the norm must add no
    # leaf-sized array to the program Adam alone compiles to. Large leaves (reduced in place)
    # and small ones (joined).
    grads = {
        "large": [jnp.ones((256, 512), jnp.float32) for _ in range(3)],
        "small": [jnp.ones((64, 64), jnp.float32) for _ in range(3)],
    }
    tx = optax.adam(1e-3)

    def adam_step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def logged_step(p, s, g):
        return (*adam_step(p, s, g), norm(g))

    # Parameters and state donated, as in a training step (the gradient is not).
    args = (jax.tree.map(jnp.zeros_like, grads), tx.init(grads), grads)
    assert _full_size_arrays_computed(*_compiled(logged_step, args)) == (
        _full_size_arrays_computed(*_compiled(adam_step, args))
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_global_norm_logged_beside_the_global_clip_is_computed_once(dtype):
    # The clip's norm and a global_norm(grads) logged in the same step read the leaves the
    # same way, so XLA computes the norm once: logging it adds no loop over a leaf and no
    # reduction to chain(clip_by_global_norm, adam).
    grads = {
        "large": [jnp.ones((256, 512), dtype) for _ in range(3)],
        "small": [jnp.ones((64, 64), dtype) for _ in range(3)],
    }
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def logged_step(p, s, g):
        return (*step(p, s, g), optaxclip.global_norm(g))

    def counts(fn):
        text, shapes = _compiled(fn, (jax.tree.map(jnp.zeros_like, grads), tx.init(grads), grads))
        return _leaf_sized_loops(text, shapes), text.count(" reduce(")

    assert counts(logged_step) == counts(step)
