"""The static clippers against float64 references, optax, PyTorch, and their properties."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    FLOAT_DTYPES,
    NORM_RTOL,
    ORDS,
    assert_close_to_ref,
    flush_atol,
    gradient_trees,
    ref_global_norm,
    ref_leaf_norm,
    ref_rms,
    same_bits,
    to_f64,
    tree_dtype,
    unit_roundoff,
)
from hypothesis import example, given
from hypothesis import strategies as st

import optaxclip

# Op by op: see conftest.eager_ops (the jit tests switch jit back on explicitly).
pytestmark = pytest.mark.usefixtures("eager_ops")

# Threshold as a multiple of the reference norm: 0 (zero everything), clipped (< 1) and not
# clipped (> 1). Ratios stay away from 1 so the float32 norm's rounding cannot flip a decision.
RATIOS = st.sampled_from([0.0, 1e-3, 0.5, 0.9, 1.1, 2.0, 1e3])
REAL_DTYPES = tuple(d for d in FLOAT_DTYPES if not jnp.issubdtype(d, jnp.complexfloating))
HIGH_PRECISION = (jnp.dtype(jnp.float32), jnp.dtype(jnp.complex64))


def _apply(tx, tree):
    return tx.update(tree, tx.init(tree))


def _leaves(tree):
    return jax.tree.leaves(tree)


def _path_keys(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# --- float64 references ---------------------------------------------------------------------


def ref_clip_global(tree, limit, p):
    norm = ref_global_norm(tree, p)
    scale = limit / norm if norm > limit else 1.0
    return [to_f64(x) * scale for x in _leaves(tree)], norm, scale


def ref_clip_leaf(tree, limits, p):
    out = []
    for x, limit in zip(_leaves(tree), limits, strict=True):
        norm = ref_leaf_norm(x, p)
        out.append(to_f64(x) * (limit / norm if norm > limit else 1.0))
    return out


def ref_clip_rms(tree, limit):
    out = []
    for x in _leaves(tree):
        rms = ref_rms(x)
        out.append(to_f64(x) * (limit / rms if rms > limit else 1.0))
    return out


def _bound_in_dtype(value, dtype):
    """A bound as the clipper applies it: float32, then rounded into the leaf's dtype."""
    return float(np.asarray(np.float32(value)).astype(jnp.dtype(dtype)))


def ref_clip_value(tree, low, high):
    return [
        np.clip(to_f64(x), _bound_in_dtype(low, x.dtype), _bound_in_dtype(high, x.dtype))
        for x in _leaves(tree)
    ]


def assert_leaves_match(out_tree, expected, in_tree):
    """Same structure, each leaf keeps its dtype and equals the reference up to rounding."""
    assert jax.tree.structure(out_tree) == jax.tree.structure(in_tree)
    for out, exp, x in zip(_leaves(out_tree), expected, _leaves(in_tree), strict=True):
        assert out.dtype == x.dtype and out.shape == x.shape
        assert_close_to_ref(out, exp, x.dtype)


def assert_parallel(out_leaves, in_leaves, ref_out_leaves):
    """The output is a positive multiple of the input: cosine 1 up to the output's rounding.

    Each element of leaf i is rounded once into its dtype (relative error u_i) or flushed near
    zero (absolute error a_i), so ||out - ref|| <= sum_i (u_i ||ref_i|| + sqrt(N_i) a_i) =: E,
    sin(angle) <= E / ||ref|| and 1 - cos <= sin**2.
    """
    out = np.concatenate([to_f64(x).ravel() for x in out_leaves])
    inp = np.concatenate([to_f64(x).ravel() for x in in_leaves])
    ref_norm = float(np.linalg.norm(np.concatenate([np.ravel(x) for x in ref_out_leaves])))
    if ref_norm == 0:
        assert not np.any(out)
        return
    error = sum(
        unit_roundoff(o.dtype) * float(np.linalg.norm(r)) + math.sqrt(o.size) * flush_atol(o.dtype)
        for o, r in zip(out_leaves, ref_out_leaves, strict=True)
    )
    if not np.any(out):
        # Everything rounded to zero (fp16 values below half its smallest subnormal): allowed
        # only where the rounding bound admits it.
        assert error >= ref_norm
        return
    cosine = float(np.real(np.vdot(out, inp))) / (
        float(np.linalg.norm(out)) * float(np.linalg.norm(inp))
    )
    assert 1 - cosine <= min((error / ref_norm) ** 2, 1.0) + 1e-12


