"""quantile_clip: against the geometric update of Andrew et al. in float64, and its properties."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.runs import batched, nnx_linear, nnx_train_step, resume_from_checkpoint, run_updates

import optaxclip

SHAPES = {"w": (4, 3), "b": (3,)}


def recorded_gradients(seed=0):
    """Quiet steps, spikes of x100-x1000, one NaN step, then a long quiet stretch."""
    rng = np.random.default_rng(seed)
    multipliers = [1.0] * 10 + [100.0, 1.0, 1000.0, 300.0] + [1.0] * 3 + [None] + [1.0] * 40
    steps = []
    for factor in multipliers:
        grads = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
        if factor is None:
            grads["b"][0] = np.nan
        else:
            grads = {k: (v * factor).astype(np.float32) for k, v in grads.items()}
        steps.append(grads)
    return steps


def quantile_reference(steps, target, learning_rate, initial):
    """Clip with C_t, then C_{t+1} = C_t exp(-eta (b_t - gamma)), in float64, no noise."""
    threshold = initial
    outputs, thresholds = [], []
    for grads in steps:
        norm = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in grads.values()))
        thresholds.append(threshold)
        if not math.isfinite(norm):
            outputs.append({k: np.float64(g) for k, g in grads.items()})
            continue
        scale = min(1.0, threshold / norm) if norm > 0 else 1.0
        outputs.append({k: np.float64(g) * scale for k, g in grads.items()})
        unclipped = 1.0 if norm <= threshold else 0.0
        threshold = threshold * math.exp(-learning_rate * (unclipped - target))
    return outputs, thresholds, threshold


@pytest.mark.parametrize(("target", "learning_rate"), [(0.5, 0.2), (0.9, 0.5)])
def test_matches_float64_reference_step_by_step_through_spikes_and_nan(target, learning_rate):
    steps = recorded_gradients()
    expected, thresholds, final = quantile_reference(steps, target, learning_rate, 0.5)
    tx = optaxclip.quantile_clip(target, learning_rate, 0.5)
    update = jax.jit(tx.update)
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    for t, grads in enumerate(steps):
        out, state = update(grads, state)
        for k in SHAPES:
            np.testing.assert_allclose(out[k], expected[t][k], rtol=1e-5, atol=1e-30)
        np.testing.assert_allclose(state.stats.threshold, thresholds[t], rtol=1e-5)
        assert int(state.stats.steps) == t + 1
    np.testing.assert_allclose(state.threshold, final, rtol=1e-5)


def test_nonfinite_step_leaves_the_threshold_unchanged():
    tx = optaxclip.quantile_clip(0.5, 0.2, 2.0)
    update = jax.jit(tx.update)
    grads = {"w": jnp.array([jnp.nan, 1.0])}
    out, state = update(grads, tx.init(grads))
    assert float(state.threshold) == 2.0
    assert int(state.stats.steps) == 1
    np.testing.assert_array_equal(out["w"], grads["w"])


@jax.jit
def run_on_norms(norms, target, learning_rate, initial):
    """Feeds one-leaf gradients with the given norms through quantile_clip under lax.scan.

    The hyperparameters are traced, so every call with 5000 norms shares one compilation.
    """
    tx = optaxclip.quantile_clip(target, learning_rate, initial)

    def step(state, norm):
        _, state = tx.update({"g": jnp.stack([norm, 0.0])}, state)
        return state, (state.stats.pre_clip_norm, state.stats.threshold)

    return jax.lax.scan(step, tx.init({"g": jnp.zeros(2)}), norms)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_unclipped_fraction_converges_to_target_quantile_on_lognormal_norms(target):
    rng = np.random.default_rng(4)
    norms = rng.lognormal(mean=2.0, sigma=1.0, size=5000).astype(np.float32)
    _, (seen, used) = run_on_norms(norms, target, 0.2, 0.01)
    unclipped = np.asarray(seen <= used)[-2000:]
    assert abs(unclipped.mean() - target) < 0.05
    # The threshold also sits near the true quantile of the distribution.
    true_quantile = math.exp(2.0 + 1.0 * _normal_ppf(target))
    assert abs(math.log(float(np.median(used[-2000:])) / true_quantile)) < 0.35


def _normal_ppf(q):
    """Inverse standard normal CDF by bisection (enough for a test)."""
    low, high = -10.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def test_threshold_survives_a_long_run_of_zero_gradients_and_recovers():
    norms = np.concatenate([np.zeros(1500), np.full(3500, 5.0)]).astype(np.float32)
    state, (_, used) = run_on_norms(norms, 0.5, 0.2, 1.0)
    assert float(np.min(used)) > 0
    assert np.all(np.isfinite(used))
    np.testing.assert_allclose(float(state.threshold), 5.0, rtol=0.15)


def test_learning_rate_zero_is_a_fixed_clip():
    tx = optaxclip.quantile_clip(0.5, learning_rate=0.0, initial_threshold=1.0)
    grads = {"w": jnp.array([3.0, 4.0])}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
    assert float(state.threshold) == 1.0


def test_vmap_over_independent_runs_equals_a_loop_of_runs():
    tx = optaxclip.quantile_clip(0.5, 0.3, 1.0)
    rng = np.random.default_rng(1)
    grads = rng.lognormal(size=(3, 7, 5)).astype(np.float32)
    grads[2, 4] *= 1000.0
    together = run_updates(batched(tx), jnp.zeros((3, 5)), jnp.asarray(grads).swapaxes(0, 1))
    states = together[-1][1]
    for run in range(3):
        alone = run_updates(tx, jnp.zeros(5), jnp.asarray(grads[run]))
        for t in range(7):
            np.testing.assert_allclose(together[t][0][run], alone[t][0], rtol=1e-6)
        np.testing.assert_allclose(states.threshold[run], alone[-1][1].threshold, rtol=1e-6)


def test_multisteps_clips_the_accumulated_gradient_and_counts_real_steps():
    k = 4
    inner = optaxclip.quantile_clip(0.5, 0.2, 1.0)
    tx = optax.MultiSteps(optax.chain(inner, optax.sgd(1.0)), every_k_schedule=k)
    rng = np.random.default_rng(2)
    micro = rng.normal(size=(2 * k, 4)).astype(np.float32)
    params = jnp.zeros(4)
    results = run_updates(tx, params, [jnp.asarray(g) for g in micro])
    emitted = [updates for updates, _ in results]
    state = results[-1][1]
    alone_state = inner.init(params)
    for step in range(2):
        mean = jnp.asarray(micro[step * k : (step + 1) * k].mean(axis=0))
        expected, alone_state = jax.jit(inner.update)(mean, alone_state)
        np.testing.assert_allclose(emitted[(step + 1) * k - 1], -expected, rtol=1e-5)
    assert int(optaxclip.clip_stats(state)["quantile_clip/steps"]) == 2
    np.testing.assert_allclose(state.inner_opt_state[0].threshold, alone_state.threshold)


def test_nnx_optimizer_step_reports_stats():
    model, optimizer = nnx_linear(
        optax.chain(optaxclip.quantile_clip(0.5, 0.2, 0.01), optax.sgd(0.1))
    )
    x, y = jnp.ones((4, 3)), jnp.ones((4, 2))
    grads = nnx_train_step(lambda m: jnp.mean((m(x) - y) ** 2))(model, optimizer)
    norm, stats = optaxclip.global_norm(grads), optaxclip.clip_stats(optimizer)
    assert float(norm) > 0.01
    assert int(stats["quantile_clip/steps"]) == 1
    np.testing.assert_allclose(stats["quantile_clip/pre_clip_norm"], norm, rtol=1e-6)
    np.testing.assert_allclose(stats["quantile_clip/post_clip_norm"], 0.01, rtol=1e-5)
    # Clipped, so the threshold for the next step grew by exp(0.2 * 0.5).
    np.testing.assert_allclose(optimizer.opt_state[0].threshold, 0.01 * math.exp(0.1), rtol=1e-5)


def test_orbax_restore_midway_continues_bit_identically(tmp_path):
    tx = optax.chain(optaxclip.quantile_clip(0.5, 0.2, 0.5), optax.adam(1e-2))
    steps = [g for g in recorded_gradients(seed=3)[:20] if np.isfinite(g["b"]).all()]
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    full, resumed = resume_from_checkpoint(tx, params, steps, 9, tmp_path / "ckpt")
    assert jax.tree.structure(resumed) == jax.tree.structure(full)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


def test_inject_hyperparams_can_schedule_the_learning_rate():
    factory = optax.inject_hyperparams(optaxclip.quantile_clip)
    tx = factory(target_quantile=0.5, learning_rate=0.2, initial_threshold=1.0)
    grads = {"w": jnp.array([3.0, 4.0])}
    _, state = jax.jit(tx.update)(grads, tx.init(grads))
    np.testing.assert_allclose(state.inner_state.threshold, math.exp(0.1), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_quantile": -0.1}, ValueError, "target_quantile"),
        ({"target_quantile": 1.5}, ValueError, "target_quantile"),
        ({"learning_rate": -0.2}, ValueError, "learning_rate"),
        ({"learning_rate": math.inf}, ValueError, "learning_rate"),
        ({"initial_threshold": 0.0}, ValueError, "initial_threshold"),
        ({"initial_threshold": -1.0}, ValueError, "initial_threshold"),
        ({"initial_threshold": math.nan}, ValueError, "initial_threshold"),
        ({"initial_threshold": "1"}, TypeError, "initial_threshold"),
        ({"nonfinite": "skip"}, ValueError, "nonfinite"),
    ],
)
def test_bad_hyperparameters_are_rejected_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        optaxclip.quantile_clip(**kwargs)
