"""Norms of pytrees, ``global_norm`` and ``leaf_norms``, against float64 references.

Reference: float64 NumPy on the values as rounded to each leaf's dtype (see
``helpers/references.py``).
"""

from __future__ import annotations

import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import NORM_RTOL, ref_global_norm, ref_leaf_norm
from helpers.strategies import ORDS, gradient_trees
from hypothesis import given
from hypothesis import strategies as st

import optaxclip
from optaxclip import _lowering
from optaxclip._numerics.arithmetic import combine_norms

# Op by op: see conftest.eager_ops (the jit tests below switch jit back on explicitly).
pytestmark = pytest.mark.usefixtures("eager_ops")


def _rel_err(actual: float, expected: float) -> float:
    if expected == 0:
        return abs(actual)
    return abs(actual - expected) / abs(expected)


# --- agreement with the float64 reference on random trees ---------------------------------


@given(tree=gradient_trees(), p=st.sampled_from(ORDS))
def test_global_norm_matches_float64_reference_on_random_trees(tree, p):
    norm = optaxclip.global_norm(tree, ord=p)
    assert norm.dtype == jnp.float32
    assert _rel_err(float(norm), ref_global_norm(tree, p)) <= NORM_RTOL


@given(tree=gradient_trees(), p=st.sampled_from(ORDS))
def test_leaf_norms_match_float64_reference_per_leaf(tree, p):
    norms = optaxclip.leaf_norms(tree, ord=p)
    assert jax.tree.structure(norms) == jax.tree.structure(tree)
    for leaf, norm in zip(jax.tree.leaves(tree), jax.tree.leaves(norms), strict=True):
        assert _rel_err(float(norm), ref_leaf_norm(leaf, p)) <= NORM_RTOL


@given(
    tree=gradient_trees(),
    p=st.sampled_from(ORDS),
    small=st.integers(0, 6),
    budget=st.integers(0, 64),
    joined=st.integers(1, 4),
)
def test_norms_match_reference_however_leaves_are_batched(tree, p, small, budget, joined):
    # Small leaves are reduced together (concatenated for the global norm, at most
    # _MAX_JOINED per concatenation; stacked by size for per-leaf norms) up to a byte budget;
    # the rest one by one. Shrinking both limits
    # makes random trees mix the two paths, in every order, with the rescue pass included.
    with (
        mock.patch.object(_lowering, "_SMALL_LEAF", small),
        mock.patch.object(_lowering, "_CONCAT_BYTES", budget),
        mock.patch.object(_lowering, "_MAX_JOINED", joined),
    ):
        norm = optaxclip.global_norm(tree, ord=p)
        norms = optaxclip.leaf_norms(tree, ord=p)
    assert _rel_err(float(norm), ref_global_norm(tree, p)) <= NORM_RTOL
    for leaf, value in zip(jax.tree.leaves(tree), jax.tree.leaves(norms), strict=True):
        assert _rel_err(float(value), ref_leaf_norm(leaf, p)) <= NORM_RTOL


def test_many_small_leaves_beyond_the_batching_budget_under_jit():
    # 3000 leaves: some above the small-leaf size, the small ones overflowing a shrunken
    # budget, mixed dtypes; under jit, as a training step runs them.
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 40, size=3000)
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
    tree = [
        jnp.asarray(rng.normal(size=int(n)) * 10.0 ** rng.integers(-3, 3), dtypes[i % 3])
        for i, n in enumerate(sizes)
    ]
    with (
        jax.disable_jit(False),
        mock.patch.object(_lowering, "_SMALL_LEAF", 30),
        mock.patch.object(_lowering, "_CONCAT_BYTES", 20_000),
        mock.patch.object(_lowering, "_MAX_JOINED", 100),
    ):
        norm = jax.jit(optaxclip.global_norm)(tree)
        norms = jax.jit(optaxclip.leaf_norms)(tree)
    assert _rel_err(float(norm), ref_global_norm(tree, 2.0)) <= NORM_RTOL
    expected = np.array([ref_leaf_norm(x, 2.0) for x in tree])
    np.testing.assert_allclose(np.asarray(jnp.stack(norms)), expected, rtol=NORM_RTOL)