# --- agreement with the float64 references on random trees ---------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_clip_by_global_norm_matches_float64_reference(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, state = _apply(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    expected, norm, scale = ref_clip_global(tree, limit, p)
    assert_leaves_match(out, expected, tree)
    assert float(state.stats.pre_clip_norm) == pytest.approx(norm, rel=NORM_RTOL)
    assert float(state.stats.scale) == pytest.approx(scale, rel=NORM_RTOL)


@given(
    tree=gradient_trees(), p=st.sampled_from(ORDS), ratios=st.lists(RATIOS, min_size=3, max_size=3)
)
def test_clip_by_leaf_norm_matches_float64_reference_with_per_leaf_function(tree, p, ratios):
    keys = _path_keys(tree)
    limits = {
        k: r * ref_leaf_norm(x, p) for k, r, x in zip(keys, ratios, _leaves(tree), strict=False)
    }
    tx = optaxclip.clip_by_leaf_norm(lambda path, leaf: limits[jax.tree_util.keystr(path)], ord=p)
    out, _ = _apply(tx, tree)
    expected = ref_clip_leaf(tree, [limits[k] for k in keys], p)
    for o, e, x in zip(_leaves(out), expected, _leaves(tree), strict=True):
        assert o.dtype == x.dtype
        assert_close_to_ref(o, e, x.dtype)


@given(tree=gradient_trees(), ratio=RATIOS)
def test_clip_by_block_rms_matches_float64_reference(tree, ratio):
    rms = [ref_rms(x) for x in _leaves(tree)]
    limit = ratio * max(rms, default=1.0)
    out, _ = _apply(optaxclip.clip_by_block_rms(limit), tree)
    for o, e, x in zip(_leaves(out), ref_clip_rms(tree, limit), _leaves(tree), strict=True):
        assert o.dtype == x.dtype
        assert_close_to_ref(o, e, x.dtype)


