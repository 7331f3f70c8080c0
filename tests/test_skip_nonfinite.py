"""skip_nonfinite: a float64 Adam that never saw the bad steps, the check on every dtype, and
the frozen inner state."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.guards import (
    NAN_STEPS,
    SHAPES,
    STEPS,
    inner_state_unchanged,
    recorded_gradients,
)
from helpers.references import Adam64, same_bits
from helpers.runs import batched, nnx_linear, resume_from_checkpoint, run_scan, step_slices
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

GUARDED_ADAM = optaxclip.skip_nonfinite(optax.adam(1e-2))


def test_nonfinite_guard_matches_float64_adam_that_never_saw_the_bad_steps():
    grads, _ = recorded_gradients(nan_steps=(120, 121, 122))
    outs, states = run_scan(GUARDED_ADAM, grads)
    adam = Adam64(1e-2, SHAPES)
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


def test_max_consecutive_errors_by_position_as_optax_apply_if_finite_takes_it():
    # Two skips, the give-up step, then finite steps: where both guards agree.
    grads = {"w": np.array([[0.5, -1.0], [np.inf, 1.0], [np.nan, 0.0], [1.0, np.nan],
                            [3.0, 0.25], [-0.5, 4.0]], np.float32)}  # fmt: skip
    ours, our_states = run_scan(optaxclip.skip_nonfinite(optax.sgd(0.3), 2), grads)
    theirs, their_states = run_scan(optax.apply_if_finite(optax.sgd(0.3), 2), grads)
    np.testing.assert_array_equal(ours["w"], theirs["w"])
    np.testing.assert_array_equal(our_states.total_errors, their_states.total_notfinite)
    applied = ~np.all(ours["w"] == 0, axis=1)
    np.testing.assert_array_equal(applied, [1, 0, 0, 1, 1, 1])


def test_guard_count_message_does_not_mention_inject_hyperparams():
    with pytest.raises(TypeError) as error:
        optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors="4")
    message = str(error.value)
    assert message.startswith("skip_nonfinite(max_consecutive_errors=...): must be a Python")
    assert "inject_hyperparams" not in message and "static_args" not in message


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
    assert int(stats["zclip/steps"]) == 3  # the NaN-loss step never reached the clipper
    norm = math.sqrt(sum(float(np.sum(np.float64(g) ** 2)) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(stats["zclip/pre_clip_norm"], norm, rtol=1e-5)
    assert int(optimizer.opt_state.total_errors[...]) == 1


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=0), "max_consecutive_errors"),
        (lambda: optaxclip.skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=1.5), "max_consecutive_errors"),
        (lambda: optaxclip.skip_nonfinite("adam"), "inner"),
    ],
)  # fmt: skip
def test_bad_hyperparameters_raise_naming_the_argument(make, argument):
    with pytest.raises((ValueError, TypeError), match=argument):
        make()
