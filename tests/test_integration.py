"""optaxclip inside real training code: flax.nnx, inject_hyperparams, MultiSteps, masked,
partition and Orbax checkpoints."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NORM_RTOL, ref_global_norm, same_bits, to_f64

import optaxclip
from optaxclip import ClipState, ClipStats

pytestmark = pytest.mark.usefixtures("eager_ops")


def _params():
    rng = np.random.default_rng(0)
    return {
        "body": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.zeros(4)},
        "head": {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32), "b": jnp.zeros(2)},
    }


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 2.0 ** (step % 4), x.dtype), params
    )


def _ref_clip(tree, limit):
    norm = ref_global_norm(tree, 2.0)
    scale = limit / norm if norm > limit else 1.0
    return jax.tree.map(lambda x: to_f64(x) * scale, tree), norm


def test_flax_nnx_optimizer_step_reports_stats_of_the_gradients():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    model = Model(nnx.Rngs(0))
    tx = optax.chain(optaxclip.clip_by_global_norm(0.05), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 3)), jnp.float32)
    y = jnp.sum(x, axis=1, keepdims=True)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    with jax.disable_jit(False):
        for step in range(2):
            before = nnx.state(model, nnx.Param)
            before = jax.tree.map(np.asarray, before)
            _, grads = train_step(model, optimizer, x, y)
            stats = optaxclip.clip_stats(optimizer)
            norm = ref_global_norm(grads, 2.0)
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )
            assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(
                min(norm, 0.05), rel=NORM_RTOL
            )
            assert int(stats["clip_by_global_norm/count"]) == step + 1
            # The parameters moved by -lr * clipped gradient.
            after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
            expected, _ = _ref_clip(grads, 0.05)
            for b, a, g in zip(
                jax.tree.leaves(before),
                jax.tree.leaves(after),
                jax.tree.leaves(expected),
                strict=True,
            ):
                np.testing.assert_allclose(a, b - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_changes_max_norm_between_steps():
    params = _params()
    grads = _grads(2, params)
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    with jax.disable_jit(False):
        for limit in (1.0, 0.25, 100.0):
            state.hyperparams["max_norm"] = jnp.asarray(limit)
            out, state = update(grads, state)
            expected, norm = _ref_clip(grads, limit)
            for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), e, rtol=1e-5)
            stats = optaxclip.clip_stats(state)
            assert float(stats["clip_by_global_norm/threshold"]) == limit
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )


def test_multisteps_clips_the_mean_gradient_and_counts_real_steps():
    params = _params()
    k = 3
    tx = optax.MultiSteps(
        optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)), every_k_schedule=k
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    with jax.disable_jit(False):
        for real_step in range(2):
            micro = [_grads(real_step * k + i, params) for i in range(k)]
            for i, g in enumerate(micro):
                out, state = update(g, state, params)
                if i < k - 1:
                    assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(out))
            mean = jax.tree.map(lambda *xs: np.mean([to_f64(x) for x in xs], axis=0), *micro)
            expected, norm = _ref_clip(mean, 1.0)
            for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), -e, rtol=1e-5, atol=1e-7)
            stats = optaxclip.clip_stats(state)
            assert int(stats["clip_by_global_norm/count"]) == real_step + 1
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )


def test_masked_and_partition_stats_have_distinct_names():
    params = _params()
    grads = _grads(3, params)
    labels = {"body": {"w": "body", "b": "body"}, "head": {"w": "head", "b": "head"}}
    partitioned = optax.partition(
        {
            "body": optaxclip.clip_by_global_norm(1.0, name="body_clip"),
            "head": optaxclip.clip_by_global_norm(0.5),
        },
        labels,
    )
    masked = optax.chain(
        optax.masked(optaxclip.clip_by_global_norm(2.0), {"body": True, "head": False}),
        optax.masked(optaxclip.clip_by_global_norm(3.0), {"body": False, "head": True}),
    )
    for tx, names in [
        (partitioned, {"body_clip": "body", "clip_by_global_norm": "head"}),
        (masked, {"clip_by_global_norm": "body", "clip_by_global_norm_1": "head"}),
    ]:
        out, state = tx.update(grads, tx.init(params), params)
        stats = optaxclip.clip_stats(state)
        assert len(stats) == 2 * 6
        for name, part in names.items():
            assert float(stats[f"{name}/pre_clip_norm"]) == pytest.approx(
                ref_global_norm(grads[part], 2.0), rel=NORM_RTOL
            )
            limit = float(stats[f"{name}/threshold"])
            expected, _ = _ref_clip(grads[part], limit)
            for o, e in zip(jax.tree.leaves(out[part]), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), e, rtol=1e-5)


def test_orbax_checkpoint_round_trip_resumes_bit_identically(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0, name="gclip"), optax.adam(1e-2))
    update = jax.jit(tx.update)

    def run(params, opt_state, steps):
        for step in steps:
            updates, opt_state = update(_grads(step, params), opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    with jax.disable_jit(False):
        params = _params()
        straight = run(params, tx.init(params), range(6))
        middle = run(params, tx.init(params), range(3))
        checkpointer = ocp.StandardCheckpointer()
        path = tmp_path / "ckpt"
        checkpointer.save(path, {"params": middle[0], "opt_state": middle[1]})
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": tx.init(params)}
        )
        restored = checkpointer.restore(path, abstract)
        checkpointer.close()
        clip_state = restored["opt_state"][0]
        assert isinstance(clip_state, ClipState) and isinstance(clip_state.stats, ClipStats)
        assert clip_state.stats.name == "gclip"
        assert int(clip_state.stats.count) == 3
        resumed = run(restored["params"], restored["opt_state"], range(3, 6))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        assert same_bits(a, b)
    stats = optaxclip.clip_stats(resumed[1])
    assert int(stats["gclip/count"]) == 6


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
    # it: the factors' dozen selects were in each leaf's kernel and in each of Adam's,
    # which made chain(clip, adam) compile up to 2x slower. They must arrive computed; what
    # is left per leaf is the bounds select of a runtime slice, one per kernel. (A property
    # of the compiled program, not a timing.)
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
    # _numerics.computed_once); a GPU would pay for it (a conditional may synchronize with
    # the host to read its predicate) and gains nothing. The same step lowered for CUDA (no GPU
    # needed to lower) must hold fewer conditional ops than for CPU: the CPU-only ones.
    tree = [jnp.ones((4, 4), jnp.float32) for _ in range(6)]
    tx = make()
    step = jax.jit(lambda g, s: tx.update(g, s, tree))

    def conditionals(platform):
        exported = jax.export.export(step, platforms=(platform,))(tree, tx.init(tree))
        return exported.mlir_module().count("stablehlo.case")

    assert conditionals("cuda") < conditionals("cpu")


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
    # clip_by_value's count and post-clip norm used to take one reduction per leaf, which
    # made it compile 13x slower than optax.clip at 2000 leaves. Small leaves sharing their
    # bounds are reduced as the concatenation the pre-clip norm already makes, so the number
    # of reductions in the compiled program does not grow with the number of leaves. (A
    # property of the compiled program, not a timing.)
    def reductions(n_leaves):
        tree = [jnp.ones((4, 4), jnp.float32) for _ in range(n_leaves)]
        tx = make()
        compiled = jax.jit(tx.update).lower(tree, tx.init(tree)).compile()
        return compiled.as_text().count(" reduce(")

    assert reductions(40) == reductions(20)


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
    # reduction's fusion shares with another fusion. The statistics used to broadcast scalars
    # equal to a bound or to each other (0.5 is also a halving, 2.0 a doubling; the scheduled
    # bound; the asymmetric clamp), and a full-size array was then written and read on every
    # step: twice the time of clip_by_value(0.3) on one 64M leaf. The reference is a plain
    # clamp (optax.clip), which computes no statistics: the compiled step must compute no more
    # leaf-sized arrays than the plain clamp's. Twenty leaves of one shape, too large to be
    # joined, are reduced one by one: more than the 16 scaled variants the statistics once
    # cycled through, whose 17th leaf shared the 1st one's scalars. A bound of 2^-17 is the
    # scale of the count's differences, once shared with the post-clip norm's.
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


@pytest.mark.parametrize(
    ("make_adaptive", "make_static"),
    [
        (lambda: optaxclip.autoclip(10.0), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.zclip(warmup_steps=2), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.quantile_clip(), lambda: optaxclip.clip_by_global_norm(1.0)),
        (lambda: optaxclip.adagc(warmup_steps=2), lambda: optaxclip.clip_by_leaf_norm(1.0)),
    ],
    ids=["autoclip", "zclip", "quantile_clip", "adagc"],
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
    # leaf then got a float32 copy on every step (clip_by_value on one 64M-entry leaf: 160 ms,
    # 60 ms without). Large leaves (reduced in place) and small ones (joined) both present.
    grads = {
        "large": [jnp.ones((256, 512), jnp.bfloat16) for _ in range(3)],
        "small": [jnp.ones((64, 64), jnp.bfloat16) for _ in range(3)],
        "bias": jnp.ones((512,), jnp.bfloat16),
    }
    text, _ = _compiled(*_step_and_args(make(), grads, chained, needs_params))
    assert _float32_arrays_of_size(text, 256 * 512) == []


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_nonfinite_guard_writes_no_leaf_sized_flags_or_float32_copies(dtype):
    # skip_nonfinite's check is a plain sum over the leaves: per leaf, all(isfinite(x))
    # wrote each leaf's flags out in full on XLA:CPU. On bfloat16 it must also convert the
    # leaves apart from the clip inside it, which reduces the same leaves.
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
    # the leaves apart (see _numerics.behind_barriers), or XLA:CPU writes out a float32 copy.
    grads = [jnp.ones((256, 512), jnp.bfloat16) for _ in range(3)]
    tx = optaxclip.skip_nonfinite(optax.adam(1e-3))

    def step(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, optaxclip.global_norm(g)

    text, _ = _compiled(step, (grads, tx.init(grads), grads))
    copies = _float32_arrays_of_size(text, 256 * 512)
    assert [line for line in copies if "fusion(%constant" not in line] == []


@pytest.mark.parametrize(
    "norm",
    [optaxclip.global_norm, optaxclip.leaf_norms],
    ids=["global_norm", "leaf_norms"],
)
def test_a_norm_logged_beside_adam_writes_no_leaf_sized_array(norm):
    # A step that logs the gradient's norm beside Adam squares each entry twice in the same
    # program: the norm's g * g and Adam's second moment. XLA merged the two and XLA:CPU
    # wrote the squares out in full, a leaf-sized array for each leaf on every step (2.3-2.5x
    # Adam's step on one 64M leaf). Logging the norm must add no leaf-sized array to the
    # program Adam alone compiles to. Large leaves (reduced in place) and small ones (joined).
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