@given(
    tree=gradient_trees(dtypes=REAL_DTYPES),
    high=st.one_of(st.just(0.0), st.floats(1e-30, 1e4)),
    width=st.one_of(st.none(), st.just(0.0), st.floats(1e-30, 1e4)),
)
def test_clip_by_value_matches_float64_reference(tree, high, width):
    # Bounds are 0 or normal floats: a subnormal float32 bound is flushed to 0 by XLA on CPU.
    low = -high if width is None else high - width
    tx = optaxclip.clip_by_value(high) if width is None else optaxclip.clip_by_value(high, low)
    out, state = _apply(tx, tree)
    expected = ref_clip_value(tree, low, high)
    # Clamping is exact: each element is either the input or a bound rounded to the dtype.
    for o, e, x in zip(_leaves(out), expected, _leaves(tree), strict=True):
        assert o.dtype == x.dtype
        np.testing.assert_array_equal(to_f64(o), e)
    n_clamped = sum(
        int(np.sum(to_f64(o) != to_f64(x)))
        for o, x in zip(_leaves(out), _leaves(tree), strict=True)
    )
    total = sum(x.size for x in _leaves(tree))
    # Elements already on a bound are neither moved nor counted.
    assert float(state.stats.clipped_fraction) == pytest.approx(n_clamped / max(total, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("high", [2.0**-100, 1e-35, 3e-20, 1.5, 3e4])
@pytest.mark.parametrize("under_jit", [False, True])
def test_clip_by_value_counts_entries_one_step_past_a_bound(dtype, high, under_jit):
    # The clipped fraction counts entries through differences (see _count_outside); next to
    # a tiny bound such a difference is below float32's smallest normal and would be flushed.
    bound = np.asarray(high, jnp.dtype(dtype))
    up = np.nextafter(bound, np.asarray(np.inf, bound.dtype))
    down = np.nextafter(bound, np.asarray(-np.inf, bound.dtype))
    largest = float(jnp.finfo(dtype).max)
    values = np.array(
        [up, bound, down, -up, -bound, -down, 0, 2 * up, -2 * up, largest], np.float64
    )
    x = jnp.asarray(values.astype(np.float32)).astype(dtype)
    xs = to_f64(x)
    low_bound, high_bound = (
        float(-to_f64(jnp.asarray(high, dtype))),
        float(to_f64(jnp.asarray(high, dtype))),
    )
    expected = int(np.sum((xs > high_bound) | (xs < low_bound)))
    tx = optaxclip.clip_by_value(high)
    update = jax.jit(tx.update) if under_jit else tx.update
    out, state = update({"x": x}, tx.init({"x": x}))
    # The count agrees with the entries the clamp actually moved, and with the reference.
    moved = int(np.sum(to_f64(out["x"]) != xs))
    assert moved == expected
    assert round(float(state.stats.clipped_fraction) * x.size) == expected


# --- properties ------------------------------------------------------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_global_clip_output_norm_is_at_most_threshold(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, _ = _apply(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    post = ref_global_norm(out, p)
    if all(x.dtype in HIGH_PRECISION for x in _leaves(tree)):
        assert post <= limit * (1 + 1e-6)
    else:
        # fp16/bf16: every element is rounded into its dtype after scaling (relative u) and
        # may land on an fp16 subnormal (absolute flush_atol), so the bound grows by that.
        n = sum(x.size for x in _leaves(tree))
        atol = max(flush_atol(x.dtype) for x in _leaves(tree))
        slack = n ** (0 if p == math.inf else 1 / p) * atol
        assert post <= limit * (1 + 1e-6) * (1 + unit_roundoff(tree_dtype(tree))) + slack


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_global_clip_preserves_direction(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, _ = _apply(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    expected, _, _ = ref_clip_global(tree, limit, p)
    assert_parallel(_leaves(out), _leaves(tree), expected)


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=st.sampled_from([1.1, 2.0, 1e6]))
def test_below_threshold_every_clipper_returns_input_bit_for_bit(tree, p, ratio):
    leaves = _leaves(tree)
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
        out, state = _apply(tx, tree)
        assert all(same_bits(o, x) for o, x in zip(_leaves(out), leaves, strict=True))
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
    leaf_limit = ratio * max([ref_leaf_norm(x, p) for x in _leaves(tree)], default=0.0)

    def excess_global(out):
        return ref_global_norm(out, p) / limit - 1 if limit > 0 else 0.0

    def excess_leaf(out):
        if leaf_limit <= 0:
            return 0.0
        return max([ref_leaf_norm(x, p) / leaf_limit - 1 for x in _leaves(out)], default=0.0)

    def excess_rms(out):
        if leaf_limit <= 0:
            return 0.0
        return max(
            [
                ref_leaf_norm(x, 2.0) / math.sqrt(max(x.size, 1)) / leaf_limit - 1
                for x in _leaves(out)
            ],
            default=0.0,
        )

    for tx, excess in [
        (optaxclip.clip_by_global_norm(limit, ord=p), excess_global),
        (optaxclip.clip_by_leaf_norm(leaf_limit, ord=p), excess_leaf),
        (optaxclip.clip_by_block_rms(leaf_limit), excess_rms),
    ]:
        once, state = _apply(tx, tree)
        twice, _ = tx.update(once, state)
        # The second pass can only rescale by the float32 rounding of the first norm, plus
        # however far the rounded first output ended above the threshold: in fp16/bf16 that
        # is the least precise leaf's u, or more where fp16 entries are subnormal (their
        # rounding error is absolute, 2**-25). Every leaf is then rounded again (its own u).
        rescale = NORM_RTOL + unit_roundoff(tree_dtype(tree)) + max(excess(once), 0.0)
        for a, b in zip(_leaves(twice), _leaves(once), strict=True):
            assert a.dtype == b.dtype
            assert_close_to_ref(a, to_f64(b), b.dtype, rtol=rescale)


@given(tree=gradient_trees(), p=st.sampled_from(ORDS))
def test_max_norm_zero_gives_zeros_and_never_nan(tree, p):
    clippers = [
        optaxclip.clip_by_global_norm(0.0, ord=p),
        optaxclip.clip_by_leaf_norm(0.0, ord=p),
        optaxclip.clip_by_block_rms(0.0),
    ]
    if not any(jnp.iscomplexobj(x) for x in _leaves(tree)):
        clippers.append(optaxclip.clip_by_value(0.0))
    for tx in clippers:
        out, state = _apply(tx, tree)
        for o, x in zip(_leaves(out), _leaves(tree), strict=True):
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
            out, _ = _apply(tx, tree)
            assert all(not np.any(to_f64(o)) for o in _leaves(out))


def test_leaf_clip_bounds_each_leaf_and_keeps_each_direction():
    rng = np.random.default_rng(5)
    tree = {
        "w": jnp.asarray(rng.standard_normal((4, 3)) * 10, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.bfloat16),
        "z": jnp.asarray(rng.standard_normal(2) * 1e25, jnp.float32),
    }
    for p in ORDS:
        out, _ = _apply(optaxclip.clip_by_leaf_norm(1.0, ord=p), tree)
        for key in tree:
            dtype = tree[key].dtype
            assert ref_leaf_norm(out[key], p) <= 1 + 1e-6 + unit_roundoff(dtype)
            expected = ref_clip_leaf({key: tree[key]}, [1.0], p)
            assert_parallel([out[key]], [tree[key]], expected)


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
            for o, e in zip(_leaves(out), expected, strict=True):
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
            out, state = _apply(tx, tree)
            assert jax.tree.structure(out) == jax.tree.structure(tree)
            assert int(state.stats.count) == 1
            assert all(math.isfinite(float(v)) for v in state.stats[:2])
            if "c" in tree:
                assert out["a"].shape == (0,)
                c = to_f64(out["c"])
                assert np.all(np.isfinite(c)) and 0 < np.linalg.norm(c) < 5.0


# --- specific cases and the optax contrasts ------------------------------------------------


def test_fp16_ones_are_scaled_to_threshold_where_optax_zeroes_them():
    tree = {"w": jnp.ones(100_000, jnp.float16)}
    ours, state = _apply(optaxclip.clip_by_global_norm(1.0), tree)
    theirs, _ = _apply(optax.clip_by_global_norm(1.0), tree)
    assert not np.any(to_f64(theirs["w"]))  # optax: fp16 norm overflows to inf, update zeroed
    assert float(state.stats.pre_clip_norm) == pytest.approx(math.sqrt(1e5), rel=NORM_RTOL)
    assert ours["w"].dtype == jnp.float16
    assert_close_to_ref(ours["w"], np.full(100_000, 1 / math.sqrt(1e5)), jnp.float16)


def test_float32_1e20_leaves_are_scaled_where_optax_zeroes_them():
    tree = {"a": jnp.full((4,), 2e19, jnp.float32), "b": jnp.full((2,), -1e20, jnp.float32)}
    ours, _ = _apply(optaxclip.clip_by_global_norm(1.0), tree)
    theirs, _ = _apply(optax.clip_by_global_norm(1.0), tree)
    assert not any(np.any(to_f64(x)) for x in _leaves(theirs))  # optax: norm inf -> zeros
    expected, _, _ = ref_clip_global(tree, 1.0, 2.0)
    assert_leaves_match(ours, expected, tree)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("under_jit", [False, True])
@pytest.mark.parametrize("limit", [1.0, 1e-3, 1e-18])
@pytest.mark.parametrize("kind", ["global", "leaf", "rms"])
def test_norms_past_2_to_126_times_the_threshold_are_clipped_not_zeroed(
    kind, limit, under_jit, dtype
):
    # limit / norm is below float32's smallest normal number here; XLA:CPU flushes such a
    # ratio to 0, which used to zero the whole gradient instead of scaling it to the limit.
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
    assert max(np.max(np.abs(to_f64(x))) for x in _leaves(ours)) > 0
    reference_post = math.sqrt(sum(float(np.sum(e**2)) for e in expected))
    assert float(state.stats.post_clip_norm) == pytest.approx(reference_post, rel=1e-2)


def test_max_norm_zero_on_zero_gradient_gives_zeros_where_optax_gives_nan():
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2), jnp.float16)}
    theirs, _ = _apply(optax.clip_by_global_norm(0.0), tree)
    assert np.all(np.isnan(to_f64(theirs["a"])))
    ours, state = _apply(optaxclip.clip_by_global_norm(0.0), tree)
    assert all(same_bits(o, jnp.zeros_like(o)) for o in _leaves(ours))
    assert float(state.stats.scale) == 1.0


