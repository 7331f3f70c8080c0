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
            assert int(stats["clip_by_global_norm/steps"]) == step + 1
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
            assert int(stats["clip_by_global_norm/steps"]) == real_step + 1
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
        assert int(clip_state.stats.steps) == 3
        resumed = run(restored["params"], restored["opt_state"], range(3, 6))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        assert same_bits(a, b)
    stats = optaxclip.clip_stats(resumed[1])
    assert int(stats["gclip/steps"]) == 6


@pytest.mark.parametrize(
    "clipper",
    [
        lambda: optaxclip.clip_by_global_norm(1.0),
        lambda: optaxclip.zclip(),
        lambda: optaxclip.clip_by_value(0.5),
        lambda: optaxclip.adaptive_grad_clip(0.1),
    ],
    ids=["global", "zclip", "value", "agc"],
)
def test_tree_get_count_finds_only_adams_counter_after_swapping_optax_clipper(clipper):
    """``optax.tree_utils.tree_get(state, "count")`` reads Adam's step counter with our clipper
    in the chain, as it does with Optax's, and the clipper's own counter is ``steps``."""
    params = {"w": jnp.array([3.0, -4.0, 1.0]), "b": jnp.array([0.5])}
    for tx in (
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
        optax.chain(clipper(), optax.adam(1e-3)),
    ):
        state = tx.init(params)
        for _ in range(3):
            _, state = tx.update(params, state, params)
        assert int(optax.tree_utils.tree_get(state, "count")) == 3
    stats = optaxclip.clip_stats(state)
    (steps_key,) = [k for k in stats if k.endswith("/steps")]
    assert int(stats[steps_key]) == 3
    assert not any(k.endswith("/count") for k in stats)


def _nnx_two_layer_model():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(3, 5, rngs=rngs)
            self.head = nnx.Linear(5, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.tanh(self.body(x)))

    return nnx, Model(nnx.Rngs(3))


def _nnx_step(tx):
    """One ``nnx.Optimizer`` step with ``chain(tx, sgd(1))``: the gradients, how far each
    parameter moved against them (``before - after``, the clipped gradient) and the
    parameters before the step, as nested dicts."""
    nnx, model = _nnx_two_layer_model()
    optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(1.0)), wrt=nnx.Param)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 3)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(5).standard_normal((8, 2)) * 20, jnp.float32)
    before = nnx.state(model, nnx.Param).to_pure_dict()
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    after = nnx.state(model, nnx.Param).to_pure_dict()
    grads = nnx.state(grads, nnx.Param).to_pure_dict()
    moved = jax.tree.map(lambda a, b: to_f64(b) - to_f64(a), after, before)
    return jax.tree.map(to_f64, grads), moved, before


def test_nnx_optimizer_with_a_per_leaf_threshold_dict_clips_each_layer_at_its_value():
    limits = {"body": 4.0, "head": 20.0}  # clips the body kernel only
    grads, moved, _ = _nnx_step(optaxclip.clip_by_leaf_norm(limits))
    clipped = 0
    for part, limit in limits.items():
        for key, g in grads[part].items():
            norm = np.linalg.norm(g)
            clipped += norm > limit
            expected = g * min(1.0, limit / norm)
            np.testing.assert_allclose(moved[part][key], expected, rtol=1e-5, atol=1e-7)
    assert clipped == 1


def test_nnx_optimizer_with_agc_exclude_and_unit_axes_dicts_matches_float64_reference():
    clipping, eps = 0.02, 1e-3
    exclude = {"body": False, "head": {"kernel": False, "bias": True}}
    # Body kernel by rows (its input features), the head by the Flax columns.
    unit_axes = {"body": {"kernel": (1,), "bias": (0,)}, "head": "flax"}
    tx = optaxclip.adaptive_grad_clip(clipping, eps, exclude=exclude, unit_axes=unit_axes)
    grads, moved, params = _nnx_step(tx)
    reduced = {"body": {"kernel": 1, "bias": 0}, "head": {"kernel": 0}}
    for part, axes in reduced.items():
        for key, axis in axes.items():
            g, w = grads[part][key], to_f64(params[part][key])
            g_norm = np.sqrt(np.sum(g**2, axis=axis, keepdims=True))
            limit = clipping * np.maximum(np.sqrt(np.sum(w**2, axis=axis, keepdims=True)), eps)
            expected = g * np.where(g_norm > limit, limit / g_norm, 1.0)
            assert not np.allclose(expected, g)
            np.testing.assert_allclose(moved[part][key], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(moved["head"]["bias"], grads["head"]["bias"], rtol=1e-6)


@pytest.mark.parametrize(
    ("make_tx", "match"),
    [
        (
            lambda: optaxclip.clip_by_leaf_norm({"body": 0.4, "haed": 3.0}),
            r"max_norm.*\['haed'\].*\['head'\]\['bias'\]",
        ),
        (
            lambda: optaxclip.adaptive_grad_clip(exclude={"body": False, "tail": True}),
            r"exclude.*\['tail'\].*\['head'\]\['bias'\]",
        ),
        (
            lambda: optaxclip.adaptive_grad_clip(unit_axes={"body": "flax", "head": {"w": 0}}),
            r"unit_axes.*\['head'\]\['w'\]",
        ),
    ],
    ids=["threshold", "exclude", "unit_axes"],
)
def test_nnx_optimizer_with_a_dict_spec_naming_a_wrong_key_raises_naming_the_path(make_tx, match):
    nnx, model = _nnx_two_layer_model()
    with pytest.raises(ValueError, match=match):
        nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
