"""Shared test setup: the hypothesis profile, float64 NumPy references and tree strategies.

The references here are written independently of optaxclip: they compute in float64 NumPy on
the values *as rounded to the leaf dtype*, which is what an exact implementation must match.
Test modules import them with ``from conftest import ...``. The last section holds the drivers
the transform tests share: runs of steps, a jitted ``lax.scan`` over recorded gradients,
``vmap`` batching, Orbax checkpoint round trips and a Flax NNX training step.

Speed: the property tests run eagerly under ``jax.disable_jit()`` on a small pool of leaf
shapes. Every primitive is then compiled once per (shape, dtype) and reused across examples,
whereas ``jit`` would compile a whole new program for each random tree structure.

``HYPOTHESIS_PROFILE=thorough`` runs 200 examples per property instead of 25.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "optaxclip",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("optaxclip"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optaxclip"))


@pytest.fixture
def eager_ops() -> Iterator[None]:
    """Runs a test op by op under ``jax.disable_jit()``.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("eager_ops")``; a test that
    checks real compilation switches it back on with ``jax.disable_jit(False)``.
    """
    with jax.disable_jit():
        yield


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


def to_f64(x: Any) -> np.ndarray:
    """The values of an array as float64 (complex128 for complex), exactly."""
    a = np.asarray(x)
    return a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)


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


def same_bits(a: Any, b: Any) -> bool:
    """Bitwise equality of two arrays (dtype, shape and every byte)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


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


def tree_dtype(tree: Any) -> Any:
    """The least precise dtype among the leaves (the one whose rounding bounds the error)."""
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)]
    if not dtypes:
        return jnp.dtype(jnp.float32)
    return max(dtypes, key=unit_roundoff)


# ------------------------------------------------------------------ drivers of transformations


def step_slices(stacked: Any, steps: Sequence[int]) -> list[Any]:
    """The gradients of the given steps from a pytree of arrays stacked along axis 0."""
    return [jax.tree.map(lambda v, t=t: v[t], stacked) for t in steps]


@functools.partial(jax.jit, static_argnums=0)
def _train_step(tx: Any, params: Any, state: Any, grads: Any, extra: dict[str, Any]) -> Any:
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state


def run_steps(
    tx: Any, params: Any, state: Any, grads_seq: Sequence[Any], losses: Any = None
) -> tuple[Any, Any]:
    """``tx.update`` then ``optax.apply_updates`` for each gradient in turn (one jitted step).

    With ``losses``, step ``i`` also passes ``loss=losses[i]`` to ``tx.update``.
    """
    for i, grads in enumerate(grads_seq):
        extra = {} if losses is None else {"loss": losses[i]}
        params, state = _train_step(tx, params, state, grads, extra)
    return params, state


def run_updates(tx: Any, params: Any, grads_seq: Sequence[Any]) -> list[tuple[Any, Any]]:
    """``(updates, state)`` after each step of ``jax.jit(tx.update)`` with fixed ``params``."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = update(grads, state, params)
        out.append((updates, state))
    return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _scan(tx: Any, grads: Any, loss: Any, with_loss: bool) -> Any:
    def body(state: Any, inputs: Any) -> Any:
        g, value = inputs
        kwargs = {"loss": value} if with_loss else {}
        out, state = tx.update(g, state, None, **kwargs)
        return state, (out, state)

    first = {k: jnp.zeros(v.shape[1:]) for k, v in grads.items()}
    return jax.lax.scan(body, tx.init(first), (grads, loss))[1]


def run_scan(tx: Any, grads: dict[str, Any], loss: Any = None) -> Any:
    """All steps in one jitted scan (compiled once per ``tx``): outputs and states, as NumPy.

    ``grads`` is a dict of arrays stacked along the step axis; ``loss``, if given, one value
    per step passed as ``loss=``.
    """
    steps = len(next(iter(grads.values())))
    values = np.zeros(steps, np.float32) if loss is None else loss
    return jax.tree.map(np.asarray, _scan(tx, grads, values, loss is not None))


def batched(tx: Any, axis_name: str | None = None) -> optax.GradientTransformation:
    """``tx`` applied independently along a leading axis of every leaf (and of the state)."""
    return optax.GradientTransformation(jax.vmap(tx.init), jax.vmap(tx.update, axis_name=axis_name))


def orbax_roundtrip(tree: Any, path: Any) -> Any:
    """``tree`` saved with Orbax's StandardCheckpointer and restored from its abstract shape."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))


def resume_from_checkpoint(
    tx: Any, params: Any, grads_seq: Sequence[Any], split: int, path: Any, losses: Any = None
) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """Trains ``split`` steps, checkpoints ``(params, state)``, then finishes the run twice.

    Returns ``(full, resumed)``, each ``(params, state)`` after all of ``grads_seq``: ``full``
    continued in memory, ``resumed`` continued from the restored checkpoint.
    """
    first = None if losses is None else losses[:split]
    rest = None if losses is None else losses[split:]
    mid = run_steps(tx, params, tx.init(params), grads_seq[:split], first)
    full = run_steps(tx, *mid, grads_seq[split:], rest)
    resumed = run_steps(tx, *orbax_roundtrip(mid, path), grads_seq[split:], rest)
    return full, resumed


def nnx_linear(tx: optax.GradientTransformation) -> tuple[Any, Any]:
    """A Flax NNX ``Linear(3, 2)`` (seed 0) and an ``nnx.Optimizer`` with ``tx`` over its Params."""
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def nnx_train_step(loss_of_model: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    """An ``nnx.jit`` step: gradient of ``loss_of_model``, ``optimizer.update``.

    The step returns the gradients as a plain pytree of arrays.
    """
    from flax import nnx

    @nnx.jit
    def train_step(model: Any, optimizer: Any) -> Any:
        grads = nnx.grad(loss_of_model)(model)
        optimizer.update(model, grads)
        return nnx.as_pure(nnx.state(grads, nnx.Param))

    return train_step
