"""clip_by_leaf_norm and clip_by_block_rms against float64 references, and their properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.references import (
    assert_close_to_ref,
    assert_parallel,
    ref_clip_leaf,
    ref_clip_rms,
    ref_leaf_norm,
    ref_rms,
    unit_roundoff,
)
from helpers.runs import apply_once
from helpers.strategies import ORDS, RATIOS, gradient_trees
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

# Op by op: see conftest.eager_ops.
pytestmark = pytest.mark.usefixtures("eager_ops")


def _path_keys(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


# --- agreement with the float64 references on random trees ---------------------------------


@given(
    tree=gradient_trees(), p=st.sampled_from(ORDS), ratios=st.lists(RATIOS, min_size=3, max_size=3)
)
def test_clip_by_leaf_norm_matches_float64_reference_with_per_leaf_function(tree, p, ratios):
    keys = _path_keys(tree)
    limits = {
        k: r * ref_leaf_norm(x, p)
        for k, r, x in zip(keys, ratios, jax.tree.leaves(tree), strict=False)
    }
    tx = optaxclip.clip_by_leaf_norm(lambda path, leaf: limits[jax.tree_util.keystr(path)], ord=p)
    out, _ = apply_once(tx, tree)
    expected = ref_clip_leaf(tree, [limits[k] for k in keys], p)
    for o, e, x in zip(jax.tree.leaves(out), expected, jax.tree.leaves(tree), strict=True):
        assert o.dtype == x.dtype
        assert_close_to_ref(o, e, x.dtype)


@given(tree=gradient_trees(), ratio=RATIOS)
def test_clip_by_block_rms_matches_float64_reference(tree, ratio):
    rms = [ref_rms(x) for x in jax.tree.leaves(tree)]
    limit = ratio * max(rms, default=1.0)
    out, _ = apply_once(optaxclip.clip_by_block_rms(limit), tree)
    for o, e, x in zip(
        jax.tree.leaves(out), ref_clip_rms(tree, limit), jax.tree.leaves(tree), strict=True
    ):
        assert o.dtype == x.dtype
        assert_close_to_ref(o, e, x.dtype)


# --- properties ------------------------------------------------------------------------------


def test_leaf_clip_bounds_each_leaf_and_keeps_each_direction():
    rng = np.random.default_rng(5)
    tree = {
        "w": jnp.asarray(rng.standard_normal((4, 3)) * 10, jnp.float32),
        "b": jnp.asarray(rng.standard_normal(3), jnp.bfloat16),
        "z": jnp.asarray(rng.standard_normal(2) * 1e25, jnp.float32),
    }
    for p in ORDS:
        out, _ = apply_once(optaxclip.clip_by_leaf_norm(1.0, ord=p), tree)
        for key in tree:
            dtype = tree[key].dtype
            assert ref_leaf_norm(out[key], p) <= 1 + 1e-6 + unit_roundoff(dtype)
            expected = ref_clip_leaf({key: tree[key]}, [1.0], p)
            assert_parallel([out[key]], [tree[key]], expected)
