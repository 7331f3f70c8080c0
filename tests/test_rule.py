"""``clip_by_rule``: the engine behind threshold rules, checked against float64 NumPy and
against the static clippers it reproduces with a constant rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import same_bits, to_f64
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip

TREE = {"w": jnp.array([[3.0, -4.0], [1.0, 2.0]]), "b": jnp.array([0.5, -12.0])}


def _ref_norms(tree):
    return {k: float(np.sqrt(np.sum(to_f64(v) ** 2))) for k, v in tree.items()}


def _running_max_rule():
    """Threshold: the largest norm seen before this step (inf before any)."""

    def init(norms):
        return jnp.full(norms.shape, -jnp.inf, jnp.float32)

    def update(norms, largest, step):
        del step
        threshold = jnp.where(jnp.isfinite(largest), largest, jnp.inf)
        return threshold, jnp.maximum(largest, norms)

    return optaxclip.ClipRule(init, update)


@settings(deadline=None, max_examples=20)
@given(limit=st.floats(0.0, 20.0), scale=st.floats(0.01, 10.0))
def test_constant_rule_clips_bit_for_bit_as_the_static_clippers(limit, scale):
    tree = jax.tree.map(lambda x: x * scale, TREE)
    pairs = [
        (
            optaxclip.clip_by_rule(optaxclip.rules.constant(limit)),
            optaxclip.clip_by_global_norm(limit),
        ),
        (
            optaxclip.clip_by_rule(optaxclip.rules.constant(limit), scope="per_leaf"),
            optaxclip.clip_by_leaf_norm(limit),
        ),
    ]
    for ours, static in pairs:
        a, sa = jax.jit(ours.update)(tree, ours.init(tree))
        b, sb = jax.jit(static.update)(tree, static.init(tree))
        for key in tree:
            assert same_bits(a[key], b[key]), key
        for field in ("pre_clip_norm", "post_clip_norm", "threshold", "scale", "clipped_fraction"):
            assert same_bits(getattr(sa.stats, field), getattr(sb.stats, field)), field


def test_per_leaf_scope_gives_each_leaf_its_own_threshold_against_float64():
    tx = optaxclip.clip_by_rule(_running_max_rule(), scope="per_leaf")
    state = tx.init(TREE)
    first = {"w": TREE["w"] * 0.1, "b": TREE["b"] * 0.5}
    _, state = jax.jit(tx.update)(first, state)
    out, state = jax.jit(tx.update)(TREE, state)
    limits = _ref_norms(first)
    norms = _ref_norms(TREE)
    for key in TREE:
        expected = to_f64(TREE[key]) * min(1.0, limits[key] / norms[key])
        np.testing.assert_allclose(to_f64(out[key]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(state.stats.threshold), min(limits.values()), rtol=1e-6)
    # The rule state tracks each leaf's largest norm.
    order = [k for k, _ in sorted(TREE.items())]  # tree_leaves order of a dict
    np.testing.assert_allclose(np.asarray(state.rule_state), [norms[k] for k in order], rtol=1e-6)


@pytest.mark.parametrize("scope", ["global", "per_leaf"])
@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_nonfinite_step_keeps_the_rule_state_and_applies_the_policy(scope, nonfinite):
    tx = optaxclip.clip_by_rule(_running_max_rule(), scope=scope, nonfinite=nonfinite)
    state = tx.init(TREE)
    _, state = jax.jit(tx.update)(TREE, state)
    bad = {"w": TREE["w"].at[0, 0].set(jnp.nan), "b": TREE["b"] * 100}
    out, after = jax.jit(tx.update)(bad, state)
    assert same_bits(after.rule_state, state.rule_state)
    if nonfinite == "zero":
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(out))
        assert float(after.stats.scale) == 0.0
    else:
        assert same_bits(out["b"], bad["b"])  # passed through, not clipped
        assert float(after.stats.scale) == 1.0
    assert int(after.stats.steps) == 2


@pytest.mark.parametrize("bad", [-1.5, math.nan])
@pytest.mark.parametrize("scope", ["global", "per_leaf"])
def test_negative_or_nan_threshold_from_a_rule_zeroes_the_update(scope, bad):
    rule = optaxclip.ClipRule(lambda norms: (), lambda norms, s, step: (jnp.float32(bad), s))
    tx = optaxclip.clip_by_rule(rule, scope=scope)
    out, state = jax.jit(tx.update)(TREE, tx.init(TREE))
    for x in jax.tree.leaves(out):
        np.testing.assert_array_equal(np.abs(np.asarray(x)), 0.0)
    assert float(state.stats.threshold) == 0.0


def test_rule_sees_the_step_count_and_float32_norms():
    seen = []

    def update(norms, state, step):
        seen.append((norms.dtype, step.dtype))
        return 1.0 + 0.0 * step, state

    tx = optaxclip.clip_by_rule(optaxclip.ClipRule(lambda norms: (), update))
    tree = {"w": jnp.array([3.0, 4.0], jnp.bfloat16)}
    out, _state = tx.update(tree, tx.init(tree))
    assert seen == [(jnp.dtype(jnp.float32), jnp.dtype(jnp.int32))]
    np.testing.assert_allclose(to_f64(out["w"]), [0.6, 0.8], rtol=4e-3)
    assert out["w"].dtype == jnp.bfloat16


def test_clip_by_rule_chains_with_adam_and_reports_stats_by_name():
    tx = optax.chain(
        optaxclip.clip_by_rule(optaxclip.rules.constant(1.0), name="mine"), optax.adam(0.1)
    )
    _, state = jax.jit(tx.update)(TREE, tx.init(TREE), TREE)
    stats = optaxclip.clip_stats(state)
    total = math.sqrt(sum(n**2 for n in _ref_norms(TREE).values()))
    np.testing.assert_allclose(float(stats["mine/pre_clip_norm"]), total, rtol=1e-6)
    assert int(stats["mine/steps"]) == 1


def test_bad_arguments_are_refused_naming_the_call():
    with pytest.raises(TypeError, match=r"clip_by_rule\(rule=\.\.\.\)"):
        optaxclip.clip_by_rule(lambda norms: norms)
    with pytest.raises(ValueError, match=r"clip_by_rule\(scope=\.\.\.\)"):
        optaxclip.clip_by_rule(optaxclip.rules.constant(1.0), scope="per_unit")
    with pytest.raises(ValueError, match=r"rules.constant\(value=\.\.\.\)"):
        optaxclip.rules.constant(-1.0)


def test_rules_module_imports_both_ways():
    import optaxclip.rules as by_import

    assert by_import is optaxclip.rules
    assert callable(by_import.percentile)
