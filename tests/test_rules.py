"""``optaxclip.rules``: the ZClip, EMA-ratio and mean + k std rules, step by step against
float64 NumPy transcriptions of their references, in both scopes, plus properties.

Each reference below is written from the method's equations and keeps its statistics in
float64; it shares no code with optaxclip. A step counts as finite when every norm is, and a
non-finite step changes no statistic; the gradient is then passed through (``nonfinite`` is
``"propagate"``).
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import same_bits, to_f64
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

SHAPES = {"a": (3,), "b": (2, 2)}  # dict leaves flatten in sorted key order
STEPS = 72
NAN_STEP = 40
QUIET = range(50, 60)
# The float32 results against float64: a few float32 ulps (2**-23 is one ulp at 1), relative.
RTOL = 8 * 2.0**-23


def recorded_gradients(seed=0):
    """A zero first step, quiet steps (norm ~1), spikes, a NaN step and a quiet stretch.

    The spikes hit both leaves (x100), one leaf only (x1000 on "a") and both again (x50);
    the stretch of norms near 1e-3 is followed by a return to norms near 1.
    """
    rng = np.random.default_rng(seed)
    factors = {k: np.ones(STEPS) for k in SHAPES}
    for t, factor in ((22, 100.0), (45, 50.0)):
        for k in SHAPES:
            factors[k][t] = factor
    factors["a"][30] = 1000.0
    for k in SHAPES:
        factors[k][0] = 0.0
        factors[k][list(QUIET)] = 1e-3
    out = {k: np.zeros((STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(STEPS):
        size = np.exp(rng.normal(0.0, 0.15))
        for k, s in SHAPES.items():
            out[k][t] = rng.normal(size=s) * size * factors[k][t] / math.sqrt(7.0)
    out["b"][NAN_STEP, 1, 0] = np.nan
    return out


GRADS = recorded_gradients()


def step_tree(t):
    return {k: jnp.asarray(v[t]) for k, v in GRADS.items()}


def ref_norms(tree, scope):
    """Float64 norms of the float32 leaves: one per leaf, or the global one (a 0-d array)."""
    leaves = [to_f64(tree[k]) for k in sorted(tree)]
    per_leaf = np.array([np.sqrt(np.sum(x**2)) for x in leaves])
    return per_leaf if scope == "per_leaf" else np.array(np.sqrt(np.sum(per_leaf**2)))


def ref_clip(tree, norms, threshold, scope):
    """The clipped float64 leaves; a non-finite step passes through."""
    keys = sorted(tree)
    if not np.all(np.isfinite(norms)):
        return {k: to_f64(tree[k]) for k in keys}
    scale = np.where(norms > threshold, threshold / np.where(norms > 0, norms, 1), 1.0)
    scales = scale if scope == "per_leaf" else [scale] * len(keys)
    return {k: to_f64(tree[k]) * s for k, s in zip(keys, scales, strict=True)}


# --- float64 references of the rules: update(norms) -> threshold, then the state ------------


class ZScoreReference:
    """ZClip (Kumar et al.): warm-up buffer, z-score test, reciprocal target, EMA of mean/var."""

    def __init__(self, alpha, z_thresh, warmup_steps, mode, clip_option, max_grad_norm):
        self.alpha, self.z, self.warmup = alpha, z_thresh, warmup_steps
        self.mode, self.option, self.eps = mode, clip_option, 1e-6
        self.cap = math.inf if max_grad_norm is None else max_grad_norm
        self.buffer, self.mean, self.var = [], None, None
        self.margins = []  # how far each outlier test was from a tie

    def update(self, n):
        finite = bool(np.all(np.isfinite(n)))
        if self.mean is None:
            if finite:
                self.buffer.append(n)
                if len(self.buffer) == self.warmup:
                    self.mean = np.mean(self.buffer, axis=0)
                    self.var = np.var(self.buffer, axis=0)
            return np.full(np.shape(n), self.cap)
        std = np.sqrt(self.var)
        if self.mode == "zscore":
            z = (n - self.mean) / (std + self.eps)
            spike = z > self.z
            margin = np.abs(z - self.z) / self.z
            reciprocal = self.mean + self.z**2 * std / np.where(spike, z, 1.0)
            target = reciprocal if self.option == "adaptive_scaling" else self.mean
        else:
            target = self.mean + self.z * std
            spike = n > target
            margin = np.abs(n - target) / target
        spike = spike & finite
        threshold = np.where(spike, np.minimum(target, self.cap), self.cap)
        if finite:
            self.margins.append(margin)
            x = np.where(spike, target, n)
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return threshold

    def check_state(self, state):
        if self.mean is None:
            assert int(state.warmup_count) == len(self.buffer)
            np.testing.assert_allclose(state.warmup_norms[: len(self.buffer)], self.buffer, RTOL)
            return
        assert int(state.warmup_count) == self.warmup
        np.testing.assert_allclose(state.mean, self.mean, rtol=RTOL)
        # The std's rounding error is that of the mean it is measured from.
        error = np.abs(to_f64(state.std) - np.sqrt(self.var))
        assert np.all(error <= RTOL * (np.sqrt(self.var) + self.mean)), (state.std, self.var)


class EmaRatioReference:
    """AdaGC's per-tensor rule after warm-up: clip at r * gamma, gamma an EMA of clipped norms."""

    def __init__(self, relative_factor, beta):
        self.r, self.beta, self.gamma = relative_factor, beta, None
        self.margins = []

    def update(self, n):
        if self.gamma is None:
            self.gamma = np.zeros(np.shape(n))
        is_set = self.gamma > 0
        threshold = np.where(is_set, self.r * self.gamma, np.inf)
        if np.all(np.isfinite(n)):
            self.margins.append(np.abs(n - threshold)[is_set] / threshold[is_set])
            clipped = np.minimum(n, threshold)
            self.gamma = np.where(is_set, self.beta * self.gamma + (1 - self.beta) * clipped, n)
        return threshold

    def check_state(self, state):
        np.testing.assert_allclose(state, self.gamma, rtol=RTOL)


