"""skip_spikes: a float64 rolling-window reference of the skip rule, step by step, and the
frozen inner state."""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.guards import SHAPES, STEPS, inner_state_unchanged, recorded_gradients
from helpers.references import Adam64
from helpers.runs import run_scan, run_updates, step_slices
from hypothesis import assume, given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optaxclip


def global_norm64(grads, t):
    return math.sqrt(sum(float(np.sum(np.float64(v[t]) ** 2)) for v in grads.values()))


class SkipSpikes64:
    """The rule of skip_spikes in float64: windows of accepted values, mean + k * std.

    The std is Bessel-corrected and floored at 1e-6 |mean| and at 1e-30.
    """

    def __init__(self, window, k, min_history):
        self.k, self.min_history = k, min_history
        self.norms = collections.deque(maxlen=window)
        self.losses = collections.deque(maxlen=window)

    def threshold(self, values):
        if len(values) < self.min_history:
            return math.inf
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        return mean + self.k * max(std, 1e-6 * abs(mean), 1e-30)

    def step(self, norm, loss=None):
        norm_threshold = self.threshold(self.norms)
        loss_threshold = self.threshold(self.losses) if loss is not None else math.inf
        finite = math.isfinite(norm) and (loss is None or math.isfinite(loss))
        spike = norm > norm_threshold or (loss is not None and loss > loss_threshold)
        skip = not finite or spike
        if not skip:
            self.norms.append(norm)
            if loss is not None:
                self.losses.append(loss)
        return skip, norm_threshold, loss_threshold


@functools.cache
def spikes_guard(window, k, min_history):
    return optaxclip.skip_spikes(optax.adam(1e-2), window=window, k=k, min_history=min_history)


@pytest.mark.parametrize(
    ("config", "use_loss"),
    [((128, 6.0, 64), False), ((16, 3.0, 8), True)],
    ids=["defaults-norm", "short-window-norm-and-loss"],
)
def test_spike_skips_match_float64_rolling_window_step_by_step(config, use_loss):
    grads, loss = recorded_gradients()
    outs, states = run_scan(spikes_guard(*config), grads, loss if use_loss else None)
    ref, adam = SkipSpikes64(*config), Adam64(1e-2, SHAPES)
    for t in range(STEPS):
        g = {k: v[t] for k, v in grads.items()}
        skip, norm_threshold, loss_threshold = ref.step(
            global_norm64(grads, t), float(loss[t]) if use_loss else None
        )
        assert bool(states.skipped[t]) == skip, f"step {t}"
        np.testing.assert_allclose(states.norm_threshold[t], norm_threshold, rtol=1e-5)
        np.testing.assert_allclose(states.loss_threshold[t], loss_threshold, rtol=1e-5)
        expected = {k: np.zeros(s) for k, s in SHAPES.items()} if skip else adam.update(g)
        for k in SHAPES:  # Adam sees the accepted steps only
            np.testing.assert_allclose(outs[k][t], expected[k], rtol=1e-4, atol=1e-7)
        assert int(states.inner_state[0].count[t]) == adam.count
    assert states.skipped[100] and states.skipped[120]
    assert bool(states.skipped[140]) == use_loss
    assert int(states.total_skipped[-1]) == int(np.sum(states.skipped))


# Norms and losses drift geometrically, at most 8 decades over the run (slow against the
# window, so no drifting step is a spike), then the loss spikes on one step and the norm on
# the last.
DRIFT_STEPS = 300
DRIFT_SPIKE = 1e3  # a spike over the drift's final level
DRIFT_GUARD = optaxclip.skip_spikes(optax.sgd(1.0), window=32, k=6.0, min_history=16)


def drifting_levels(start, end, rng):
    """10**start -> 10**end geometrically over the run, with 5% noise."""
    return np.logspace(start, end, DRIFT_STEPS) * np.exp(0.05 * rng.normal(size=DRIFT_STEPS))