def test_global_norm_is_exact_for_float64_leaves_under_x64():
    # float64 leaves need x64; it is switched on only inside this test. They accumulate in
    # float64, so the error bound is float64's, far below float32's.
    with jax.enable_x64(True), jax.disable_jit(False):
        rng = np.random.default_rng(0)
        tree = {
            "big": jnp.asarray(rng.uniform(-1, 1, 7) * 1e200, jnp.float64),
            "small": jnp.asarray(rng.uniform(-1, 1, (2, 3)), jnp.float64),
            "f32": jnp.asarray(rng.uniform(-1, 1, 3), jnp.float32),
        }
        norms = jax.jit(
            lambda t: [(optaxclip.global_norm(t, p), optaxclip.leaf_norms(t, p)) for p in ORDS]
        )(tree)
        for p, (norm, per_leaf) in zip(ORDS, norms, strict=True):
            assert norm.dtype == jnp.float64
            assert _rel_err(float(norm), ref_global_norm(tree, p)) <= 1e-13
            big = per_leaf["big"]
            assert _rel_err(float(big), ref_leaf_norm(tree["big"], p)) <= 1e-13


# --- specific cases ----------------------------------------------------------------------------


def test_fp16_ones_norm_is_316_where_optax_overflows_to_inf():
    tree = {"w": jnp.ones(100_000, jnp.float16)}
    ours = float(optaxclip.global_norm(tree))
    assert ours == pytest.approx(math.sqrt(1e5), rel=NORM_RTOL)
    # optax squares and sums in float16, whose largest value is 65504: the contrast.
    assert math.isinf(float(optax.tree.norm(tree)))


def test_fp16_ones_split_in_many_leaves_norm_is_316():
    tree = [jnp.ones(1000, jnp.float16) for _ in range(100)]
    assert float(optaxclip.global_norm(tree)) == pytest.approx(math.sqrt(1e5), rel=NORM_RTOL)


@pytest.mark.parametrize("p", ORDS)
def test_float32_leaves_of_magnitude_1e25_give_finite_exact_norm(p):
    tree = {"a": jnp.full((4,), 1e25, jnp.float32), "b": jnp.full((2, 2), -3e25, jnp.float32)}
    norm = float(optaxclip.global_norm(tree, ord=p))
    assert math.isfinite(norm)
    assert _rel_err(norm, ref_global_norm(tree, p)) <= NORM_RTOL
    leaf = float(optaxclip.leaf_norms(tree, ord=p)["b"])
    assert _rel_err(leaf, ref_leaf_norm(tree["b"], p)) <= NORM_RTOL


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize("under_jit", [False, True])
def test_entries_above_2_to_126_give_their_norm_or_inf(p, under_jit):
    # XLA:CPU divides by multiplying with the reciprocal, which it flushes to 0 when subnormal:
    # a rescue that divided by the largest entry itself would turn these norms into 0 (see
    # ``optaxclip._numerics.arithmetic.rescale_divisor``).
    tree = {
        "a": jnp.array([2e38, -1e38, 1.0], jnp.float32),
        "b": jnp.array([3e38, 3e38], jnp.float32),
    }
    float32_max = float(jnp.finfo(jnp.float32).max)

    def expect(actual, reference):
        if reference > float32_max:
            assert float(actual) == math.inf
        else:
            assert _rel_err(float(actual), reference) <= NORM_RTOL

    with jax.disable_jit(not under_jit):
        global_norm = jax.jit(optaxclip.global_norm, static_argnames="ord")
        leaf_norms = jax.jit(optaxclip.leaf_norms, static_argnames="ord")
        combine = jax.jit(combine_norms, static_argnums=1)
        expect(global_norm({"a": tree["a"]}, ord=p), ref_global_norm({"a": tree["a"]}, p))
        expect(global_norm(tree, ord=p), ref_global_norm(tree, p))
        norms = leaf_norms(tree, ord=p)
        for key in tree:
            expect(norms[key], ref_leaf_norm(tree[key], p))
        expect(combine(jnp.array([2e38, 1e38], jnp.float32), p), ref_global_norm([2e38, 1e38], p))


@pytest.mark.parametrize("p", ORDS)
def test_tiny_float32_values_1e_minus_20_give_exact_global_norm(p):
    # Their squares (1e-40) are below float32's normal range and flush to zero on CPU.
    tree = {"a": jnp.full((4,), 1e-20, jnp.float32), "b": jnp.array([3e-20, -4e-20])}
    norm = float(optaxclip.global_norm(tree, ord=p))
    assert _rel_err(norm, ref_global_norm(tree, p)) <= NORM_RTOL


@pytest.mark.parametrize("p", [1.0, math.inf, 3.5])
def test_tiny_float32_values_give_exact_leaf_norms_for_non_euclidean_orders(p):
    tree = {"a": jnp.full((4,), 1e-20, jnp.float32)}
    norm = float(optaxclip.leaf_norms(tree, ord=p)["a"])
    assert _rel_err(norm, ref_leaf_norm(tree["a"], p)) <= NORM_RTOL


