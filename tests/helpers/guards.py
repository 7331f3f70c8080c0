"""The recorded run that the tests of skip_nonfinite and skip_spikes replay."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from .references import same_bits

SHAPES = {"b": (5,), "w": (4, 3)}
STEPS = 200
SPIKES = {10: 100.0, 90: 100.0, 100: 1000.0, 101: 300.0, 160: 500.0}
NAN_STEPS = (120,)


def recorded_gradients(
    seed: int = 0, nan_steps: tuple[int, ...] = NAN_STEPS, spikes: dict[int, float] = SPIKES
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Quiet steps (norm ~1), spikes x100-x1000, NaN steps, then a long quiet stretch.

    Also a loss per step: ~2 with small noise, and a loss spike on step 140 only.
    """
    rng = np.random.default_rng(seed)
    grads = {k: np.zeros((STEPS, *s), np.float32) for k, s in SHAPES.items()}
    for t in range(STEPS):
        size = np.exp(rng.normal(0.0, 0.15)) * spikes.get(t, 1.0)
        for k, s in SHAPES.items():
            grads[k][t] = rng.normal(size=s) * size / math.sqrt(17.0)
    for t in nan_steps:
        grads["w"][t, 0, 0] = np.nan
    loss = (2.0 + 0.05 * rng.normal(size=STEPS)).astype(np.float32)
    loss[140] = 50.0
    return grads, loss


def inner_state_unchanged(states: Any, t: int) -> bool:
    """Whether the inner optimizer state after step ``t`` is bit for bit the one before it."""
    before = jax.tree.map(lambda x: x[t - 1], states.inner_state)
    after = jax.tree.map(lambda x: x[t], states.inner_state)
    return all(
        same_bits(a, b)
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    )
