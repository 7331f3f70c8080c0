"""AdaGC: step by step against a float64 transcription of the official code, and integration."""

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
from jax.sharding import PartitionSpec as P

import optaxclip

SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 2)}  # dict leaves flatten in this (sorted) order
SCALES = {"a": 1.0, "b": 0.3, "c": 0.05}
STEPS = 200


def recorded_gradients(seed=0):
    """Quiet steps, spikes x100-x1000 in one leaf or all, one NaN step, a long quiet stretch.

    Leaf "c" is exactly zero for the first five steps (inside the warm-up).
    """
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(STEPS):
        for k, s in SHAPES.items():
            size = SCALES[k] * np.exp(rng.normal(0.0, 0.1))
            out[k][t] = rng.normal(size=s) * size / math.sqrt(np.prod(s))
    out["c"][:5] = 0.0
    out["a"][50] *= 100.0
    out["b"][60] *= 1000.0
    for k in SHAPES:
        out[k][61] *= 300.0
    out["c"][80, 0, 1] = np.nan
    out["c"][150] *= 100.0
    return out


class ReferenceAdaGC:
    """``AdaGC.clip_by_norm`` of the official Megatron patch (lishuai-97/AdaGC) in float64.

    Warm-up (``steps <= start_clip_steps``): global clip with ``max_norm / (total + eps)`` when
    below 1, then each tensor's state is the minimum of its norm measured after that clip.
    After: ``if n > ratio * avg: scale by ratio * avg / (n + eps); n = ratio * avg``, then
    ``avg <- beta * avg + (1 - beta) * n``; a tensor without state starts from its norm.

    optaxclip's documented departures, marked below: a non-finite step changes nothing and is
    not counted; a zero norm never sets a tensor's state (0 means "no state").
    """

    def __init__(self, ratio, beta, eps, start_clip_steps, max_norm):
        self.ratio, self.beta, self.eps = ratio, beta, eps
        self.start, self.max_norm = start_clip_steps, max_norm
        self.steps, self.state = 0, {}

    def threshold(self, norms):
        """Our reported threshold: max_norm in the warm-up, else the smallest ratio * avg."""
        if self.steps < self.start:
            return self.max_norm
        avgs = [self.state.get(i, 0.0) or n for i, n in enumerate(norms)]
        limits = [self.ratio * a for a in avgs if a > 0]
        return min(limits) if limits else math.inf

    def step(self, grads):
        grads = [np.float64(g) for g in grads]
        norms = [float(np.linalg.norm(g.ravel())) for g in grads]
        total = math.sqrt(sum(n * n for n in norms))
        threshold = self.threshold(norms)
        if not math.isfinite(total):  # departure: skip the step entirely
            return grads, threshold, 0.0
        self.steps += 1
        if self.steps <= self.start:
            coeff = self.max_norm / (total + self.eps)
            if coeff < 1.0:
                grads = [g * coeff for g in grads]
            for i, g in enumerate(grads):
                n = float(np.linalg.norm(g.ravel()))
                if n > 0:  # departure: a zero norm does not set the state
                    self.state[i] = min(self.state.get(i, n), n)
            return grads, threshold, float(coeff < 1.0)
        clipped = 0
        for i, n in enumerate(norms):
            avg = self.state.get(i, 0.0) or n  # no state (or 0, our "unset"): start from n
            if n > self.ratio * avg:
                grads[i] = grads[i] * (self.ratio * avg / (n + self.eps))
                n = self.ratio * avg
                clipped += 1
            self.state[i] = avg * self.beta + n * (1.0 - self.beta)
        return grads, threshold, clipped / len(grads)


@pytest.fixture(scope="module")
def recorded():
    return recorded_gradients()


CONFIGS = [(20, 1.0, 1e-6), (0, 1.0, 0.0), (10, math.inf, 1e-6)]


