"""Clippers at the edges of the float range and with thresholds that go bad at run time.

Finite gradients whose norm passes float32's largest number, leaves too small to square in
float32, float64 gradients with float64 thresholds, thresholds from schedules and
``inject_hyperparams`` that turn negative or NaN. References are float64 NumPy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import to_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip

F32_MAX = float(np.finfo(np.float32).max)

# Gradients of finite float32 entries whose 2-norm passes F32_MAX: a few entries of
# magnitude in [2.5e38, F32_MAX] beside ordinary ones.
HUGE = float(np.float32(2.5e38))
huge_entries = st.lists(
    st.floats(HUGE, F32_MAX, width=32) | st.floats(-F32_MAX, -HUGE, width=32),
    min_size=2,
    max_size=6,
)
ordinary_entries = st.lists(st.floats(-10.0, 10.0, width=32), min_size=1, max_size=4)
thresholds = st.floats(1e-3, 1e3)


def _huge_tree(big: list[float], small: list[float]) -> dict[str, jax.Array]:
    return {
        "big": jnp.asarray(np.array(big, np.float32)),
        "small": jnp.asarray(np.array(small, np.float32)),
    }


def _f64_norm(x: np.ndarray) -> float:
    """The 2-norm in float64 without overflow, for float32 magnitudes up to F32_MAX."""
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.sum(x * x))) if x.size else 0.0


def _assert_matches(actual: jax.Array, expected: np.ndarray, rtol: float = 2e-6) -> None:
    actual64 = to_f64(actual)
    assert np.all(np.isfinite(actual64))
    # Entries whose clipped value is subnormal in float32 may read 0 on CPU.
    atol = float(np.finfo(np.float32).tiny)
    np.testing.assert_allclose(actual64, expected, rtol=rtol, atol=atol)


@settings(deadline=None, max_examples=15)
@given(big=huge_entries, small=ordinary_entries, limit=thresholds)
@pytest.mark.parametrize("nonfinite", ["propagate", "zero", "error"])
def test_global_clip_of_finite_gradient_past_float32_range(nonfinite, big, small, limit):
    tree = _huge_tree(big, small)
    norm = math.hypot(_f64_norm(big), _f64_norm(small))
    assert norm > F32_MAX  # the case under test
    tx = optaxclip.clip_by_global_norm(limit, nonfinite=nonfinite)
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    for key in tree:
        _assert_matches(out[key], to_f64(tree[key]) * (limit / norm))
    assert float(state.stats.pre_clip_norm) == math.inf  # not representable: reads inf
    np.testing.assert_allclose(float(state.stats.post_clip_norm), limit, rtol=1e-5)
    assert float(state.stats.clipped_fraction) == 1.0


@settings(deadline=None, max_examples=15)
@given(big=huge_entries, small=ordinary_entries, limit=thresholds)
def test_per_leaf_clips_of_finite_leaves_past_float32_range(big, small, limit):
    tree = _huge_tree(big, small)
    leaf = optaxclip.clip_by_leaf_norm(limit)
    out, _ = jax.jit(leaf.update)(tree, leaf.init(tree))
    for key in tree:
        x = to_f64(tree[key])
        n = _f64_norm(x)
        _assert_matches(out[key], x * (limit / n if n > limit else 1.0))
    rms = optaxclip.clip_by_block_rms(limit)
    out, _ = jax.jit(rms.update)(tree, rms.init(tree))
    for key in tree:
        x = to_f64(tree[key])
        r = _f64_norm(x) / math.sqrt(x.size)
        _assert_matches(out[key], x * (limit / r if r > limit else 1.0))


@settings(deadline=None, max_examples=10)
@given(big=huge_entries, limit=st.floats(1e-2, 1e2))
def test_agc_clips_units_of_finite_entries_past_float32_range(big, limit):
    column = np.array(big, np.float32)
    grads = {"w": jnp.asarray(np.stack([column, np.ones_like(column)], axis=1))}
    params = {"w": jnp.ones_like(grads["w"])}
    tx = optaxclip.adaptive_grad_clip(limit)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g = to_f64(grads["w"])
    unit_limit = limit * math.sqrt(len(big))  # clipping * ||w_unit||, w all ones
    expected = np.stack(
        [g[:, k] * min(1.0, unit_limit / _f64_norm(g[:, k])) for k in range(2)], axis=1
    )
    _assert_matches(out["w"], expected)


ADAPTIVE = {
    "autoclip": lambda: optaxclip.autoclip(percentile=50.0),
    "zclip": lambda: optaxclip.zclip(warmup_steps=3),
    "quantile_clip": lambda: optaxclip.quantile_clip(initial_threshold=2.0),
    "adagc": lambda: optaxclip.adagc(warmup_steps=3),
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_clippers_clip_a_finite_gradient_past_float32_range(name):
    rng = np.random.default_rng(7)
    tree = {"a": jnp.ones(4, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    tx = ADAPTIVE[name]()
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for _ in range(6):
        ordinary = {
            k: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32) for k, v in tree.items()
        }
        _, state = update(ordinary, state)
    spike = {"a": jnp.full(4, 2e38, jnp.float32), "b": jnp.full(3, -1e38, jnp.float32)}
    out, state = update(spike, state)
    a, b = to_f64(out["a"]), to_f64(out["b"])
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    # Clipped along the gradient's own direction, to about the size of the ordinary norms.
    total = math.hypot(_f64_norm(a), _f64_norm(b))
    assert 0.0 < total < 20.0
    np.testing.assert_allclose(a / 2e38, a[0] / 2e38, rtol=1e-6)
    np.testing.assert_allclose(b / -1e38, b[0] / -1e38, rtol=1e-6)
    assert a[0] > 0 and b[0] < 0
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim:
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_guard_applies_the_clipped_step_of_a_finite_gradient_past_float32_range():
    params = {"w": jnp.zeros(3, jnp.float32)}
    grads = {"w": jnp.array([2.5e38, 2.5e38, -1e38], jnp.float32)}
    tx = optaxclip.skip_nonfinite(optax.chain(optaxclip.clip_by_global_norm(2.0), optax.sgd(0.5)))
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    g = to_f64(grads["w"])
    np.testing.assert_allclose(to_f64(updates["w"]), -0.5 * 2.0 * g / _f64_norm(g), rtol=2e-6)
    assert int(state.total_errors) == 0
    # A real Inf is still caught.
    bad = {"w": jnp.array([1.0, jnp.inf, 0.0], jnp.float32)}
    updates, state = jax.jit(tx.update)(bad, state, params)
    assert int(state.total_errors) == 1
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


@settings(deadline=None, max_examples=20)
@given(
    exponent=st.floats(-36.0, -20.0),  # entries >= 1e-37: normal float32 numbers
    entries=st.lists(st.floats(0.1, 1.0), min_size=1, max_size=8),
)
def test_per_leaf_norms_of_leaves_too_small_to_square_are_exact(exponent, entries):
    tiny = np.array(entries, np.float64) * 10.0**exponent
    tree = {"tiny": jnp.asarray(tiny.astype(np.float32)), "unit": jnp.ones(2, jnp.float32)}
    x = to_f64(tree["tiny"])
    expected = _f64_norm(x)
    norms = optaxclip.leaf_norms(tree)
    np.testing.assert_allclose(float(norms["tiny"]), expected, rtol=1e-5)
    # A threshold below that norm clips the leaf to it.
    limit = expected / 4
    tx = optaxclip.clip_by_leaf_norm(limit)
    out, _ = jax.jit(tx.update)(tree, tx.init(tree))
    np.testing.assert_allclose(
        to_f64(out["tiny"]), x * (limit / expected), rtol=1e-5, atol=np.finfo(np.float32).tiny
    )
    rms = optaxclip.clip_by_block_rms(limit)
    out, _ = jax.jit(rms.update)(tree, rms.init(tree))
    r = expected / math.sqrt(x.size)
    np.testing.assert_allclose(
        to_f64(out["tiny"]),
        x * (limit / r if r > limit else 1.0),
        rtol=1e-5,
        atol=np.finfo(np.float32).tiny,
    )


def test_all_zero_leaf_has_norm_zero_beside_tiny_ones():
    tree = {"zero": jnp.zeros(3), "tiny": jnp.full(2, 3e-30, jnp.float32)}
    norms = optaxclip.leaf_norms(tree)
    assert float(norms["zero"]) == 0.0
    np.testing.assert_allclose(float(norms["tiny"]), 3e-30 * math.sqrt(2), rtol=1e-6)


# Thresholds that go bad at run time: a negative one acts as 0, a NaN one as 0 too.
def _bad_schedule(bad: float):
    return lambda count: jnp.where(count >= 1, bad, 1.5)


RUNTIME_CLIPPERS = {
    "clip_by_global_norm": optaxclip.clip_by_global_norm,
    "clip_by_leaf_norm": optaxclip.clip_by_leaf_norm,
    "clip_by_block_rms": optaxclip.clip_by_block_rms,
    "clip_by_value": optaxclip.clip_by_value,
    "adaptive_grad_clip": optaxclip.adaptive_grad_clip,
}


def _grads_and_params():
    grads = {"w": jnp.array([[0.7, -2.0], [1.5, 0.3]], jnp.float32), "b": jnp.array([-0.4, 3.0])}
    return grads, jax.tree.map(jnp.ones_like, grads)


@pytest.mark.parametrize("bad", [-0.75, math.nan])
@pytest.mark.parametrize("name", sorted(RUNTIME_CLIPPERS))
def test_threshold_gone_bad_in_a_schedule_zeroes_the_update(name, bad):
    grads, params = _grads_and_params()
    tx = RUNTIME_CLIPPERS[name](_bad_schedule(bad))
    state = tx.init(params)
    first, state = jax.jit(tx.update)(grads, state, params)
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(first))
    second, state = jax.jit(tx.update)(grads, state, params)
    for x in jax.tree.leaves(second):
        # Zero, never the gradient's opposite nor the gradient itself.
        np.testing.assert_array_equal(np.abs(np.asarray(x)), 0.0)
    assert float(state.stats.threshold) == 0.0


@pytest.mark.parametrize("bad", [-2.0, math.nan])
@pytest.mark.parametrize("name", ["clip_by_global_norm", "clip_by_leaf_norm", "clip_by_value"])
def test_threshold_gone_bad_through_inject_hyperparams_zeroes_the_update(name, bad):
    grads, params = _grads_and_params()
    arg = {"clip_by_value": "max_delta"}.get(name, "max_norm")
    tx = optax.inject_hyperparams(RUNTIME_CLIPPERS[name])(**{arg: 1.0})
    state = tx.init(params)
    state.hyperparams[arg] = jnp.asarray(bad, jnp.float32)
    out, _ = jax.jit(tx.update)(grads, state, params)
    for x in jax.tree.leaves(out):
        np.testing.assert_array_equal(np.abs(np.asarray(x)), 0.0)


def test_float64_gradients_get_float64_thresholds():
    with jax.enable_x64(True):
        g = {"w": jnp.array([0.3, -0.25, 0.05], jnp.float64)}
        limit = 0.1  # not a float32 number
        out, _ = optaxclip.clip_by_value(limit).update(g, optaxclip.clip_by_value(limit).init(g))
        w = np.asarray(out["w"])
        assert w.dtype == np.float64
        assert w.max() == limit and w.min() == -limit

        tx = optaxclip.clip_by_global_norm(limit)
        out, _ = jax.jit(tx.update)(g, tx.init(g))
        x = np.asarray(g["w"], np.float64)
        np.testing.assert_allclose(np.asarray(out["w"]), x * limit / np.linalg.norm(x), rtol=1e-14)
        assert np.linalg.norm(np.asarray(out["w"])) <= limit * (1 + 2 * np.finfo(np.float64).eps)

        tx = optaxclip.clip_by_leaf_norm(optax.constant_schedule(limit))
        out, _ = jax.jit(tx.update)(g, tx.init(g))
        np.testing.assert_allclose(np.asarray(out["w"]), x * limit / np.linalg.norm(x), rtol=1e-14)


def test_subnormal_entries_below_the_threshold_come_back_or_flush_to_zero():
    smallest_normal = float(np.finfo(np.float32).tiny)
    x = np.array([1e-40, -3e-39, smallest_normal, -2.5, 7.0], np.float32)
    tree = {"w": jnp.asarray(x)}
    for tx in (optaxclip.clip_by_global_norm(100.0), optaxclip.clip_by_leaf_norm(100.0)):
        out = np.asarray(jax.jit(tx.update)(tree, tx.init(tree))[0]["w"])
        # Normal entries bit for bit; subnormal ones as given or 0 (the documented exception).
        np.testing.assert_array_equal(out[2:].view(np.uint32), x[2:].view(np.uint32))
        assert all(o == v or o == 0.0 for o, v in zip(out[:2], x[:2], strict=True))
