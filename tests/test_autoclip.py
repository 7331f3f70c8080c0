"""AutoClip: against a float64 NumPy version of the paper's algorithm, and its properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.runs import batched, nnx_linear, nnx_train_step, resume_from_checkpoint, run_updates
from hypothesis import example, given
from hypothesis import strategies as st

import optaxclip
from optaxclip._transforms.rules import history_percentile

SHAPES = {"w": (4, 3), "b": (3,)}
jitted_percentile = jax.jit(history_percentile)


def recorded_gradients(history_size, seed=0):
    """Quiet steps, spikes of x100-x1000, one NaN step, then a quiet stretch that wraps."""
    rng = np.random.default_rng(seed)
    multipliers = [1.0] * 8 + [100.0, 1.0, 1000.0, 1.0, 300.0] + [1.0] * 3
    steps = []
    for factor in multipliers:
        steps.append(
            {k: (rng.normal(size=s) * factor).astype(np.float32) for k, s in SHAPES.items()}
        )
    nan_step = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    nan_step["w"][1, 2] = np.nan
    steps.append(nan_step)
    for _ in range(2 * history_size + 5):
        steps.append({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    steps[-3] = {k: v * 500.0 for k, v in steps[-3].items()}
    return steps


def autoclip_reference(steps, percentile, history_size):
    """Algorithm 1 of the paper in float64, with the history limited to a window."""
    history, outputs, thresholds = [], [], []
    for grads in steps:
        norm = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in grads.values()))
        if math.isfinite(norm):
            history.append(norm)
        window = history[-history_size:]
        threshold = float(np.percentile(window, percentile)) if window else math.inf
        scale = min(1.0, threshold / norm) if math.isfinite(norm) and norm > 0 else 1.0
        outputs.append({k: np.float64(g) * scale for k, g in grads.items()})
        thresholds.append(threshold)
    return outputs, thresholds


@pytest.mark.parametrize("percentile", [10.0, 95.0])
def test_matches_float64_reference_step_by_step_through_spikes_nan_and_wraparound(percentile):
    size = 8
    steps = recorded_gradients(size)
    expected, thresholds = autoclip_reference(steps, percentile, size)
    tx = optaxclip.autoclip(percentile, history_size=size)
    update = jax.jit(tx.update)
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    finite_seen = 0
    for t, grads in enumerate(steps):
        out, state = update(grads, state)
        for k in SHAPES:
            np.testing.assert_allclose(out[k], expected[t][k], rtol=2e-6, atol=1e-30)
        np.testing.assert_allclose(state.stats.threshold, thresholds[t], rtol=2e-6)
        finite_seen += all(np.all(np.isfinite(g)) for g in grads.values())
        assert int(state.filled) == min(finite_seen, size)
        assert int(state.stats.steps) == t + 1
        assert np.all(np.isfinite(state.history))
    assert finite_seen > 2 * size  # the buffer wrapped


def test_first_step_is_never_clipped_and_threshold_equals_its_norm():
    tx = optaxclip.autoclip(0.0, history_size=4)
    grads = {"w": jnp.array([30.0, 40.0])}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(out["w"], grads["w"])
    assert float(state.stats.threshold) == 50.0
    assert float(state.stats.clipped_fraction) == 0.0


def test_nonfinite_step_leaves_history_unchanged_and_moves_only_counters():
    tx = optaxclip.autoclip(50.0, history_size=4)
    grads = {"w": jnp.array([3.0, 4.0])}
    update = jax.jit(tx.update)
    state = tx.init(grads)
    _, state = update(grads, state)
    bad = {"w": jnp.array([jnp.inf, 1.0])}
    out, after = update(bad, state)
    np.testing.assert_array_equal(after.history, state.history)
    assert int(after.filled) == int(state.filled) == 1
    assert int(after.next_slot) == int(state.next_slot)
    assert int(after.stats.steps) == 2
    np.testing.assert_array_equal(out["w"], bad["w"])  # propagate: passed through unscaled
    assert float(after.stats.threshold) == 5.0


def test_nonfinite_zero_policy_returns_zeros():
    tx = optaxclip.autoclip(50.0, nonfinite="zero")
    grads = {"w": jnp.array([jnp.nan, 1.0])}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])
    assert int(state.filled) == 0


@given(
    values=st.lists(st.floats(0.0, 1e3, width=32, allow_subnormal=False), min_size=1, max_size=16),
    percentile=st.floats(0.0, 100.0),
    junk=st.floats(0.0, 1e6, width=32, allow_nan=False),
)
@example(values=[0.0, 0.0, 0.0, 1.0], percentile=67.5, junk=0.0)  # position 2.025 in float32
@example(values=[0.0, 7.52316384526264e-37], percentile=1.0, junk=0.0)  # a subnormal result
@example(values=[0.0], percentile=0.0, junk=0.0)  # one value
def test_history_percentile_equals_numpy_percentile_linear(values, percentile, junk):
    buffer = np.full(16, junk, np.float32)  # the unused entries must not matter
    buffer[: len(values)] = values
    got = jitted_percentile(jnp.asarray(buffer), jnp.int32(len(values)), percentile)
    ordered = np.sort(np.asarray(values, np.float32).astype(np.float64))
    expected = np.percentile(ordered, percentile)
    # The rank position p * (n - 1) / 100 is computed in float32 (a few roundings, each at most
    # 2^-24 relative); the interpolated value moves by that error times the steepest gap
    # between neighbours, and the lerp itself rounds at the scale of the largest value. A result
    # below float32's smallest normal number may be flushed to 0 (XLA:CPU flushes subnormals).
    position = percentile * (len(values) - 1) / 100
    steepest = float(np.max(np.diff(ordered))) if len(values) > 1 else 0.0
    tolerance = 2.0**-21 * (position * steepest + ordered[-1]) + float(np.finfo(np.float32).tiny)
    assert abs(float(got) - expected) <= tolerance, (float(got), expected, tolerance)


def test_history_percentile_of_empty_history_is_inf():
    assert float(jitted_percentile(jnp.ones(16), jnp.int32(0), 50.0)) == math.inf


def _quadratic_run(clipper, steps=60):
    curvature = jnp.logspace(-1, 1, 8)
    target = jnp.linspace(-1.0, 1.0, 8)
    tx = optax.chain(clipper, optax.adam(0.05, eps=1e-30))

    # A fixed noise sequence makes the norms fluctuate as with minibatches.
    noise = 3.0 * jax.random.normal(jax.random.key(0), (steps, 8))

    @jax.jit
    def run(scale):
        def loss(w, batch_noise):
            return scale * (0.5 * jnp.sum(curvature * (w - target) ** 2) + batch_noise @ w)

        def step(carry, batch_noise):
            w, state = carry
            updates, state = tx.update(jax.grad(loss)(w, batch_noise), state, w)
            w = optax.apply_updates(w, updates)
            return (w, state), (w, optaxclip.clip_stats(state))

        w0 = jnp.full(8, 3.0)
        _, (trajectory, stats) = jax.lax.scan(step, (w0, tx.init(w0)), noise)
        return trajectory, stats

    return run


def test_scale_invariance_with_adam_and_a_fixed_clip_is_not_invariant():
    run = _quadratic_run(optaxclip.autoclip(10.0, history_size=20))
    base, stats = run(1.0)
    assert float(jnp.mean(stats["autoclip/clipped_fraction"])) > 0.5  # clipping is active
    for scale in (1e-3, 1e3):
        other, other_stats = run(scale)
        np.testing.assert_allclose(other, base, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(
            other_stats["autoclip/clipped_fraction"], stats["autoclip/clipped_fraction"]
        )
    fixed = _quadratic_run(optaxclip.clip_by_global_norm(1.0))
    small, _ = fixed(1e-3)
    large, _ = fixed(1e3)
    assert float(jnp.max(jnp.abs(small - large))) > 1e-2


def test_vmap_over_independent_runs_equals_a_loop_of_runs():
    tx = optaxclip.autoclip(30.0, history_size=4)
    rng = np.random.default_rng(1)
    grads = rng.lognormal(size=(3, 7, 5)).astype(np.float32)  # (runs, steps, dim)
    grads[1, 3] *= 1000.0
    together = run_updates(batched(tx), jnp.zeros((3, 5)), jnp.asarray(grads).swapaxes(0, 1))
    states = together[-1][1]
    for run in range(3):
        alone = run_updates(tx, jnp.zeros(5), jnp.asarray(grads[run]))
        for t in range(7):
            np.testing.assert_allclose(together[t][0][run], alone[t][0], rtol=1e-6)
        np.testing.assert_allclose(states.history[run], alone[-1][1].history, rtol=1e-6)


def test_multisteps_clips_the_accumulated_gradient_and_counts_real_steps():
    k = 3
    inner = optaxclip.autoclip(10.0, history_size=8)
    tx = optax.MultiSteps(optax.chain(inner, optax.sgd(1.0)), every_k_schedule=k)
    rng = np.random.default_rng(2)
    micro = rng.normal(size=(2 * k, 4)).astype(np.float32) * np.array(
        [[1], [1], [1], [50], [1], [1]]
    )
    params = jnp.zeros(4)
    results = run_updates(tx, params, [jnp.asarray(g) for g in micro])
    emitted = [updates for updates, _ in results]
    state = results[-1][1]
    alone_state = inner.init(params)
    for step in range(2):
        mean = jnp.asarray(micro[step * k : (step + 1) * k].mean(axis=0))
        expected, alone_state = jax.jit(inner.update)(mean, alone_state)
        np.testing.assert_allclose(emitted[(step + 1) * k - 1], -expected, rtol=1e-5)
    stats = optaxclip.clip_stats(state)
    assert int(stats["autoclip/steps"]) == 2
    assert int(state.inner_opt_state[0].filled) == 2


def test_nnx_optimizer_step_reports_stats():
    model, optimizer = nnx_linear(
        optax.chain(optaxclip.autoclip(10.0, history_size=8), optax.sgd(0.1))
    )
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    grads = nnx_train_step(lambda m: jnp.mean((m(x) - y) ** 2))(model, optimizer)
    norm, stats = optaxclip.global_norm(grads), optaxclip.clip_stats(optimizer)
    assert int(stats["autoclip/steps"]) == 1
    np.testing.assert_allclose(stats["autoclip/pre_clip_norm"], norm, rtol=1e-6)
    np.testing.assert_allclose(stats["autoclip/threshold"], norm, rtol=1e-6)
    np.testing.assert_allclose(optimizer.opt_state[0].history[0], norm, rtol=1e-6)


def test_orbax_restore_midway_continues_bit_identically(tmp_path):
    tx = optax.chain(optaxclip.autoclip(10.0, history_size=4), optax.adam(1e-2))
    steps = recorded_gradients(4, seed=3)[:14]
    steps = [g for g in steps if all(np.all(np.isfinite(v)) for v in g.values())]
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    full, resumed = resume_from_checkpoint(tx, params, steps, 6, tmp_path / "ckpt")
    assert jax.tree.structure(resumed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inject_hyperparams_needs_static_history_size():
    factory = optax.inject_hyperparams(optaxclip.autoclip, static_args=("history_size",))
    tx = factory(percentile=50.0, history_size=4)
    grads = {"w": jnp.array([3.0, 4.0])}
    state = tx.init(grads)
    out, state = jax.jit(tx.update)(grads, state)
    np.testing.assert_allclose(out["w"], grads["w"])
    traced = optax.inject_hyperparams(optaxclip.autoclip)(percentile=50.0, history_size=4)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(traced.update)(grads, traced.init(grads))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"percentile": -1.0}, ValueError, "percentile"),
        ({"percentile": 100.5}, ValueError, "percentile"),
        ({"percentile": math.nan}, ValueError, "percentile"),
        ({"history_size": 0}, ValueError, "history_size"),
        ({"history_size": 10.0}, TypeError, "history_size"),
        ({"history_size": True}, TypeError, "history_size"),
        ({"ord": 0.5}, ValueError, "ord"),
        ({"nonfinite": "skip"}, ValueError, "nonfinite"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.autoclip(**kwargs)
