"""Float64 NumPy references and the tolerances of comparisons with them.

The references are written independently of optaxclip: they compute in float64 NumPy on the
values *as rounded to the leaf dtype*, which is what an exact implementation must match.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Relative tolerance of a float32-accumulated norm of a few dozen numbers: the sum of n
# rounded terms is within n * 2**-24 (~2e-6 for n = 32) of the exact sum, and the root and
# the rescaling add a few ulps. 1e-5 covers this with margin; it is not a fitted value.
NORM_RTOL = 1e-5


def unit_roundoff(dtype: Any) -> float:
    """Half the machine epsilon of a (real or complex) dtype: the relative rounding error."""
    return float(jnp.finfo(jnp.dtype(dtype)).eps) / 2


def flush_atol(dtype: Any) -> float:
    """The absolute error that rounding into ``dtype`` can add near zero.

    XLA on CPU flushes float32 subnormals to zero, so results below the smallest normal
    float32 (also for bfloat16, which shares its exponent range) may read 0. float16 is
    computed through float32 and keeps its subnormals, rounded to their spacing.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16:
        return float(jnp.finfo(jnp.float16).smallest_subnormal)
    return float(jnp.finfo(jnp.float32).tiny)


def tree_dtype(tree: Any) -> Any:
    """The least precise dtype among the leaves (the one whose rounding bounds the error)."""
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)]
    if not dtypes:
        return jnp.dtype(jnp.float32)
    return max(dtypes, key=unit_roundoff)


def to_f64(x: Any) -> np.ndarray:
    """The values of an array as float64 (complex128 for complex), exactly."""
    a = np.asarray(x)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality of two arrays (dtype, shape and every byte)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --- norms ------------------------------------------------------------------------------------


def ref_vector_norm(values: np.ndarray, p: float) -> float:
    """The p-norm of |values| in float64, scaled by the largest entry so it cannot overflow."""
    a = np.abs(np.asarray(values, dtype=np.complex128 if np.iscomplexobj(values) else np.float64))
    a = a.ravel().astype(np.float64)
    if a.size == 0:
        return 0.0
    largest = float(a.max())
    if p == math.inf or largest == 0 or not math.isfinite(largest):
        return largest
    return largest * float(np.sum((a / largest) ** p) ** (1.0 / p))


def ref_leaf_norm(x: Any, p: float) -> float:
    return ref_vector_norm(to_f64(x), p)


