"""AGC: per-unit clipping against a float64 NumPy version of the NFNets equations."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.runs import batched, nnx_linear, nnx_train_step, resume_from_checkpoint, run_updates
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optaxclip

SHAPES = {
    "dense": {"kernel": (5, 4), "bias": (4,)},
    "conv": {"kernel": (3, 3, 2, 4)},
    "attn_out": {"kernel": (2, 3, 5)},
    "gain": (),
}
# The axes each preset reduces over, written out by hand for every leaf of SHAPES.
PRESET_AXES = {
    "flax": {"dense": {"kernel": (0,), "bias": (0,)}, "conv": {"kernel": (0, 1, 2)},
             "attn_out": {"kernel": (0, 1)}, "gain": ()},
    "equinox": {"dense": {"kernel": (1,), "bias": (0,)}, "conv": {"kernel": (1, 2, 3)},
                "attn_out": {"kernel": (1, 2)}, "gain": ()},
    "whole": {"dense": {"kernel": (0, 1), "bias": (0,)}, "conv": {"kernel": (0, 1, 2, 3)},
              "attn_out": {"kernel": (0, 1, 2)}, "gain": ()},
}  # fmt: skip
PRESET_AXES["torch"] = PRESET_AXES["equinox"]


def clip_once(tx, grads, params):
    """One jitted update from a fresh state (jit compiles once; eager would compile per op)."""
    return jax.jit(tx.update)(grads, tx.init(params), params)


def tree_of(shapes, fn):
    return jax.tree.map(fn, shapes, is_leaf=lambda s: isinstance(s, tuple))


def agc_reference(grads, params, axes, clipping, eps):
    """NFNets AGC in float64: per unit, G * min(1, clipping * max(|W|, eps) / |G|).

    ``clipping``: a number, or a dict with one per leaf.
    """
    out, grad_norms, limits = {}, [], []
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    clippings = [clipping] * len(leaves) if np.isscalar(clipping) else jax.tree.leaves(clipping)
    for (path, g), w, ax, c in zip(
        leaves,
        jax.tree.leaves(params),
        jax.tree.leaves(axes, is_leaf=lambda a: isinstance(a, tuple)),
        clippings,
        strict=True,
    ):
        g64, w64 = np.float64(g), np.float64(w)
        g_norm = np.sqrt(np.sum(g64**2, axis=ax, keepdims=True))
        limit = c * np.maximum(np.sqrt(np.sum(w64**2, axis=ax, keepdims=True)), eps)
        scale = np.where(g_norm > limit, limit / np.where(g_norm > 0, g_norm, 1), 1.0)
        out[jax.tree_util.keystr(path)] = g64 * scale
        grad_norms.append(np.broadcast_to(g_norm, scale.shape).ravel())
        limits.append(np.broadcast_to(limit, scale.shape).ravel())
    norms, limits = np.concatenate(grad_norms), np.concatenate(limits)
    clipped = norms > limits
    scales = np.where(clipped, limits / np.where(norms > 0, norms, 1), 1.0)
    stats = {
        "pre": math.sqrt(np.sum(norms**2)),
        "post": math.sqrt(np.sum((norms * scales) ** 2)),
        "threshold": limits.min(),
        "fraction": clipped.mean(),
    }
    return out, stats


def by_path(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def assert_matches_reference(out, state, expected, stats, rtol=1e-5):
    got = by_path(out)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=rtol, atol=1e-30, err_msg=key)
    np.testing.assert_allclose(state.stats.pre_clip_norm, stats["pre"], rtol=rtol)
    np.testing.assert_allclose(state.stats.post_clip_norm, stats["post"], rtol=rtol)
    np.testing.assert_allclose(state.stats.threshold, stats["threshold"], rtol=rtol)
    np.testing.assert_allclose(state.stats.clipped_fraction, stats["fraction"], rtol=1e-6)


def recorded_run(seed=0):
    """Params drifting slowly; gradients quiet, with x100-x1000 spikes and one NaN step."""
    rng = np.random.default_rng(seed)
    params = tree_of(SHAPES, lambda s: rng.normal(size=s).astype(np.float32))
    steps = []
    for t, factor in enumerate([1] * 6 + [100, 1, 1000, 300, 1, None] + [1] * 10):
        params = jax.tree.map(
            lambda p: (p + 0.01 * rng.normal(size=p.shape)).astype(np.float32), params
        )
        grads = tree_of(SHAPES, lambda s: (0.002 * rng.normal(size=s)).astype(np.float32))
        if factor is None:
            grads["conv"]["kernel"][0, 1, 1, 2] = np.nan
        else:
            scale = factor * (1.0 + 0.5 * (t % 3))
            grads = jax.tree.map(lambda g, a=scale: (g * a).astype(np.float32), grads)
        steps.append((grads, params))
    return steps


def test_matches_float64_reference_step_by_step_through_spikes_and_nan():
    tx = optaxclip.adaptive_grad_clip(0.02)
    update = jax.jit(tx.update)
    state = tx.init(recorded_run()[0][1])
    for t, (grads, params) in enumerate(recorded_run()):
        out, state = update(grads, state, params)
        assert int(state.stats.steps) == t + 1
        if not all(np.isfinite(g).all() for g in jax.tree.leaves(grads)):
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
                np.testing.assert_array_equal(a, b)  # propagate: untouched
            assert math.isnan(float(state.stats.pre_clip_norm))
            assert float(state.stats.clipped_fraction) == 0.0
            continue
        expected, stats = agc_reference(grads, params, PRESET_AXES["flax"], 0.02, 1e-3)
        assert_matches_reference(out, state, expected, stats)


def clip_cases(cases):
    """Runs ``(clipper, grads, params)`` cases in one jitted program (one compilation)."""

    @jax.jit
    def run(inputs):
        return [
            tx.update(g, tx.init(p), p) for (tx, _, _), (g, p) in zip(cases, inputs, strict=True)
        ]

    return run([(g, p) for _, g, p in cases])


def clip_with_each(transforms, grads, params):
    return clip_cases([(tx, grads, params) for tx in transforms])


def test_every_preset_pytree_spec_and_callable_equals_the_manual_unit_computation():
    grads, params = recorded_run(seed=1)[0]
    rng = np.random.default_rng(11)  # spread the magnitudes so that some units are clipped
    grads = jax.tree.map(lambda g: g * 10 ** rng.uniform(0, 3, g.shape).astype(np.float32), grads)
    mixed_axes = {"dense": {"kernel": (1,), "bias": (0,)}, "conv": {"kernel": (0, 1, 2)},
                  "attn_out": {"kernel": (0, 1)}, "gain": ()}  # fmt: skip
    mixed_spec = {"dense": {"kernel": -1, "bias": "whole"}, "conv": "flax",
                  "attn_out": (1, 0), "gain": ()}  # fmt: skip

    def from_path(path, leaf):
        return (1,) if "dense" in jax.tree_util.keystr(path) and leaf.ndim == 2 else "flax"

    cases = [(preset, PRESET_AXES[preset]) for preset in ("flax", "equinox", "torch", "whole")]
    cases += [(mixed_spec, mixed_axes), (from_path, mixed_axes)]
    results = clip_with_each(
        [optaxclip.adaptive_grad_clip(0.05, unit_axes=spec) for spec, _ in cases], grads, params
    )
    for (_, axes), (out, state) in zip(cases, results, strict=True):
        expected, stats = agc_reference(grads, params, axes, 0.05, 1e-3)
        assert 0 < stats["fraction"] < 1
        assert_matches_reference(out, state, expected, stats)


def unit_norms_np(x, axis):
    return np.sqrt(np.sum(np.float64(x) ** 2, axis=axis))


def test_equinox_layout_clips_rows_flax_layout_clips_columns_and_flax_default_is_wrong_for_rows():
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(3, 6)).astype(np.float32)  # Equinox Linear: (out, in)
    grad = (rng.normal(size=(3, 6)) * np.array([[0.001], [1.0], [0.02]])).astype(np.float32)
    clip = 0.05
    eqx_tx = optaxclip.adaptive_grad_clip(clip, unit_axes="equinox")
    flax_tx = optaxclip.adaptive_grad_clip(clip)
    (eqx_out, _), (flax_out, _), (wrong, _) = clip_cases(
        [
            (eqx_tx, {"w": grad}, {"w": weight}),
            (flax_tx, {"k": grad.T}, {"k": weight.T}),  # the same layer stored the Flax way
            (flax_tx, {"w": grad}, {"w": weight}),  # the Flax default on the Equinox layout
        ]
    )
    row_limits = clip * unit_norms_np(weight, 1)
    row_norms = unit_norms_np(grad, 1)
    expected = np.float64(grad) * np.minimum(1, row_limits / row_norms)[:, None]
    np.testing.assert_allclose(eqx_out["w"], expected, rtol=1e-6)
    np.testing.assert_array_equal(eqx_out["w"][0], grad[0])  # a quiet row is untouched

    # The same layer stored the Flax way, (in, out), is clipped per column by the default.
    np.testing.assert_allclose(flax_out["k"], expected.T, rtol=1e-6)

    # The Flax default on the Equinox layout would clip per input feature: not the same.
    assert not np.allclose(wrong["w"], expected, rtol=1e-3)


def test_attention_projection_and_embedding_units_by_pytree_spec():
    rng = np.random.default_rng(4)
    params = {
        "embed": rng.normal(size=(10, 4)).astype(np.float32),  # (vocab, dim)
        "out_proj": rng.normal(size=(2, 3, 5)).astype(np.float32),  # (heads, head_dim, out)
    }
    grads = jax.tree.map(lambda p: (0.001 * rng.normal(size=p.shape)).astype(np.float32), params)
    grads["embed"][7] *= 1e4  # one token's row spikes
    grads["out_proj"][:, :, 2] *= 1e4  # one output unit spikes
    tx = optaxclip.adaptive_grad_clip(0.01, unit_axes={"embed": "torch", "out_proj": (0, 1)})
    out, state = clip_once(tx, grads, params)
    embed = np.asarray(out["embed"])
    for token in range(10):
        if token == 7:
            np.testing.assert_allclose(
                unit_norms_np(embed[token], 0),
                0.01 * unit_norms_np(params["embed"][token], 0),
                rtol=1e-6,
            )
        else:
            np.testing.assert_array_equal(embed[token], grads["embed"][token])
    proj = np.asarray(out["out_proj"])
    np.testing.assert_allclose(
        unit_norms_np(proj[:, :, 2], (0, 1)),
        0.01 * unit_norms_np(params["out_proj"][:, :, 2], (0, 1)),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(proj[:, :, [0, 1, 3, 4]], grads["out_proj"][:, :, [0, 1, 3, 4]])
    np.testing.assert_allclose(state.stats.clipped_fraction, 2 / 15)


RANKED = {"v": (7,), "m": (4, 6), "t": (2, 3, 4), "c3": (2, 1, 2, 2, 3)}
RANDOM_PRESETS = ("flax", "equinox", "whole")
RANDOM_CLIPPERS = [optaxclip.adaptive_grad_clip(0.1, 1e-3, unit_axes=p) for p in RANDOM_PRESETS]


@jax.jit
def clip_random_case(grads, params):
    return [tx.update(grads, tx.init(params), params)[0] for tx in RANDOM_CLIPPERS]


@given(
    seed=st.integers(0, 2**32 - 1),
    grad_exponent=st.floats(-5.0, 4.0),
    param_exponent=st.floats(-6.0, 2.0),
)
def test_after_clipping_unit_ratio_is_bounded_and_units_under_the_limit_are_bitwise_unchanged(
    seed, grad_exponent, param_exponent
):
    rng = np.random.default_rng(seed)
    clipping, eps = 0.1, 1e-3
    params = tree_of(RANKED, lambda s: (10**param_exponent * rng.normal(size=s)).astype(np.float32))
    # Units get different magnitudes so that some are clipped and some are not.
    grads = tree_of(
        RANKED,
        lambda s: (
            10 ** (grad_exponent + rng.uniform(-2, 2, size=s[-1:] or ())) * rng.normal(size=s)
        ).astype(np.float32),
    )
    for preset, out in zip(RANDOM_PRESETS, clip_random_case(grads, params), strict=True):
        for key, shape in RANKED.items():
            axes = optaxclip.unit_reduction_axes(preset, len(shape))
            g, o, w = np.float64(grads[key]), np.float64(out[key]), np.float64(params[key])
            limit = clipping * np.maximum(np.sqrt(np.sum(w**2, axis=axes)), eps)
            g_norm = np.sqrt(np.sum(g**2, axis=axes))
            o_norm = np.sqrt(np.sum(o**2, axis=axes))
            assert np.all(o_norm <= limit * (1 + 1e-5))
            under = np.broadcast_to(np.expand_dims(g_norm <= limit * (1 - 1e-5), axes), g.shape)
            np.testing.assert_array_equal(np.asarray(out[key])[under], grads[key][under])
            assert out[key].dtype == grads[key].dtype


# Leaves that share a unit size in several layouts, so that AGC reduces them together: unit
# size 5 by columns (a, b, j), by rows (c, d), 10 by transposed rows (e, f) and by columns (g),
# scalars (h, i), and a leaf too large to join (big). Axes to reduce over, per leaf:
JOINED_AXES = {"a": (0,), "b": (0,), "c": (1,), "d": (1,), "e": (0, 2), "f": (0, 2), "g": (0,),
               "h": (), "i": (), "j": (0,), "big": (0,)}  # fmt: skip
JOINED_SHAPES = {"a": (5, 4), "b": (5, 7), "c": (4, 5), "d": (7, 5), "e": (2, 3, 5),
                 "f": (5, 3, 2), "g": (10,), "h": (), "i": (), "j": (5,), "big": (4, 20000)}  # fmt: skip
JOINED_CLIPPING = {k: 0.01 * (1 + i) for i, k in enumerate(sorted(JOINED_SHAPES))}
JOINED_CLIPPERS = [
    optaxclip.adaptive_grad_clip(0.05, unit_axes=JOINED_AXES),
    optaxclip.adaptive_grad_clip(JOINED_CLIPPING, unit_axes=JOINED_AXES),
    optaxclip.adaptive_grad_clip(lambda step: 0.05 + 0 * step, unit_axes=JOINED_AXES),
]


@jax.jit
def clip_joined_case(grads, params):
    return [tx.update(grads, tx.init(params), params) for tx in JOINED_CLIPPERS]


@given(
    seed=st.integers(0, 2**32 - 1),
    exponents=st.lists(st.sampled_from([-16.0, -3.0, 0.0, 2.0, 25.0]), min_size=11, max_size=11),
)
def test_leaves_reduced_together_match_the_reference_leaf_by_leaf(seed, exponents):
    # Unit norms of leaves joined into one reduction must come back to the right units, with
    # per-leaf clipping values, and with the overflow/underflow rescue (1e25 squares to inf
    # in float32, sums of squares of 1e-16 lose bits to underflow) taken by some of them.
    rng = np.random.default_rng(seed)
    keys = sorted(JOINED_SHAPES)
    scale = dict(zip(keys, exponents, strict=True))
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in JOINED_SHAPES.items()}
    grads = {
        k: (10 ** (scale[k] + rng.uniform(-1, 1, size=s)) * rng.normal(size=s)).astype(np.float32)
        for k, s in JOINED_SHAPES.items()
    }
    results = clip_joined_case(grads, params)
    for clipping, (out, state) in zip([0.05, JOINED_CLIPPING, 0.05], results, strict=True):
        expected, stats = agc_reference(grads, params, JOINED_AXES, clipping, 1e-3)
        assert_matches_reference(out, state, expected, stats)


def test_exclusion_passes_leaves_through_bitwise_and_leaves_them_out_of_stats():
    rng = np.random.default_rng(5)
    params = {"body": rng.normal(size=(4, 3)).astype(np.float32),
              "head": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                       "bias": np.zeros(2, np.float32)}}  # fmt: skip
    grads = jax.tree.map(lambda p: (100 * rng.normal(size=p.shape)).astype(np.float32), params)
    body_only, _ = agc_reference({"body": grads["body"]}, {"body": params["body"]},
                                 {"body": (0,)}, 0.01, 1e-3)  # fmt: skip
    as_mask = {"body": False, "head": True}

    def as_function(path, leaf):
        return "head" in jax.tree_util.keystr(path)

    clippers = [optaxclip.adaptive_grad_clip(0.01, exclude=e) for e in (as_mask, as_function)]
    for out, state in clip_with_each(clippers, grads, params):
        np.testing.assert_array_equal(out["head"]["kernel"], grads["head"]["kernel"])
        np.testing.assert_array_equal(out["head"]["bias"], grads["head"]["bias"])
        np.testing.assert_allclose(out["body"], body_only["['body']"], rtol=1e-6)
        np.testing.assert_allclose(
            state.stats.pre_clip_norm, np.linalg.norm(np.float64(grads["body"])), rtol=1e-6
        )
        assert float(state.stats.clipped_fraction) == 1.0


def test_everything_excluded_is_the_identity():
    params = {"w": jnp.ones(3)}
    tx = optaxclip.adaptive_grad_clip(0.01, exclude=True)
    grads = {"w": jnp.full(3, 1e3)}
    out, state = clip_once(tx, grads, params)
    np.testing.assert_array_equal(out["w"], grads["w"])
    assert int(state.stats.steps) == 1


def test_update_without_params_says_agc_needs_them():
    tx = optaxclip.adaptive_grad_clip()
    grads = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"tx\.update\(grads, state, params\)"):
        tx.update(grads, tx.init(grads))


def test_params_that_do_not_mirror_the_gradients_are_named():
    tx = optaxclip.adaptive_grad_clip()
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        tx.update({"a": jnp.ones(3), "c": jnp.ones(2)}, state, params)
    with pytest.raises(ValueError, match=r"\['b'\].*shape"):
        tx.update({"a": jnp.ones(3), "b": jnp.ones(3)}, state, params)


def test_zero_params_are_floored_at_eps():
    clipping, eps = 0.01, 1e-3
    params = {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}
    grads = {"kernel": jnp.ones((3, 2)), "bias": jnp.full(2, 1e-6)}
    tx = optaxclip.adaptive_grad_clip(clipping, eps)
    out, state = clip_once(tx, grads, params)
    np.testing.assert_allclose(np.linalg.norm(out["kernel"], axis=0), clipping * eps, rtol=1e-6)
    np.testing.assert_array_equal(out["bias"], grads["bias"])  # 1.4e-6 < 1e-5: untouched
    np.testing.assert_allclose(state.stats.threshold, clipping * eps, rtol=1e-6)


def test_zero_gradient_and_zero_params_give_zeros_and_finite_derivatives():
    zeros = jnp.zeros((3, 2))
    tx = optaxclip.adaptive_grad_clip(0.0, eps=0.0)

    def clipped_sum(g, w):
        return jnp.sum(tx.update({"w": g}, tx.init({"w": w}), {"w": w})[0]["w"])

    @jax.jit
    def run(g):
        out, state = tx.update({"w": g}, tx.init({"w": zeros}), {"w": zeros})
        # Derivatives at a zero gradient, with zero and with nonzero weights.
        derivatives = [jax.grad(clipped_sum)(g, w) for w in (zeros, jnp.ones((3, 2)))]
        return out, state.stats.post_clip_norm, derivatives

    out, post, derivatives = run(zeros)
    np.testing.assert_array_equal(out["w"], np.zeros((3, 2)))
    assert float(post) == 0.0
    for derivative in derivatives:
        assert np.all(np.isfinite(derivative))


def test_clipping_zero_zeroes_every_unit_even_one_whose_norm_rounds_to_zero():
    # Entries of 1e-30 square to 0 in float32, so that unit's norm reads 0; the limit 0 must
    # still zero it (limit_i = 0 allows no gradient at all).
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    grads = {"w": jnp.array([[1e-30, 1.0]] * 3, jnp.float32), "b": jnp.array([1e-30, 0.0])}
    tx = optaxclip.adaptive_grad_clip(0.0)
    out, state = clip_once(tx, grads, params)
    np.testing.assert_array_equal(out["w"], np.zeros((3, 2)))
    np.testing.assert_array_equal(out["b"], np.zeros(2))
    assert float(state.stats.post_clip_norm) == 0.0
    assert state.stats.clipped_fraction == np.float32(1 / 3)  # only the unit of norm sqrt(3)


def test_huge_float32_units_are_clipped_exactly_not_zeroed():
    params = {"w": jnp.ones((4, 2))}
    grads = {"w": jnp.array([[1e30, 1e-3]] * 4, jnp.float32)}  # column 0 overflows when squared
    tx = optaxclip.adaptive_grad_clip(0.5)
    out, state = clip_once(tx, grads, params)
    np.testing.assert_allclose(np.linalg.norm(out["w"][:, 0]), 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(out["w"][:, 1], grads["w"][:, 1])
    np.testing.assert_allclose(state.stats.pre_clip_norm, 2e30, rtol=1e-6)


@pytest.mark.parametrize("under_jit", [False, True])
def test_units_past_2_to_126_times_their_limit_are_clipped_not_zeroed(under_jit):
    # limit / norm = 2e-40 is subnormal: XLA:CPU flushes such a ratio to 0, which would zero
    # the unit instead of scaling it to its limit.
    params = {"w": jnp.ones((4, 2))}
    grads = {"w": jnp.array([[1e38, 1e-3], [-1e38, 1e-3], [1e30, 0.0], [0.0, 0.0]], jnp.float32)}
    tx = optaxclip.adaptive_grad_clip(0.01)
    update = jax.jit(tx.update) if under_jit else tx.update
    out, state = update(grads, tx.init(params), params)
    column = np.float64(np.asarray(grads["w"])[:, 0])
    expected = column * (0.01 * 2.0 / np.linalg.norm(column))
    np.testing.assert_allclose(np.asarray(out["w"])[:, 0], expected, rtol=1e-6, atol=1.2e-38)
    np.testing.assert_array_equal(out["w"][:, 1], grads["w"][:, 1])
    np.testing.assert_allclose(
        state.stats.post_clip_norm, math.hypot(0.02, math.sqrt(2) * 1e-3), rtol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_leaves_keep_their_dtype_and_match_the_reference(dtype):
    rng = np.random.default_rng(6)
    params = {"w": jnp.asarray(rng.normal(size=(8, 3)), dtype)}
    grads = {"w": jnp.asarray(rng.normal(size=(8, 3)) * [[0.01, 1.0, 100.0]], dtype)}
    tx = optaxclip.adaptive_grad_clip(0.1)
    out, _ = clip_once(tx, grads, params)
    assert out["w"].dtype == dtype
    expected, _ = agc_reference({"w": np.float32(grads["w"])}, {"w": np.float32(params["w"])},
                                {"w": (0,)}, 0.1, 1e-3)  # fmt: skip
    np.testing.assert_allclose(np.float32(out["w"]), expected["['w']"], rtol=1e-2)


def test_nonfinite_policies_zero_and_error():
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.array([[jnp.nan, 1.0], [1.0, 1.0]])}
    zero = optaxclip.adaptive_grad_clip(nonfinite="zero")
    out, state = clip_once(zero, grads, params)
    np.testing.assert_array_equal(out["w"], np.zeros((2, 2)))
    assert float(state.stats.post_clip_norm) == 0.0
    error = optaxclip.adaptive_grad_clip(nonfinite="error")
    with pytest.raises(Exception, match=r"\['w'\]"):
        out, _ = clip_once(error, grads, params)
        jax.block_until_ready(out)


@functools.cache
def _sharded_case():
    rng = np.random.default_rng(7)
    params = {"k": rng.normal(size=(8, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    grads = {"k": (rng.normal(size=(8, 4)) * [0.01, 1.0, 0.1, 5.0]).astype(np.float32),
             "b": np.full(4, 0.5, np.float32)}  # fmt: skip
    tx = optaxclip.adaptive_grad_clip(0.05)
    whole, whole_state = clip_once(tx, grads, params)
    assert 0 < float(whole_state.stats.clipped_fraction) < 1
    return params, grads, whole, whole_state


@pytest.mark.parametrize(
    ("kernel_layout", "split_dim"),
    [(P("d", None), 0), (P(None, "d"), 1)],
    ids=["reduced-dim", "unit-dim"],
)
def test_sharded_leaf_equals_the_unsharded_clip(kernel_layout, split_dim):
    """Two "devices" (vmap with an axis name) each hold half of the (in, out) kernel."""
    params, grads, whole, whole_state = _sharded_case()
    tx = optaxclip.adaptive_grad_clip(0.05, axis_name="d", layout={"k": kernel_layout, "b": P()})

    def split(tree):
        return {
            "k": np.stack(np.split(tree["k"], 2, axis=split_dim)),
            "b": np.stack([tree["b"]] * 2),
        }

    def per_device(g, p):
        return tx.update(g, tx.init(p), p)

    out, state = jax.jit(jax.vmap(per_device, axis_name="d"))(split(grads), split(params))
    np.testing.assert_allclose(
        np.concatenate(list(out["k"]), axis=split_dim), whole["k"], rtol=1e-6
    )
    np.testing.assert_allclose(out["b"][0], whole["b"], rtol=1e-6)
    for field in ("pre_clip_norm", "post_clip_norm", "threshold", "clipped_fraction"):
        for device in range(2):
            np.testing.assert_allclose(
                getattr(state.stats, field)[device], getattr(whole_state.stats, field), rtol=1e-6
            )


def test_split_leaf_without_a_per_dimension_layout_is_refused_with_its_path():
    params, grads, _, _ = _sharded_case()
    tx = optaxclip.adaptive_grad_clip(0.05, axis_name="d", layout={"k": ("d",), "b": P()})

    def per_device(g, p):
        return tx.update(g, tx.init(p), p)

    halves = {"k": np.stack(np.split(grads["k"], 2)), "b": np.stack([grads["b"]] * 2)}
    weights = {"k": np.stack(np.split(params["k"], 2)), "b": np.stack([params["b"]] * 2)}
    with pytest.raises(ValueError, match=r"\['k'\].*PartitionSpec"):
        jax.vmap(per_device, axis_name="d")(halves, weights)


def test_vmap_over_independent_runs_equals_a_loop_of_runs():
    rng = np.random.default_rng(8)
    tx = optaxclip.adaptive_grad_clip(0.05)
    params = rng.normal(size=(3, 4, 2)).astype(np.float32)
    grads = (rng.normal(size=(3, 4, 2)) * rng.lognormal(size=(3, 1, 2))).astype(np.float32)
    runs = batched(tx)
    out, states = jax.jit(runs.update)(grads, runs.init(params), params)
    single = jax.jit(tx.update)
    for run in range(3):
        expected, state = single(grads[run], tx.init(params[run]), params[run])
        np.testing.assert_allclose(out[run], expected, rtol=1e-6)
        np.testing.assert_allclose(states.stats.clipped_fraction[run], state.stats.clipped_fraction)


def test_multisteps_clips_the_accumulated_gradient_and_counts_real_steps():
    k = 3
    inner = optaxclip.adaptive_grad_clip(0.05)
    tx = optax.MultiSteps(optax.chain(inner, optax.sgd(1.0)), every_k_schedule=k)
    rng = np.random.default_rng(9)
    params = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    micro = rng.normal(size=(2 * k, 4, 2)).astype(np.float32)
    results = run_updates(tx, params, [jnp.asarray(g) for g in micro])
    emitted = [updates for updates, _ in results]
    state = results[-1][1]
    for step in range(2):
        mean = micro[step * k : (step + 1) * k].mean(axis=0)
        expected, _ = agc_reference({"p": mean}, {"p": params}, {"p": (0,)}, 0.05, 1e-3)
        np.testing.assert_allclose(emitted[(step + 1) * k - 1], -expected["['p']"], rtol=1e-5)
    assert int(optaxclip.clip_stats(state)["adaptive_grad_clip/steps"]) == 2


def test_nnx_optimizer_step_reports_stats():
    from flax import nnx

    model, optimizer = nnx_linear(optax.chain(optaxclip.adaptive_grad_clip(0.01), optax.sgd(1.0)))
    x, y = jnp.ones((4, 3)), jnp.full((4, 2), 5.0)
    before = {k: np.asarray(v) for k, v in nnx.as_pure(nnx.state(model, nnx.Param)).items()}
    grads = nnx_train_step(lambda m: jnp.mean((m(x) - y) ** 2))(model, optimizer)
    stats = optaxclip.clip_stats(optimizer)
    grads = {k: np.asarray(v) for k, v in grads.items()}
    axes = {"bias": (0,), "kernel": (0,)}
    expected, ref_stats = agc_reference(grads, before, axes, 0.01, 1e-3)
    after = {k: np.asarray(v) for k, v in nnx.as_pure(nnx.state(model, nnx.Param)).items()}
    for k in ("bias", "kernel"):
        np.testing.assert_allclose(after[k], before[k] - expected[f"['{k}']"], rtol=1e-5, atol=1e-7)
    assert int(stats["adaptive_grad_clip/steps"]) == 1
    np.testing.assert_allclose(
        stats["adaptive_grad_clip/pre_clip_norm"], ref_stats["pre"], rtol=1e-5
    )
    np.testing.assert_allclose(stats["adaptive_grad_clip/clipped_fraction"], ref_stats["fraction"])


def test_orbax_restore_midway_continues_bit_identically(tmp_path):
    tx = optax.chain(optaxclip.adaptive_grad_clip(0.02), optax.adam(1e-2))
    steps = [g["dense"] for g, _ in recorded_run(seed=10)[:12]]
    steps = [g for g in steps if all(np.isfinite(x).all() for x in jax.tree.leaves(g))]
    params = recorded_run(seed=10)[0][1]["dense"]
    full, resumed = resume_from_checkpoint(tx, params, steps, 5, tmp_path / "ckpt")
    assert jax.tree.structure(resumed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clipping": -0.1}, ValueError, "clipping"),
        ({"clipping": math.nan}, ValueError, "clipping"),
        ({"clipping": {"w": -1.0}}, ValueError, r"clipping=\.\.\.\) at leaf \['w'\]"),
        ({"eps": -1e-3}, ValueError, "eps"),
        ({"unit_axes": "pytorch"}, ValueError, "unit_axes.*pytorch"),
        ({"unit_axes": {"w": "rows"}}, ValueError, "unit_axes.*rows"),
        ({"unit_axes": 1.5}, TypeError, "unit_axes"),
        ({"unit_axes": None}, TypeError, "unit_axes"),
        ({"exclude": {"w": 1}}, TypeError, r"exclude at \['w'\]"),
        ({"nonfinite": "skip"}, ValueError, "nonfinite"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.adaptive_grad_clip(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exclude": {"body": False, "tail": True}}, r"exclude.*\['tail'\]"),
        ({"exclude": {"body": False}}, r"exclude.*\['head'\]"),
        ({"unit_axes": {"body": "flax", "heads": "flax"}}, r"unit_axes.*\['heads'\]"),
        ({"unit_axes": {"body": (2,), "head": "flax"}}, r"unit_axes at leaf \['body'\].*axis 2"),
        (
            {"unit_axes": {"body": (0, -2), "head": "flax"}},
            r"unit_axes at leaf \['body'\].*repeated",
        ),
        ({"clipping": {"body": 0.1}}, r"clipping"),
    ],
)
def test_specs_that_do_not_fit_the_parameters_are_named_at_init(kwargs, match):
    params = {"body": jnp.ones((3, 2)), "head": jnp.ones(2)}
    tx = optaxclip.adaptive_grad_clip(**kwargs)
    with pytest.raises(ValueError, match=match):
        tx.init(params)


def test_unit_reduction_axes_presets_by_rank():
    assert optaxclip.unit_reduction_axes("flax", 0) == ()
    assert optaxclip.unit_reduction_axes("flax", 1) == (0,)
    assert optaxclip.unit_reduction_axes("flax", 3) == (0, 1)
    assert optaxclip.unit_reduction_axes("flax", 5) == (0, 1, 2, 3)
    assert optaxclip.unit_reduction_axes("equinox", 4) == (1, 2, 3)
    assert optaxclip.unit_reduction_axes("whole", 3) == (0, 1, 2)


# --- Optax's ``axis`` ---------------------------------------------------------------------


def _ones(shape, value=1.0):
    return np.full(shape, value, np.float32)


def _arange(shape):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _normal(shape, seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


# The adaptive_grad_clip cases of Optax's own tests (optax/transforms/_clipping_test.py), as
# (grads, params, clipping values applied in turn, axis, the axes reduced, written by hand).
# A case with several clipping values feeds each output back in, as Optax's test does to
# show that clipping again does not drift. Two cases where our "flax" preset differs from
# Optax's rule by shape (rank 3, a (1, n) kernel) are added with random values.
OPTAX_AXIS_CASES = {
    "conv3d-spatial-axes": (
        {"w": _ones((2, 2, 2, 3, 4), 2.0)}, {"w": _ones((2, 2, 2, 3, 4))}, [0.5], (0, 1, 2),
        {"w": (0, 1, 2)},
    ),
    "conv3d-spatial-axes-under-the-limit": (
        {"w": _ones((2, 2, 2, 3, 4), 0.1)}, {"w": _ones((2, 2, 2, 3, 4))}, [2.0], (0, 1, 2),
        {"w": (0, 1, 2)},
    ),
    "conv3d-by-shape": (
        {"w": _ones((2, 2, 2, 3, 4), 2.0)}, {"w": _ones((2, 2, 2, 3, 4))}, [0.5], None,
        {"w": (0, 1, 2, 3)},
    ),
    "linear-by-shape": (
        {"w": _ones((5, 6), 3.0)}, {"w": _ones((5, 6))}, [0.5], None, {"w": (0,)},
    ),
    "square-by-shape": (
        {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}, {"w": _ones((2, 2))}, [1.0],
        None, {"w": (0,)},
    ),
    "rank5-channel-axes": (
        {"w": _arange((2, 2, 2, 3, 4))}, {"w": _ones((2, 2, 2, 3, 4))}, [0.5], (3, 4),
        {"w": (3, 4)},
    ),
    "rank5-last-axis": (
        {"w": _arange((2, 2, 2, 3, 4))}, {"w": _ones((2, 2, 2, 3, 4))}, [0.5], -1,
        {"w": (4,)},
    ),
    "rank6-leading-axes": (
        {"w": _ones((2,) * 6, 2.0)}, {"w": _ones((2,) * 6)}, [0.5], (0, 1, 2),
        {"w": (0, 1, 2)},
    ),
    "vectors-clipped-again-and-again": (
        {"a": np.array([500.0, 5.0], np.float32), "b": np.array([300.0, 3.0], np.float32)},
        {"a": np.array([1.0, 2.0], np.float32), "b": np.array([3.0, 4.0], np.float32)},
        [1.0, 1 / 2, 1 / 3, 1 / 10, 1 / 50], None, {"a": (0,), "b": (0,)},
    ),
    "rank3-by-shape": (
        {"w": _normal((3, 4, 5), 21, 3.0)}, {"w": _normal((3, 4, 5), 22)}, [0.2], None,
        {"w": (0,)},
    ),
    "row-kernel-by-shape": (
        {"w": _normal((1, 6), 23, 3.0)}, {"w": _normal((1, 6), 24)}, [0.2], None,
        {"w": (0, 1)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(OPTAX_AXIS_CASES))
def test_axis_cases_from_optax_tests_match_optax_adaptive_grad_clip(case):
    grads, params, clippings, axis, reduced = OPTAX_AXIS_CASES[case]
    theirs = ours_keyword = ours_positional = grads
    for clipping in clippings:
        expected, _ = optax.adaptive_grad_clip(clipping, 1e-3, axis).update(theirs, None, params)
        # Optax's value is the reference where it agrees with the NFNets equations in float64.
        reference, _ = agc_reference(theirs, params, reduced, clipping, 1e-3)
        for key, value in by_path(expected).items():
            np.testing.assert_allclose(value, reference[key], rtol=1e-6, err_msg=key)
        (ours_keyword, _), (ours_positional, _) = clip_cases(
            [
                (optaxclip.adaptive_grad_clip(clipping, 1e-3, axis=axis), ours_keyword, params),
                (optaxclip.adaptive_grad_clip(clipping, 1e-3, axis), ours_positional, params),
            ]
        )
        for ours in (ours_keyword, ours_positional):
            for key in grads:
                np.testing.assert_allclose(ours[key], expected[key], rtol=1e-6, err_msg=key)
        theirs = expected
    if case.endswith("under-the-limit"):
        np.testing.assert_array_equal(ours_keyword["w"], grads["w"])


def test_axis_none_refuses_a_rank_6_leaf_as_optax_does_naming_the_leaf():
    params = {"deep": jnp.ones((2, 1, 2, 3, 2, 2))}
    with pytest.raises(ValueError):
        optax.adaptive_grad_clip(0.3, axis=None).update(params, None, params)
    tx = optaxclip.adaptive_grad_clip(0.3, axis=None)
    with pytest.raises(ValueError, match=r"^adaptive_grad_clip\(axis=\.\.\.\).*\['deep'\].*rank"):
        tx.init(params)


def test_axis_positional_and_keyword_equal_unit_axes_naming_the_same_axes():
    params = {"qkv": _normal((4, 3, 5), 31)}
    # Units are indexed by axis 1; the first is quiet, the others are clipped.
    grads = {"qkv": _normal((4, 3, 5), 33) * np.float32([0.01, 1.0, 10.0])[:, None]}
    spellings = [
        optaxclip.adaptive_grad_clip(0.2, 1e-4, (2, 0)),
        optaxclip.adaptive_grad_clip(0.2, 1e-4, axis=(0, -1)),
        optaxclip.adaptive_grad_clip(0.2, 1e-4, unit_axes=(0, 2)),
        optaxclip.adaptive_grad_clip(0.2, 1e-4, (0, 2), unit_axes=(2, 0)),
    ]
    expected, stats = agc_reference(grads, params, {"qkv": (0, 2)}, 0.2, 1e-4)
    assert 0 < stats["fraction"] < 1
    for out, state in clip_with_each(spellings, grads, params):
        assert_matches_reference(out, state, expected, stats, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"axis": (1,), "unit_axes": "equinox"}, ValueError, "differ"),
        ({"axis": None, "unit_axes": "flax"}, ValueError, "differ"),
        ({"axis": 0, "unit_axes": "flax"}, ValueError, "differ"),
        ({"axis": (0, 1), "unit_axes": (1,)}, ValueError, "differ"),
        ({"axis": 2.0}, TypeError, "float"),
        ({"axis": [0, 1]}, TypeError, "list"),
        ({"axis": True}, TypeError, "bool"),
        ({"axis": jnp.asarray(1)}, TypeError, "static_args=\\('axis',\\)"),
    ],
)
def test_conflicting_or_malformed_axis_is_refused_naming_the_call(kwargs, error, match):
    with pytest.raises(error, match=r"^adaptive_grad_clip\(axis=\.\.\..*" + match):
        optaxclip.adaptive_grad_clip(0.05, **kwargs)


def test_axis_out_of_range_for_a_leaf_is_named_at_init_as_axis():
    tx = optaxclip.adaptive_grad_clip(0.05, axis=(0, 3))
    with pytest.raises(ValueError, match=r"^adaptive_grad_clip\(axis=\.\.\.\) at leaf \['k'\]"):
        tx.init({"k": jnp.ones((2, 3))})


def test_axis_through_inject_hyperparams_as_a_static_argument():
    params = {"k": _normal((4, 3), 41)}
    grads = {"k": _normal((4, 3), 42, 5.0)}
    tx = optax.inject_hyperparams(optaxclip.adaptive_grad_clip, static_args=("axis",))(
        clipping=0.15, axis=1
    )
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    expected, _ = agc_reference(grads, params, {"k": (1,)}, 0.15, 1e-3)
    np.testing.assert_allclose(out["k"], expected["['k']"], rtol=1e-6)
