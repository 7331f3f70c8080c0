"""The public names of optaxclip that are gradient transformations, for coverage checks."""

from __future__ import annotations

import optaxclip

# Public names that build no gradient transformation: types, helpers, norms, the rules module.
_NOT_TRANSFORMS = {
    "ClipRule",
    "ClipStats",
    "clip_stats",
    "global_norm",
    "layout_from_shardings",
    "leaf_norms",
    "rules",
    "unit_reduction_axes",
}

GUARDS = {"skip_nonfinite", "skip_spikes"}


def public_transforms() -> set[str]:
    """Every public factory of a gradient transformation, guards included."""
    return {n for n in optaxclip.__all__ if not n.endswith("State")} - _NOT_TRANSFORMS