def test_tiny_leaf_l2_norm_is_as_exact_per_leaf_as_globally():
    # Entries whose squares flush to zero in float32: the per-leaf norm takes the rescaled
    # pass, like the global one, rather than reading 0.
    tree = {"a": jnp.full((5,), 3e-21, jnp.float32), "zero": jnp.zeros((2,), jnp.float32)}
    expected = 3e-21 * math.sqrt(5)
    assert _rel_err(float(optaxclip.leaf_norms(tree)["a"]), expected) <= NORM_RTOL
    assert float(optaxclip.leaf_norms(tree)["zero"]) == 0.0
    assert _rel_err(float(optaxclip.global_norm(tree)), expected) <= NORM_RTOL


def test_tiny_leaf_beside_normal_leaf_does_not_disturb_per_leaf_l2_norms():
    tree = {"tiny": jnp.full((4,), 1e-17, jnp.float32), "one": jnp.array([3.0, 4.0])}
    norms = optaxclip.leaf_norms(tree)
    # 1e-17 squared is 1e-34, still a normal float32: the rescue pass makes it exact.
    assert _rel_err(float(norms["tiny"]), 2e-17) <= NORM_RTOL
    assert float(norms["one"]) == 5.0


def test_empty_tree_has_norm_zero_and_none_leaves_are_skipped():
    assert float(optaxclip.global_norm({})) == 0.0
    assert float(optaxclip.global_norm([])) == 0.0
    assert optaxclip.leaf_norms({}) == {}
    tree = {"a": None, "b": jnp.array([3.0, 4.0]), "c": [None, jnp.zeros(0)]}
    assert float(optaxclip.global_norm(tree)) == 5.0
    norms = optaxclip.leaf_norms(tree)
    assert norms["a"] is None and norms["c"][0] is None
    assert float(norms["b"]) == 5.0 and float(norms["c"][1]) == 0.0


@pytest.mark.parametrize("p", ORDS)
def test_complex_leaves_contribute_their_modulus(p):
    z = jnp.array([3 + 4j, -1j, 0.5 - 0.5j], jnp.complex64)
    modulus = np.abs(np.asarray(z).astype(np.complex128))
    expected = float(np.max(modulus)) if p == math.inf else float(np.sum(modulus**p) ** (1 / p))
    assert _rel_err(float(optaxclip.global_norm({"z": z}, ord=p)), expected) <= NORM_RTOL
    assert _rel_err(float(optaxclip.leaf_norms({"z": z}, ord=p)["z"]), expected) <= NORM_RTOL


@pytest.mark.parametrize("p", ORDS)
def test_nan_anywhere_gives_nan_norm_and_inf_gives_inf(p):
    # A NaN total must come out of safe_root as NaN: a norm of 0 would hide NaN gradients from
    # the nonfinite policies.
    nan_tree = {"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(3, jnp.float16)}
    inf_tree = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.ones(3, jnp.bfloat16)}
    assert math.isnan(float(optaxclip.global_norm(nan_tree, ord=p)))
    assert math.isnan(float(optaxclip.leaf_norms(nan_tree, ord=p)["a"]))
    assert float(optaxclip.leaf_norms(nan_tree, ord=p)["b"]) == pytest.approx(
        3 ** (0 if p == math.inf else 1 / p)
    )
    assert float(optaxclip.global_norm(inf_tree, ord=p)) == math.inf
    assert float(optaxclip.leaf_norms(inf_tree, ord=p)["a"]) == math.inf