@given(
    start=st.integers(-30, 35),
    change=st.integers(-8, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_thresholds_stay_finite_and_spikes_are_skipped_while_values_drift_over_float32_range(
    start, change, seed
):
    end = min(max(start + change, -30), 35)
    rng = np.random.default_rng(seed)
    norms, loss = drifting_levels(start, end, rng), drifting_levels(start, end, rng)
    loss[-2] = 10.0**end * DRIFT_SPIKE
    norms[-1] = 10.0**end * DRIFT_SPIKE
    grads = {"w": np.asarray(np.outer(norms, [0.6, 0.8]), np.float32)}
    loss = loss.astype(np.float32)
    # mean + k * std of each window in float64, where no square of these values overflows.
    ref = SkipSpikes64(32, 6.0, 16)
    skips, norm_thresholds, loss_thresholds, margins = [], [], [], []
    for t in range(DRIFT_STEPS):
        norm = global_norm64(grads, t)
        skip, norm_threshold, loss_threshold = ref.step(norm, float(loss[t]))
        skips.append(skip)
        norm_thresholds.append(norm_threshold)
        loss_thresholds.append(loss_threshold)
        if math.isfinite(norm_threshold):
            margins += [abs(norm / norm_threshold - 1), abs(loss[t] / loss_threshold - 1)]
    # float32 rounding may flip a decision on a value within rounding of its threshold.
    assume(min(margins) > 1e-3)
    assert skips[-2:] == [True, True]

    outs, states = run_scan(DRIFT_GUARD, grads, loss)
    ready = slice(16, None)  # steps with min_history accepted values in the windows
    assert np.all(np.isfinite(states.norm_threshold[ready]))
    assert np.all(np.isfinite(states.loss_threshold[ready]))
    np.testing.assert_allclose(states.norm_threshold[ready], norm_thresholds[ready], rtol=1e-5)
    np.testing.assert_allclose(states.loss_threshold[ready], loss_thresholds[ready], rtol=1e-5)
    np.testing.assert_array_equal(states.skipped, skips)
    assert np.all(outs["w"][-2:] == 0)


def test_spike_is_skipped_only_once_min_history_steps_are_in_the_window():
    grads, _ = recorded_gradients(nan_steps=())
    _, states = run_scan(spikes_guard(128, 6.0, 64), grads)
    assert not states.skipped[10]  # x100 at step 10: only 10 accepted steps so far
    assert np.isinf(states.norm_threshold[10])
    assert states.skipped[90] and np.isfinite(states.norm_threshold[90])
    # The threshold is built from accepted steps only: the skipped spike does not move it.
    np.testing.assert_allclose(states.norm_threshold[101], states.norm_threshold[100], rtol=1e-6)


def test_max_consecutive_skips_lets_a_lasting_jump_through_and_restarts_the_count():
    guard = optaxclip.skip_spikes(optax.sgd(1.0), window=16, min_history=4, max_consecutive_skips=2)
    norms = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 1.0] + [100.0] * 3 + [1e4] * 3
    grads = {"w": np.array([[n] for n in norms], np.float32)}
    _, states = run_scan(guard, grads)
    np.testing.assert_array_equal(states.skipped[8:], [1, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(states.consecutive_skips[8:], [1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(states.norm_count[-1], 10)  # the two let through


def test_spike_guard_freezes_adam_state_on_a_skipped_step():
    grads, loss = recorded_gradients()
    outs, states = run_scan(spikes_guard(16, 3.0, 8), grads, loss)
    t = 100
    assert states.skipped[t] and all(np.all(outs[k][t] == 0) for k in SHAPES)
    assert inner_state_unchanged(states, t)


def test_spike_guard_axis_name_uses_the_norm_of_the_whole_gradient():
    grads, loss = recorded_gradients()
    layout = {"b": P(), "w": P("shards")}
    guard = optaxclip.skip_spikes(
        optax.adam(1e-2), window=16, k=3.0, min_history=8, axis_name="shards", layout=layout
    )

    def update(updates, state, params=None, *, loss):  # one loss, shared by both shards
        return jax.vmap(lambda u, s: guard.update(u, s, loss=loss), axis_name="shards")(
            updates, state
        )

    sharded = optax.GradientTransformationExtraArgs(jax.vmap(guard.init), update)
    shards = {"b": np.stack([grads["b"]] * 2, 1), "w": grads["w"].reshape(STEPS, 2, 2, 3)}
    _, states = run_scan(sharded, shards, loss)
    _, full = run_scan(spikes_guard(16, 3.0, 8), grads, loss)
    np.testing.assert_allclose(states.last_norm[:, 1], full.last_norm, rtol=1e-6)
    np.testing.assert_array_equal(states.skipped[:, 0], full.skipped)


def test_multisteps_spike_guard_judges_the_accumulated_gradient_once_per_real_step():
    grads, _ = recorded_gradients(nan_steps=())
    guard = optaxclip.skip_spikes(optax.sgd(1.0), window=8, k=3.0, min_history=4)
    tx = optax.MultiSteps(guard, 2)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    for t, (_, state) in enumerate(run_updates(tx, params, step_slices(grads, range(20)))):
        if t % 2 == 1:
            mean = [np.mean(np.float64(v[t - 1 : t + 1]), 0) for v in grads.values()]
            norm = math.sqrt(sum(float(np.sum(m**2)) for m in mean))
            np.testing.assert_allclose(state.inner_opt_state.last_norm, norm, rtol=1e-5)
            guard_state = state.inner_opt_state
            assert int(guard_state.norm_count + guard_state.total_skipped) == (t + 1) // 2


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), window=1, min_history=1), "window"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), window=8, min_history=9), "min_history"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), min_history=1), "min_history"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), k=0.0), "k"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), k=float("nan")), "k"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), ord=0.5), "ord"),
        (lambda: optaxclip.skip_spikes(optax.sgd(1.0), max_consecutive_skips=0), "max_consecutive_skips"),
        (lambda: optaxclip.skip_spikes(None), "inner"),
    ],
)  # fmt: skip
def test_bad_hyperparameters_raise_naming_the_argument(make, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        make()
