"""Thresholds as numbers, schedules, per-leaf pytrees (or prefixes) and per-leaf functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import ref_leaf_norm, ref_rms, to_f64

import optaxclip
from optaxclip._spec.thresholds import Threshold

pytestmark = pytest.mark.usefixtures("eager_ops")

STEP0 = jnp.zeros((), jnp.int32)


def _model_grads():
    rng = np.random.default_rng(0)
    return {
        "body": {
            "w": jnp.asarray(rng.standard_normal((3, 4)) * 5, jnp.float32),
            "b": jnp.asarray(rng.standard_normal(4) * 5, jnp.float32),
        },
        "head": {
            "w": jnp.asarray(rng.standard_normal((4, 2)) * 5, jnp.float32),
            "b": jnp.asarray(rng.standard_normal(2) * 5, jnp.float32),
        },
    }


def _ref_leaf_clip(x, limit, p=2.0):
    norm = ref_leaf_norm(x, p)
    return to_f64(x) * (limit / norm if norm > limit else 1.0)


# --- the Threshold helper -----------------------------------------------------------------


@pytest.mark.parametrize("value", [2, 2.5, np.float32(2.5), jnp.asarray(2.5), np.asarray(3.0)])
def test_numbers_are_constants(value):
    threshold = Threshold(value, "max_norm", per_leaf=True)
    assert threshold.kind == "constant"
    assert float(threshold.scalar(STEP0)) == float(value)
    values = threshold.per_leaf_values({"a": jnp.ones(2), "b": [jnp.ones(3)]}, STEP0)
    assert [float(v) for v in values] == [float(value)] * 2


def test_one_argument_callable_is_a_schedule_evaluated_at_the_step():
    threshold = Threshold(optax.linear_schedule(1.0, 3.0, 2), "max_norm", per_leaf=False)
    assert threshold.kind == "schedule"
    assert [float(threshold.scalar(jnp.asarray(k))) for k in range(4)] == [1.0, 2.0, 3.0, 3.0]


def test_two_argument_callable_is_per_leaf_function_or_rejected_for_global():
    def fn(path, leaf):
        return 1.0

    assert Threshold(fn, "max_norm", per_leaf=True).kind == "function"
    with pytest.raises(TypeError, match=r"max_norm.*two arguments"):
        Threshold(fn, "max_norm", per_leaf=False)
    with pytest.raises(TypeError, match=r"max_norm.*unsupported signature"):
        Threshold(lambda: 1.0, "max_norm", per_leaf=True)


def test_pytree_spec_broadcasts_a_prefix_to_every_leaf():
    grads = _model_grads()
    threshold = Threshold({"body": 1.0, "head": {"w": 5.0, "b": 7.0}}, "max_norm", per_leaf=True)
    assert threshold.kind == "tree"
    by_path = dict(
        zip(
            [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(grads)],
            [float(v) for v in threshold.per_leaf_values(grads, STEP0)],
            strict=True,
        )
    )
    assert by_path == {
        "['body']['b']": 1.0,
        "['body']['w']": 1.0,
        "['head']['b']": 7.0,
        "['head']['w']": 5.0,
    }


def test_pytree_spec_that_does_not_match_names_the_leaf():
    grads = _model_grads()
    threshold = Threshold({"body": 1.0, "tail": 2.0}, "max_norm", per_leaf=True)
    with pytest.raises(ValueError, match=r"max_norm.*\['tail'\]"):
        threshold.validate_for(grads)
    missing = Threshold({"body": 1.0}, "max_norm", per_leaf=True)
    with pytest.raises(ValueError, match=r"max_norm.*\['head'\]"):
        missing.validate_for(grads)


def test_negative_value_in_pytree_spec_names_the_leaf():
    with pytest.raises(ValueError, match=r"max_norm at leaf \['head'\]\['w'\] must be >= 0"):
        Threshold({"body": 1.0, "head": {"w": -1.0, "b": 1.0}}, "max_norm", per_leaf=True)


def test_per_leaf_function_value_is_validated_with_the_leaf_path():
    grads = _model_grads()
    bad = Threshold(
        lambda path, leaf: -1.0 if "head" in jax.tree_util.keystr(path) else 1.0,
        "threshold",
        per_leaf=True,
    )
    with pytest.raises(ValueError, match=r"threshold at leaf \['head'\]\['b'\]"):
        bad.validate_for(grads)


def test_schedule_starting_negative_is_rejected_at_init():
    tx = optaxclip.clip_by_global_norm(lambda step: -1.0 + step)
    with pytest.raises(ValueError, match=r"max_norm.*step 0"):
        tx.init({"a": jnp.ones(2)})


# --- schedules in the clippers ----------------------------------------------------------------


def test_global_clip_follows_schedule_by_step_count():
    grads = {"w": jnp.array([30.0, 40.0])}

    def schedule(step):
        return 1.0 + 2.0 * step

    tx = optaxclip.clip_by_global_norm(schedule)
    state = tx.init(grads)
    for step in range(4):
        out, state = tx.update(grads, state)
        assert float(state.stats.threshold) == schedule(step)
        np.testing.assert_allclose(out["w"], np.array([30.0, 40.0]) * schedule(step) / 50, 1e-6)
    assert int(state.stats.steps) == 4


def test_per_leaf_clippers_follow_a_schedule():
    grads = {"a": jnp.full((4,), 2.0), "b": jnp.array([-9.0, 0.5])}
    schedule = optax.linear_schedule(1.0, 0.5, 2)
    final = 0.5  # the schedule's value at step 2, the third update

    def rms_clip(x, t):
        return to_f64(x) * min(1.0, t / ref_rms(x))

    # The RMS clip reports its bound on the L2 norm: of the smallest leaf, "b" (2 entries).
    cases = [
        (optaxclip.clip_by_leaf_norm(schedule), _ref_leaf_clip, 1.0),
        (optaxclip.clip_by_block_rms(schedule), rms_clip, np.sqrt(2)),
        (optaxclip.clip_by_value(schedule), lambda x, t: np.clip(to_f64(x), -t, t), 1.0),
    ]
    for tx, reference, per_threshold in cases:
        state = tx.init(grads)
        for step in range(3):
            out, state = tx.update(grads, state)
            expected = float(schedule(step)) * per_threshold
            assert float(state.stats.threshold) == pytest.approx(expected)
        for key in grads:
            np.testing.assert_allclose(to_f64(out[key]), reference(grads[key], final), 1e-6)


def test_clip_by_value_min_delta_schedule_and_constant_max():
    grads = {"a": jnp.array([-5.0, 0.0, 5.0])}
    tx = optaxclip.clip_by_value(2.0, lambda step: -1.0 - step)
    state = tx.init(grads)
    for step in range(3):
        out, state = tx.update(grads, state)
        np.testing.assert_array_equal(out["a"], [-1.0 - step, 0.0, 2.0])


# --- per-leaf specs in the clippers ----------------------------------------------------------


def _per_leaf_specs():
    # Three spellings of "body leaves 1.0, the output layer 5.0".
    full = {"body": {"w": 1.0, "b": 1.0}, "head": {"w": 5.0, "b": 5.0}}
    prefix = {"body": 1.0, "head": 5.0}

    def by_path(path, leaf):
        return 5.0 if "head" in jax.tree_util.keystr(path) else 1.0

    return [full, prefix, by_path]


@pytest.mark.parametrize("spec", _per_leaf_specs(), ids=["full", "prefix", "function"])
def test_clip_by_leaf_norm_per_leaf_spec_gives_the_output_layer_a_wider_range(spec):
    grads = _model_grads()
    tx = optaxclip.clip_by_leaf_norm(spec)
    out, state = tx.update(grads, tx.init(grads))
    for part, limit in (("body", 1.0), ("head", 5.0)):
        for key in ("w", "b"):
            expected = _ref_leaf_clip(grads[part][key], limit)
            np.testing.assert_allclose(to_f64(out[part][key]), expected, rtol=1e-5)
    assert float(state.stats.threshold) == 1.0


@pytest.mark.parametrize("spec", _per_leaf_specs(), ids=["full", "prefix", "function"])
def test_clip_by_value_per_leaf_spec_gives_the_output_layer_a_wider_range(spec):
    grads = _model_grads()
    tx = optaxclip.clip_by_value(spec)
    out, _ = tx.update(grads, tx.init(grads))
    for part, limit in (("body", 1.0), ("head", 5.0)):
        for key in ("w", "b"):
            expected = np.clip(to_f64(grads[part][key]), -limit, limit)
            np.testing.assert_array_equal(to_f64(out[part][key]), expected)


@pytest.mark.parametrize("spec", _per_leaf_specs(), ids=["full", "prefix", "function"])
def test_clip_by_block_rms_per_leaf_spec_gives_the_output_layer_a_wider_range(spec):
    grads = _model_grads()
    tx = optaxclip.clip_by_block_rms(spec)
    out, _ = tx.update(grads, tx.init(grads))
    for part, limit in (("body", 1.0), ("head", 5.0)):
        for key in ("w", "b"):
            x = grads[part][key]
            rms = ref_rms(x)
            expected = to_f64(x) * (limit / rms if rms > limit else 1.0)
            np.testing.assert_allclose(to_f64(out[part][key]), expected, rtol=1e-5)


def test_asymmetric_per_leaf_value_bounds():
    grads = _model_grads()
    tx = optaxclip.clip_by_value({"body": 1.0, "head": 3.0}, {"body": -0.5, "head": -3.0})
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(
        to_f64(out["body"]["w"]), np.clip(to_f64(grads["body"]["w"]), -0.5, 1.0)
    )
    np.testing.assert_array_equal(
        to_f64(out["head"]["b"]), np.clip(to_f64(grads["head"]["b"]), -3.0, 3.0)
    )


def test_per_leaf_spec_with_none_leaves_in_the_gradient():
    grads = {"a": jnp.array([3.0, 4.0]), "frozen": None, "b": jnp.array([6.0, 8.0])}
    tx = optaxclip.clip_by_leaf_norm({"a": 1.0, "frozen": None, "b": 5.0})
    out, _ = tx.update(grads, tx.init(grads))
    assert out["frozen"] is None
    np.testing.assert_allclose(out["a"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [3.0, 4.0], rtol=1e-6)


def test_none_in_a_per_leaf_spec_for_a_real_leaf_is_rejected_naming_the_leaf():
    grads = {"a": jnp.ones(2), "b": jnp.ones(2)}
    clipper = optaxclip.clip_by_leaf_norm({"a": None, "b": 1.0})
    with pytest.raises(ValueError, match=r"max_norm.*\['a'\]"):
        clipper.init(grads)


# --- per-leaf specs matched by key path -----------------------------------------------------


@jax.tree_util.register_pytree_with_keys_class
class _Namespace:
    """A mapping-like pytree node that is not a dict, flattened with dict keys (as nnx.State)."""

    def __init__(self, entries):
        self.entries = dict(entries)

    def tree_flatten_with_keys(self):
        keys = sorted(self.entries)
        return [(jax.tree_util.DictKey(k), self.entries[k]) for k in keys], tuple(keys)

    @classmethod
    def tree_unflatten(cls, keys, children):
        return cls(zip(keys, children, strict=True))


def _as_namespaces(tree):
    if isinstance(tree, dict):
        return _Namespace({k: _as_namespaces(v) for k, v in tree.items()})
    return tree


@pytest.mark.parametrize("spec", _per_leaf_specs()[:2], ids=["full", "prefix"])
def test_dict_spec_matches_another_mapping_node_by_key_path(spec):
    grads = _model_grads()
    tx = optaxclip.clip_by_leaf_norm(spec)
    out, state = tx.update(_as_namespaces(grads), tx.init(_as_namespaces(grads)))
    for part, limit in (("body", 1.0), ("head", 5.0)):
        for key in ("w", "b"):
            expected = _ref_leaf_clip(grads[part][key], limit)
            np.testing.assert_allclose(to_f64(out.entries[part].entries[key]), expected, rtol=1e-5)
    assert float(state.stats.threshold) == 1.0


def test_dict_spec_with_a_wrong_key_on_another_mapping_node_names_both_paths():
    grads = _as_namespaces(_model_grads())
    tx = optaxclip.clip_by_leaf_norm({"body": 1.0, "haed": 5.0})
    with pytest.raises(ValueError, match=r"max_norm.*\['haed'\].*\['head'\]\['b'\]"):
        tx.init(grads)
    too_deep = optaxclip.clip_by_leaf_norm({"body": {"w": {"x": 1.0}, "b": 1.0}, "head": 5.0})
    with pytest.raises(ValueError, match=r"max_norm.*\['body'\]\['w'\]\['x'\]"):
        too_deep.init(grads)


def test_spec_entries_for_leaves_masked_out_are_accepted():
    grads = _model_grads()
    spec = {"body": {"w": 1.0, "b": 1.0}, "head": {"w": 5.0, "b": 5.0}}
    mask = {"body": {"w": True, "b": False}, "head": False}
    tx = optax.masked(optaxclip.clip_by_leaf_norm(spec), mask)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(
        to_f64(out["body"]["w"]), _ref_leaf_clip(grads["body"]["w"], 1.0), rtol=1e-5
    )
    for part, key in (("body", "b"), ("head", "w"), ("head", "b")):
        np.testing.assert_array_equal(out[part][key], grads[part][key])