def test_global_norm_takes_optax_updates_keyword_and_agrees_with_optax():
    updates = {"w": jnp.array([[1.5, -2.0], [0.5, 6.0]]), "b": [jnp.array([-0.75, 3.0])]}
    expected = float(optax.global_norm(updates=updates))
    assert float(optaxclip.global_norm(updates=updates)) == pytest.approx(expected, rel=1e-6)
    assert float(optaxclip.global_norm(updates)) == pytest.approx(expected, rel=1e-6)
    assert float(optaxclip.global_norm(tree=updates)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(TypeError, match=r"^global_norm\(tree=\.\.\., updates=\.\.\.\): .*not both"):
        optaxclip.global_norm(updates, updates=updates)
    with pytest.raises(TypeError, match=r"^global_norm\(\): missing the pytree"):
        optaxclip.global_norm()


def test_string_inf_and_none_orders_are_accepted():
    tree = {"a": jnp.array([3.0, -4.0])}
    assert float(optaxclip.global_norm(tree, ord="inf")) == 4.0
    assert float(optaxclip.global_norm(tree, ord=None)) == 5.0


# --- derivatives -----------------------------------------------------------------------------


def test_norm_gradients_are_finite_at_all_zero_tree():
    direction = {
        "a": jnp.array([1.0, -2.0], jnp.float16),
        "b": jnp.ones((2, 2), jnp.float32),
        "z": jnp.array([1 + 1j, -2j], jnp.complex64),
    }

    def along(t):
        return jax.tree.map(lambda d: (t * d).astype(d.dtype), direction)

    def all_gradients(t):
        # For every order: d/dt of the norm along a ray from 0, and the gradients of the
        # global and per-leaf norms with respect to an all-zero tree.
        out = []
        for p in ORDS:
            out.append(jax.grad(lambda t, p=p: optaxclip.global_norm(along(t), p))(t))
            out.append(jax.grad(lambda tree, p=p: optaxclip.global_norm(tree, p))(along(t)))
            out.append(
                jax.grad(lambda tree, p=p: sum(jax.tree.leaves(optaxclip.leaf_norms(tree, p))))(
                    along(t)
                )
            )
        return out

    with jax.disable_jit(False):
        gradients = jax.jit(all_gradients)(0.0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gradients))


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-20])
def test_global_norm_gradient_matches_formula_away_from_kink(p, scale):
    # d||x||_p / dx_i = sign(x_i) |x_i|^(p-1) / ||x||^(p-1); for inf, sign at the argmax.
    x = np.array([0.5, -2.0, 1.25, 3.0]) * scale
    tree = {"a": jnp.asarray(x[:2], jnp.float32), "b": jnp.asarray(x[2:], jnp.float32)}
    grads = jax.grad(lambda t: optaxclip.global_norm(t, ord=p))(tree)
    got = np.concatenate([np.asarray(grads["a"]), np.asarray(grads["b"])])
    if p == math.inf:
        expected = np.where(np.abs(x) == np.abs(x).max(), np.sign(x), 0.0)
    else:
        norm = np.sum(np.abs(x / scale) ** p) ** (1 / p)
        expected = np.sign(x) * np.abs(x / scale) ** (p - 1) / norm ** (p - 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_global_norm_gradient_matches_float64_finite_difference():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(6)
    v = rng.standard_normal(6)
    for p in ORDS:
        tree = {"a": jnp.asarray(x[:4].reshape(2, 2), jnp.float32), "b": jnp.asarray(x[4:])}
        grads = jax.grad(lambda t, p=p: optaxclip.global_norm(t, ord=p))(tree)
        directional = float(np.dot(np.asarray(grads["a"]).ravel(), v[:4])) + float(
            np.dot(np.asarray(grads["b"]), v[4:])
        )
        h = 1e-6

        def ref(y, p=p):
            return float(np.linalg.norm(y, ord=p))

        fd = (ref(x + h * v) - ref(x - h * v)) / (2 * h)
        assert directional == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_second_derivative_of_norm_of_scaled_zero_is_finite():
    d = jnp.array([3.0, 4.0])
    g2 = jax.grad(jax.grad(lambda t: optaxclip.global_norm({"a": t * d})))(0.0)
    assert math.isfinite(float(g2))


# --- transformations ------------------------------------------------------------------------


def test_norms_under_jit_and_vmap_equal_eager_loop_over_batch():
    rng = np.random.default_rng(2)
    scales = np.array([1.0, 1e30, 1e-20, 0.0])[:, None]
    batch = {
        "a": jnp.asarray(rng.standard_normal((4, 3)) * scales, jnp.float32),
        "b": jnp.asarray(rng.standard_normal((4, 2, 2)) * scales[:, :, None], jnp.bfloat16),
        "c": jnp.asarray(rng.standard_normal((4, 5)), jnp.float16),
    }

    def all_norms(t):
        return [(optaxclip.global_norm(t, ord=p), optaxclip.leaf_norms(t, ord=p)) for p in ORDS]

    with jax.disable_jit(False):
        batched = jax.jit(jax.vmap(all_norms))(batch)
    for i in range(4):
        one = jax.tree.map(lambda x, i=i: x[i], batch)
        eager = all_norms(one)
        for p, (norm, per_leaf), (eager_norm, _) in zip(ORDS, batched, eager, strict=True):
            assert float(norm[i]) == pytest.approx(float(eager_norm), rel=1e-6)
            assert _rel_err(float(norm[i]), ref_global_norm(one, p)) <= NORM_RTOL
            for key in ("a", "c"):
                expected = ref_leaf_norm(one[key], p)
                if p == 2 and 0 < expected < 1e-18:
                    continue  # the documented per-leaf flush (test_tiny_leaf_l2_norm_...)
                assert _rel_err(float(per_leaf[key][i]), expected) <= NORM_RTOL
