"""ZClip: step by step against a float64 transcription of the reference code, and integration."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import same_bits
from helpers.runs import (
    batched,
    nnx_linear,
    nnx_train_step,
    resume_from_checkpoint,
    run_scan,
    run_updates,
    step_slices,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optaxclip

SHAPES = {"b": (5,), "w": (4, 3)}  # dict leaves flatten in sorted key order


SPIKES = ((60, 100.0), (70, 1000.0), (72, 300.0), (150, 100.0))


def recorded_gradients(seed=0, steps=200, spikes=SPIKES, nan_step=80):
    """Quiet steps (norm ~1), spikes x100-x1000, one NaN step, then a long quiet stretch."""
    rng = np.random.default_rng(seed)
    factors = np.ones(steps)
    for t, factor in spikes:
        factors[t] = factor
    out = {k: np.zeros((steps, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(steps):
        size = np.exp(rng.normal(0.0, 0.15))
        for k, s in SHAPES.items():
            out[k][t] = rng.normal(size=s) * size * factors[t] / math.sqrt(17.0)
    if nan_step is not None:
        out["w"][nan_step, 1, 2] = np.nan
    return out


SHORT = dict(steps=40, spikes=((25, 100.0),), nan_step=30)


class ReferenceZClip:
    """The reference ``ZClip.step`` (bluorion-com/ZClip, zclip/zclip.py) in float64.

    Branch for branch: warm-up buffer, then "percentile" / "zscore" with "adaptive_scaling" or
    "mean", the optional max_grad_norm cap, the EMA fed with the clip value on spikes, and the
    reference's ``coef = limit / (norm + 1e-6)`` scaling (torch's clip_grad_norm_ during the
    warm-up). The one addition is ours: a non-finite norm is passed through and changes nothing.
    """

    def __init__(self, alpha, z_thresh, max_grad_norm, eps, warmup_steps, mode, clip_option,
                 clip_factor, skip_update_on_spike):  # fmt: skip
        self.alpha, self.z, self.cap, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup, self.mode, self.option = warmup_steps, mode, clip_option
        self.factor, self.skip = clip_factor, skip_update_on_spike
        self.buffer, self.ready, self.mean, self.var = [], False, None, None

    def spike_value(self, g):
        """The clip value the reference computes after warm-up, or None (no spike)."""
        std = self.var**0.5
        if self.mode == "percentile":
            limit = self.mean + self.z * std
            return limit if g > limit else None
        z = (g - self.mean) / (std + self.eps)
        if z <= self.z:
            return None
        if self.option == "adaptive_scaling":
            return (self.mean + self.z * std / (z / self.z)) * self.factor
        return self.mean

    def boundary(self):
        """Our reported threshold: the norm above which the step counts as clipped."""
        if not self.ready:
            return math.inf if self.cap is None else self.cap
        std = self.var**0.5
        edge = self.mean + self.z * (std + (self.eps if self.mode == "zscore" else 0.0))
        return edge if self.cap is None else min(edge, self.cap)

    def step(self, grads):
        g = math.sqrt(sum(float(np.sum(np.float64(x) ** 2)) for x in grads))
        threshold = self.boundary()
        if not math.isfinite(g):
            return [np.float64(x) for x in grads], threshold, 1.0
        if not self.ready:
            self.buffer.append(g)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.ready, self.buffer = True, []
            coef = 1.0 if self.cap is None else min(1.0, self.cap / (g + 1e-6))
            return [np.float64(x) * coef for x in grads], threshold, coef
        value = self.spike_value(g)
        limit = value if value is not None else g
        if self.cap is not None:
            limit = min(limit, self.cap)
        coef = limit / (g + 1e-6) if g > limit else 1.0
        if not (value is not None and self.skip):
            x = value if value is not None else g
            self.mean = self.alpha * self.mean + (1 - self.alpha) * x
            self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return [np.float64(x) * coef for x in grads], threshold, coef


@functools.cache
def zclip_for(mode, clip_option, clip_factor, cap, skip):
    """One transformation object per configuration, so that its scan compiles once."""
    return optaxclip.zclip(
        0.97,
        2.5,
        25,
        mode=mode,
        clip_option=clip_option,
        clip_factor=clip_factor,
        max_grad_norm=cap,
        skip_update_on_spike=skip,
    )


# Each mode / clip option without, then with, both max_grad_norm and skip_update_on_spike
# (the two flags act on separate branches, so turning them on together covers each), and
# clip_factor != 1 in the second adaptive-scaling run.
CONFIGS = [
    ("zscore", "adaptive_scaling", 1.0, None, False),
    ("zscore", "adaptive_scaling", 0.7, 1.2, True),
    ("zscore", "mean", 1.0, None, False),
    ("zscore", "mean", 1.0, 1.2, True),
    ("percentile", "adaptive_scaling", 1.0, None, False),
    ("percentile", "adaptive_scaling", 1.0, 1.2, True),
]


@pytest.fixture(scope="module")
def recorded():
    return recorded_gradients()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_thresholds_and_outputs_match_reference_code_step_by_step(config, recorded):
    mode, option, factor, cap, skip = config
    grads = recorded
    outs, states = run_scan(zclip_for(*config), grads)
    ref = ReferenceZClip(0.97, 2.5, cap, 1e-6, 25, mode, option, factor, skip)
    clipped_steps = 0
    for t in range(200):
        expected, threshold, coef = ref.step([grads[k][t] for k in SHAPES])
        # rtol: float32 arithmetic plus the reference's 1e-6 in the divisor (1e-6 / norm,
        # at most ~3e-6 here since every norm is above 0.3).
        for k, e in zip(SHAPES, expected, strict=True):
            np.testing.assert_allclose(outs[k][t], e, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
        np.testing.assert_allclose(states.stats.threshold[t], threshold, rtol=1e-4)
        assert bool(states.stats.clipped_fraction[t]) == (coef < 1.0), f"step {t}"
        clipped_steps += coef < 1.0
        if ref.ready:
            np.testing.assert_allclose(states.mean[t], ref.mean, rtol=1e-4)
            np.testing.assert_allclose(states.std[t], ref.var**0.5, rtol=1e-4)
    assert clipped_steps >= 4  # the spikes at least


def test_spikes_are_scaled_close_to_the_running_mean(recorded):
    _, states = run_scan(zclip_for(*CONFIGS[0]), recorded)
    for t, _ in SPIKES:
        assert states.stats.pre_clip_norm[t] > 50
        assert states.stats.post_clip_norm[t] < 1.6
        assert states.stats.post_clip_norm[t] < states.stats.threshold[t]


def test_nonfinite_step_changes_no_statistic_and_passes_the_gradient_through(recorded):
    outs, states = run_scan(zclip_for(*CONFIGS[0]), recorded)
    for field in ("mean", "std", "warmup_norms", "warmup_count"):
        assert same_bits(getattr(states, field)[80], getattr(states, field)[79]), field
    assert np.isnan(outs["w"][80, 1, 2])
    assert same_bits(outs["b"][80], recorded["b"][80])
    assert np.all(np.isfinite(states.mean)) and np.all(np.isfinite(states.std))


def test_nonfinite_step_during_warmup_is_not_collected():
    tx = optaxclip.zclip(warmup_steps=3)
    grads = {"w": jnp.array([[1.0, 0.0], [jnp.inf, 0.0], [2.0, 0.0], [3.0, 0.0]])}
    _, states = run_scan(tx, grads)
    state = jax.tree.map(lambda x: x[-1], states)
    assert int(state.warmup_count) == 3
    np.testing.assert_allclose(state.mean, 2.0)
    np.testing.assert_allclose(state.std, math.sqrt(2.0 / 3.0), rtol=1e-6)


def test_no_adaptive_clipping_during_warmup_only_the_optional_cap():
    grads = {"w": jnp.array([[1.0], [1.0], [1000.0]])}
    for cap, expected in ((None, 1000.0), (2.0, 2.0)):
        outs, _ = run_scan(optaxclip.zclip(warmup_steps=5, max_grad_norm=cap), grads)
        np.testing.assert_allclose(outs["w"][-1], [expected], rtol=1e-6)


def test_max_grad_norm_defaults_to_off_unlike_the_reference():
    outs, states = run_scan(optaxclip.zclip(warmup_steps=1), {"w": jnp.array([[5.0]])})
    assert float(outs["w"][0, 0]) == 5.0
    assert math.isinf(float(states.stats.threshold[0]))


CAPPED = optaxclip.zclip(warmup_steps=4, max_grad_norm=3.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 1e4), min_size=12, max_size=12))
def test_with_cap_the_output_norm_never_exceeds_max_grad_norm(norms):
    grads = {"w": jnp.asarray(np.outer(norms, [0.6, 0.8]), jnp.float32)}
    outs, states = run_scan(CAPPED, grads)  # compiled once for all examples
    assert np.all(np.linalg.norm(outs["w"], axis=1) <= 3.0 * (1 + 1e-6))
    assert np.all(states.stats.post_clip_norm <= states.stats.pre_clip_norm * (1 + 1e-6))


# A slow geometric drift of the norm, at most 8 decades over the run, which the EMA follows,
# then one spike. eps is 0: an absolute eps would hide every outlier at norms far below it,
# and the property is the same at every scale.
DRIFT_STEPS = 1000
DRIFT_SPIKE = 2e3  # the last step's norm over the drift's final level
DRIFTING = {
    mode: optaxclip.zclip(0.97, 2.5, 25, mode=mode, eps=0.0) for mode in ("zscore", "percentile")
}


def drifting_norms(start, end, seed):
    """Norms 10**start -> 10**end geometrically with 5% noise, then a spike on the last step."""
    rng = np.random.default_rng(seed)
    levels = np.logspace(start, end, DRIFT_STEPS - 1) * np.exp(
        0.05 * rng.normal(size=DRIFT_STEPS - 1)
    )
    return np.append(levels, 10.0**end * DRIFT_SPIKE)


@given(
    mode=st.sampled_from(sorted(DRIFTING)),
    start=st.integers(-30, 35),
    change=st.integers(-8, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_statistics_stay_finite_and_spike_is_clipped_while_norm_drifts_over_float32_range(
    mode, start, change, seed
):
    end = min(max(start + change, -30), 35)
    norms = drifting_norms(start, end, seed)
    grads = {"w": np.asarray(np.outer(norms, [0.6, 0.8]), np.float32)}
    # The paper's statistics in float64, where no square of these norms overflows: the mean
    # and the variance of the warm-up norms, then per step mu <- alpha * mu + (1 - alpha) * x,
    # v <- alpha * v + (1 - alpha) * (x - mu)**2 with x the clip value on a spike.
    ref = ReferenceZClip(0.97, 2.5, None, 0.0, 25, mode, "adaptive_scaling", 1.0, False)
    thresholds, clip_values, means, stds, margins = [], [], [], [], []
    for t in range(DRIFT_STEPS):
        g = float(np.linalg.norm(np.float64(grads["w"][t])))
        thresholds.append(ref.boundary())
        clip_values.append(ref.spike_value(g) if ref.ready else None)
        if ref.ready:
            margins.append(abs(g / thresholds[-1] - 1))
        ref.step([grads["w"][t]])
        means.append(ref.mean if ref.ready else math.nan)
        stds.append(math.sqrt(ref.var) if ref.ready else math.nan)
    # float32 rounding may flip a decision on a norm within rounding of the threshold.
    assume(min(margins) > 1e-3)
    clipped = np.array([v is not None for v in clip_values])
    assert clipped[-1]

    outs, states = run_scan(DRIFTING[mode], grads)
    ready = slice(25, None)  # steps whose threshold comes from the statistics
    assert np.all(np.isfinite(states.stats.threshold[ready]))
    np.testing.assert_allclose(states.stats.threshold[ready], thresholds[ready], rtol=1e-4)
    np.testing.assert_array_equal(states.stats.clipped_fraction > 0, clipped)
    expected = [v for v in clip_values if v is not None]
    np.testing.assert_allclose(states.stats.post_clip_norm[clipped], expected, rtol=1e-4)
    np.testing.assert_allclose(
        np.linalg.norm(np.float64(outs["w"][-1])), clip_values[-1], rtol=1e-4
    )
    assert np.all(np.isfinite(states.mean)) and np.all(np.isfinite(states.std))
    np.testing.assert_allclose(states.mean[24:], means[24:], rtol=1e-4)
    np.testing.assert_allclose(states.std[24:], stds[24:], rtol=1e-4)


SMALL = optaxclip.zclip(warmup_steps=5)


def test_vmap_over_independent_runs_equals_separate_runs():
    grads = recorded_gradients(**SHORT)
    batch = {k: np.stack([v, 3.0 * v, np.flip(v, 0)], 1) for k, v in grads.items()}
    outs, states = run_scan(batched(SMALL), batch)
    for run in range(3):
        single_outs, single_states = run_scan(SMALL, {k: v[:, run] for k, v in batch.items()})
        for k in SHAPES:
            np.testing.assert_allclose(outs[k][:, run], single_outs[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(states.mean[:, run], single_states.mean, rtol=1e-6)


def test_axis_name_gives_the_norm_of_the_whole_gradient_across_shards():
    grads = recorded_gradients(**SHORT)
    # Two shards: "w" split along its first axis, "b" replicated, as the layout says.
    layout = {"b": P(), "w": P("shards")}
    sharded = optaxclip.zclip(warmup_steps=5, axis_name="shards", layout=layout)
    shards = {"b": np.stack([grads["b"]] * 2, 1), "w": grads["w"].reshape(40, 2, 2, 3)}
    outs, states = run_scan(batched(sharded, "shards"), shards)
    full_outs, full_states = run_scan(SMALL, grads)
    for shard in range(2):
        np.testing.assert_allclose(
            states.stats.pre_clip_norm[:, shard], full_states.stats.pre_clip_norm, rtol=1e-6
        )
    np.testing.assert_allclose(outs["w"].reshape(40, 4, 3), full_outs["w"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(outs["b"][:, 1], full_outs["b"], rtol=1e-5, atol=1e-7)


def test_orbax_restore_mid_run_continues_bit_identically(tmp_path):
    grads = recorded_gradients(**SHORT)
    tx = optax.chain(optaxclip.zclip(warmup_steps=10), optax.adam(1e-2))
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    steps = step_slices(grads, range(40))
    full, resumed = resume_from_checkpoint(tx, params, steps, 20, tmp_path / "zclip")
    (p_full, s_full), (p_resumed, s_resumed) = full, resumed
    for a, b in zip(
        jax.tree.leaves((p_full, s_full)), jax.tree.leaves((p_resumed, s_resumed)), strict=True
    ):
        assert same_bits(a, b)
    assert optaxclip.clip_stats(s_resumed).keys() == optaxclip.clip_stats(s_full).keys()


def test_flax_nnx_optimizer_step_reports_clip_stats():
    model, optimizer = nnx_linear(optax.chain(optaxclip.zclip(warmup_steps=2), optax.sgd(0.1)))
    x = jnp.arange(6.0).reshape(2, 3)
    train_step = nnx_train_step(lambda m: jnp.sum(m(x) ** 2))
    for _ in range(3):
        grads = train_step(model, optimizer)
    expected = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in jax.tree.leaves(grads)))
    stats = optaxclip.clip_stats(optimizer)
    np.testing.assert_allclose(stats["zclip/pre_clip_norm"], expected, rtol=1e-5)
    assert int(stats["zclip/steps"]) == 3


def test_multisteps_clips_the_accumulated_gradient_once_per_real_step():
    grads = recorded_gradients(steps=24, spikes=((13, 100.0),), nan_step=None)
    tx = optax.MultiSteps(optax.chain(optaxclip.zclip(warmup_steps=3), optax.sgd(1.0)), 3)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    for t, (_, state) in enumerate(run_updates(tx, params, step_slices(grads, range(24)))):
        if t % 3 == 2:
            mean = {k: np.mean(np.float64(v[t - 2 : t + 1]), 0) for k, v in grads.items()}
            norm = math.sqrt(sum(float(np.sum(m**2)) for m in mean.values()))
            stats = optaxclip.clip_stats(state)
            np.testing.assert_allclose(stats["zclip/pre_clip_norm"], norm, rtol=1e-5)
            assert int(stats["zclip/steps"]) == (t + 1) // 3


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(z_thresh=0.0), "z_thresh"),
        (dict(z_thresh=-1.0), "z_thresh"),
        (dict(warmup_steps=0), "warmup_steps"),
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(mode="median"), "mode"),
        (dict(clip_option="max"), "clip_option"),
        (dict(clip_factor=0.0), "clip_factor"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm"),
        (dict(eps=-1e-6), "eps"),
        (dict(skip_update_on_spike="yes"), "skip_update_on_spike"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(name="a/b"), "name"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        optaxclip.zclip(**kwargs)


def test_inject_hyperparams_without_static_warmup_steps_says_what_to_do():
    # init runs eagerly and gets a concrete count; the traced one under jit must raise.
    tx = optax.inject_hyperparams(optaxclip.zclip)(warmup_steps=2)
    grads = {"w": jnp.zeros(2)}
    with pytest.raises(TypeError, match=r"static_args=\('warmup_steps',\)"):
        jax.jit(tx.update)(grads, tx.init(grads))
