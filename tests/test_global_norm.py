"""clip_by_global_norm against float64 references, optax and PyTorch, and its properties."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import (
    NORM_RTOL,
    assert_close_to_ref,
    assert_leaves_match,
    assert_parallel,
    flush_atol,
    ref_clip_global,
    ref_global_norm,
    same_bits,
    to_f64,
    tree_dtype,
    unit_roundoff,
)
from helpers.runs import apply_once
from helpers.strategies import ORDS, RATIOS, gradient_trees
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

# Op by op: see conftest.eager_ops.
pytestmark = pytest.mark.usefixtures("eager_ops")

HIGH_PRECISION = (jnp.dtype(jnp.float32), jnp.dtype(jnp.complex64))


# --- agreement with the float64 reference on random trees ----------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_clip_by_global_norm_matches_float64_reference(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, state = apply_once(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    expected, norm, scale = ref_clip_global(tree, limit, p)
    assert_leaves_match(out, expected, tree)
    assert float(state.stats.pre_clip_norm) == pytest.approx(norm, rel=NORM_RTOL)
    assert float(state.stats.scale) == pytest.approx(scale, rel=NORM_RTOL)


# --- properties ------------------------------------------------------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_global_clip_output_norm_is_at_most_threshold(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, _ = apply_once(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    post = ref_global_norm(out, p)
    if all(x.dtype in HIGH_PRECISION for x in jax.tree.leaves(tree)):
        assert post <= limit * (1 + 1e-6)
    else:
        # fp16/bf16: every element is rounded into its dtype after scaling (relative u) and
        # may land on an fp16 subnormal (absolute flush_atol), so the bound grows by that.
        n = sum(x.size for x in jax.tree.leaves(tree))
        atol = max(flush_atol(x.dtype) for x in jax.tree.leaves(tree))
        slack = n ** (0 if p == math.inf else 1 / p) * atol
        assert post <= limit * (1 + 1e-6) * (1 + unit_roundoff(tree_dtype(tree))) + slack


@given(tree=gradient_trees(), p=st.sampled_from(ORDS), ratio=RATIOS)
def test_global_clip_preserves_direction(tree, p, ratio):
    limit = ratio * ref_global_norm(tree, p)
    out, _ = apply_once(optaxclip.clip_by_global_norm(limit, ord=p), tree)
    expected, _, _ = ref_clip_global(tree, limit, p)
    assert_parallel(jax.tree.leaves(out), jax.tree.leaves(tree), expected)


# --- specific cases and the optax contrasts ------------------------------------------------


def test_fp16_ones_are_scaled_to_threshold_where_optax_zeroes_them():
    tree = {"w": jnp.ones(100_000, jnp.float16)}
    ours, state = apply_once(optaxclip.clip_by_global_norm(1.0), tree)
    theirs, _ = apply_once(optax.clip_by_global_norm(1.0), tree)
    assert not np.any(to_f64(theirs["w"]))  # optax: fp16 norm overflows to inf, update zeroed
    assert float(state.stats.pre_clip_norm) == pytest.approx(math.sqrt(1e5), rel=NORM_RTOL)
    assert ours["w"].dtype == jnp.float16
    assert_close_to_ref(ours["w"], np.full(100_000, 1 / math.sqrt(1e5)), jnp.float16)


def test_float32_1e20_leaves_are_scaled_where_optax_zeroes_them():
    tree = {"a": jnp.full((4,), 2e19, jnp.float32), "b": jnp.full((2,), -1e20, jnp.float32)}
    ours, _ = apply_once(optaxclip.clip_by_global_norm(1.0), tree)
    theirs, _ = apply_once(optax.clip_by_global_norm(1.0), tree)
    assert not any(np.any(to_f64(x)) for x in jax.tree.leaves(theirs))  # optax: norm inf -> zeros
    expected, _, _ = ref_clip_global(tree, 1.0, 2.0)
    assert_leaves_match(ours, expected, tree)


def test_max_norm_zero_on_zero_gradient_gives_zeros_where_optax_gives_nan():
    tree = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2), jnp.float16)}
    theirs, _ = apply_once(optax.clip_by_global_norm(0.0), tree)
    assert np.all(np.isnan(to_f64(theirs["a"])))
    ours, state = apply_once(optaxclip.clip_by_global_norm(0.0), tree)
    assert all(same_bits(o, jnp.zeros_like(o)) for o in jax.tree.leaves(ours))
    assert float(state.stats.scale) == 1.0


def test_meta_gradient_at_zero_gradient_is_finite_where_optax_gives_nan():
    direction = jnp.array([3.0, 4.0])

    def summed(tx, s):
        return jnp.sum(tx.update({"a": s * direction}, tx.init({"a": direction}))[0]["a"])

    assert math.isnan(float(jax.grad(lambda s: summed(optax.clip_by_global_norm(1.0), s))(0.0)))
    # At s = 0 the gradient (0) is below the threshold, so the update is s * direction.
    ours = jax.grad(lambda s: summed(optaxclip.clip_by_global_norm(1.0), s))(0.0)
    assert float(ours) == pytest.approx(7.0)


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
            out, state = apply_once(optaxclip.clip_by_global_norm(max_norm, ord=p), tree)
            assert float(state.stats.pre_clip_norm) == pytest.approx(total, rel=NORM_RTOL)
            # torch multiplies by max_norm / (total + 1e-6) (when that is < 1), so its result is
            # smaller than the exact one by the relative amount 1e-6 / total; on top of that
            # our float32 accumulation gives NORM_RTOL.
            rtol = NORM_RTOL + 1e-6 / total
            for o, param in zip(out, params, strict=True):
                np.testing.assert_allclose(
                    to_f64(o), param.grad.numpy(), rtol=rtol, atol=flush_atol(jnp.float32)
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
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(by_hand), strict=True):
            assert same_bits(a, b)
        params = optax.apply_updates(params, updates)
    assert int(optaxclip.clip_stats(chain_state)["clip_by_global_norm/steps"]) == 3
