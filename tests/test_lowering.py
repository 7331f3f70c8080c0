"""The lowering layer: its devices change how values are computed, never which values."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip
from optaxclip import _lowering

# Every clipper, alone and guarded; each update takes (grads, state, params).
CLIPPERS = {
    "global": lambda: optaxclip.clip_by_global_norm(1.0),
    "global_inf": lambda: optaxclip.clip_by_global_norm(1.0, ord="inf"),
    "leaf": lambda: optaxclip.clip_by_leaf_norm(0.5),
    "block_rms": lambda: optaxclip.clip_by_block_rms(0.1),
    "value": lambda: optaxclip.clip_by_value(0.05),
    "value_asymmetric": lambda: optaxclip.clip_by_value(0.05, -0.02),
    "agc": lambda: optaxclip.adaptive_grad_clip(0.05),
    "autoclip": lambda: optaxclip.autoclip(50.0),
    "zclip": lambda: optaxclip.zclip(warmup_steps=2),
    "adagc": lambda: optaxclip.adagc(warmup_steps=2),
    "quantile": lambda: optaxclip.quantile_clip(),
    "skip_nonfinite": lambda: optaxclip.skip_nonfinite(optax.sgd(0.1)),
    "skip_spikes": lambda: optaxclip.skip_spikes(optax.sgd(0.1), window=4, min_history=2),
}


def _tree(seed, dtype):
    rng = np.random.default_rng(seed)
    shapes = {"a": (3,), "b": (4, 5), "c": (8, 8), "d": (2, 3, 4), "e": (), "big": (300, 300)}
    return {k: jnp.asarray(rng.standard_normal(s) * (1 + seed), dtype) for k, s in shapes.items()}


def _run(make, dtype):
    tx = make()
    params = _tree(100, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    outputs = []
    for step in range(4):
        out, state = update(_tree(step, dtype), state, params)
        outputs.append((out, state))
    return outputs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CLIPPERS))
def test_plain_lowering_gives_the_same_values(name, dtype):
    # The devices join small leaves, read leaves through barriers and compute factors under
    # conditionals; only the order of float32 additions may differ from the plain program.
    with_devices = _run(CLIPPERS[name], dtype)
    with _lowering.plain_lowering():
        plain = _run(CLIPPERS[name], dtype)
    rtol = 4 * float(jnp.finfo(dtype).eps) if dtype == jnp.bfloat16 else 2e-6
    for a, b in zip(jax.tree.leaves(with_devices), jax.tree.leaves(plain), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=0)


def test_plain_lowering_joins_nothing_and_reads_through_no_barrier():
    # With the devices, the many small leaves are reduced as one joined array behind barriers;
    # the plain program reduces each leaf where it lies.
    tree = [jnp.ones((4, 4), jnp.float32) for _ in range(20)] + [jnp.ones(8, jnp.bfloat16)]

    def text():
        # A transform of its own each time: JAX reuses the trace of a function it has seen.
        tx = optaxclip.clip_by_global_norm(1.0)
        return jax.jit(tx.update).lower(tree, tx.init(tree)).as_text()

    with_devices = text()
    with _lowering.plain_lowering():
        plain = text()
    # Per-leaf partial sums are stacked either way; only a join of leaves holds more entries
    # than there are leaves.
    assert _largest_concatenation(with_devices) == 20 * 16
    assert _largest_concatenation(plain) <= len(tree)
    assert "optimization_barrier" in with_devices
    assert "optimization_barrier" not in plain


def _largest_concatenation(text):
    sizes = re.findall(r"stablehlo.concatenate .* -> tensor<(\d+)x", text)
    return max(map(int, sizes), default=0)
