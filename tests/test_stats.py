"""ClipStats: every field against a float64 reference, the pytree registration, clip_stats."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.public import GUARDS, public_transforms
from helpers.references import (
    NORM_RTOL,
    ref_global_norm,
    ref_leaf_norm,
    ref_rms,
    ref_vector_norm,
    to_f64,
)
from helpers.strategies import ORDS, gradient_trees
from hypothesis import given
from hypothesis import strategies as st

import optaxclip
from optaxclip._spec.stats import ClipStats, initial_stats, make_stats

pytestmark = pytest.mark.usefixtures("eager_ops")

# float32/complex64 only: post_clip_norm is derived analytically (norm * scale), and it must
# equal the float64 norm of the actual output within float32 accumulation error. In fp16/bf16
# the output's own rounding is larger than that, by design.
HIGH_PRECISION_TREES = gradient_trees(dtypes=(jnp.float32, jnp.complex64))
RATIOS = st.sampled_from([0.0, 1e-3, 0.5, 0.9, 1.1, 2.0])


def _approx(expected):
    return pytest.approx(expected, rel=NORM_RTOL, abs=1e-30)


def _check_common(stats, out, p, name):
    assert stats.name == name
    for field in ClipStats._fields[:5]:
        assert getattr(stats, field).dtype == jnp.float32 and getattr(stats, field).shape == ()
    assert stats.steps.dtype == jnp.int32
    # The reported post-clip norm is honest: it is the norm of what was returned.
    assert float(stats.post_clip_norm) == _approx(ref_global_norm(out, p))
    pre = float(stats.pre_clip_norm)
    expected_scale = float(stats.post_clip_norm) / pre if pre > 0 else 1.0
    assert float(stats.scale) == pytest.approx(expected_scale, rel=1e-6)


@given(tree=HIGH_PRECISION_TREES, p=st.sampled_from(ORDS), ratio=RATIOS)
def test_global_clip_stats_match_reference(tree, p, ratio):
    norm = ref_global_norm(tree, p)
    limit = ratio * norm
    tx = optaxclip.clip_by_global_norm(limit, ord=p)
    state = tx.init(tree)
    out, state = tx.update(tree, state)
    stats = state.stats
    _check_common(stats, out, p, "clip_by_global_norm")
    assert float(stats.pre_clip_norm) == _approx(norm)
    assert float(stats.threshold) == _approx(limit)
    assert float(stats.clipped_fraction) == (1.0 if norm > limit else 0.0)
    assert float(stats.scale) == _approx(limit / norm if norm > limit else 1.0)
    assert int(stats.steps) == 1
    _, state = tx.update(tree, state)
    assert int(state.stats.steps) == 2


@given(tree=HIGH_PRECISION_TREES, p=st.sampled_from(ORDS), ratio=RATIOS)
def test_leaf_clip_stats_match_reference(tree, p, ratio):
    leaves = jax.tree.leaves(tree)
    # A multiple (never 1) of the largest leaf norm: no leaf sits exactly on the threshold.
    limit = ratio * max(ref_leaf_norm(x, p) for x in leaves)
    out, state = optaxclip.clip_by_leaf_norm(limit, ord=p, name="per_leaf").update(
        tree, optaxclip.clip_by_leaf_norm(limit).init(tree)
    )
    stats = state.stats
    _check_common(stats, out, p, "per_leaf")
    # The p-norm of the per-leaf p-norms is the p-norm of everything.
    assert float(stats.pre_clip_norm) == _approx(ref_global_norm(tree, p))
    assert float(stats.threshold) == _approx(limit)
    n_over = sum(ref_leaf_norm(x, p) > limit for x in leaves)
    assert float(stats.clipped_fraction) == pytest.approx(n_over / len(leaves))


@given(tree=HIGH_PRECISION_TREES, ratio=RATIOS)
def test_block_rms_stats_match_reference(tree, ratio):
    leaves = jax.tree.leaves(tree)
    limit = ratio * max(ref_rms(x) for x in leaves)
    tx = optaxclip.clip_by_block_rms(limit)
    out, state = tx.update(tree, tx.init(tree))
    stats = state.stats
    _check_common(stats, out, 2.0, "clip_by_block_rms")
    assert float(stats.pre_clip_norm) == _approx(ref_global_norm(tree, 2.0))
    # In the units of the two norms: the L2 bound of the smallest leaf.
    smallest = min(max(x.size, 1) for x in leaves)
    assert float(stats.threshold) == _approx(limit * math.sqrt(smallest))
    n_over = sum(ref_rms(x) > limit for x in leaves)
    assert float(stats.clipped_fraction) == pytest.approx(n_over / len(leaves))


def test_block_rms_threshold_reads_as_the_l2_bound_of_the_smallest_leaf():
    grads = {"small": jnp.full((9,), 0.5), "large": jnp.full((4, 25), 3.0)}
    tx = optaxclip.clip_by_block_rms({"small": 2.0, "large": 0.5})
    _, state = tx.update(grads, tx.init(grads))
    # L2 bounds: 2 * sqrt(9) = 6 and 0.5 * sqrt(100) = 5; pre and post are L2 norms too.
    assert float(state.stats.threshold) == pytest.approx(5.0, rel=1e-6)
    assert float(state.stats.pre_clip_norm) == pytest.approx(math.sqrt(9 * 0.25 + 900), rel=1e-6)
    assert float(state.stats.post_clip_norm) == pytest.approx(math.sqrt(9 * 0.25 + 25), rel=1e-6)


@given(tree=gradient_trees(dtypes=(jnp.float32,), exponents=(-3, 3)), high=st.floats(0.0, 2.0))
def test_value_clip_stats_match_reference(tree, high):
    tx = optaxclip.clip_by_value(high)
    out, state = tx.update(tree, tx.init(tree))
    stats = state.stats
    _check_common(stats, out, 2.0, "clip_by_value")
    assert float(stats.pre_clip_norm) == _approx(ref_global_norm(tree, 2.0))
    assert float(stats.threshold) == _approx(float(np.float32(high)))
    values = np.concatenate([to_f64(x).ravel() for x in jax.tree.leaves(tree)])
    clamped = np.sum(np.abs(values) > np.float32(high))
    assert float(stats.clipped_fraction) == pytest.approx(clamped / values.size)


# Bound magnitudes across float32's range: 0, tiny ones whose differences with nearby entries
# would be subnormal, ordinary ones, and ones near the top where scaled copies overflow.
VALUE_BOUNDS = st.sampled_from([0.0, 2.0**-100, 1e-35, 3e-20, 0.05, 1.0, 3e4, 1e30, 3e38])


@st.composite
def value_clip_cases(draw):
    """Many leaves of one shape (the statistics vary per reduced array, see
    ``optaxclip._lowering.DistinctOnes``) whose entries sit on, next to, inside and outside the
    bounds."""
    dtype = jnp.dtype(draw(st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])))
    high = draw(VALUE_BOUNDS)
    low = -high if draw(st.booleans()) else high - draw(VALUE_BOUNDS)
    shape = draw(st.sampled_from([(3,), (2, 3), (4, 1)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    finite_max = float(jnp.finfo(dtype).max)
    leaves = []
    for _ in range(draw(st.integers(1, 20))):
        pool = []
        for bound in (low, high):
            b = np.asarray(_in_dtype(bound, dtype), dtype)
            if np.isfinite(b):
                up = np.nextafter(b, np.asarray(np.inf, dtype))
                down = np.nextafter(b, np.asarray(-np.inf, dtype))
                pool += [float(b), float(up), float(down)]
        typical = max(abs(high), abs(low), 1e-30)
        pool += list(rng.standard_normal(8) * min(typical, finite_max / 4))
        pool += [0.0, finite_max / 16, -finite_max / 16]
        values = rng.choice(np.asarray(pool, np.float64), size=shape)
        leaf = jnp.asarray(values.astype(np.float32)).astype(dtype)
        # XLA:CPU reads float32/bfloat16 subnormals as 0 (the clamp too), so give them as 0.
        tiny = float(jnp.finfo(jnp.float32).tiny)
        flushed = np.where(np.abs(to_f64(leaf)) < tiny, 0.0, to_f64(leaf))
        leaves.append(jnp.asarray(flushed.astype(np.float32)).astype(dtype))
    return leaves, low, high


def _in_dtype(value, dtype):
    """``value`` rounded to ``dtype`` as a float (a bound beyond fp16's range becomes inf)."""
    with np.errstate(over="ignore"):
        return float(np.asarray(value, np.float64).astype(dtype))


def _check_value_clip(leaves, low, high, out, stats):
    xs = [to_f64(x) for x in leaves]
    outs = [to_f64(o) for o in out]
    all_in = np.concatenate([x.ravel() for x in xs])
    if ref_vector_norm(all_in, 2) > float(jnp.finfo(jnp.float32).max):
        # The norm overflows float32: non-finite, so the default policy passes the input on.
        assert float(stats.pre_clip_norm) == math.inf
        assert all(np.array_equal(o, x) for o, x in zip(outs, xs, strict=True))
        assert float(stats.clipped_fraction) == 0.0
        return
    for x, o, leaf in zip(xs, outs, leaves, strict=True):
        lo, hi = _in_dtype(low, leaf.dtype), _in_dtype(high, leaf.dtype)
        np.testing.assert_array_equal(o, np.clip(x, lo, hi))
    moved = sum(int(np.sum(o != x)) for o, x in zip(outs, xs, strict=True))
    total = sum(x.size for x in xs)
    assert float(stats.clipped_fraction) == pytest.approx(moved / total, rel=1e-6)
    all_out = np.concatenate([o.ravel() for o in outs])
    post = ref_vector_norm(all_out, 2)
    # A clipped norm beyond float32's range is reported as inf.
    if post > float(jnp.finfo(jnp.float32).max):
        assert float(stats.post_clip_norm) == math.inf
    else:
        assert float(stats.post_clip_norm) == _approx(post)
    assert float(stats.pre_clip_norm) == _approx(ref_vector_norm(all_in, 2))


@given(case=value_clip_cases())
def test_value_clip_stats_are_exact_next_to_any_bounds(case):
    leaves, low, high = case
    symmetric = low == -high
    tx = optaxclip.clip_by_value(high) if symmetric else optaxclip.clip_by_value(high, low)
    out, state = tx.update(leaves, tx.init(leaves))
    _check_value_clip(leaves, low, high, out, state.stats)


@given(case=value_clip_cases())
def test_value_clip_stats_are_exact_with_scheduled_bounds_under_jit(case):
    # A schedule makes the bounds traced values, which take the general (unscaled) paths.
    leaves, low, high = case
    if low == -high:
        tx = optaxclip.clip_by_value(lambda count: high + 0.0 * count)
    else:
        tx = optaxclip.clip_by_value(
            lambda count: high + 0.0 * count, lambda count: low + 0.0 * count
        )
    with jax.disable_jit(False):
        out, state = jax.jit(tx.update)(leaves, tx.init(leaves))
    _check_value_clip(leaves, low, high, out, state.stats)


@given(case=value_clip_cases())
def test_value_clip_stats_are_exact_with_per_leaf_array_bounds(case):
    # One array bound per leaf: each leaf is reduced on its own (not joined with the others),
    # so twin leaves of one shape take the statistics' scaled variants in turn.
    leaves, low, high = case
    highs = [jnp.asarray(high, jnp.float32) for _ in leaves]
    if low == -high:
        tx = optaxclip.clip_by_value(highs)
    else:
        tx = optaxclip.clip_by_value(highs, [jnp.asarray(low, jnp.float32) for _ in leaves])
    out, state = tx.update(leaves, tx.init(leaves))
    _check_value_clip(leaves, low, high, out, state.stats)


@pytest.mark.parametrize("low", [None, -1.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_clip_with_an_infinite_bound_reports_huge_entries_as_they_are(low, dtype):
    # Nothing is clamped at max_delta = inf, so the post-clip norm is the pre-clip norm, also
    # for entries so large that a scaled copy of them overflows.
    huge = float(jnp.finfo(dtype).max) * 0.75
    tree = {"w": jnp.array([huge, -1.0, 0.5], dtype)}
    tx = optaxclip.clip_by_value(math.inf, low)
    out, state = tx.update(tree, tx.init(tree))
    values = to_f64(tree["w"])
    expected_out = values if low is None else np.maximum(values, low)
    np.testing.assert_array_equal(to_f64(out["w"]), expected_out)
    assert float(state.stats.post_clip_norm) == _approx(ref_vector_norm(expected_out, 2))
    assert float(state.stats.pre_clip_norm) == _approx(ref_vector_norm(values, 2))
    assert float(state.stats.clipped_fraction) == pytest.approx(np.mean(expected_out != values))


def test_value_clip_threshold_is_smallest_per_leaf_upper_bound():
    tree = {"body": jnp.array([-3.0, 0.5]), "head": jnp.array([4.0, -0.25, 0.0, 9.0])}
    tx = optaxclip.clip_by_value({"body": 1.0, "head": 5.0})
    out, state = tx.update(tree, tx.init(tree))
    assert float(state.stats.threshold) == 1.0
    assert float(state.stats.clipped_fraction) == pytest.approx(2 / 6)
    expected_post = ref_vector_norm(np.array([1, 0.5, 4, 0.25, 0, 5]), 2)
    assert float(state.stats.post_clip_norm) == _approx(expected_post)
    np.testing.assert_array_equal(out["body"], [-1.0, 0.5])
    np.testing.assert_array_equal(out["head"], [4.0, -0.25, 0.0, 5.0])


def test_initial_stats_are_zero_with_unit_scale_and_typed():
    stats = initial_stats("x")
    assert stats.name == "x"
    assert [float(v) for v in stats[:5]] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert int(stats.steps) == 0 and stats.steps.dtype == jnp.int32


def test_initial_stats_fields_are_distinct_buffers():
    # A state whose leaves share a buffer cannot be donated to a jitted update.
    pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(initial_stats("y"))]
    assert len(pointers) == len(set(pointers)) == len(ClipStats._fields) - 1


def test_make_stats_derives_scale_and_guards_zero_and_nonfinite_norms():
    kwargs = {"steps": 3, "threshold": 1.0, "clipped_fraction": 1.0}
    assert float(make_stats("a", pre_clip_norm=4.0, post_clip_norm=1.0, **kwargs).scale) == 0.25
    assert float(make_stats("a", pre_clip_norm=0.0, post_clip_norm=0.0, **kwargs).scale) == 1.0
    nan = make_stats("a", pre_clip_norm=math.nan, post_clip_norm=math.nan, **kwargs)
    assert float(nan.scale) == 1.0
    inf = make_stats("a", pre_clip_norm=math.inf, post_clip_norm=1.0, **kwargs)
    assert float(inf.scale) == 1.0
    # A non-finite norm brought to 0 is the update nonfinite="zero" zeroed.
    for pre in (math.nan, -math.inf):
        assert float(make_stats("a", pre_clip_norm=pre, post_clip_norm=0.0, **kwargs).scale) == 0
    assert int(inf.steps) == 3 and inf.steps.dtype == jnp.int32


def test_clip_stats_name_is_static_pytree_metadata():
    stats = make_stats(
        "mine", steps=1, pre_clip_norm=2.0, post_clip_norm=1.0, threshold=1.0, clipped_fraction=1
    )
    leaves, treedef = jax.tree.flatten(stats)
    assert len(leaves) == 6 and not any(isinstance(x, str) for x in leaves)
    assert jax.tree.unflatten(treedef, leaves).name == "mine"
    doubled = jax.tree.map(lambda x: x * 2, stats)
    assert doubled.name == "mine" and float(doubled.pre_clip_norm) == 4.0
    with jax.disable_jit(False):
        through_jit = jax.jit(lambda s: s)(stats)
    assert through_jit.name == "mine"
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(stats)]
    assert keys == [f".{f}" for f in ClipStats._fields[:6]]
    # Two stats with different names are different tree structures (the name is static).
    assert jax.tree.structure(stats) != jax.tree.structure(stats._replace(name="other"))


def test_clip_stats_returns_flat_dict_with_all_fields():
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = {"w": jnp.array([3.0, 4.0])}
    _, state = tx.update(params, tx.init(params), params)
    stats = optaxclip.clip_stats(state)
    assert set(stats) == {f"clip_by_global_norm/{f}" for f in ClipStats._fields[:6]}
    assert float(stats["clip_by_global_norm/pre_clip_norm"]) == 5.0
    assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(1.0)
    assert optaxclip.clip_stats(optax.sgd(0.1).init(params)) == {}


def test_clip_stats_suffixes_duplicates_and_never_overwrites_a_user_name():
    params = {"w": jnp.array([3.0, 4.0])}
    tx = optax.chain(
        optaxclip.clip_by_global_norm(10.0, name="clip"),
        optaxclip.clip_by_global_norm(1.0, name="clip"),
        optaxclip.clip_by_value(0.1, name="clip_1"),
        optaxclip.clip_by_leaf_norm(2.0),
    )
    _, state = tx.update(params, tx.init(params))
    stats = optaxclip.clip_stats(state)
    # The second "clip" is suffixed to "clip_1"; the user's own "clip_1" must not be
    # overwritten by it and is suffixed in turn.
    assert len(stats) == 4 * 6
    assert float(stats["clip/pre_clip_norm"]) == 5.0
    assert float(stats["clip_1/pre_clip_norm"]) == 5.0  # the second "clip", in chain order
    assert float(stats["clip_1/threshold"]) == 1.0
    assert float(stats["clip_1_1/threshold"]) == pytest.approx(0.1)  # the user's "clip_1"
    # The chain feeds each clipper the previous output: [0.1, 0.1] after the value clip.
    assert float(stats["clip_by_leaf_norm/pre_clip_norm"]) == pytest.approx(0.1 * math.sqrt(2))


# --- one meaning per field across clippers ------------------------------------------------

# Every clipper, by name, as a function of its nonfinite= policy.
_EVERY_CLIPPER = {
    "clip_by_global_norm": lambda nf: optaxclip.clip_by_global_norm(1.5, nonfinite=nf),
    "clip_by_leaf_norm": lambda nf: optaxclip.clip_by_leaf_norm(1.5, nonfinite=nf),
    "clip_by_block_rms": lambda nf: optaxclip.clip_by_block_rms(0.6, nonfinite=nf),
    "clip_by_value": lambda nf: optaxclip.clip_by_value(0.9, nonfinite=nf),
    "adaptive_grad_clip": lambda nf: optaxclip.adaptive_grad_clip(0.2, nonfinite=nf),
    "autoclip": lambda nf: optaxclip.autoclip(30.0, history_size=3, nonfinite=nf),
    "quantile_clip": lambda nf: optaxclip.quantile_clip(0.4, initial_threshold=2.0, nonfinite=nf),
    "zclip": lambda nf: optaxclip.zclip(warmup_steps=2, max_grad_norm=3.0, nonfinite=nf),
    "adagc": lambda nf: optaxclip.adagc(warmup_steps=1, warmup_max_norm=2.0, nonfinite=nf),
    "adaclip": lambda nf: optaxclip.adaclip(nonfinite=nf),
    "clip_by_rule": lambda nf: optaxclip.clip_by_rule(
        optaxclip.rules.constant(0.5), scope="per_leaf", nonfinite=nf
    ),
}
_PARAMS = {"kernel": jnp.full((2, 3), 0.8), "bias": jnp.full((3,), 0.25)}
# Two finite steps, the second larger so that every clipper clips it, then a NaN step.
_FINITE_STEPS = [
    {"kernel": jnp.full((2, 3), 0.3), "bias": jnp.array([0.5, -0.25, 0.125])},
    {"kernel": jnp.full((2, 3), -4.0), "bias": jnp.array([7.0, 0.5, -2.5])},
]
_NAN_STEP = {"kernel": jnp.full((2, 3), 0.75), "bias": jnp.array([0.5, jnp.nan, 1.0])}


def test_the_stats_cases_cover_every_clipper():
    assert public_transforms() - GUARDS == set(_EVERY_CLIPPER)


@pytest.mark.parametrize("policy", ["propagate", "zero"])
@pytest.mark.parametrize("name", sorted(_EVERY_CLIPPER))
def test_every_clipper_reports_scale_as_post_over_pre_and_its_nonfinite_policy(name, policy):
    tx = _EVERY_CLIPPER[name](policy)
    state = tx.init(_PARAMS)
    for grads in _FINITE_STEPS:
        _, state = tx.update(grads, state, _PARAMS)
        stats = state.stats
        assert float(stats.pre_clip_norm) > 0
        ratio = float(stats.post_clip_norm) / float(stats.pre_clip_norm)
        assert float(stats.scale) == pytest.approx(ratio, rel=1e-6)
    assert float(stats.clipped_fraction) > 0, "the second step must clip"
    out, state = tx.update(_NAN_STEP, state, _PARAMS)
    stats = state.stats
    assert math.isnan(float(stats.pre_clip_norm))
    if policy == "zero":
        assert all(not bool(jnp.any(x)) for x in jax.tree.leaves(out))
        assert float(stats.scale) == 0.0
        assert float(stats.post_clip_norm) == 0.0
        assert float(stats.clipped_fraction) == 1.0
    else:
        assert same_nan_positions(out, _NAN_STEP)
        assert float(stats.scale) == 1.0
        np.testing.assert_array_equal(stats.post_clip_norm, stats.pre_clip_norm)
        assert float(stats.clipped_fraction) == 0.0


def same_nan_positions(a, b):
    return all(
        np.array_equal(x, y, equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
