"""The nonfinite= policies (propagate, zero, error) of every clipper, and the optax contrast."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import same_bits, to_f64

import optaxclip

pytestmark = pytest.mark.usefixtures("eager_ops")

FACTORIES = {
    "global": lambda **kw: optaxclip.clip_by_global_norm(1.0, **kw),
    "global-inf": lambda **kw: optaxclip.clip_by_global_norm(1.0, ord=math.inf, **kw),
    "global-3.5": lambda **kw: optaxclip.clip_by_global_norm(1.0, ord=3.5, **kw),
    "leaf": lambda **kw: optaxclip.clip_by_leaf_norm(1.0, **kw),
    "rms": lambda **kw: optaxclip.clip_by_block_rms(0.5, **kw),
    "value": lambda **kw: optaxclip.clip_by_value(0.5, **kw),
}
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _grads(bad):
    return {
        "dense": {
            "kernel": jnp.array([[3.0, -4.0], [1.0, 2.0]]),
            "bias": jnp.array([0.5, bad, 2.0], jnp.float16),
        },
        "head": jnp.array([7.0, bad]),
    }


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_propagate_returns_input_bit_for_bit(kind, bad):
    grads = _grads(BAD_VALUES[bad])
    tx = FACTORIES[kind]()  # the default policy
    out, state = tx.update(grads, tx.init(grads))
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        assert same_bits(o, x)
    stats = state.stats
    assert float(stats.clipped_fraction) == 0.0 and float(stats.scale) == 1.0
    assert not math.isfinite(float(stats.pre_clip_norm))
    assert same_bits(stats.post_clip_norm, stats.pre_clip_norm)


@pytest.mark.parametrize("kind", FACTORIES)
@pytest.mark.parametrize("bad", BAD_VALUES)
def test_zero_policy_returns_zeros_and_no_nan(kind, bad):
    grads = _grads(BAD_VALUES[bad])
    tx = FACTORIES[kind](nonfinite="zero")
    out, state = tx.update(grads, tx.init(grads))
    for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
        assert o.dtype == x.dtype
        assert same_bits(o, jnp.zeros_like(x))
    stats = state.stats
    assert float(stats.post_clip_norm) == 0.0 and float(stats.clipped_fraction) == 1.0
    assert all(not math.isnan(float(v)) for v in stats[1:5])


@pytest.mark.parametrize("policy", ["propagate", "zero", "error"])
@pytest.mark.parametrize("kind", FACTORIES)
def test_policies_do_not_change_finite_gradients(kind, policy):
    grads = _grads(1.5)
    reference, _ = FACTORIES[kind]().update(grads, FACTORIES[kind]().init(grads))
    tx = FACTORIES[kind](nonfinite=policy)
    out, _ = tx.update(grads, tx.init(grads))
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(reference), strict=True):
        assert same_bits(o, r)


@pytest.mark.parametrize("kind", FACTORIES)
def test_error_policy_raises_floating_point_error_naming_first_bad_leaf(kind):
    grads = _grads(math.nan)
    tx = FACTORIES[kind](nonfinite="error")
    with pytest.raises(FloatingPointError, match=r"leaf \['dense'\]\['bias'\] holds NaN or Inf"):
        tx.update(grads, tx.init(grads))
    only_head = {**grads, "dense": _grads(0.0)["dense"]}
    with pytest.raises(FloatingPointError, match=r"leaf \['head'\] holds NaN or Inf"):
        tx.update(only_head, tx.init(only_head))


@pytest.mark.parametrize("kind", ["global", "value"])  # the two code paths of the check
def test_error_policy_under_jit_raises_runtime_error_with_path(kind):
    grads = _grads(math.inf)
    tx = FACTORIES[kind](nonfinite="error", name="mine")
    update = jax.jit(tx.update)
    state = tx.init(grads)
    with jax.disable_jit(False):
        finite = _grads(1.0)
        jax.block_until_ready(update(finite, state))  # a healthy step does not raise
        with pytest.raises(
            jax.errors.JaxRuntimeError,
            match=r"FloatingPointError: mine: the gradient leaf \['dense'\]\['bias'\]",
        ):
            jax.block_until_ready(update(grads, state))


def test_error_policy_under_vmap_raises_only_when_a_batch_member_is_nonfinite():
    tx = optaxclip.clip_by_global_norm(1.0, nonfinite="error")
    batch = {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones((3, 4))}
    state = tx.init(jax.tree.map(lambda x: x[0], batch))
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, None)))
    with jax.disable_jit(False):
        out, _ = update(batch, state)
        jax.block_until_ready(out)
        norms = np.sqrt(np.sum(to_f64(batch["a"]) ** 2, 1) + 4)
        np.testing.assert_allclose(out["b"][:, 0], np.minimum(1, 1 / norms), rtol=1e-6)
        bad = {**batch, "b": batch["b"].at[1, 2].set(jnp.nan)}
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"gradient leaf \['b'\] holds NaN"):
            jax.block_until_ready(update(bad, state))


# --- the optax contrast ---------------------------------------------------------------------


def test_nan_in_one_leaf_spreads_to_all_leaves_in_optax_but_not_here():
    grads = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.array([3.0, 4.0])}
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert np.all(np.isnan(to_f64(theirs["b"])))
    tx = optaxclip.clip_by_global_norm(1.0)
    ours, _ = tx.update(grads, tx.init(grads))
    assert same_bits(ours["b"], grads["b"]) and same_bits(ours["a"], grads["a"])


def test_inf_zeroes_finite_leaves_in_optax_but_not_here():
    grads = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.array([3.0, 4.0])}
    theirs, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert not np.any(to_f64(theirs["b"]))
    tx = optaxclip.clip_by_global_norm(1.0)
    ours, _ = tx.update(grads, tx.init(grads))
    assert same_bits(ours["b"], grads["b"]) and same_bits(ours["a"], grads["a"])
