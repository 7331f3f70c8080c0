"""Hypothesis strategies for gradient pytrees, and the orders and dtypes they draw from.

The property tests run eagerly under ``jax.disable_jit()`` (the ``eager_ops`` fixture) on a
small pool of leaf shapes. Every primitive is then compiled once per (shape, dtype) and reused
across examples, whereas ``jit`` would compile a whole new program for each random tree
structure.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

ORDS = (1.0, 2.0, math.inf, 3.5)
FLOAT_DTYPES = (
    jnp.dtype(jnp.float16),
    jnp.dtype(jnp.bfloat16),
    jnp.dtype(jnp.float32),
    jnp.dtype(jnp.complex64),
)
SHAPES = ((), (3,), (2, 3))

# Decimal exponents of the magnitudes drawn per dtype: 1e-8 .. 1e30 where representable.
# float16 stops at 1e4 (max 65504) and goes down to its subnormals (~6e-8).
EXPONENTS = {
    jnp.dtype(jnp.float16): (-7, 4),
    jnp.dtype(jnp.bfloat16): (-8, 30),
    jnp.dtype(jnp.float32): (-8, 30),
    jnp.dtype(jnp.complex64): (-8, 30),
    jnp.dtype(jnp.float64): (-8, 30),
}

# Threshold as a multiple of the reference norm: 0 (zero everything), clipped (< 1) and not
# clipped (> 1). Ratios stay away from 1 so the float32 norm's rounding cannot flip a decision.
RATIOS = st.sampled_from([0.0, 1e-3, 0.5, 0.9, 1.1, 2.0, 1e3])


@st.composite
def leaf_arrays(
    draw: Any,
    dtypes: tuple[Any, ...] = FLOAT_DTYPES,
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    allow_zero: bool = True,
    exponents: tuple[int, int] | None = None,
) -> jax.Array:
    """One array: a dtype, a shape from the pool and values of magnitude 10**e (or zeros).

    ``exponents`` narrows the dtype's range of decimal exponents (see EXPONENTS).
    """
    dtype = jnp.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(st.sampled_from(shapes))
    low, high = EXPONENTS[dtype]
    if exponents is not None:
        low, high = max(low, exponents[0]), min(high, exponents[1])
    exponent = draw(st.integers(low, high))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    values = rng.uniform(-1.0, 1.0, shape) * 10.0**exponent
    if jnp.issubdtype(dtype, jnp.complexfloating):
        values = values + 1j * rng.uniform(-1.0, 1.0, shape) * 10.0**exponent
    if allow_zero and draw(st.integers(0, 9)) == 0:
        values = np.zeros(shape, values.dtype)
    return jnp.asarray(values, dtype=dtype)


@st.composite
def gradient_trees(
    draw: Any,
    dtypes: tuple[Any, ...] = FLOAT_DTYPES,
    min_leaves: int = 1,
    max_leaves: int = 3,
    allow_none: bool = True,
    allow_zero: bool = True,
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
    exponents: tuple[int, int] | None = None,
) -> Any:
    """A random pytree of arrays: nested dicts, lists and tuples, possibly with None leaves."""
    n = draw(st.integers(min_leaves, max_leaves))
    leaves = [draw(leaf_arrays(dtypes, shapes, allow_zero, exponents)) for _ in range(n)]
    return _nest(draw, leaves, allow_none, depth=0)


def _nest(draw: Any, leaves: list[Any], allow_none: bool, depth: int) -> Any:
    if len(leaves) == 1 and (depth > 0 or draw(st.booleans())):
        return leaves[0]
    kind = draw(st.sampled_from(("dict", "list", "tuple")))
    groups: list[list[Any]] = []
    rest = list(leaves)
    while rest:
        # Below depth 2 every leaf is its own child, so the recursion ends.
        size = draw(st.integers(1, len(rest))) if depth < 2 else 1
        groups.append(rest[:size])
        rest = rest[size:]
    children: list[Any] = [
        g[0] if len(g) == 1 else _nest(draw, g, allow_none, depth + 1) for g in groups
    ]
    if allow_none and draw(st.integers(0, 4)) == 0:
        children.insert(draw(st.integers(0, len(children))), None)
    if kind == "dict":
        return {f"layer{i}": child for i, child in enumerate(children)}
    return list(children) if kind == "list" else tuple(children)
