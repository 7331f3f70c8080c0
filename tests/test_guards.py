"""skip_nonfinite and skip_spikes: float64 references of the skip rules, frozen inner state."""

import collections
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    batched,
    nnx_linear,
    resume_from_checkpoint,
    run_scan,
    run_updates,
    same_bits,
    step_slices,
)
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optaxclip

SHAPES = {"b": (5,), "w": (4, 3)}
STEPS = 200
SPIKES = {10: 100.0, 90: 100.0, 100: 1000.0, 101: 300.0, 160: 500.0}
NAN_STEPS = (120,)


def recorded_gradients(seed=0, nan_steps=NAN_STEPS, spikes=SPIKES):
    """Quiet steps (norm ~1), spikes x100-x1000, NaN steps, then a long quiet stretch.

    Also a loss per step: ~2 with small noise, and a loss spike on step 140 only.
    """
    rng = np.random.default_rng(seed)
    grads = {k: np.zeros((STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(STEPS):
        size = np.exp(rng.normal(0.0, 0.15)) * spikes.get(t, 1.0)
        for k, s in SHAPES.items():
            grads[k][t] = rng.normal(size=s) * size / math.sqrt(17.0)
    for t in nan_steps:
        grads["w"][t, 0, 0] = np.nan
    loss = (2.0 + 0.05 * rng.normal(size=STEPS)).astype(np.float32)
    loss[140] = 50.0
    return grads, loss


def global_norm64(grads, t):
    return math.sqrt(sum(float(np.sum(np.float64(v[t]) ** 2)) for v in grads.values()))


class Adam64:
    """optax.adam (b1=0.9, b2=0.999, eps=1e-8) in float64."""

    def __init__(self, lr):
        self.lr, self.count = lr, 0
        self.mu = {k: np.zeros(s) for k, s in SHAPES.items()}
        self.nu = {k: np.zeros(s) for k, s in SHAPES.items()}

    def update(self, g):
        self.count += 1
        out = {}
        for k, x in g.items():
            x = np.float64(x)
            self.mu[k] = 0.9 * self.mu[k] + 0.1 * x
            self.nu[k] = 0.999 * self.nu[k] + 0.001 * x * x
            m_hat = self.mu[k] / (1 - 0.9**self.count)
            v_hat = self.nu[k] / (1 - 0.999**self.count)
            out[k] = -self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        return out


def inner_state_unchanged(states, t):
    """Whether the inner optimizer state after step ``t`` is bit for bit the one before it."""
    before = jax.tree.map(lambda x: x[t - 1], states.inner_state)
    after = jax.tree.map(lambda x: x[t], states.inner_state)
    return all(
        same_bits(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )


# ----------------------------------------------------------------------------- skip_nonfinite

GUARDED_ADAM = optaxclip.skip_nonfinite(optax.adam(1e-2))


def test_nonfinite_guard_matches_float64_adam_that_never_saw_the_bad_steps():
    grads, _ = recorded_gradients(nan_steps=(120, 121, 122))
    outs, states = run_scan(GUARDED_ADAM, grads)
    adam = Adam64(1e-2)
    for t in range(STEPS):
        g = {k: v[t] for k, v in grads.items()}
        finite = all(np.all(np.isfinite(x)) for x in g.values())
        expected = adam.update(g) if finite else {k: np.zeros(s) for k, s in SHAPES.items()}
        for k in SHAPES:
            np.testing.assert_allclose(outs[k][t], expected[k], rtol=1e-4, atol=1e-7)
        assert bool(states.last_finite[t]) == finite
        assert int(states.inner_state[0].count[t]) == adam.count
    np.testing.assert_array_equal(states.total_errors[119:124], [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(states.consecutive_errors[119:124], [0, 1, 2, 3, 0])


def test_nan_step_gives_zero_update_and_leaves_adam_mu_nu_count_bitwise_unchanged():
    grads, _ = recorded_gradients()
    outs, states = run_scan(GUARDED_ADAM, grads)
    t = NAN_STEPS[0]
    assert all(np.all(outs[k][t] == 0) for k in SHAPES)
    assert inner_state_unchanged(states, t)


def test_skipped_step_is_invisible_to_the_inner_optimizer():
    grads, _ = recorded_gradients()
    t = NAN_STEPS[0]
    # The same steps without the bad one (and a repeat of the last step to keep the length).
    clean = {k: np.concatenate([np.delete(v, t, axis=0), v[-1:]]) for k, v in grads.items()}
    outs, _ = run_scan(GUARDED_ADAM, grads)
    plain, _ = run_scan(GUARDED_ADAM, clean)
    for k in SHAPES:
        assert same_bits(np.delete(outs[k], t, axis=0), plain[k][:-1])


SGD_GIVE_UP = optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=2)


def test_gives_up_after_n_consecutive_errors_and_resets_the_counter():
    grads = {"w": np.array([[1.0], [np.nan], [np.nan], [np.nan], [np.nan], [np.nan], [np.nan],
                            [2.0], [np.nan]], np.float32)}  # fmt: skip
    outs, states = run_scan(SGD_GIVE_UP, grads)
    applied = ~np.all(outs["w"] == 0, axis=1)
    np.testing.assert_array_equal(applied, [1, 0, 0, 1, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(states.consecutive_errors, [0, 1, 2, 0, 1, 2, 0, 0, 1])
    np.testing.assert_array_equal(states.total_errors, [0, 1, 2, 3, 4, 5, 6, 6, 7])
    # optax.apply_if_finite agrees up to the give-up step, then keeps applying (no reset).
    optax_tx = optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=2)
    optax_outs, _ = run_scan(optax_tx, grads)
    optax_applied = ~np.all(optax_outs["w"] == 0, axis=1)
    np.testing.assert_array_equal(optax_applied[:4], applied[:4])
    np.testing.assert_array_equal(optax_applied, [1, 0, 0, 1, 1, 1, 1, 1, 0])


def loss_recorder():
    """An ExtraArgs inner transformation whose state is the last loss it was given."""

    def init(params):
        return jnp.zeros((), jnp.float32)

    def update(updates, state, params=None, *, loss=None, **extra_args):
        return updates, jnp.asarray(-1.0 if loss is None else loss, jnp.float32)

    return optax.GradientTransformationExtraArgs(init, update)


def test_nonfinite_loss_skips_and_the_loss_is_forwarded_to_an_inner_that_takes_it():
    grads, loss = recorded_gradients(nan_steps=())
    loss = loss.copy()
    loss[7] = np.inf
    outs, states = run_scan(optaxclip.skip_nonfinite(loss_recorder()), grads, loss)
    assert np.all(outs["w"][7] == 0) and not states.last_finite[7]
    assert same_bits(outs["w"][6], grads["w"][6])
    np.testing.assert_array_equal(states.inner_state[:7], loss[:7])
    assert states.inner_state[7] == loss[6]  # frozen on the skipped step
    # A plain inner transformation simply does not receive the loss.
    adam_outs, _ = run_scan(GUARDED_ADAM, grads, loss)
    assert np.all(adam_outs["w"][7] == 0) and np.all(adam_outs["w"][8] != 0)


def test_axis_name_makes_every_shard_skip_when_one_shard_holds_nan():
    guard = optaxclip.skip_nonfinite(optax.sgd(1.0), axis_name="shards")
    sharded = batched(guard, "shards")
    grads = {"w": np.array([[[1.0], [2.0]], [[np.nan], [2.0]]], np.float32)}  # step, shard
    outs, states = run_scan(sharded, grads)
    assert np.all(outs["w"][0] != 0) and np.all(outs["w"][1] == 0)
    np.testing.assert_array_equal(states.total_errors[1], [1, 1])


_CHECK_SHAPES = ((300, 300), (7,), (3, 4), ())  # the first too large to be joined
_CHECK_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64)


@functools.cache
def _guarded_sgd_update(dtype):
    del dtype  # one compiled step per dtype (the cache key)
    guard = optaxclip.skip_nonfinite(optax.sgd(1.0))
    return guard, jax.jit(guard.update)


@pytest.mark.parametrize("bad", [None, np.nan, np.inf], ids=["finite", "nan", "inf"])
def test_finite_gradient_whose_norm_passes_the_float32_range_is_applied(bad):
    # The check takes the gradient's norm first and looks at every entry only when the norm
    # is not finite: finite entries whose norm passes float32's largest value (here about
    # 1.9e40) must still count as finite, and a NaN or Inf among them must still be found.
    grads = [np.full((100, 100), 3e38, np.float32), np.full((7,), -3e38, np.float32)]
    if bad is not None:
        grads[0][37, 11] = bad
    tree = [jnp.asarray(g) for g in grads]
    guard = optaxclip.skip_nonfinite(optax.sgd(1.0))
    out, state = jax.jit(guard.update)(tree, guard.init(tree))
    expected_finite = all(np.all(np.isfinite(g)) for g in grads)
    assert bool(state.last_finite) == expected_finite
    if expected_finite:
        norm = np.linalg.norm(np.concatenate([g.ravel() for g in grads]).astype(np.float64))
        assert norm > np.finfo(np.float32).max  # the case this test is about
        np.testing.assert_array_equal(np.asarray(out[0]), -grads[0])
    else:
        assert all(np.all(np.asarray(o) == 0) for o in out)


@given(
    dtype=st.sampled_from(_CHECK_DTYPES),
    seed=st.integers(0, 2**31 - 1),
    bad=st.sampled_from([None, np.nan, np.inf, -np.inf]),
    leaf=st.integers(0, len(_CHECK_SHAPES) - 1),
    position=st.floats(0, 1, exclude_max=True),
    imaginary=st.booleans(),
)
def test_nonfinite_check_flags_exactly_the_gradients_numpy_finds_nonfinite(
    dtype, seed, bad, leaf, position, imaginary
):
    # The check reads every leaf (large ones in place, small ones joined) and must find one
    # NaN or Inf anywhere, in the real or the imaginary part, while the largest finite
    # values of the dtype, zeros and subnormals count as finite.
    rng = np.random.default_rng(seed)
    top = float(jnp.finfo(dtype).max)
    grads = []
    for shape in _CHECK_SHAPES:
        values = rng.choice([0.0, 1.0, -top, top, 1e-40, -3.5], size=shape) * rng.random(shape)
        values = values.astype(np.complex128) if dtype == jnp.complex64 else values
        if dtype == jnp.complex64:
            values = values + 1j * rng.choice([0.0, top, -2.0], size=shape)
        grads.append(values)
    if bad is not None:
        target = grads[leaf].reshape(-1)
        i = int(position * target.size)
        target[i] = complex(target[i].real, bad) if imaginary and dtype == jnp.complex64 else bad
    tree = [jnp.asarray(g, dtype) for g in grads]
    expected_finite = all(np.all(np.isfinite(np.asarray(x).astype(np.complex128))) for x in tree)
    guard, update = _guarded_sgd_update(jnp.dtype(dtype))
    out, state = update(tree, guard.init(tree))
    assert bool(state.last_finite) == expected_finite
    assert all(np.all(np.asarray(o) == 0) for o in out) != expected_finite


# -------------------------------------------------------------------------------- skip_spikes


class SkipSpikes64:
    """The rule of skip_spikes in float64: windows of accepted values, mean + k * std."""

    def __init__(self, window, k, min_history):
        self.k, self.min_history = k, min_history
        self.norms = collections.deque(maxlen=window)
        self.losses = collections.deque(maxlen=window)

    def threshold(self, values):
        if len(values) < self.min_history:
            return math.inf
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        return mean + self.k * max(std, 1e-6 * abs(mean))

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
    ref, adam = SkipSpikes64(*config), Adam64(1e-2)
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


# ---------------------------------------------------------------------------- both guards


def test_vmap_over_independent_runs_skips_only_the_run_with_nan():
    guard = optaxclip.skip_nonfinite(optax.adam(1e-2))
    grads, _ = recorded_gradients(nan_steps=())
    part = {k: v[:30] for k, v in grads.items()}
    batch = {k: np.stack([v, v], 1) for k, v in part.items()}
    batch["w"][20, 1, 0, 0] = np.nan
    outs, states = run_scan(batched(guard), batch)
    np.testing.assert_array_equal(states.total_errors[-1], [0, 1])
    assert np.all(outs["w"][20, 1] == 0) and np.all(outs["w"][20, 0] != 0)
    np.testing.assert_array_equal(states.inner_state[0].count[-1], [30, 29])


def test_orbax_restore_mid_run_continues_bit_identically(tmp_path):
    grads, loss = recorded_gradients(nan_steps=(5,), spikes={12: 100.0})
    # Both guards in one optimizer: one compilation and one checkpoint cover them.
    tx = optaxclip.skip_nonfinite(
        optaxclip.skip_spikes(optax.adam(1e-2), window=8, k=3.0, min_history=4),
        max_consecutive_errors=3,
    )
    params = {k: jnp.ones(s) for k, s in SHAPES.items()}
    steps = step_slices(grads, range(20))
    (p_full, s_full), (p_resumed, s_resumed) = resume_from_checkpoint(
        tx, params, steps, 10, tmp_path / "guard", losses=loss[:20]
    )
    full, resumed = jax.tree.leaves((p_full, s_full)), jax.tree.leaves((p_resumed, s_resumed))
    assert all(same_bits(a, b) for a, b in zip(full, resumed, strict=True))
    assert int(s_full.total_errors) == 1 and int(s_full.inner_state.total_skipped) >= 1


def test_flax_nnx_optimizer_with_guard_passes_loss_and_reports_clip_stats():
    from flax import nnx

    inner = optax.chain(optaxclip.zclip(warmup_steps=2), optax.adam(1e-2))
    model, optimizer = nnx_linear(optaxclip.skip_nonfinite(inner))
    x = jnp.arange(6.0).reshape(2, 3)

    @nnx.jit
    def train_step(model, optimizer, scale):
        loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads, loss=loss * scale)
        return grads

    for scale in (1.0, 1.0, jnp.nan, 1.0):
        grads = train_step(model, optimizer, scale)
    stats = optaxclip.clip_stats(optimizer)
    assert int(stats["zclip/count"]) == 3  # the NaN-loss step never reached the clipper
    norm = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(stats["zclip/pre_clip_norm"], norm, rtol=1e-5)
    assert int(optimizer.opt_state.total_errors[...]) == 1


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
        (lambda: optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=0), "max_consecutive_errors"),
        (lambda: optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=1.5), "max_consecutive_errors"),
        (lambda: optaxclip.skip_nonfinite("adam"), "inner"),
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