@functools.cache
def adagc_for(warmup_steps, warmup_max_norm, eps):
    return optaxclip.adagc(1.04, 0.99, warmup_steps, warmup_max_norm, eps)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_outputs_and_reference_norms_match_official_code_step_by_step(config, recorded):
    warmup, cap, eps = config
    outs, states = run_scan(adagc_for(*config), recorded)
    ref = ReferenceAdaGC(1.04, 0.99, eps, warmup, cap)
    for t in range(STEPS):
        expected, threshold, fraction = ref.step([recorded[k][t] for k in SHAPES])
        # rtol: float32 arithmetic, and the reference's eps in the warm-up divisor (1e-6 /
        # total, < 1e-5 here) where optaxclip scales exactly.
        for k, e in zip(SHAPES, expected, strict=True):
            np.testing.assert_allclose(outs[k][t], e, rtol=2e-5, atol=1e-9, err_msg=f"step {t}")
        gamma = [ref.state.get(i, 0.0) for i in range(len(SHAPES))]
        np.testing.assert_allclose(states.norm_ema[t], gamma, rtol=1e-4, err_msg=f"step {t}")
        np.testing.assert_allclose(states.stats.threshold[t], threshold, rtol=1e-4)
        np.testing.assert_allclose(states.stats.clipped_fraction[t], fraction, err_msg=f"step {t}")
        if t != 80:
            post = math.sqrt(sum(float(np.sum(e**2)) for e in expected))
            np.testing.assert_allclose(states.stats.post_clip_norm[t], post, rtol=2e-5)
    assert np.all(np.isfinite(states.norm_ema))


def test_nonfinite_step_changes_no_statistic_and_passes_the_gradient_through(recorded):
    outs, states = run_scan(adagc_for(*CONFIGS[0]), recorded)
    assert same_bits(states.norm_ema[80], states.norm_ema[79])
    assert int(states.finite_count[80]) == int(states.finite_count[79])
    assert np.isnan(outs["c"][80, 0, 1])
    assert same_bits(outs["a"][80], recorded["a"][80])


def test_a_spike_in_one_leaf_rescales_that_leaf_only(recorded):
    tx = adagc_for(*CONFIGS[0])
    part = recorded  # step 50: leaf "a" x100
    calm = {k: v.copy() for k, v in part.items()}
    calm["a"][50] /= 100.0
    outs, states = run_scan(tx, part)
    calm_outs, _ = run_scan(tx, calm)
    for k in ("b", "c"):  # whatever these leaves get, the spike in "a" does not change it
        assert same_bits(outs[k][50], calm_outs[k][50])
    gamma_a = states.norm_ema[49][0]
    np.testing.assert_allclose(np.linalg.norm(outs["a"][50]), 1.04 * gamma_a, rtol=1e-5)
    # Global clipping to the same norm would have shrunk every leaf by this factor.
    total = math.sqrt(sum(float(np.sum(np.float64(v[50]) ** 2)) for v in part.values()))
    assert 1.04 * gamma_a / total < 0.05


def test_locality_leaves_unspiked_leaves_bit_identical():
    tx = optaxclip.adagc(warmup_steps=1, warmup_max_norm=math.inf)
    base = {"x": jnp.array([0.3, 0.4]), "y": jnp.array([1.0, 2.0, 2.0])}
    spiky = {"x": base["x"] * 1000.0, "y": base["y"]}
    outs, _ = run_scan(tx, jax.tree.map(lambda a, b: jnp.stack([a, b]), base, spiky))
    assert same_bits(outs["y"][1], np.asarray(base["y"]))
    np.testing.assert_allclose(np.linalg.norm(outs["x"][1]), 1.04 * 0.5, rtol=1e-6)


