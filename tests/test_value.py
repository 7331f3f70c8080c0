"""clip_by_value against float64 references: the clamp and the count of clamped entries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.references import ref_clip_value, to_f64
from helpers.runs import apply_once
from helpers.strategies import FLOAT_DTYPES, gradient_trees
from hypothesis import given
from hypothesis import strategies as st

import optaxclip

# Op by op: see conftest.eager_ops.
pytestmark = pytest.mark.usefixtures("eager_ops")

REAL_DTYPES = tuple(d for d in FLOAT_DTYPES if not jnp.issubdtype(d, jnp.complexfloating))


@given(
    tree=gradient_trees(dtypes=REAL_DTYPES),
    high=st.one_of(st.just(0.0), st.floats(1e-30, 1e4)),
    width=st.one_of(st.none(), st.just(0.0), st.floats(1e-30, 1e4)),
)
def test_clip_by_value_matches_float64_reference(tree, high, width):
    # Bounds are 0 or normal floats: a subnormal float32 bound is flushed to 0 by XLA on CPU.
    low = -high if width is None else high - width
    tx = optaxclip.clip_by_value(high) if width is None else optaxclip.clip_by_value(high, low)
    out, state = apply_once(tx, tree)
    expected = ref_clip_value(tree, low, high)
    # Clamping is exact: each element is either the input or a bound rounded to the dtype.
    for o, e, x in zip(jax.tree.leaves(out), expected, jax.tree.leaves(tree), strict=True):
        assert o.dtype == x.dtype
        np.testing.assert_array_equal(to_f64(o), e)
    n_clamped = sum(
        int(np.sum(to_f64(o) != to_f64(x)))
        for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(tree), strict=True)
    )
    total = sum(x.size for x in jax.tree.leaves(tree))
    # Elements already on a bound are neither moved nor counted.
    assert float(state.stats.clipped_fraction) == pytest.approx(n_clamped / max(total, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("high", [2.0**-100, 1e-35, 3e-20, 1.5, 3e4])
@pytest.mark.parametrize("under_jit", [False, True])
def test_clip_by_value_counts_entries_one_step_past_a_bound(dtype, high, under_jit):
    # The clipped fraction counts entries through differences (see
    # ``optaxclip._transforms.value._count_outside``); next to a tiny bound such a difference
    # is below float32's smallest normal and would be flushed.
    bound = np.asarray(high, jnp.dtype(dtype))
    up = np.nextafter(bound, np.asarray(np.inf, bound.dtype))
    down = np.nextafter(bound, np.asarray(-np.inf, bound.dtype))
    largest = float(jnp.finfo(dtype).max)
    values = np.array(
        [up, bound, down, -up, -bound, -down, 0, 2 * up, -2 * up, largest], np.float64
    )
    x = jnp.asarray(values.astype(np.float32)).astype(dtype)
    xs = to_f64(x)
    low_bound, high_bound = (
        float(-to_f64(jnp.asarray(high, dtype))),
        float(to_f64(jnp.asarray(high, dtype))),
    )
    expected = int(np.sum((xs > high_bound) | (xs < low_bound)))
    tx = optaxclip.clip_by_value(high)
    update = jax.jit(tx.update) if under_jit else tx.update
    out, state = update({"x": x}, tx.init({"x": x}))
    # The count agrees with the entries the clamp actually moved, and with the reference.
    moved = int(np.sum(to_f64(out["x"]) != xs))
    assert moved == expected
    assert round(float(state.stats.clipped_fraction) * x.size) == expected
