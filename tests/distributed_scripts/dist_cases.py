"""The transforms and the gradient tree that the distributed tests run, shared by the scripts.

Importing this module has no side effects (it is also collected by ``--doctest-modules``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import optaxclip

MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
N_DEVICES = 8
STEPS = 6
# The largest number of entries a cross-device reduction of statistics may have here: the
# units (output features) of the "proj" and "embed" kernels, whose inputs are split.
STATS_REDUCTION_LIMIT = 8
# Scales of the gradient at each step: a spike at step 3 so that the adaptive clippers clip
# past their warm-up, and a quiet step after it.
STEP_SCALES = (1.0, 1.3, 0.8, 4.0, 1.1, 0.6)
# At this step one entry of the "embed" gradient is NaN: it sits in one device's block only,
# and every device must still take the same decision as the single-device run.
NAN_STEP = 4

# How each leaf is laid out on the (data, model) mesh: split along the model axis in either
# dimension (the units of a flax kernel, or its inputs), fully sharded over both axes (FSDP
# style) and replicated. Every split leaf has 128 entries, more than any per-leaf or per-unit
# vector of statistics (at most 8 entries here), which the HLO check relies on.
SPECS: dict[str, Any] = {
    "dense": {"kernel": P(None, "model")},
    "proj": {"kernel": P("model", None)},
    "norm": {"scale": P()},
    "embed": P(("data", "model"), None),
}
SHAPES: dict[str, Any] = {
    "dense": {"kernel": (8, 16)},
    "proj": {"kernel": (16, 8)},
    "norm": {"scale": (8,)},
    "embed": (16, 8),
}


def _tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    if isinstance(trees[0], dict):
        return {k: _tree_map(fn, *(t[k] for t in trees)) for k in trees[0]}
    return fn(*trees)


def params() -> Any:
    """Parameters (float32), the same in every process."""
    rng = np.random.default_rng(1234)
    return _tree_map(lambda s: (0.5 * rng.normal(size=s)).astype(np.float32), SHAPES)


def grads(step: int) -> Any:
    """The gradient of one step (float32, global norm around ``STEP_SCALES[step]``)."""
    rng = np.random.default_rng(step)
    scale = 0.05 * STEP_SCALES[step]
    tree = _tree_map(lambda s: (scale * rng.normal(size=s)).astype(np.float32), SHAPES)
    if step == NAN_STEP:
        tree["embed"][0, 0] = np.nan
    return tree


def loss(step: int) -> float:
    return 2.0 - 0.1 * step + (3.0 if step == 3 else 0.0)


def pmap_spec(spec: P) -> P:
    """The same layout on a 1-D ``pmap`` axis ``"i"`` of 8 devices (every split becomes 8-way)."""
    return P(*(None if entry is None else "i" for entry in spec))


class Case(NamedTuple):
    """A transform under test: ``make(axis_name, layout)`` builds it.

    ``needs_layout``: per-unit clippers must know which dimension of a leaf is split, which
    JAX's types do not say, so they get ``layout=`` in the shard_map run that otherwise relies
    on the types.
    """

    make: Callable[[Any, Any], optax.GradientTransformation]
    needs_params: bool = False
    needs_loss: bool = False
    needs_layout: bool = False


def _skip_spikes(axis_name: Any, layout: Any) -> optax.GradientTransformation:
    inner = optaxclip.clip_by_global_norm(2.0, axis_name=axis_name, layout=layout)
    return optaxclip.skip_spikes(
        inner, window=4, k=1.0, min_history=2, axis_name=axis_name, layout=layout
    )


CASES: dict[str, Case] = {
    "clip_by_global_norm": Case(
        lambda a, lay: optaxclip.clip_by_global_norm(1.5, axis_name=a, layout=lay)
    ),
    "clip_by_global_norm_inf": Case(
        lambda a, lay: optaxclip.clip_by_global_norm(0.15, ord=math.inf, axis_name=a, layout=lay)
    ),
    "clip_by_leaf_norm": Case(
        lambda a, lay: optaxclip.clip_by_leaf_norm(0.5, axis_name=a, layout=lay)
    ),
    "clip_by_value": Case(lambda a, lay: optaxclip.clip_by_value(0.05, axis_name=a, layout=lay)),
    "clip_by_block_rms": Case(
        lambda a, lay: optaxclip.clip_by_block_rms(0.05, axis_name=a, layout=lay)
    ),
    "adaptive_grad_clip": Case(
        lambda a, lay: optaxclip.adaptive_grad_clip(0.1, axis_name=a, layout=lay),
        needs_params=True,
        needs_layout=True,
    ),
    "autoclip": Case(
        lambda a, lay: optaxclip.autoclip(50.0, history_size=4, axis_name=a, layout=lay)
    ),
    "zclip": Case(
        lambda a, lay: optaxclip.zclip(
            alpha=0.9, z_thresh=1.0, warmup_steps=2, axis_name=a, layout=lay
        )
    ),
    "adagc": Case(
        lambda a, lay: optaxclip.adagc(
            relative_factor=1.04, beta=0.9, warmup_steps=2, axis_name=a, layout=lay
        )
    ),
    "quantile_clip": Case(
        lambda a, lay: optaxclip.quantile_clip(0.5, 0.2, 1.0, axis_name=a, layout=lay)
    ),
    "skip_spikes": Case(_skip_spikes, needs_loss=True),
    "skip_nonfinite": Case(
        lambda a, lay: optaxclip.skip_nonfinite(
            optaxclip.clip_by_global_norm(1.5, axis_name=a, layout=lay), axis_name=a
        )
    ),
}
