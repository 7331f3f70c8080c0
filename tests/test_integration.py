"""optaxclip inside real training code: flax.nnx, inject_hyperparams, MultiSteps, masked,
partition and Orbax checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import NORM_RTOL, ref_global_norm, same_bits, to_f64

import optaxclip
from optaxclip import ClipState, ClipStats

pytestmark = pytest.mark.usefixtures("eager_ops")


def _params():
    rng = np.random.default_rng(0)
    return {
        "body": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), "b": jnp.zeros(4)},
        "head": {"w": jnp.asarray(rng.standard_normal((4, 2)), jnp.float32), "b": jnp.zeros(2)},
    }


def _grads(step, params):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 2.0 ** (step % 4), x.dtype), params
    )


def _ref_clip(tree, limit):
    norm = ref_global_norm(tree, 2.0)
    scale = limit / norm if norm > limit else 1.0
    return jax.tree.map(lambda x: to_f64(x) * scale, tree), norm


def test_flax_nnx_optimizer_step_reports_stats_of_the_gradients():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.tanh(self.hidden(x)))

    model = Model(nnx.Rngs(0))
    tx = optax.chain(optaxclip.clip_by_global_norm(0.05), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 3)), jnp.float32)
    y = jnp.sum(x, axis=1, keepdims=True)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss_fn(model):
            return jnp.mean((model(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    with jax.disable_jit(False):
        for step in range(2):
            before = nnx.state(model, nnx.Param)
            before = jax.tree.map(np.asarray, before)
            _, grads = train_step(model, optimizer, x, y)
            stats = optaxclip.clip_stats(optimizer)
            norm = ref_global_norm(grads, 2.0)
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )
            assert float(stats["clip_by_global_norm/post_clip_norm"]) == pytest.approx(
                min(norm, 0.05), rel=NORM_RTOL
            )
            assert int(stats["clip_by_global_norm/count"]) == step + 1
            # The parameters moved by -lr * clipped gradient.
            after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
            expected, _ = _ref_clip(grads, 0.05)
            for b, a, g in zip(
                jax.tree.leaves(before),
                jax.tree.leaves(after),
                jax.tree.leaves(expected),
                strict=True,
            ):
                np.testing.assert_allclose(a, b - 0.1 * g, rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_changes_max_norm_between_steps():
    params = _params()
    grads = _grads(2, params)
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    with jax.disable_jit(False):
        for limit in (1.0, 0.25, 100.0):
            state.hyperparams["max_norm"] = jnp.asarray(limit)
            out, state = update(grads, state)
            expected, norm = _ref_clip(grads, limit)
            for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), e, rtol=1e-5)
            stats = optaxclip.clip_stats(state)
            assert float(stats["clip_by_global_norm/threshold"]) == limit
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )


def test_multisteps_clips_the_mean_gradient_and_counts_real_steps():
    params = _params()
    k = 3
    tx = optax.MultiSteps(
        optax.chain(optaxclip.clip_by_global_norm(1.0), optax.sgd(1.0)), every_k_schedule=k
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    with jax.disable_jit(False):
        for real_step in range(2):
            micro = [_grads(real_step * k + i, params) for i in range(k)]
            for i, g in enumerate(micro):
                out, state = update(g, state, params)
                if i < k - 1:
                    assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(out))
            mean = jax.tree.map(lambda *xs: np.mean([to_f64(x) for x in xs], axis=0), *micro)
            expected, norm = _ref_clip(mean, 1.0)
            for o, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), -e, rtol=1e-5, atol=1e-7)
            stats = optaxclip.clip_stats(state)
            assert int(stats["clip_by_global_norm/count"]) == real_step + 1
            assert float(stats["clip_by_global_norm/pre_clip_norm"]) == pytest.approx(
                norm, rel=NORM_RTOL
            )


def test_masked_and_partition_stats_have_distinct_names():
    params = _params()
    grads = _grads(3, params)
    labels = {"body": {"w": "body", "b": "body"}, "head": {"w": "head", "b": "head"}}
    partitioned = optax.partition(
        {
            "body": optaxclip.clip_by_global_norm(1.0, name="body_clip"),
            "head": optaxclip.clip_by_global_norm(0.5),
        },
        labels,
    )
    masked = optax.chain(
        optax.masked(optaxclip.clip_by_global_norm(2.0), {"body": True, "head": False}),
        optax.masked(optaxclip.clip_by_global_norm(3.0), {"body": False, "head": True}),
    )
    for tx, names in [
        (partitioned, {"body_clip": "body", "clip_by_global_norm": "head"}),
        (masked, {"clip_by_global_norm": "body", "clip_by_global_norm_1": "head"}),
    ]:
        out, state = tx.update(grads, tx.init(params), params)
        stats = optaxclip.clip_stats(state)
        assert len(stats) == 2 * 6
        for name, part in names.items():
            assert float(stats[f"{name}/pre_clip_norm"]) == pytest.approx(
                ref_global_norm(grads[part], 2.0), rel=NORM_RTOL
            )
            limit = float(stats[f"{name}/threshold"])
            expected, _ = _ref_clip(grads[part], limit)
            for o, e in zip(jax.tree.leaves(out[part]), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(to_f64(o), e, rtol=1e-5)


def test_orbax_checkpoint_round_trip_resumes_bit_identically(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optax.chain(optaxclip.clip_by_global_norm(1.0, name="gclip"), optax.adam(1e-2))
    update = jax.jit(tx.update)

    def run(params, opt_state, steps):
        for step in steps:
            updates, opt_state = update(_grads(step, params), opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    with jax.disable_jit(False):
        params = _params()
        straight = run(params, tx.init(params), range(6))
        middle = run(params, tx.init(params), range(3))
        checkpointer = ocp.StandardCheckpointer()
        path = tmp_path / "ckpt"
        checkpointer.save(path, {"params": middle[0], "opt_state": middle[1]})
        checkpointer.wait_until_finished()
        abstract = jax.tree.map(
            ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": tx.init(params)}
        )
        restored = checkpointer.restore(path, abstract)
        checkpointer.close()
        clip_state = restored["opt_state"][0]
        assert isinstance(clip_state, ClipState) and isinstance(clip_state.stats, ClipStats)
        assert clip_state.stats.name == "gclip"
        assert int(clip_state.stats.count) == 3
        resumed = run(restored["params"], restored["opt_state"], range(3, 6))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        assert same_bits(a, b)
    stats = optaxclip.clip_stats(resumed[1])
    assert int(stats["gclip/count"]) == 6
