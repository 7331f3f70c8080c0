"""AdaClip: step by step against a float64 transcription of the reference equations, and properties."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.references import flush_atol, same_bits, to_f64, unit_roundoff
from helpers.runs import one_device_mesh, run_scan
from helpers.strategies import gradient_trees
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import optaxclip

SHAPES = {"a": (4, 3), "b": (5,), "c": (2, 2, 3)}  # dict leaves flatten in this (sorted) order
SCALES = {"a": 1.0, "b": 0.3, "c": 0.05}
STEPS = 48
SPIKE_STEPS = (10, 14, 18)
NAN_STEP = 22
QUIET = range(30, 40)

# Four float32 ulps, relative: the EMA's gap rounded to float32, the EMA's own rounding, the
# bias correction's expm1, the division and the multiplication of a clipped entry each add at
# most about one.
RTOL = 4 * float(np.finfo(np.float32).eps)


def recorded_gradients(seed=0):
    """Ordinary steps, spikes in one leaf, in one entry and in all leaves, a NaN, a quiet stretch.

    Leaf "c" is exactly zero for the first three steps.
    """
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(STEPS):
        for k, s in SHAPES.items():
            out[k][t] = rng.normal(size=s) * SCALES[k] * np.exp(rng.normal(0.0, 0.1))
    out["c"][:3] = 0.0
    out["a"][SPIKE_STEPS[0]] *= 100.0
    out["b"][SPIKE_STEPS[1], 2] *= 1000.0
    for k in SHAPES:
        out[k][SPIKE_STEPS[2]] *= 300.0
        out[k][QUIET] *= 1e-3
    out["c"][NAN_STEP, 1, 0, 2] = np.nan
    return out


class ReferenceAdaClip:
    """The AdaClip block of ``StableSPAM.step`` (TianjinYellow/StableSPAM) in float64, per tensor.

    In the reference's order: ``step += 1``; ``m = theta * m + (1 - theta) * max|g|``;
    ``m_hat = m / (1 - theta**step)``; entries with ``|g| > m_hat`` become ``g / max|g| * m_hat``.
    optaxclip's documented departures, marked below: a step holding NaN or Inf changes nothing
    and is not counted; a tensor whose ``m_hat`` is 0 is not clipped.
    """

    def __init__(self, theta, n_leaves):
        self.theta = theta
        self.m = np.zeros(n_leaves)
        self.t = 0

    def corrected(self):
        """Each tensor's ``m_hat`` from the statistics as they stand (0 before any step)."""
        return self.m / (1 - self.theta**self.t) if self.t else np.zeros_like(self.m)

    def threshold(self):
        """Our reported threshold: the smallest ``m_hat`` above 0, inf if none."""
        hats = self.corrected()
        return float(np.min(hats[hats > 0])) if np.any(hats > 0) else math.inf

    def step(self, grads):
        """The clipped gradients (float64) and the fraction of entries that change."""
        grads = [np.float64(g) for g in grads]
        if not all(np.all(np.isfinite(g)) for g in grads):  # departure: nothing changes
            return grads, 0.0
        self.t += 1
        out = []
        for i, g in enumerate(grads):
            peak = float(np.max(np.abs(g)))
            self.m[i] = self.theta * self.m[i] + (1 - self.theta) * peak
            m_hat = self.m[i] / (1 - self.theta**self.t)
            g = g.copy()
            mask = np.abs(g) > m_hat
            if m_hat > 0 and mask.any():  # departure: m_hat == 0 leaves the tensor alone
                g[mask] = g[mask] / peak * m_hat
            out.append(g)
        # An entry changes when its float32 value does: on the first step the rounded
        # bias correction may put m_hat a float64 ulp under max|g|, a tie the equations
        # resolve as "not clipped".
        changed = sum(
            int(np.sum(np.float32(o) != np.float32(g))) for o, g in zip(out, grads, strict=True)
        )
        return out, changed / sum(g.size for g in grads)


@pytest.fixture(scope="module")
def recorded():
    return recorded_gradients()


@functools.cache
def adaclip_for(theta, nonfinite="propagate"):
    return optaxclip.adaclip(theta, nonfinite=nonfinite)


def _global_norm(leaves):
    return math.sqrt(sum(float(np.sum(np.float64(x) ** 2)) for x in leaves))