def test_meta_gradient_at_zero_gradient_is_finite_where_optax_gives_nan():
    direction = jnp.array([3.0, 4.0])

    def summed(tx, s):
        return jnp.sum(tx.update({"a": s * direction}, tx.init({"a": direction}))[0]["a"])

    assert math.isnan(float(jax.grad(lambda s: summed(optax.clip_by_global_norm(1.0), s))(0.0)))
    # At s = 0 the gradient (0) is below the threshold, so the update is s * direction.
    ours = jax.grad(lambda s: summed(optaxclip.clip_by_global_norm(1.0), s))(0.0)
    assert float(ours) == pytest.approx(7.0)


@given(tree=gradient_trees(dtypes=(jnp.float32,), allow_zero=False, exponents=(-3, 3)))
def test_agrees_with_optax_on_finite_float32_gradients(tree):
    # Where optax is right (float32, no overflow, norm > 0) the results coincide.
    for ours_tx, theirs_tx in [
        (optaxclip.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)),
        (optaxclip.clip_by_value(0.5), optax.clip(0.5)),
        (optaxclip.clip_by_block_rms(0.1), optax.clip_by_block_rms(0.1)),
    ]:
        ours, _ = _apply(ours_tx, tree)
        theirs, _ = _apply(theirs_tx, tree)
        for a, b in zip(_leaves(ours), _leaves(theirs), strict=True):
            assert_close_to_ref(a, to_f64(b), jnp.float32)


