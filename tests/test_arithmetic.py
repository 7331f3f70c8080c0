"""The safe arithmetic under the norms and the clips: safe_divide, safe_root, combine_norms
and the dtype-preserving multiply."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.references import NORM_RTOL, ref_leaf_norm, same_bits, to_f64
from helpers.strategies import ORDS

from optaxclip._numerics.arithmetic import combine_norms, multiply, safe_divide, safe_root

# Op by op: see conftest.eager_ops.
pytestmark = pytest.mark.usefixtures("eager_ops")


def _rel_err(actual: float, expected: float) -> float:
    if expected == 0:
        return abs(actual)
    return abs(actual - expected) / abs(expected)


# --- safe division, roots and combined norms ------------------------------------------------


def test_safe_divide_is_zero_where_denominator_is_zero_with_finite_gradient():
    num = jnp.array([1.0, 2.0, 0.0])
    den = jnp.array([2.0, 0.0, 0.0])
    np.testing.assert_array_equal(safe_divide(num, den), [0.5, 0.0, 0.0])
    grad = jax.grad(lambda d: jnp.sum(safe_divide(num, d)))(den)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert float(grad[0]) == pytest.approx(-0.25)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_safe_root_matches_power_and_has_zero_derivative_at_zero(p):
    total = jnp.array([0.0, 8.0, 1e30])
    np.testing.assert_allclose(safe_root(total, p), np.array([0.0, 8.0, 1e30]) ** (1 / p), 1e-6)
    assert float(jax.grad(lambda t: safe_root(t, p))(0.0)) == 0.0
    assert math.isnan(float(safe_root(jnp.asarray(jnp.nan), p)))
    assert float(safe_root(jnp.asarray(jnp.inf), p)) == math.inf


@pytest.mark.parametrize("p", ORDS)
def test_combine_norms_of_partial_norms_equals_norm_of_whole(p):
    parts = np.array([3e30, 4e30, 0.0, 1e29])
    expected = ref_leaf_norm(parts, p)
    combined = float(combine_norms(jnp.asarray(parts, jnp.float32), p))
    assert _rel_err(combined, expected) <= NORM_RTOL
    assert float(combine_norms(jnp.zeros((0,), jnp.float32), p)) == 0.0


# --- dtype-preserving multiply -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.complex64])
def test_multiply_keeps_dtype_rounds_once_and_is_exact_for_scale_one(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal(64) * 100
    if jnp.issubdtype(dtype, jnp.complexfloating):
        values = values + 1j * rng.standard_normal(64)
    x = jnp.asarray(values, dtype)
    assert same_bits(multiply(x, jnp.float32(1.0)), x)
    out = multiply(x, jnp.float32(0.3))
    assert out.dtype == x.dtype
    # One rounding of the exact product into the dtype (float32 scale, float64 reference).
    expected = to_f64(x) * float(np.float32(0.3))
    u = float(jnp.finfo(dtype).eps) / 2
    assert np.all(np.abs(to_f64(out) - expected) <= (u + 2**-24) * np.abs(expected))


def test_multiply_fp16_near_max_does_not_overflow():
    x = jnp.array([65504.0, -65504.0], jnp.float16)
    np.testing.assert_array_equal(multiply(x, jnp.float32(0.5)), [32752.0, -32752.0])