@pytest.mark.parametrize("theta", [0.999, 0.9])
def test_outputs_states_and_stats_match_the_reference_equations_step_by_step(theta, recorded):
    outs, states = run_scan(adaclip_for(theta), recorded)
    ref = ReferenceAdaClip(theta, len(SHAPES))
    for t in range(STEPS):
        grads = [recorded[k][t] for k in SHAPES]
        expected, fraction = ref.step(grads)
        for k, e in zip(SHAPES, expected, strict=True):
            np.testing.assert_allclose(outs[k][t], e, rtol=RTOL, atol=0, err_msg=f"step {t}")
        np.testing.assert_allclose(states.max_ema[t], ref.m, rtol=RTOL, err_msg=f"step {t}")
        assert int(states.finite_steps[t]) == ref.t
        stats = jax.tree.map(lambda v, t=t: v[t], states.stats)
        np.testing.assert_allclose(stats.threshold, ref.threshold(), rtol=RTOL, err_msg=f"{t}")
        np.testing.assert_allclose(stats.clipped_fraction, fraction, rtol=1e-6, err_msg=f"{t}")
        if t != NAN_STEP:
            np.testing.assert_allclose(stats.pre_clip_norm, _global_norm(grads), rtol=1e-5)
            np.testing.assert_allclose(stats.post_clip_norm, _global_norm(expected), rtol=1e-5)
    # The spikes are clipped, the first step and the quiet stretch are not.
    assert all(states.stats.clipped_fraction[t] > 0 for t in SPIKE_STEPS)
    assert states.stats.clipped_fraction[0] == 0
    assert np.all(states.stats.clipped_fraction[list(QUIET)] == 0)


def test_a_spike_in_one_entry_rescales_only_that_leaf_and_keeps_its_order(recorded):
    t = SPIKE_STEPS[1]  # entry 2 of leaf "b" times 1000
    calm = {k: v.copy() for k, v in recorded.items()}
    calm["b"][t, 2] /= 1000.0
    outs, states = run_scan(adaclip_for(0.999), recorded)
    calm_outs, _ = run_scan(adaclip_for(0.999), calm)
    for k in ("a", "c"):  # whatever these leaves get, the spike in "b" does not change it
        assert same_bits(outs[k][t], calm_outs[k][t])
    m_hat = states.max_ema[t][1] / (1 - 0.999 ** int(states.finite_steps[t]))
    np.testing.assert_allclose(np.abs(outs["b"][t][2]), m_hat, rtol=RTOL)
    order = np.argsort(np.abs(recorded["b"][t]), kind="stable")
    assert np.all(np.diff(np.abs(outs["b"][t])[order]) >= 0)


@pytest.mark.parametrize("policy", ["propagate", "zero"])
def test_a_nan_step_keeps_the_statistics_and_applies_the_policy(policy, recorded):
    outs, states = run_scan(adaclip_for(0.999, policy), recorded)
    t = NAN_STEP
    assert same_bits(states.max_ema[t], states.max_ema[t - 1])
    assert int(states.finite_steps[t]) == int(states.finite_steps[t - 1])
    assert int(states.stats.steps[t]) == t + 1
    for k in SHAPES:
        expected = np.zeros_like(recorded[k][t]) if policy == "zero" else recorded[k][t]
        assert np.array_equal(outs[k][t], expected, equal_nan=True)
    assert math.isnan(states.stats.pre_clip_norm[t])
    assert states.stats.clipped_fraction[t] == (1.0 if policy == "zero" else 0.0)
    # The threshold reported is that of the statistics kept.
    kept = states.max_ema[t] / (1 - 0.999 ** int(states.finite_steps[t]))
    np.testing.assert_allclose(states.stats.threshold[t], np.min(kept), rtol=RTOL)


def test_error_policy_raises_naming_the_leaf_eagerly_and_under_jit(recorded):
    tx = adaclip_for(0.999, "error")
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    bad = {k: jnp.asarray(v[NAN_STEP]) for k, v in recorded.items()}
    eager_error = pytest.raises(FloatingPointError, match=r"adaclip: the gradient leaf \['c'\]")
    with jax.disable_jit(), eager_error:
        tx.update(bad, state)
    update = jax.jit(tx.update)
    good = {k: jnp.asarray(v[0]) for k, v in recorded.items()}
    jax.block_until_ready(update(good, state))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"gradient leaf \['c'\] holds NaN"):
        jax.block_until_ready(update(bad, state))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_leaves_are_clipped_in_float32_and_rounded_once(dtype, recorded):
    steps = range(20)  # spikes included, the NaN step not
    low = {k: np.asarray(v[steps]).astype(dtype) for k, v in recorded.items()}
    wide = {k: v.astype(np.float32) for k, v in low.items()}
    low_outs, low_states = run_scan(adaclip_for(0.999), low)
    wide_outs, wide_states = run_scan(adaclip_for(0.999), wide)
    for k in SHAPES:
        assert low_outs[k].dtype == jnp.dtype(dtype)
        assert same_bits(low_outs[k], wide_outs[k].astype(dtype))
    assert same_bits(low_states.max_ema, wide_states.max_ema)
    assert same_bits(low_states.stats.threshold, wide_states.stats.threshold)


def _reference_thresholds(trees, theta):
    """Per step, each leaf's ``m_hat`` in float64 from the reference equations."""
    m, out = None, []
    for t, tree in enumerate(trees, start=1):
        peaks = np.array(
            [float(np.max(np.abs(to_f64(x)), initial=0)) for x in jax.tree.leaves(tree)]
        )
        m = (1 - theta) * peaks if m is None else theta * m + (1 - theta) * peaks
        out.append(m / (1 - theta**t))
    return out