# --- PyTorch -------------------------------------------------------------------------------


def test_global_clip_agrees_with_torch_clip_grad_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    for p in (1.0, 2.0, math.inf, 3.0):
        for max_norm in (0.5, 5.0, 1e3):
            # float32 values (what we clip) held exactly in float64 tensors (what torch clips).
            values = [
                rng.standard_normal(s).astype(np.float32) * np.float32(10.0 ** rng.integers(-3, 4))
                for s in shapes
            ]
            params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64)) for s in shapes]
            for param, v in zip(params, values, strict=True):
                param.grad = torch.tensor(v.astype(np.float64))
            total = float(torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=p))
            tree = [jnp.asarray(v) for v in values]
            out, state = _apply(optaxclip.clip_by_global_norm(max_norm, ord=p), tree)
            assert float(state.stats.pre_clip_norm) == pytest.approx(total, rel=NORM_RTOL)
            # torch multiplies by max_norm / (total + 1e-6) (when that is < 1), so its result is
            # smaller than the exact one by the relative amount 1e-6 / total; on top of that
            # our float32 accumulation gives NORM_RTOL.
            rtol = NORM_RTOL + 1e-6 / total
            for o, param in zip(out, params, strict=True):
                np.testing.assert_allclose(
                    to_f64(o), param.grad.numpy(), rtol=rtol, atol=flush_atol(jnp.float32)
                )


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
            lambda tree, t: ref_clip_leaf(tree, [t] * len(_leaves(tree)), 2.0),
        ),
        ("rms", optaxclip.clip_by_block_rms, ref_clip_rms),
        (
            "value",
            optaxclip.clip_by_value,
            # Exact float64 bounds (not rounded to float32) so finite differences see t +- h.
            lambda tree, t: [np.clip(to_f64(x), -t, t) for x in _leaves(tree)],
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
        return sum(jnp.sum(wi * o) for wi, o in zip(_leaves(w), _leaves(out), strict=True))

    for t in (0.0, 1.0):
        g_tree, g_t = jax.grad(loss, argnums=(0, 1))(zeros, t)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in _leaves(g_tree))
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
        return sum(float(np.sum(wi * o)) for wi, o in zip(_leaves(w), out, strict=True))

    def loss(tree32, t):
        tx = factory(t)
        out, _ = tx.update(tree32, tx.init(tree32))
        return sum(
            jnp.sum(jnp.asarray(wi, jnp.float32) * o)
            for wi, o in zip(_leaves(w), _leaves(out), strict=True)
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
        for g, d in zip(_leaves(g_tree), _leaves(direction), strict=True)
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
        for a, b in zip(_leaves(jit_out), _leaves(eager_out), strict=True):
            assert_close_to_ref(a, to_f64(b), a.dtype, rtol=1e-6)
    for i in range(4):
        looped = update_all(jax.tree.map(lambda x, i=i: x[i], batch), states)
        for (b_out, b_state), (l_out, l_state) in zip(batched, looped, strict=True):
            for a, b in zip(_leaves(b_out), _leaves(l_out), strict=True):
                assert_close_to_ref(a[i], to_f64(b), b.dtype, rtol=1e-6)
            assert float(b_state.stats.pre_clip_norm[i]) == pytest.approx(
                float(l_state.stats.pre_clip_norm), rel=1e-6
            )


# --- chains with optimizers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_opt",
    [lambda: optax.sgd(0.1, momentum=0.9), lambda: optax.adam(1e-2), lambda: optax.adamw(1e-2)],
    ids=["sgd", "adam", "adamw"],
)
def test_chain_equals_clipping_then_optimizer_by_hand(make_opt):
    rng = np.random.default_rng(8)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2)}
    clip = optaxclip.clip_by_global_norm(1.0)
    chained = optax.chain(clip, make_opt())
    opt = make_opt()
    chain_state = chained.init(params)
    clip_state, opt_state = clip.init(params), opt.init(params)
    for step in range(3):
        grads = jax.tree.map(
            lambda x, step=step: jnp.asarray(rng.standard_normal(x.shape) * 3.0**step, x.dtype),
            params,
        )
        updates, chain_state = chained.update(grads, chain_state, params)
        clipped, clip_state = clip.update(grads, clip_state, params)
        by_hand, opt_state = opt.update(clipped, opt_state, params)
        for a, b in zip(_leaves(updates), _leaves(by_hand), strict=True):
            assert same_bits(a, b)
        params = optax.apply_updates(params, updates)
    assert int(optaxclip.clip_stats(chain_state)["clip_by_global_norm/count"]) == 3
