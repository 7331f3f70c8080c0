"""Properties every static clipper shares: identity below the threshold, idempotence, zero
thresholds, empty trees, huge ratios, derivatives, jit and vmap."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.public import public_transforms
from helpers.references import (
    NORM_RTOL,
    assert_close_to_ref,
    assert_leaves_match,
    ref_clip_global,
    ref_clip_leaf,
    ref_clip_rms,
    ref_global_norm,
    ref_leaf_norm,
    ref_rms,
    same_bits,
    to_f64,
    tree_dtype,
    unit_roundoff,
)
from helpers.runs import apply_once
from helpers.strategies import ORDS, RATIOS, gradient_trees
from hypothesis import example, given
from hypothesis import strategies as st

import optaxclip

# Op by op: see conftest.eager_ops (the jit tests switch jit back on explicitly).
pytestmark = pytest.mark.usefixtures("eager_ops")


# --- properties ------------------------------------------------------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=st.sampled_from([1.1, 2.0, 1e6]))
def test_below_threshold_every_clipper_returns_input_bit_for_bit(tree, p, ratio):
    leaves = jax.tree.leaves(tree)
    global_limit = ratio * ref_global_norm(tree, p)
    leaf_limit = ratio * max([ref_leaf_norm(x, p) for x in leaves], default=0.0)
    rms_limit = ratio * max([ref_rms(x) for x in leaves], default=0.0)
    value_limit = ratio * max([ref_leaf_norm(x, math.inf) for x in leaves], default=0.0)
    clippers = [
        optaxclip.clip_by_global_norm(global_limit, ord=p),
        optaxclip.clip_by_leaf_norm(leaf_limit, ord=p),
        optaxclip.clip_by_block_rms(rms_limit),
    ]
    if not any(jnp.iscomplexobj(x) for x in leaves):
        clippers.append(optaxclip.clip_by_value(value_limit))
    for tx in clippers:
        out, state = apply_once(tx, tree)
        assert all(same_bits(o, x) for o, x in zip(jax.tree.leaves(out), leaves, strict=True))
        assert float(state.stats.clipped_fraction) == 0.0


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
@example(  # fp16 subnormals: the rounded first output ends ~0.3% above the threshold
    tree=[
        np.float16(0.0),
        np.array([2.4e-07, 9.0e-06, -7.1e-06], np.float16),
        np.float32(2.364325e-05),
    ],
    p=1.0,
    ratio=0.5,
)
def test_clipping_twice_equals_clipping_once(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    leaf_limit = ratio * max([ref_leaf_norm(x, p) for x in jax.tree.leaves(tree)], default=0.0)

    def excess_global(out):
        return ref_global_norm(out, p) / limit - 1 if limit > 0 else 0.0

    def excess_leaf(out):
        if leaf_limit <= 0:
            return 0.0
        return max(
            [ref_leaf_norm(x, p) / leaf_limit - 1 for x in jax.tree.leaves(out)], default=0.0
        )

    def excess_rms(out):
        if leaf_limit <= 0:
            return 0.0
        return max(
            [
                ref_leaf_norm(x, 2.0) / math.sqrt(max(x.size, 1)) / leaf_limit - 1
                for x in jax.tree.leaves(out)
            ],
            default=0.0,
        )

    for tx, excess in [
        (optaxclip.clip_by_global_norm(limit, ord=p), excess_global),
        (optaxclip.clip_by_leaf_norm(leaf_limit, ord=p), excess_leaf),
        (optaxclip.clip_by_block_rms(leaf_limit), excess_rms),
    ]:
        once, state = apply_once(tx, tree)
        twice, _ = tx.update(once, state)
        # The second pass can only rescale by the float32 rounding of the first norm, plus
        # however far the rounded first output ended above the threshold: in fp16/bf16 that
        # is the least precise leaf's u, or more where fp16 entries are subnormal (their
        # rounding error is absolute, 2**-25). Every leaf is then rounded again (its own u).
        rescale = NORM_RTOL + unit_roundoff(tree_dtype(tree)) + max(excess(once), 0.0)
        for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(once), strict=True):
            assert a.dtype == b.dtype
            assert_close_to_ref(a, to_f64(b), b.dtype, rtol=rescale)


@given(tree=gradient_trees(), p=st.sampled_from(ORDS))
def test_max_norm_zero_gives_zeros_and_never_nan(tree, p):
    clippers = [
        optaxclip.clip_by_global_norm(0.0, ord=p),
        optaxclip.clip_by_leaf_norm(0.0, ord=p),
        optaxclip.clip_by_block_rms(0.0),
    ]
    if not any(jnp.iscomplexobj(x) for x in jax.tree.leaves(tree)):
        clippers.append(optaxclip.clip_by_value(0.0))
    for tx in clippers:
        out, state = apply_once(tx, tree)
        for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True):
            assert o.dtype == x.dtype
            assert not np.any(to_f64(o)), tx
        assert all(math.isfinite(float(v)) for v in state.stats[:5])


@pytest.mark.parametrize("p", ORDS)
def test_max_norm_zero_zeroes_tiny_and_all_zero_gradients(p):
    tiny = {"a": jnp.full((3,), 1e-20, jnp.float32), "b": jnp.zeros((2, 2), jnp.bfloat16)}
    zero = jax.tree.map(jnp.zeros_like, tiny)
    for tree in (tiny, zero):
        for tx in [
            optaxclip.clip_by_global_norm(0.0, ord=p),
            optaxclip.clip_by_leaf_norm(0.0, ord=p),
            optaxclip.clip_by_block_rms(0.0),
            optaxclip.clip_by_value(0.0),
        ]:
            out, _ = apply_once(tx, tree)
            assert all(not np.any(to_f64(o)) for o in jax.tree.leaves(out))


def test_float64_leaves_are_clipped_exactly_under_x64():
    # x64 is switched on only inside this test; float64 leaves accumulate in float64.
    with jax.enable_x64(True), jax.disable_jit(False):
        rng = np.random.default_rng(6)
        tree = {
            "w": jnp.asarray(rng.standard_normal((3, 2)) * 1e150, jnp.float64),
            "b": jnp.asarray(rng.standard_normal(3), jnp.float64),
        }
        clippers = [optaxclip.clip_by_global_norm(1.0, ord=p) for p in ORDS]
        clippers.append(optaxclip.clip_by_leaf_norm(1.0))
        outs = jax.jit(lambda t: [tx.update(t, tx.init(t))[0] for tx in clippers])(tree)
        references = [ref_clip_global(tree, 1.0, p)[0] for p in ORDS]
        references.append(ref_clip_leaf(tree, [1.0, 1.0], 2.0))
        for out, expected in zip(outs, references, strict=True):
            for o, e in zip(jax.tree.leaves(out), expected, strict=True):
                assert o.dtype == jnp.float64
                np.testing.assert_allclose(to_f64(o), e, rtol=1e-13)


def test_empty_trees_zero_size_and_none_leaves_pass_through_every_clipper():
    trees = [{}, [], {"a": None}, {"a": jnp.zeros((0,)), "b": None, "c": jnp.array([3.0, 4.0])}]
    for tree in trees:
        for tx in [
            optaxclip.clip_by_global_norm(1.0),
            optaxclip.clip_by_leaf_norm(1.0),
            optaxclip.clip_by_block_rms(1.0),
            optaxclip.clip_by_value(1.0),
        ]:
            out, state = apply_once(tx, tree)
            assert jax.tree.structure(out) == jax.tree.structure(tree)
            assert int(state.stats.steps) == 1
            assert all(math.isfinite(float(v)) for v in state.stats[:2])
            if "c" in tree:
                assert out["a"].shape == (0,)
                c = to_f64(out["c"])
                assert np.all(np.isfinite(c)) and 0 < np.linalg.norm(c) < 5.0


# --- specific cases and the optax contrasts ------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("under_jit", [False, True])
@pytest.mark.parametrize("limit", [1.0, 1e-3, 1e-18])
@pytest.mark.parametrize("kind", ["global", "leaf", "rms"])
def test_norms_past_2_to_126_times_the_threshold_are_clipped_not_zeroed(
    kind, limit, under_jit, dtype
):
    # limit / norm is below float32's smallest normal number here; XLA:CPU flushes such a
    # ratio to 0, which would zero the whole gradient instead of scaling it to the limit.
    tree = {
        "a": jnp.array([3e38, -1.0, 1e30, 2e20], dtype),
        "b": jnp.array([[-1e38, 5e37]], dtype),
    }
    tx = {
        "global": optaxclip.clip_by_global_norm(limit),
        "leaf": optaxclip.clip_by_leaf_norm(limit),
        "rms": optaxclip.clip_by_block_rms(limit),
    }[kind]
    update = jax.jit(tx.update) if under_jit else tx.update
    ours, state = update(tree, tx.init(tree))
    expected = {
        "global": lambda: ref_clip_global(tree, limit, 2.0)[0],
        "leaf": lambda: ref_clip_leaf(tree, [limit, limit], 2.0),
        "rms": lambda: ref_clip_rms(tree, limit),
    }[kind]()
    assert_leaves_match(ours, expected, tree)
    assert max(np.max(np.abs(to_f64(x))) for x in jax.tree.leaves(ours)) > 0
    reference_post = math.sqrt(sum(float(np.sum(e**2)) for e in expected))
    assert float(state.stats.post_clip_norm) == pytest.approx(reference_post, rel=1e-2)


@given(tree=gradient_trees(dtypes=(jnp.float32,), allow_zero=False, exponents=(-3, 3)))
def test_agrees_with_optax_on_finite_float32_gradients(tree):
    # Where optax is right (float32, no overflow, norm > 0) the results coincide.
    for ours_tx, theirs_tx in [
        (optaxclip.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        (optaxclip.clip_by_value(0.5), optax.clip(0.5)),
        (optaxclip.clip_by_block_rms(0.1), optax.clip_by_block_rms(0.1)),
    ]:
        ours, _ = apply_once(ours_tx, tree)
        theirs, _ = apply_once(theirs_tx, tree)
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
            assert_close_to_ref(a, to_f64(b), jnp.float32)


# --- derivatives ------------------------------------------------------------------------------


def _weights(tree):
    rng = np.random.default_rng(11)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def _clipper_cases():
    # (name, factory taking the threshold, float64 reference output of (leaves, threshold)).
    return [
        (
            f"global-{p}",
            lambda t, p=p: optaxclip.clip_by_global_norm(t, ord=p),
            lambda tree, t, p=p: ref_clip_global(tree, t, p)[0],
        )
        for p in ORDS
    ] + [
        (
            "leaf-2",
            lambda t: optaxclip.clip_by_leaf_norm(t),
            lambda tree, t: ref_clip_leaf(tree, [t] * len(jax.tree.leaves(tree)), 2.0),
        ),
        ("rms", optaxclip.clip_by_block_rms, ref_clip_rms),
        (
            "value",
            optaxclip.clip_by_value,
            # Exact float64 bounds (not rounded to float32) so finite differences see t +- h.
            lambda tree, t: [np.clip(to_f64(x), -t, t) for x in jax.tree.leaves(tree)],
        ),
    ]


@pytest.mark.parametrize(
    "factory", [c[1] for c in _clipper_cases()], ids=[c[0] for c in _clipper_cases()]
)
def test_meta_gradients_are_finite_at_zero_gradient_and_zero_threshold(factory):
    zeros = {"a": jnp.zeros((2, 2)), "b": jnp.zeros(3)}
    w = _weights(zeros)

    def loss(tree, t):
        out, _ = factory(t).update(tree, factory(t).init(tree))
        return sum(
            jnp.sum(wi * o) for wi, o in zip(jax.tree.leaves(w), jax.tree.leaves(out), strict=True)
        )

    for t in (0.0, 1.0):
        g_tree, g_t = jax.grad(loss, argnums=(0, 1))(zeros, t)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_tree))
        assert math.isfinite(float(g_t))


@pytest.mark.parametrize("case", _clipper_cases(), ids=[c[0] for c in _clipper_cases()])
def test_meta_gradients_match_float64_finite_differences_away_from_kinks(case):
    _, factory, reference = case
    rng = np.random.default_rng(7)
    base = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4)}
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), base)
    # Exactly representable float32 inputs so that the reference sees the same values.
    base = jax.tree.map(to_f64, tree)
    w = jax.tree.map(to_f64, _weights(tree))
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape), base)
    threshold = 0.7  # clips every case (norms ~2-3, rms ~1, max |x| ~2), far from kinks

    def ref_loss(tree64, t):
        out = reference(tree64, t)
        return sum(float(np.sum(wi * o)) for wi, o in zip(jax.tree.leaves(w), out, strict=True))

    def loss(tree32, t):
        tx = factory(t)
        out, _ = tx.update(tree32, tx.init(tree32))
        return sum(
            jnp.sum(jnp.asarray(wi, jnp.float32) * o)
            for wi, o in zip(jax.tree.leaves(w), jax.tree.leaves(out), strict=True)
        )

    g_tree, g_t = jax.grad(loss, argnums=(0, 1))(tree, threshold)
    h = 1e-6
    fd_t = (ref_loss(base, threshold + h) - ref_loss(base, threshold - h)) / (2 * h)
    assert float(g_t) == pytest.approx(fd_t, rel=1e-4, abs=1e-5)
    plus = jax.tree.map(lambda x, d: x + h * d, base, direction)
    minus = jax.tree.map(lambda x, d: x - h * d, base, direction)
    fd_dir = (ref_loss(plus, threshold) - ref_loss(minus, threshold)) / (2 * h)
    ours_dir = sum(
        float(np.sum(to_f64(g) * d))
        for g, d in zip(jax.tree.leaves(g_tree), jax.tree.leaves(direction), strict=True)
    )
    assert ours_dir == pytest.approx(fd_dir, rel=1e-4, abs=1e-5)


# --- jit and vmap ----------------------------------------------------------------------------


def test_vmap_over_batch_of_gradients_equals_loop_and_jit_equals_eager():
    rng = np.random.default_rng(4)
    scales = np.array([1.0, 1e-3, 1e25, 0.0])
    batch = {
        "a": jnp.asarray(rng.standard_normal((4, 2, 3)) * scales[:, None, None], jnp.float32),
        "b": jnp.asarray(rng.standard_normal((4, 3)) * scales[:, None], jnp.bfloat16),
    }
    one = jax.tree.map(lambda x: x[0], batch)
    clippers = [factory(0.8) for _, factory, _ in _clipper_cases()]
    states = [tx.init(one) for tx in clippers]

    def update_all(grads, states):
        return [tx.update(grads, s) for tx, s in zip(clippers, states, strict=True)]

    with jax.disable_jit(False):
        batched = jax.jit(jax.vmap(update_all, in_axes=(0, None)))(batch, states)
        jitted = jax.jit(update_all)(one, states)
    eager = update_all(one, states)
    for (jit_out, _), (eager_out, _) in zip(jitted, eager, strict=True):
        for a, b in zip(jax.tree.leaves(jit_out), jax.tree.leaves(eager_out), strict=True):
            assert_close_to_ref(a, to_f64(b), a.dtype, rtol=1e-6)
    for i in range(4):
        looped = update_all(jax.tree.map(lambda x, i=i: x[i], batch), states)
        for (b_out, b_state), (l_out, l_state) in zip(batched, looped, strict=True):
            for a, b in zip(jax.tree.leaves(b_out), jax.tree.leaves(l_out), strict=True):
                assert_close_to_ref(a[i], to_f64(b), b.dtype, rtol=1e-6)
            assert float(b_state.stats.pre_clip_norm[i]) == pytest.approx(
                float(l_state.stats.pre_clip_norm), rel=1e-6
            )


# --- donation ----------------------------------------------------------------------------

# Every public transform, built with small windows so that the buffers stay small.
_PUBLIC_TRANSFORMS = {
    "clip_by_global_norm": lambda: optaxclip.clip_by_global_norm(0.7),
    "clip_by_leaf_norm": lambda: optaxclip.clip_by_leaf_norm(0.7),
    "clip_by_block_rms": lambda: optaxclip.clip_by_block_rms(0.7),
    "clip_by_value": lambda: optaxclip.clip_by_value(0.7),
    "adaptive_grad_clip": lambda: optaxclip.adaptive_grad_clip(0.05),
    "autoclip": lambda: optaxclip.autoclip(25.0, history_size=4),
    "quantile_clip": lambda: optaxclip.quantile_clip(0.75),
    "zclip": lambda: optaxclip.zclip(warmup_steps=3),
    "adagc": lambda: optaxclip.adagc(warmup_steps=1),
    "adaclip": lambda: optaxclip.adaclip(),
    "clip_by_rule": lambda: optaxclip.clip_by_rule(optaxclip.rules.percentile(50.0, 4)),
    "skip_nonfinite": lambda: optaxclip.skip_nonfinite(optax.sgd(0.05)),
    "skip_spikes": lambda: optaxclip.skip_spikes(optax.sgd(0.05), window=4, min_history=2),
}
# Public names that are not gradient transformations.


def test_the_donation_cases_cover_every_public_transform():
    assert public_transforms() == set(_PUBLIC_TRANSFORMS)


def _assert_distinct_buffers(state):
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
    assert len(pointers) == len(set(pointers)), "two state leaves share one buffer"


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained_with_adam"])
@pytest.mark.parametrize("name", sorted(_PUBLIC_TRANSFORMS))
def test_state_from_init_can_be_donated_to_a_jitted_update(name, chained):
    tx = _PUBLIC_TRANSFORMS[name]()
    if chained:
        tx = optax.chain(tx, optax.adam(3e-3))
    params = {"kernel": jnp.full((3, 2), 0.4), "bias": jnp.full((2,), -1.5)}
    grads = {"kernel": jnp.full((3, 2), 1.25), "bias": jnp.full((2,), -0.3)}
    with jax.disable_jit(False):
        state = tx.init(params)
        _assert_distinct_buffers(state)
        update = jax.jit(tx.update, donate_argnums=(1,))
        for _ in range(2):
            updates, state = update(grads, state, params)
            _assert_distinct_buffers(state)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