@pytest.mark.usefixtures("eager_ops")
@given(
    tree=gradient_trees(
        dtypes=(jnp.float16, jnp.bfloat16, jnp.float32), exponents=(-6, 1), allow_zero=True
    ),
    factors=st.lists(st.sampled_from([0.5, 1.0, 4.0, 100.0]), min_size=2, max_size=2),
    theta=st.sampled_from([0.5, 0.9, 0.999]),
)
@settings(deadline=None)
def test_entries_at_or_below_the_threshold_are_kept_bit_for_bit(tree, factors, theta):
    trees = [tree] + [
        jax.tree.map(lambda x, f=f: jnp.asarray(to_f64(x) * f, x.dtype), tree) for f in factors
    ]
    tx = optaxclip.adaclip(theta)
    state = tx.init(tree)
    hats_per_step = _reference_thresholds(trees, theta)
    for step, (grads, hats) in enumerate(zip(trees, hats_per_step, strict=True)):
        out, state = tx.update(grads, state)
        for o, x, m_hat in zip(jax.tree.leaves(out), jax.tree.leaves(grads), hats, strict=True):
            o, x = np.asarray(o), np.asarray(x)
            assert o.dtype == x.dtype
            assert np.array_equal(np.signbit(o), np.signbit(x))
            # The first threshold is max|g| itself; later ones as computed may differ from the
            # float64 ones by a few ulps.
            below = np.abs(to_f64(x)) <= m_hat * (1 - RTOL)
            kept = np.ones(x.shape, bool) if step == 0 else below
            assert same_bits(o[kept], x[kept])
            largest = float(np.max(np.abs(to_f64(o)), initial=0))
            bound = m_hat * (1 + RTOL + unit_roundoff(x.dtype)) + flush_atol(x.dtype)
            assert largest <= bound


@pytest.mark.parametrize(
    ("theta", "message"),
    [
        (0.0, r"must be in \(0, 1\), got 0"),
        (1.0, r"must be in \(0, 1\), got 1"),
        (1.5, r"must be in \(0, 1\), got 1.5"),
        (-0.25, r"must be in \(0, 1\), got -0.25"),
        (math.nan, "must not be NaN"),
    ],
)
def test_theta_outside_the_open_unit_interval_is_refused_naming_the_call(theta, message):
    with pytest.raises(ValueError, match=r"^adaclip\(theta=\.\.\.\): " + message):
        optaxclip.adaclip(theta)


def test_complex_and_integer_leaves_are_refused_naming_their_path():
    tx = optaxclip.adaclip()
    with pytest.raises(TypeError, match=r"leaf \['z'\] has the complex dtype"):
        tx.init({"w": jnp.zeros(2), "z": jnp.zeros(2, jnp.complex64)})
    state = tx.init({"w": jnp.zeros(2), "z": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"leaf \['z'\] has dtype int32"):
        tx.update({"w": jnp.zeros(2), "z": jnp.zeros(2, jnp.int32)}, state)
    with pytest.raises(ValueError, match="initialised for 2"):
        tx.update({"w": jnp.zeros(2)}, state)


def test_state_from_init_can_be_donated_to_a_jitted_update(recorded):
    tx = optaxclip.adaclip()
    state = tx.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    expected_state = state
    update = jax.jit(tx.update, donate_argnums=1)
    for t in range(2):
        grads = {k: jnp.asarray(v[t]) for k, v in recorded.items()}
        _, expected_state = tx.update(grads, expected_state)
        _, state = update(grads, state)
        pointers = [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(state)]
        assert len(pointers) == len(set(pointers)), "two state leaves share one buffer"
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(expected_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL)


def test_axis_name_inside_shard_map_gives_the_unsharded_result(recorded):
    mesh = one_device_mesh("model")
    specs = {"a": P("model"), "b": P(), "c": P(None, "model")}
    sharded = optaxclip.adaclip(axis_name="model", layout=specs)
    plain = optaxclip.adaclip()
    state = plain.init({k: jnp.zeros(s) for k, s in SHAPES.items()})
    step = jax.jit(
        jax.shard_map(sharded.update, mesh=mesh, in_specs=(specs, P()), out_specs=(specs, P()))
    )
    plain_step = jax.jit(plain.update)
    sharded_state, plain_state = state, state
    for t in range(NAN_STEP + 2):  # the spikes and the NaN step
        grads = {k: jnp.asarray(v[t]) for k, v in recorded.items()}
        out, sharded_state = step(grads, sharded_state)
        expected, plain_state = plain_step(grads, plain_state)
        for k in SHAPES:
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, atol=0)
    for a, b in zip(jax.tree.leaves(sharded_state), jax.tree.leaves(plain_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_theta_injected_as_a_hyperparameter_gives_the_same_run(recorded):
    # Traced, theta reaches the clipper in float32 and its gap 1 - theta is rounded from that.
    injected = optax.inject_hyperparams(optaxclip.adaclip)(theta=0.9)
    outs, states = run_scan(injected, recorded)
    plain_outs, plain_states = run_scan(adaclip_for(0.9), recorded)
    for k in SHAPES:
        np.testing.assert_allclose(outs[k], plain_outs[k], rtol=1e-6, atol=0)
    np.testing.assert_allclose(states.inner_state.max_ema, plain_states.max_ema, rtol=1e-6)
