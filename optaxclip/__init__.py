"""optaxclip: gradient clipping for JAX/Optax that is exact, fast and reports what it did."""

from optaxclip._numerics import global_norm, leaf_norms
from optaxclip._static import (
    ClipState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from optaxclip._stats import ClipStats, clip_stats

__version__ = "0.1.0"

__all__ = [
    "ClipState",
    "ClipStats",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "clip_stats",
    "global_norm",
    "leaf_norms",
]
