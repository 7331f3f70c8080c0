"""optaxclip: gradient clipping for JAX/Optax that is exact, fast and reports what it did."""

from optaxclip._guards.skip import SkipNonfiniteState, SkipSpikesState, skip_nonfinite, skip_spikes
from optaxclip._numerics.reductions import global_norm, leaf_norms
from optaxclip._spec.layout import layout_from_shardings
from optaxclip._spec.stats import ClipStats, clip_stats
from optaxclip._transforms.adagc import AdaGCState, adagc
from optaxclip._transforms.agc import AGCState, adaptive_grad_clip, unit_reduction_axes
from optaxclip._transforms.autoclip import AutoClipState, autoclip
from optaxclip._transforms.quantile import QuantileClipState, quantile_clip
from optaxclip._transforms.static import (
    ClipState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from optaxclip._transforms.zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = [
    "AGCState",
    "AdaGCState",
    "AutoClipState",
    "ClipState",
    "ClipStats",
    "QuantileClipState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "clip_stats",
    "global_norm",
    "layout_from_shardings",
    "leaf_norms",
    "quantile_clip",
    "skip_nonfinite",
    "skip_spikes",
    "unit_reduction_axes",
    "zclip",
]