class MeanStdReference:
    """Levanter's clip_update_by_historical_norm: mean + k * std of the previous norms."""

    def __init__(self, k, window, min_history=None):
        self.k, self.window = k, window
        self.needed = max(2, window // 2) if min_history is None else min_history
        self.history = collections.deque(maxlen=window)
        self.margins = []

    def update(self, n):
        if len(self.history) >= self.needed:
            past = np.array(self.history)
            threshold = np.mean(past, axis=0) + self.k * np.maximum(np.std(past, axis=0), 1e-6)
            if np.all(np.isfinite(n)):
                self.margins.append(np.abs(n - threshold) / threshold)
        else:
            threshold = np.full(np.shape(n), np.inf)
        if np.all(np.isfinite(n)):
            self.history.append(n)  # unclipped
        return threshold

    def check_state(self, state):
        filled = len(self.history)
        assert int(state.filled) == filled
        # The ring buffer holds the last `filled` norms, the newest at next_slot - 1.
        order = (int(state.next_slot) - filled + np.arange(filled)) % self.window
        np.testing.assert_allclose(np.asarray(state.history)[order], self.history, rtol=RTOL)


class PercentileReference:
    """AutoClip: the p-th percentile (NumPy's linear) of the norms so far, this one included."""

    def __init__(self, p, history_size):
        self.p, self.history = p, collections.deque(maxlen=history_size)
        self.margins = []

    def update(self, n):
        if np.all(np.isfinite(n)):
            self.history.append(n)
        if not self.history:
            return np.full(np.shape(n), np.inf)
        threshold = np.percentile(np.array(self.history), self.p, axis=0)
        if np.all(np.isfinite(n)):
            self.margins.append(np.abs(n - threshold)[n != threshold] / threshold[n != threshold])
        return threshold

    def check_state(self, state):
        assert int(state.filled) == len(self.history)


CASES = {
    "zscore": (
        lambda: optaxclip.rules.zscore(0.9, 2.5, 10),
        lambda: ZScoreReference(0.9, 2.5, 10, "zscore", "adaptive_scaling", None),
    ),
    "zscore_mean_capped": (
        lambda: optaxclip.rules.zscore(0.9, 2.0, 10, clip_option="mean", max_grad_norm=5.0),
        lambda: ZScoreReference(0.9, 2.0, 10, "zscore", "mean", 5.0),
    ),
    "zscore_percentile_mode": (
        lambda: optaxclip.rules.zscore(0.9, 3.0, 10, mode="percentile"),
        lambda: ZScoreReference(0.9, 3.0, 10, "percentile", None, None),
    ),
    "ema_ratio": (
        lambda: optaxclip.rules.ema_ratio(1.05, 0.9),
        lambda: EmaRatioReference(1.05, 0.9),
    ),
    "mean_std": (
        lambda: optaxclip.rules.mean_std(k=2.0, window=16),
        lambda: MeanStdReference(2.0, 16),
    ),
    "percentile": (
        lambda: optaxclip.rules.percentile(50.0, history_size=12),
        lambda: PercentileReference(50.0, 12),
    ),
}
COMBINATIONS = [
    ("zscore", "global"),
    ("zscore", "per_leaf"),
    ("zscore_mean_capped", "global"),
    ("zscore_percentile_mode", "per_leaf"),
    ("ema_ratio", "global"),
    ("ema_ratio", "per_leaf"),
    ("mean_std", "global"),
    ("mean_std", "per_leaf"),
    ("percentile", "per_leaf"),
]


@pytest.mark.parametrize(("case", "scope"), COMBINATIONS)
def test_rule_matches_its_float64_reference_step_by_step(case, scope):
    make_rule, make_reference = CASES[case]
    tx = optaxclip.clip_by_rule(make_rule(), scope=scope)
    reference = make_reference()
    update = jax.jit(tx.update)
    state = tx.init(step_tree(0))
    clipped_steps = 0
    for t in range(STEPS):
        tree = step_tree(t)
        out, state = update(tree, state)
        norms = ref_norms(tree, scope)
        threshold = reference.update(norms)
        expected = ref_clip(tree, norms, threshold, scope)
        for k in SHAPES:
            np.testing.assert_allclose(
                to_f64(out[k]), expected[k], rtol=RTOL, atol=1e-30, err_msg=f"step {t} leaf {k}"
            )
        np.testing.assert_allclose(
            float(state.stats.threshold), np.min(threshold), rtol=RTOL, err_msg=f"step {t}"
        )
        reference.check_state(state.rule_state)
        clipped_steps += bool(np.all(np.isfinite(norms)) and np.any(norms > threshold))
    # The run exercises the rule, and no decision sits within rounding of a tie.
    assert clipped_steps >= 3
    assert np.min(np.concatenate([np.ravel(m) for m in reference.margins])) > 1e-4


def test_zscore_rule_clips_bit_for_bit_as_zclip_and_shares_its_statistics():
    settings = dict(alpha=0.9, z_thresh=2.5, warmup_steps=10, max_grad_norm=20.0)
    ours = optaxclip.clip_by_rule(optaxclip.rules.zscore(**settings))
    theirs = optaxclip.zclip(**settings)
    a_state, b_state = ours.init(step_tree(0)), theirs.init(step_tree(0))
    for t in range(STEPS):
        a, a_state = jax.jit(ours.update)(step_tree(t), a_state)
        b, b_state = jax.jit(theirs.update)(step_tree(t), b_state)
        assert all(same_bits(a[k], b[k]) for k in SHAPES), t
        for field in ("mean", "std", "warmup_norms", "warmup_count"):
            assert same_bits(getattr(a_state.rule_state, field), getattr(b_state, field)), t
        assert same_bits(a_state.stats.post_clip_norm, b_state.stats.post_clip_norm), t


def test_ema_ratio_rule_per_leaf_follows_adagc_without_warmup():
    ours = optaxclip.clip_by_rule(optaxclip.rules.ema_ratio(1.04, 0.99), scope="per_leaf")
    theirs = optaxclip.adagc(1.04, 0.99, warmup_steps=0, eps=0.0)
    a_state, b_state = ours.init(step_tree(0)), theirs.init(step_tree(0))
    for t in range(STEPS):
        a, a_state = jax.jit(ours.update)(step_tree(t), a_state)
        b, b_state = jax.jit(theirs.update)(step_tree(t), b_state)
        for k in SHAPES:
            np.testing.assert_allclose(to_f64(a[k]), to_f64(b[k]), rtol=RTOL, atol=1e-30)
        assert same_bits(a_state.rule_state, b_state.norm_ema), t


def test_mean_std_after_adam_clips_the_update_norm_as_levanter_does():
    tx = optax.chain(
        optax.adam(1e-2), optaxclip.clip_by_rule(optaxclip.rules.mean_std(k=2.0, window=8))
    )
    # Adam alone gives the update the clipper sees; float32 Adam is not the subject here.
    adam = optax.adam(1e-2)
    params = step_tree(1)
    state, adam_state = tx.init(params), adam.init(params)
    update, adam_update = jax.jit(tx.update), jax.jit(adam.update)
    history = collections.deque(maxlen=8)
    clipped_steps = 0
    # Without the NaN step, which Adam would carry into every later update.
    for t in (t for t in range(STEPS) if t != NAN_STEP):
        out, state = update(step_tree(t), state, params)
        raw, adam_state = adam_update(step_tree(t), adam_state, params)
        # Levanter's clip_update_by_historical_norm, in float64.
        norm = ref_norms(raw, "global")
        if len(history) >= max(2, 8 // 2):
            threshold = np.mean(history) + 2.0 * max(np.std(history), 1e-6)
        else:
            threshold = math.inf
        scale = threshold / max(norm, 1e-6) if norm > threshold else 1.0
        assert not abs(norm - threshold) < 1e-4 * threshold  # no decision within rounding
        history.append(norm)  # the unclipped norm
        clipped_steps += scale < 1.0
        for k in SHAPES:
            np.testing.assert_allclose(to_f64(out[k]), to_f64(raw[k]) * scale, rtol=RTOL)
        clip_state = state[1]
        np.testing.assert_allclose(float(clip_state.stats.pre_clip_norm), norm, rtol=RTOL)
        np.testing.assert_allclose(float(clip_state.stats.threshold), threshold, rtol=RTOL)
    assert clipped_steps >= 2


# --- properties ------------------------------------------------------------------------------

ALL_RULES = {
    "constant": lambda: optaxclip.rules.constant(1.0),
    "percentile": lambda: optaxclip.rules.percentile(10.0, history_size=4),
    "quantile": lambda: optaxclip.rules.quantile(),
    "zscore": lambda: optaxclip.rules.zscore(warmup_steps=3),
    # Not alpha = 0.5: with equal weights XLA rewrites the EMA a * mean + a * x as
    # a * (mean + x), whose sum overflows for norms near the top of the float32 range.
    "zscore_percentile_mode": lambda: optaxclip.rules.zscore(
        0.6, 1.0, 2, mode="percentile", clip_factor=3.0
    ),
    "ema_ratio": lambda: optaxclip.rules.ema_ratio(),
    "mean_std": lambda: optaxclip.rules.mean_std(window=4),
}
_LARGEST = float(np.finfo(np.float32).max)
NORMS = st.one_of(
    st.sampled_from([0.0, 1e-45, 1e-38, _LARGEST, math.inf, math.nan]),
    st.floats(1e-30, 3e38, allow_nan=False, allow_infinity=False),
    st.floats(0.5, 2.0),
)


_STEPS: dict = {}


def _compiled_steps(name, shape):
    """The initial state and the jitted ``rule.update`` of a rule, one per rule and shape."""
    if (name, shape) not in _STEPS:
        rule = ALL_RULES[name]()
        _STEPS[name, shape] = (rule.init(jnp.zeros(shape, jnp.float32)), jax.jit(rule.update))
    return _STEPS[name, shape]


@pytest.mark.parametrize("name", sorted(ALL_RULES))
@pytest.mark.parametrize("shape", [(), (2,)], ids=["global", "per_leaf"])
@given(data=st.data())
def test_threshold_is_never_nan_and_the_state_stays_finite(name, shape, data):
    state, update = _compiled_steps(name, shape)
    count = math.prod(shape)
    for step in range(data.draw(st.integers(1, 12))):
        drawn = data.draw(st.lists(NORMS, min_size=count, max_size=count))
        norms = np.array(drawn, np.float32).reshape(shape)
        threshold, state = update(jnp.asarray(norms), state, jnp.int32(step))
        threshold = np.asarray(threshold)
        assert not np.any(np.isnan(threshold)), (step, norms)
        assert np.all((threshold >= 0) & (np.isfinite(threshold) | (threshold == np.inf)))
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf))), (step, norms, state)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: optaxclip.rules.zscore(alpha=1.0), ValueError, r"rules\.zscore\(alpha=\.\.\.\)"),
        (lambda: optaxclip.rules.zscore(z_thresh=0), ValueError, r"rules\.zscore\(z_thresh="),
        (lambda: optaxclip.rules.zscore(warmup_steps=0), ValueError, r"rules\.zscore\(warmup_s"),
        (lambda: optaxclip.rules.zscore(warmup_steps=2.5), TypeError, r"rules\.zscore\(warmup_"),
        (lambda: optaxclip.rules.zscore(mode="z"), ValueError, r"rules\.zscore\(mode=\.\.\.\)"),
        (lambda: optaxclip.rules.zscore(clip_option="x"), ValueError, r"rules\.zscore\(clip_op"),
        (lambda: optaxclip.rules.zscore(clip_factor=-1), ValueError, r"rules\.zscore\(clip_fa"),
        (lambda: optaxclip.rules.zscore(max_grad_norm=0), ValueError, r"rules\.zscore\(max_gra"),
        (lambda: optaxclip.rules.zscore(skip_update_on_spike=1), TypeError, r"rules\.zscore\(s"),
        (lambda: optaxclip.rules.zscore(eps=-1e-6), ValueError, r"rules\.zscore\(eps=\.\.\.\)"),
        (lambda: optaxclip.rules.ema_ratio(0.0), ValueError, r"rules\.ema_ratio\(relative_fa"),
        (lambda: optaxclip.rules.ema_ratio(beta=1.0), ValueError, r"rules\.ema_ratio\(beta="),
        (lambda: optaxclip.rules.mean_std(k=-1.0), ValueError, r"rules\.mean_std\(k=\.\.\.\)"),
        (lambda: optaxclip.rules.mean_std(k=math.nan), ValueError, r"rules\.mean_std\(k="),
        (lambda: optaxclip.rules.mean_std(window=1), ValueError, r"rules\.mean_std\(window="),
        (lambda: optaxclip.rules.mean_std(window=8.0), TypeError, r"rules\.mean_std\(window="),
        (
            lambda: optaxclip.rules.mean_std(window=8, min_history=9),
            ValueError,
            r"rules\.mean_std\(min_history=\.\.\.\): must be in \[1, 8\]",
        ),
        (lambda: optaxclip.rules.mean_std(min_history=0), ValueError, r"rules\.mean_std\(min_h"),
    ],
)
def test_bad_arguments_are_refused_naming_the_rule_and_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_mean_std_waits_for_levanters_default_history():
    rule = optaxclip.rules.mean_std(window=10)
    state = rule.init(jnp.zeros((), jnp.float32))
    thresholds = []
    for step in range(7):
        threshold, state = rule.update(jnp.float32(1.0 + step), state, jnp.int32(step))
        thresholds.append(float(threshold))
    assert thresholds[:5] == [math.inf] * 5  # max(2, 10 // 2) norms needed
    assert all(math.isfinite(x) for x in thresholds[5:])
