"""optaxclip: gradient clipping for JAX/Optax that is exact, fast and reports what it did.

The package is layered; each layer imports only the ones below it (checked in CI by
import-linter, see ``pyproject.toml``):

* ``optaxclip._guards``: wrappers that skip a whole optimizer step;
* ``optaxclip._transforms``: the clippers, one module per family, and the public norms;
* ``optaxclip._engine``: the clip engine and the non-finite policy every clipper shares;
* ``optaxclip._numerics``: pure array math and the one reduction engine;
* ``optaxclip._lowering``: every backend-specific program shape, in one module;
* ``optaxclip._spec``: Python-side input checks, thresholds, device layouts and stats.
"""

import sys

from optaxclip._guards.nonfinite import SkipNonfiniteState, skip_nonfinite
from optaxclip._guards.spikes import SkipSpikesState, skip_spikes
from optaxclip._spec.shardings import layout_from_shardings
from optaxclip._spec.stats import ClipState, ClipStats, clip_stats
from optaxclip._spec.units import unit_reduction_axes
from optaxclip._transforms import rules
from optaxclip._transforms.adaclip import AdaClipState, adaclip
from optaxclip._transforms.adagc import AdaGCState, adagc
from optaxclip._transforms.agc import AGCState, adaptive_grad_clip
from optaxclip._transforms.autoclip import AutoClipState, autoclip
from optaxclip._transforms.global_norm import clip_by_global_norm
from optaxclip._transforms.leaf_norm import clip_by_block_rms, clip_by_leaf_norm
from optaxclip._transforms.norms import global_norm, leaf_norms
from optaxclip._transforms.quantile import QuantileClipState, quantile_clip
from optaxclip._transforms.rule import ClipRule, RuleClipState, clip_by_rule
from optaxclip._transforms.value import clip_by_value
from optaxclip._transforms.zclip import ZClipState, zclip

# ``import optaxclip.rules`` as well as ``optaxclip.rules``: the module lives in its layer.
sys.modules.setdefault("optaxclip.rules", rules)

__version__ = "0.1.0"

__all__ = [
    "AGCState",
    "AdaClipState",
    "AdaGCState",
    "AutoClipState",
    "ClipRule",
    "ClipState",
    "ClipStats",
    "QuantileClipState",
    "RuleClipState",
    "SkipNonfiniteState",
    "SkipSpikesState",
    "ZClipState",
    "adaclip",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_rule",
    "clip_by_value",
    "clip_stats",
    "global_norm",
    "layout_from_shardings",
    "leaf_norms",
    "quantile_clip",
    "rules",
    "skip_nonfinite",
    "skip_spikes",
    "unit_reduction_axes",
    "zclip",
]
