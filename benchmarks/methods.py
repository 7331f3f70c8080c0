"""What the suite times: the clippers (ours, Optax's, local variants) and the step functions.

Every method is built from a :class:`harness.TreeSpec`, so that thresholds can be set from
the gradient scale (all clippers actually clip on every step). A clipper that the installed
``optaxclip`` lacks is reported as skipped, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from harness import ADAM_PASSES, TreeSpec

import optaxclip

Factory = Callable[[TreeSpec], optax.GradientTransformation]


@dataclass(frozen=True)
class Method:
    """One clipper as benchmarked.

    ``reduction_passes`` is the number of full reads needed before the clip can be applied
    (0 for elementwise clipping, 1 for a norm of the gradient, 2 when the parameters' norms
    are needed too). The byte model follows: the clipper alone moves
    ``reduction_passes + 2`` trees, chained with Adam ``ADAM_PASSES + reduction_passes``.
    """

    key: str
    family: str
    library: str
    label: str
    reduction_passes: int
    needs_params: bool
    factory: Factory | None
    missing: str | None = None

    @property
    def clip_passes(self) -> int:
        return self.reduction_passes + 2

    @property
    def chain_passes(self) -> int:
        return ADAM_PASSES + self.reduction_passes


# --------------------------------------------------------------------------------------
# Local variants of the global clip, to attribute its costs
# --------------------------------------------------------------------------------------


def clip_by_global_norm_without_stats(max_norm: float) -> optax.GradientTransformation:
    """optaxclip's global clip (same norm, scale and non-finite handling) without ClipStats.

    It runs ``optaxclip.clip_by_global_norm`` from a fresh state on every call and returns
    only the clipped gradient: the stats are never used, so XLA removes them as dead code,
    and the variant keeps no state of its own. The difference to
    ``optaxclip.clip_by_global_norm`` is the cost of the stats. (With a constant threshold
    the fresh state changes nothing else: the step count only feeds a schedule.)
    """
    inner = optaxclip.clip_by_global_norm(max_norm)

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        out, _ = inner.update(updates, inner.init(updates), params)
        return out, state

    return optax.GradientTransformation(init_fn, update_fn)


def bare_clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """The least work a global clip can do: f32 sums of squares, ``g * min(1, c / norm)``.

    No overflow rescue, no non-finite policy, no stats (and NaN at a zero gradient): a floor
    for what the exact clip costs, not something to ship.
    """

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        leaves, treedef = jax.tree.flatten(updates)
        sums = [jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves]
        norm = jnp.sqrt(jnp.sum(jnp.stack(sums)))
        scale = jnp.minimum(1.0, max_norm / norm)
        out = [(x.astype(jnp.float32) * scale).astype(x.dtype) for x in leaves]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_from_one_entry() -> optax.GradientTransformation:
    """``g * s`` with ``s`` computed from one entry of the first leaf: not a clip.

    The least any clip adds to a step: one runtime scalar handed to every leaf (and, chained,
    to each of the optimizer's kernels), and no read of the gradient. Its compile time is the
    floor of what a clip chained with Adam can compile in.
    """

    def scaled(updates: Any, params: Any = None) -> Any:
        del params
        first = jax.tree.leaves(updates)[0].ravel()[0].astype(jnp.float32)
        scale = 1 / (1 + jnp.abs(first))
        return jax.tree.map(lambda x: (x.astype(jnp.float32) * scale).astype(x.dtype), updates)

    return optax.stateless(scaled)


def norm_beside(norm: Callable[[Any], Any] = optaxclip.global_norm) -> optax.GradientTransformation:
    """The gradient passed on unchanged, its global norm kept in the state: not a clip.

    Chained with Adam this is a step that logs the gradient's norm beside Adam, and Adam plus
    one read of the gradient that Adam does not wait for: the least time any clip that needs
    the norm can take on the machine (XLA may even run the two side by side). The global
    clip's target is judged against it. ``norm``: ``optaxclip.global_norm`` or Optax's.
    """

    def init_fn(params: Any) -> jax.Array:
        del params
        return jnp.zeros((), jnp.float32)

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del state, params
        return updates, jnp.asarray(norm(updates), jnp.float32)

    return optax.GradientTransformation(init_fn, update_fn)


# Cases the compile section runs with the global family whatever --compile-libraries says.
COMPILE_REFERENCES = ("variant:scale_floor",)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


def _leaf_threshold(spec: TreeSpec) -> float:
    # Half the average per-leaf norm: most leaves are clipped.
    return 0.5 * 4.0 / math.sqrt(max(spec.n_leaves, 1))


def _ours(name: str, build: Callable[[Any, TreeSpec], optax.GradientTransformation]) -> Any:
    """(factory, missing reason) for ``optaxclip.<name>`` if it exists."""
    fn = getattr(optaxclip, name, None)
    if fn is None:
        return None, f"optaxclip.{name} does not exist in this checkout"
    return (lambda spec: build(fn, spec)), None


def all_methods() -> list[Method]:
    """Every method the suite knows, available or not, in table order."""
    methods: list[Method] = []

    def add(key, family, library, label, passes, needs_params, factory, missing=None):
        methods.append(Method(key, family, library, label, passes, needs_params, factory, missing))

    add(
        "optaxclip:global",
        "global",
        "optaxclip",
        "optaxclip.clip_by_global_norm(1.0)",
        1,
        False,
        lambda spec: optaxclip.clip_by_global_norm(1.0),
    )
    add(
        "variant:global_nostats",
        "global",
        "variant",
        "same clip, ClipStats dropped",
        1,
        False,
        lambda spec: clip_by_global_norm_without_stats(1.0),
    )
    add(
        "variant:global_again",
        "global",
        "variant",
        "same clip again (A/A control)",
        1,
        False,
        lambda spec: optaxclip.clip_by_global_norm(1.0),
    )
    add(
        "variant:global_bare",
        "global",
        "variant",
        "bare g*min(1,c/norm) (no rescue/policy/stats)",
        1,
        False,
        lambda spec: bare_clip_by_global_norm(1.0),
    )
    add(
        "variant:norm_beside",
        "global",
        "variant",
        "g unchanged, its norm stored beside (the floor of a norm-based clip)",
        1,
        False,
        lambda spec: norm_beside(),
    )
    add(
        "variant:optax_norm_beside",
        "global",
        "variant",
        "g unchanged, optax.global_norm stored beside",
        1,
        False,
        lambda spec: norm_beside(optax.global_norm),
    )
    add(
        "variant:scale_floor",
        "global",
        "variant",
        "g*s, s from one entry (no norm: the floor of any clip)",
        0,
        False,
        lambda spec: scale_from_one_entry(),
    )
    add(
        "optax:global",
        "global",
        "optax",
        "optax.clip_by_global_norm(1.0)",
        1,
        False,
        lambda spec: optax.clip_by_global_norm(1.0),
    )
    add(
        "optaxclip:leaf",
        "leaf",
        "optaxclip",
        "optaxclip.clip_by_leaf_norm(c)",
        1,
        False,
        lambda spec: optaxclip.clip_by_leaf_norm(_leaf_threshold(spec)),
    )
    add(
        "optaxclip:value",
        "value",
        "optaxclip",
        "optaxclip.clip_by_value(sigma)",
        0,
        False,
        lambda spec: optaxclip.clip_by_value(spec.grad_std),
    )
    add(
        "optax:value",
        "value",
        "optax",
        "optax.clip(sigma)",
        0,
        False,
        lambda spec: optax.clip(spec.grad_std),
    )
    factory, missing = _ours("adaclip", lambda fn, spec: fn())
    add(
        "optaxclip:adaclip",
        "value",
        "optaxclip",
        "optaxclip.adaclip()",
        0,
        False,
        factory,
        missing,
    )
    add(
        "optaxclip:block_rms",
        "block_rms",
        "optaxclip",
        "optaxclip.clip_by_block_rms(sigma/2)",
        1,
        False,
        lambda spec: optaxclip.clip_by_block_rms(0.5 * spec.grad_std),
    )
    add(
        "optax:block_rms",
        "block_rms",
        "optax",
        "optax.clip_by_block_rms(sigma/2)",
        1,
        False,
        lambda spec: optax.clip_by_block_rms(0.5 * spec.grad_std),
    )
    factory, missing = _ours("adaptive_grad_clip", lambda fn, spec: fn(0.01))
    add(
        "optaxclip:agc",
        "agc",
        "optaxclip",
        "optaxclip.adaptive_grad_clip(0.01)",
        2,
        True,
        factory,
        missing,
    )
    add(
        "optax:agc",
        "agc",
        "optax",
        "optax.adaptive_grad_clip(0.01)",
        2,
        True,
        lambda spec: optax.adaptive_grad_clip(0.01),
    )
    adaptive = [
        ("autoclip", "autoclip(10.0)", lambda fn, spec: fn(10.0)),
        ("zclip", "zclip(warmup_steps=2)", lambda fn, spec: fn(warmup_steps=2)),
        ("adagc", "adagc(warmup_steps=2)", lambda fn, spec: fn(warmup_steps=2)),
        ("quantile_clip", "quantile_clip()", lambda fn, spec: fn()),
    ]
    for name, label, build in adaptive:
        factory, missing = _ours(name, build)
        add(
            f"optaxclip:{name}", name, "optaxclip", f"optaxclip.{label}", 1, False, factory, missing
        )
    return methods


FAMILIES = (
    "global",
    "leaf",
    "value",
    "block_rms",
    "agc",
    "autoclip",
    "zclip",
    "adagc",
    "quantile_clip",
)
ADAPTIVE_FAMILIES = ("autoclip", "zclip", "adagc", "quantile_clip")


def select_methods(families: list[str] | None) -> list[Method]:
    """The methods of the given families (all when None)."""
    methods = all_methods()
    if families is None:
        return methods
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown method families {unknown}; known: {', '.join(FAMILIES)}")
    return [m for m in methods if m.family in families]


def method_by_key(key: str) -> Method:
    for m in all_methods():
        if m.key == key:
            return m
    raise KeyError(key)


def optimizer(name: str) -> optax.GradientTransformation:
    """The optimizer every clipper is chained with: Adam (CPU suite) or AdamW (GPU mode)."""
    if name == "adam":
        return optax.adam(1e-3)
    if name == "adamw":
        return optax.adamw(1e-3, weight_decay=0.1)
    raise ValueError(name)


# --------------------------------------------------------------------------------------
# Step functions: (fn, donate_argnums, feed) for harness.time_step
# --------------------------------------------------------------------------------------


def clip_step(tx: optax.GradientTransformation, needs_params: bool):
    """The clipper alone: gradients and state donated, the clipped gradients fed back."""
    if needs_params:

        def step_with_params(g, s, p):
            return tx.update(g, s, p)

        return step_with_params, (0, 1), lambda args, out: (out[0], out[1], args[2])

    def step(g, s):
        return tx.update(g, s)

    return step, (0, 1), lambda args, out: (out[0], out[1])


def train_step(tx: optax.GradientTransformation):
    """update + apply_updates: params and optimizer state donated, fed back; same gradients."""

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return step, (0, 1), lambda args, out: (out[0], out[1], args[2])


def dispatch_step():
    """A no-op on (params, state, grads): the per-call cost of passing the buffers through jit."""

    def step(p, s, g):
        del g
        return p, s

    return step, (0, 1), lambda args, out: (out[0], out[1], args[2])