def ref_global_norm(tree: Any, p: float) -> float:
    leaves = [to_f64(x).ravel() for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        return 0.0
    return ref_vector_norm(np.concatenate([np.abs(x) for x in leaves]), p)


def ref_rms(x: Any) -> float:
    a = to_f64(x)
    return ref_vector_norm(a, 2.0) / math.sqrt(max(a.size, 1))


# --- the static clippers ----------------------------------------------------------------------


def ref_clip_global(tree: Any, limit: float, p: float) -> tuple[list[np.ndarray], float, float]:
    """clip_by_global_norm: the clipped leaves, the norm and the scale."""
    norm = ref_global_norm(tree, p)
    scale = limit / norm if norm > limit else 1.0
    return [to_f64(x) * scale for x in jax.tree.leaves(tree)], norm, scale


def ref_clip_leaf(tree: Any, limits: Any, p: float) -> list[np.ndarray]:
    """clip_by_leaf_norm with one limit per leaf."""
    out = []
    for x, limit in zip(jax.tree.leaves(tree), limits, strict=True):
        norm = ref_leaf_norm(x, p)
        out.append(to_f64(x) * (limit / norm if norm > limit else 1.0))
    return out


def ref_clip_rms(tree: Any, limit: float) -> list[np.ndarray]:
    """clip_by_block_rms."""
    out = []
    for x in jax.tree.leaves(tree):
        rms = ref_rms(x)
        out.append(to_f64(x) * (limit / rms if rms > limit else 1.0))
    return out


def _bound_in_dtype(value: float, dtype: Any) -> float:
    """A bound as the clipper applies it: float32, then rounded into the leaf's dtype."""
    return float(np.asarray(np.float32(value)).astype(jnp.dtype(dtype)))


def ref_clip_value(tree: Any, low: float, high: float) -> list[np.ndarray]:
    """clip_by_value, with the bounds rounded as the clipper rounds them."""
    return [
        np.clip(to_f64(x), _bound_in_dtype(low, x.dtype), _bound_in_dtype(high, x.dtype))
        for x in jax.tree.leaves(tree)
    ]


class Adam64:
    """optax.adam (b1=0.9, b2=0.999, eps=1e-8) in float64, for dict gradients of ``shapes``."""

    def __init__(self, lr: float, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.lr, self.count = lr, 0
        self.mu = {k: np.zeros(s) for k, s in shapes.items()}
        self.nu = {k: np.zeros(s) for k, s in shapes.items()}

    def update(self, g: Mapping[str, Any]) -> dict[str, np.ndarray]:
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


# --- comparisons ------------------------------------------------------------------------------


def assert_close_to_ref(actual: Any, expected: Any, dtype: Any, rtol: float = NORM_RTOL) -> None:
    """``actual`` (in ``dtype``) equals the float64 ``expected`` up to rounding into ``dtype``.

    Allowed error per element: ``(rtol + u) * |expected| + flush_atol(dtype)``, where ``u`` is
    the unit roundoff of the output dtype (the output is rounded once into it).
    """
    a = to_f64(actual)
    e = np.asarray(expected)
    tol = (rtol + unit_roundoff(dtype)) * np.abs(e) + flush_atol(dtype)
    err = np.abs(a - e)
    assert np.all(err <= tol), (
        f"max excess {np.max(err - tol)}; actual {a.ravel()[:6]}, expected {e.ravel()[:6]}"
    )


def assert_leaves_match(out_tree: Any, expected: Any, in_tree: Any) -> None:
    """Same structure, each leaf keeps its dtype and equals the reference up to rounding."""
    assert jax.tree.structure(out_tree) == jax.tree.structure(in_tree)
    for out, exp, x in zip(
        jax.tree.leaves(out_tree), expected, jax.tree.leaves(in_tree), strict=True
    ):
        assert out.dtype == x.dtype and out.shape == x.shape
        assert_close_to_ref(out, exp, x.dtype)


def assert_parallel(out_leaves: Any, in_leaves: Any, ref_out_leaves: Any) -> None:
    """The output is a positive multiple of the input: cosine 1 up to the output's rounding.

    Each element of leaf i is rounded once into its dtype (relative error u_i) or flushed near
    zero (absolute error a_i), so ||out - ref|| <= sum_i (u_i ||ref_i|| + sqrt(N_i) a_i) =: E,
    sin(angle) <= E / ||ref|| and 1 - cos <= sin**2.
    """
    out = np.concatenate([to_f64(x).ravel() for x in out_leaves])
    inp = np.concatenate([to_f64(x).ravel() for x in in_leaves])
    ref_norm = float(np.linalg.norm(np.concatenate([np.ravel(x) for x in ref_out_leaves])))
    if ref_norm == 0:
        assert not np.any(out)
        return
    error = sum(
        unit_roundoff(o.dtype) * float(np.linalg.norm(r)) + math.sqrt(o.size) * flush_atol(o.dtype)
        for o, r in zip(out_leaves, ref_out_leaves, strict=True)
    )
    if not np.any(out):
        # Everything rounded to zero (fp16 values below half its smallest subnormal): allowed
        # only where the rounding bound admits it.
        assert error >= ref_norm
        return
    cosine = float(np.real(np.vdot(out, inp))) / (
        float(np.linalg.norm(out)) * float(np.linalg.norm(inp))
    )
    assert 1 - cosine <= min((error / ref_norm) ** 2, 1.0) + 1e-12