def test_zero_gradient_during_warmup_does_not_freeze_the_leaf():
    # The official code would set gamma to 0 here and zero this leaf from then on.
    tx = optaxclip.adagc(warmup_steps=3)
    grads = {"frozen_then_live": jnp.array([[0.0], [0.0], [0.0], [2.0], [2.0]])}
    outs, states = run_scan(tx, grads)
    np.testing.assert_allclose(outs["frozen_then_live"][3:, 0], [2.0, 2.0])
    np.testing.assert_allclose(states.norm_ema[2:, 0], [0.0, 2.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(states.stats.threshold, [1.0, 1.0, 1.0, 2.08, 2.08], rtol=1e-6)


def test_always_zero_leaf_is_left_alone_and_not_reported_as_threshold():
    tx = optaxclip.adagc(warmup_steps=2, warmup_max_norm=math.inf)
    zeros = np.zeros((6, 2), np.float32)
    live = np.ones((6, 2), np.float32)
    outs, states = run_scan(tx, {"live": live, "zero": zeros})
    assert np.all(outs["zero"] == 0) and np.all(states.norm_ema[:, 1] == 0)
    np.testing.assert_allclose(states.stats.threshold[2:], 1.04 * math.sqrt(2.0), rtol=1e-6)


def test_vmap_over_independent_runs_equals_separate_runs(recorded):
    tx = adagc_for(*CONFIGS[0])
    batch = {k: np.stack([v, 0.5 * v], 1) for k, v in recorded.items()}
    outs, states = run_scan(batched(tx), batch)
    for run in range(2):
        single_outs, single_states = run_scan(tx, {k: v[:, run] for k, v in batch.items()})
        for k in SHAPES:
            np.testing.assert_allclose(outs[k][:, run], single_outs[k], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(states.norm_ema[:, run], single_states.norm_ema, rtol=1e-6)


def test_axis_name_gives_each_leaf_the_norm_of_the_whole_leaf(recorded):
    part = recorded
    layout = {"a": P("shards"), "b": P(), "c": P("shards")}
    sharded = optaxclip.adagc(1.04, 0.99, 20, 1.0, 1e-6, axis_name="shards", layout=layout)
    shards = {
        "a": part["a"].reshape(STEPS, 2, 2, 3),
        "b": np.stack([part["b"]] * 2, 1),
        "c": part["c"].reshape(STEPS, 2, 1, 2),
    }
    outs, states = run_scan(batched(sharded, "shards"), shards)
    full_outs, full_states = run_scan(adagc_for(*CONFIGS[0]), part)
    np.testing.assert_allclose(states.norm_ema[:, 0], full_states.norm_ema, rtol=1e-5)
    np.testing.assert_allclose(outs["a"].reshape(STEPS, 4, 3), full_outs["a"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(outs["b"][:, 1], full_outs["b"], rtol=1e-5, atol=1e-9)


def test_orbax_restore_mid_run_continues_bit_identically(tmp_path, recorded):
    tx = optax.chain(optaxclip.adagc(warmup_steps=5), optax.adam(1e-2))
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    steps = step_slices(recorded, range(20))
    full, resumed = resume_from_checkpoint(tx, params, steps, 10, tmp_path / "adagc")
    full, resumed = jax.tree.leaves(full), jax.tree.leaves(resumed)
    assert all(same_bits(a, b) for a, b in zip(full, resumed, strict=True))


def test_flax_nnx_optimizer_step_reports_clip_stats():
    tx = optax.chain(optaxclip.adagc(warmup_steps=1, warmup_max_norm=1e3), optax.sgd(0.01))
    model, optimizer = nnx_linear(tx)
    x = jnp.arange(6.0).reshape(2, 3)
    train_step = nnx_train_step(lambda m: jnp.sum(m(x) ** 2))
    for _ in range(2):
        grads = train_step(model, optimizer)
    stats = optaxclip.clip_stats(optimizer)
    norm = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(stats["adagc/pre_clip_norm"], norm, rtol=1e-5)
    assert int(stats["adagc/steps"]) == 2


def test_multisteps_clips_the_accumulated_gradient_once_per_real_step(recorded):
    inner = optax.chain(optaxclip.adagc(warmup_steps=2), optax.sgd(1.0))
    tx = optax.MultiSteps(inner, 3)
    params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    for t, (_, state) in enumerate(run_updates(tx, params, step_slices(recorded, range(12)))):
        if t % 3 == 2:
            mean = [np.mean(np.float64(v[t - 2 : t + 1]), 0) for v in recorded.values()]
            stats = optaxclip.clip_stats(state)
            norm = math.sqrt(sum(float(np.sum(m**2)) for m in mean))
            np.testing.assert_allclose(stats["adagc/pre_clip_norm"], norm, rtol=1e-5)
            assert int(stats["adagc/steps"]) == (t + 1) // 3


def test_gradient_with_other_leaves_than_init_raises():
    tx = optaxclip.adagc()
    state = tx.init({"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="initialised for 1"):
        tx.update({"a": jnp.zeros(2), "b": jnp.zeros(2)}, state)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(relative_factor=0.0), "relative_factor"),
        (dict(relative_factor=-1.0), "relative_factor"),
        (dict(beta=0.0), "beta"),
        (dict(beta=1.0), "beta"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=1.5), "warmup_steps"),
        (dict(warmup_max_norm=0.0), "warmup_max_norm"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(nonfinite="skip"), "nonfinite"),
        (dict(name=""), "name"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        optaxclip.adagc(**kwargs)
