"""Bad input fails early with a message that names the argument and, where relevant, the leaf."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.public import public_transforms

import optaxclip
from optaxclip._spec.validation import (
    check_number,
    is_concrete_number,
    normalize_ord,
    path_str,
)

pytestmark = pytest.mark.usefixtures("eager_ops")

GRADS = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}

# (factory, name of its threshold argument)
CLIPPERS = [
    (optaxclip.clip_by_global_norm, "max_norm"),
    (optaxclip.clip_by_leaf_norm, "max_norm"),
    (optaxclip.clip_by_block_rms, "threshold"),
    (optaxclip.clip_by_value, "max_delta"),
]
IDS = [f.__name__ for f, _ in CLIPPERS]


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
@pytest.mark.parametrize("value", [-1.0, -1e-30, math.nan, np.float32("nan"), jnp.asarray(-2.0)])
def test_negative_or_nan_threshold_raises_value_error_naming_argument(factory, arg, value):
    with pytest.raises(ValueError, match=arg):
        factory(value)


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
@pytest.mark.parametrize("value", [True, False, np.bool_(True), jnp.asarray(True)])
def test_bool_threshold_raises_type_error_naming_argument(factory, arg, value):
    with pytest.raises(TypeError, match=f"{arg}.*bool"):
        factory(value)


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
def test_non_numeric_threshold_raises_type_error(factory, arg):
    with pytest.raises(TypeError, match=arg):
        factory("1.0")
    with pytest.raises(TypeError, match=arg):
        factory(1 + 2j)


def test_global_threshold_must_be_scalar_not_pytree():
    with pytest.raises(TypeError, match="max_norm"):
        optaxclip.clip_by_global_norm({"a": 1.0})
    with pytest.raises(TypeError, match="max_norm"):
        optaxclip.clip_by_global_norm(jnp.ones(3))
    # Per-leaf clippers read an array as a one-leaf pytree whose value must be a scalar.
    with pytest.raises(ValueError, match=r"max_norm.*scalar"):
        optaxclip.clip_by_leaf_norm(jnp.ones(3))


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
def test_zero_and_infinite_thresholds_are_accepted(factory, arg):
    out0, _ = factory(0.0).update(GRADS, factory(0.0).init(GRADS))
    assert not any(bool(jnp.any(x)) for x in jax.tree.leaves(out0))
    out_inf, _ = factory(math.inf).update(GRADS, factory(math.inf).init(GRADS))
    assert all(bool(jnp.all(x == 1)) for x in jax.tree.leaves(out_inf))


def test_min_delta_above_max_delta_raises_at_construction():
    with pytest.raises(ValueError, match=r"min_delta \(2.0\) must not exceed max_delta \(1.0\)"):
        optaxclip.clip_by_value(1.0, 2.0)
    optaxclip.clip_by_value(1.0, 1.0)  # equal bounds are allowed
    optaxclip.clip_by_value(-1.0, -3.0)  # a negative max_delta is fine with a lower bound


def test_min_delta_above_max_delta_per_leaf_raises_at_init_naming_leaf():
    tx = optaxclip.clip_by_value({"dense": {"kernel": 1.0, "bias": 0.5}}, {"dense": 0.7})
    with pytest.raises(ValueError, match=r"min_delta.*max_delta.*\['dense'\]\['bias'\]"):
        tx.init(GRADS)


def test_negative_max_delta_without_min_delta_raises():
    with pytest.raises(ValueError, match="max_delta"):
        optaxclip.clip_by_value(-0.5)


@pytest.mark.parametrize("factory", [optaxclip.clip_by_global_norm, optaxclip.clip_by_leaf_norm])
@pytest.mark.parametrize("ord", [0, 0.5, -1, math.nan, -math.inf])
def test_ord_below_one_or_nan_raises_value_error(factory, ord):
    with pytest.raises(ValueError, match="ord"):
        factory(1.0, ord=ord)
    with pytest.raises(ValueError, match="ord"):
        optaxclip.global_norm(GRADS, ord=ord)


@pytest.mark.parametrize("ord", [True, "fro", "nuc", [2]])
def test_non_numeric_ord_raises_type_error(ord):
    with pytest.raises(TypeError, match="ord"):
        optaxclip.clip_by_global_norm(1.0, ord=ord)
    with pytest.raises(TypeError, match="ord"):
        optaxclip.leaf_norms(GRADS, ord=ord)


def test_accepted_ord_spellings():
    assert normalize_ord(None) == 2.0
    assert normalize_ord(1) == 1.0
    assert normalize_ord(np.int64(3)) == 3.0
    assert normalize_ord(jnp.asarray(2.5)) == 2.5
    for spelling in ("inf", "INF", "infinity", math.inf, np.inf):
        assert normalize_ord(spelling) == math.inf


def test_traced_ord_asks_for_static_args():
    with pytest.raises(TypeError, match="static"), jax.disable_jit(False):
        jax.jit(lambda p: optaxclip.global_norm(GRADS, ord=p))(2.0)


def test_per_leaf_spec_that_does_not_match_tree_raises_at_init_naming_path():
    tx = optaxclip.clip_by_leaf_norm({"dense": {"kernel": 1.0}, "extra": 2.0})
    with pytest.raises(ValueError, match=r"max_norm.*\['extra'\]"):
        tx.init(GRADS)
    tx = optaxclip.clip_by_block_rms({"dense": {"kernel": 1.0}})
    with pytest.raises(ValueError, match=r"threshold.*\['dense'\]\['bias'\]"):
        tx.init(GRADS)


@pytest.mark.parametrize(
    ("factory", "arg"), [c for c in CLIPPERS if c[0] is not optaxclip.clip_by_global_norm]
)
def test_negative_value_inside_per_leaf_pytree_raises_naming_path(factory, arg):
    with pytest.raises(ValueError, match=rf"{arg}=\.\.\.\) at leaf \['dense'\]\['bias'\]"):
        factory({"dense": {"kernel": 1.0, "bias": -1.0}})
    with pytest.raises(ValueError, match=rf"{arg}=\.\.\.\) at leaf \['dense'\]\['bias'\].*NaN"):
        factory({"dense": {"kernel": 1.0, "bias": math.nan}})


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
def test_integer_gradient_leaf_raises_type_error_naming_path(factory, arg):
    tx = factory(1.0)
    bad = {"dense": {"kernel": jnp.ones((2, 2)), "step": jnp.ones(2, jnp.int32)}}
    with pytest.raises(TypeError, match=r"params leaf \['dense'\]\['step'\].*int32"):
        tx.init(bad)
    state = tx.init(GRADS)
    with pytest.raises(TypeError, match=r"updates leaf \['dense'\]\['step'\].*int32"):
        tx.update(bad, state)


def test_integer_leaf_in_norm_functions_raises_naming_path():
    with pytest.raises(TypeError, match=r"tree leaf \[1\].*int32"):
        optaxclip.global_norm([jnp.ones(2), jnp.ones(2, jnp.int32)])
    with pytest.raises(TypeError, match=r"tree leaf \['b'\].*bool"):
        optaxclip.leaf_norms({"a": jnp.ones(2), "b": jnp.ones(2, bool)})


def test_complex_leaf_in_value_clipping_raises_type_error_naming_path():
    # Complex numbers have no order; norm clippers accept them, value clipping cannot.
    grads = {"a": jnp.ones(2), "z": jnp.ones(2, jnp.complex64)}
    tx = optaxclip.clip_by_value(1.0)
    with pytest.raises(TypeError, match=r"params leaf \['z'\].*complex"):
        tx.init(grads)
    with pytest.raises(TypeError, match=r"updates leaf \['z'\].*complex"):
        tx.update(grads, tx.init({"a": jnp.ones(2)}))


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
@pytest.mark.parametrize("nonfinite", ["skip", "Zero", None, 0])
def test_unknown_nonfinite_policy_raises_value_error(factory, arg, nonfinite):
    with pytest.raises(ValueError, match="nonfinite"):
        factory(1.0, nonfinite=nonfinite)


@pytest.mark.parametrize(("factory", "arg"), CLIPPERS, ids=IDS)
@pytest.mark.parametrize("name", ["", "a/b", 3, b"clip"])
def test_bad_name_raises_value_error(factory, arg, name):
    with pytest.raises(ValueError, match="name"):
        factory(1.0, name=name)


def test_schedule_and_traced_thresholds_are_not_checked_in_python():
    # inject_hyperparams passes max_norm as a traced array under jit: accepted as is.
    tx = optax.inject_hyperparams(optaxclip.clip_by_global_norm)(max_norm=1.0)
    with jax.disable_jit(False):
        out, _ = jax.jit(tx.update)(GRADS, tx.init(GRADS))
    assert float(optaxclip.global_norm(out)) == pytest.approx(1.0, rel=1e-6)


def test_path_str_and_is_concrete_number():
    tree = {"a": [jnp.ones(1), {"b": jnp.ones(1)}]}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["['a'][0]", "['a'][1]['b']"]
    assert path_str(()) == "<root>"
    assert (
        is_concrete_number(1)
        and is_concrete_number(np.float32(2))
        and is_concrete_number(jnp.asarray(1.0))
    )
    assert not is_concrete_number(True) and not is_concrete_number(jnp.ones(2))
    assert not is_concrete_number("1")


def test_check_number_messages():
    with pytest.raises(ValueError, match=r"x at leaf \['k'\] must be >= 0, got -1"):
        check_number(-1, "x", path="['k']")
    with pytest.raises(ValueError, match="x must be finite"):
        check_number(math.inf, "x", allow_inf=False)
    check_number(-5.0, "x", minimum=-math.inf)


# --- every stated bound is the bound enforced ----------------------------------------------

# (public call, argument, a value it refuses, other keyword arguments). The guards wrap SGD.
_BOUNDED = [
    ("clip_by_global_norm", "max_norm", -0.25, {}),
    ("clip_by_global_norm", "ord", 0.75, {"max_norm": 1.0}),
    ("clip_by_leaf_norm", "max_norm", -0.25, {}),
    ("clip_by_leaf_norm", "ord", 0.75, {"max_norm": 1.0}),
    ("clip_by_block_rms", "threshold", -0.25, {}),
    ("clip_by_value", "max_delta", -0.25, {}),
    ("adaptive_grad_clip", "clipping", -0.25, {}),
    ("adaptive_grad_clip", "eps", -0.25, {}),
    ("autoclip", "percentile", 120.0, {}),
    ("autoclip", "history_size", 0, {}),
    ("autoclip", "ord", 0.75, {}),
    ("quantile_clip", "target_quantile", 1.25, {}),
    ("quantile_clip", "learning_rate", -0.25, {}),
    ("quantile_clip", "initial_threshold", -0.25, {}),
    ("quantile_clip", "ord", 0.75, {}),
    ("zclip", "alpha", 1.25, {}),
    ("zclip", "z_thresh", -0.25, {}),
    ("zclip", "warmup_steps", 0, {}),
    ("zclip", "clip_factor", -0.25, {}),
    ("zclip", "max_grad_norm", -0.25, {}),
    ("zclip", "eps", -0.25, {}),
    ("adagc", "relative_factor", -0.25, {}),
    ("adagc", "beta", 1.25, {}),
    ("adagc", "warmup_steps", -2, {}),
    ("adagc", "warmup_max_norm", -0.25, {}),
    ("adagc", "eps", -0.25, {}),
    ("adaclip", "theta", 1.25, {}),
    ("clip_by_rule", "ord", 0.5, {"rule": optaxclip.rules.constant(1.0)}),
    ("skip_nonfinite", "max_consecutive_errors", 0, {}),
    ("skip_spikes", "window", 1, {"min_history": 2}),
    ("skip_spikes", "k", -0.25, {}),
    ("skip_spikes", "min_history", 1, {"window": 6}),
    ("skip_spikes", "min_history", 7, {"window": 6}),
    ("skip_spikes", "ord", 0.75, {}),
    ("skip_spikes", "max_consecutive_skips", 0, {}),
]
# Arguments that take a threshold spec (a number, a schedule, per-leaf values).
_ONE_SIDED = re.compile(r"must be (>=|>|<=) (?:[a-z_]+ \()?(-?[0-9.]+)")
_INTERVAL = re.compile(r"must be in ([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])")


def _make(call, arg, value, kwargs):
    inner = (optax.sgd(0.1),) if call.startswith("skip_") else ()
    return getattr(optaxclip, call)(*inner, **kwargs, **{arg: value})


def _probes(message, integer):
    """(value, whether it should be accepted) on both sides of the bound the message states."""
    step = 1 if integer else 1e-3
    kind = int if integer else float
    if (found := _ONE_SIDED.search(message)) is not None:
        op, bound = found.group(1), kind(found.group(2))
        return {
            ">": [(bound, False), (bound + step, True)],
            ">=": [(bound, True), (bound - step, False)],
            "<=": [(bound, True), (bound + step, False)],
        }[op]
    found = _INTERVAL.search(message)
    assert found is not None, f"no bound stated in: {message}"
    low, high = kind(found.group(2)), kind(found.group(3))
    return [
        (low, found.group(1) == "["),
        (high, found.group(4) == "]"),
        ((low + high) / 2, True),
        (low - step, False),
        (high + step, False),
    ]


@pytest.mark.parametrize(
    ("call", "arg", "bad", "kwargs"),
    _BOUNDED,
    ids=[f"{c}-{a}-{b}" for c, a, b, _ in _BOUNDED],
)
def test_each_stated_bound_is_the_bound_enforced(call, arg, bad, kwargs):
    with pytest.raises(ValueError) as error:
        _make(call, arg, bad, kwargs)
    message = str(error.value)
    assert message.startswith(f"{call}({arg}=...): "), message
    for value, accepted in _probes(message, isinstance(bad, int)):
        if accepted:
            _make(call, arg, value, kwargs)
        else:
            with pytest.raises(ValueError):
                _make(call, arg, value, kwargs)


def test_the_bound_cases_cover_every_public_transform():
    covered = {call for call, _, _, _ in _BOUNDED}
    assert covered == public_transforms()


# --- low-precision thresholds -----------------------------------------------------------------


def _low_precision_case():
    rng = np.random.default_rng(12)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
        }
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 2.0, jnp.float32), params)
    return grads, params


def _ref_global(grads, params, t):
    g = {k: np.float64(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    norm = math.sqrt(sum(np.sum(v**2) for v in g.values()))
    return {k: v * min(1.0, t / norm) for k, v in g.items()}


def _ref_leaf(grads, params, t):
    g = {k: np.float64(v) for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    return {k: v * min(1.0, t / np.linalg.norm(v)) for k, v in g.items()}


def _ref_value(grads, params, t):
    return {k: np.clip(np.float64(v), -t, t) for k, v in jax.tree_util.tree_leaves_with_path(grads)}


def _ref_agc(grads, params, t):
    # The default units of a Flax (in, out) kernel are its columns; a bias is one unit.
    out = {}
    for (k, g), w in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(params), strict=True
    ):
        g, w = np.float64(g), np.float64(w)
        g_norm = np.linalg.norm(g, axis=0, keepdims=True)
        limit = t * np.maximum(np.linalg.norm(w, axis=0, keepdims=True), 1e-3)
        out[k] = g * np.minimum(1.0, limit / g_norm)
    return out


LOW_PRECISION_CLIPPERS = [
    (optaxclip.clip_by_global_norm, "max_norm", _ref_global),
    (optaxclip.clip_by_leaf_norm, "max_norm", _ref_leaf),
    (optaxclip.clip_by_value, "max_delta", _ref_value),
    (optaxclip.adaptive_grad_clip, "clipping", _ref_agc),
]
LOW_PRECISION_SPELLINGS = {
    "bf16-array": lambda x: jnp.asarray(x, jnp.bfloat16),
    "bf16-numpy-scalar": lambda x: np.asarray(x, jnp.bfloat16)[()],
    "f16-array": lambda x: jnp.asarray(x, jnp.float16),
    "f16-numpy-scalar": np.float16,
}


@pytest.mark.parametrize(
    ("factory", "arg", "reference"),
    LOW_PRECISION_CLIPPERS,
    ids=[f.__name__ for f, _, _ in LOW_PRECISION_CLIPPERS],
)
@pytest.mark.parametrize("spelling", list(LOW_PRECISION_SPELLINGS))
def test_bfloat16_and_float16_thresholds_clip_at_their_rounded_value(
    factory, arg, reference, spelling
):
    grads, params = _low_precision_case()
    threshold = LOW_PRECISION_SPELLINGS[spelling](0.7)
    assert is_concrete_number(threshold)
    t = float(np.float32(threshold))  # 0.69921875 in bfloat16, 0.7001953125 in float16
    tx = factory(**{arg: threshold})
    out, _ = tx.update(grads, tx.init(params), params)
    expected = reference(grads, params, t)
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        np.testing.assert_allclose(np.float64(leaf), expected[path], rtol=1e-6)
    assert not all(
        np.array_equal(np.float64(g), expected[p])
        for p, g in jax.tree_util.tree_leaves_with_path(grads)
    )


@pytest.mark.parametrize(
    ("factory", "arg", "reference"),
    LOW_PRECISION_CLIPPERS,
    ids=[f.__name__ for f, _, _ in LOW_PRECISION_CLIPPERS],
)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_inject_hyperparams_in_bfloat16_and_float16_clips_at_the_rounded_value(
    factory, arg, reference, dtype
):
    grads, params = _low_precision_case()
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=dtype)(**{arg: 0.7})
    out, _ = tx.update(grads, tx.init(params), params)
    expected = reference(grads, params, float(jnp.asarray(0.7, dtype)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
        np.testing.assert_allclose(np.float64(leaf), expected[path], rtol=1e-6)


def test_check_number_accepts_low_precision_scalars_and_still_refuses_bool_and_complex():
    for value in (jnp.asarray(2.5, jnp.bfloat16), np.asarray(2.5, jnp.bfloat16)[()]):
        check_number(value, "x")
        with pytest.raises(ValueError, match="x must be >= 3"):
            check_number(value, "x", minimum=3.0)
    with pytest.raises(TypeError, match="bool"):
        check_number(np.asarray(True)[()], "x")
    with pytest.raises(TypeError, match="complex64"):
        check_number(jnp.asarray(1.0, jnp.complex64), "x")
