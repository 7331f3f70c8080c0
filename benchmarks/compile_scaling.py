"""Compile time (and optionally run time) of alternative global-norm formulations.

    python benchmarks/compile_scaling.py                          # 100,300,1000,2000 leaves
    python benchmarks/compile_scaling.py --leaves 100,1000,2000,5000 --timeout 600
    python benchmarks/compile_scaling.py --formulations current,pow2_rescue --modes norm,clip
    python benchmarks/compile_scaling.py --runtime transformer,many_small --scale 0.25

For every formulation of "the L2 norm of all leaves together" it measures, each point in a
fresh process with a timeout, ``lower`` + ``compile`` of: the norm alone (``norm``), a global
clip built on it (``clip``: norm, double-where scale, multiply) and that clip chained with
Adam + apply_updates (``chain``). ``--runtime`` also times the clip and the chain on the
suite's trees (same protocol as run.py), since a formulation that compiles fast must not
cost run time.

Formulations:
  optax                optax.tree.norm; clip and chain use optax.clip_by_global_norm itself
  current              optaxclip's norm_of_leaves as shipped (small leaves concatenated per
                       dtype up to 24 MiB, larger leaves reduced in place; overflow / underflow
                       rescue under lax.cond on the same arrays; fp16/bf16 behind a barrier)
  stack_direct         per-leaf float32 sums of squares, stacked and summed; no rescue
  pow2_rescue          current, but the rescue multiplies by 2**-e (e: exponent of the max),
                       exact, instead of dividing by the max
  recip_rescue         current, but the rescue multiplies by 1/max (not exact)
  own_max_rescue       current, but the rescue scales each leaf by its own max and combines
                       the per-leaf norms (no cross-leaf dependency inside the leaf loops)
  pow2_barrier         pow2_rescue with the scale factors behind lax.optimization_barrier
  concat_rescue        stack_direct, and a rescue that works on one concatenation of all
                       leaves (the copy is only paid on steps that need the rescue)
  lean_rescue          current, with a rescue that takes the max by plain XLA reduces (jnp.max
                       adds a NaN check that materializes |x|) and multiplies by 1/max
  concat_direct        one concatenation of all leaves, one sum; no rescue
  grouped_lean         one reduction per group of <= 64 same-dtype leaves over their
                       concatenation (single consumer each, so it can fuse); lean rescue
                       with the max taken in the leaves' own dtype
  proposed             the candidate that became "current": bucketed (small leaves
                       concatenated per dtype, in their own dtype), lean_rescue's rescue, and
                       fp16/bf16 leaves passed through lax.optimization_barrier first
  concat               one concatenation of all raveled leaves, one sum (rescue on it)
  bucketed             small leaves (<= 65536 elements) concatenated into buckets of up to
                       4M elements, big leaves alone; pow2 rescue
  sequential           per-leaf sums added with Python + (Optax's tree sum); no rescue
  reduce_associative   per-leaf sums combined by jax.tree.reduce_associative; no rescue
  dot                  per-leaf vdot(x, x) in float32, stacked; no rescue
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

F32_TINY_SUM = 2.0**-96
SMALL_LEAF = 1 << 16
BUCKET = 1 << 22

FORMULATIONS = (
    "optax",
    "current",
    "stack_direct",
    "pow2_rescue",
    "recip_rescue",
    "own_max_rescue",
    "pow2_barrier",
    "concat_rescue",
    "lean_rescue",
    "concat_direct",
    "grouped_lean",
    "proposed",
    "concat",
    "bucketed",
    "sequential",
    "reduce_associative",
    "dot",
)
MODES = ("norm", "clip", "chain")


# --------------------------------------------------------------------------------------
# Formulations: list of leaves -> float32 scalar L2 norm
# --------------------------------------------------------------------------------------


def _f32(x):
    import jax.numpy as jnp

    return x.astype(jnp.float32)


def _sq(x):
    import jax.numpy as jnp

    y = _f32(x)
    return jnp.sum(y * y)


def _needs_rescue(total):
    import jax.numpy as jnp

    return jnp.isinf(total) | (total < F32_TINY_SUM)


def _with_rescue(direct_sum, rescued: Callable[[], Any]):
    import jax.numpy as jnp
    from jax import lax

    def plain():
        return jnp.sqrt(jnp.where(direct_sum > 0, direct_sum, 1)) * (direct_sum > 0)

    return lax.cond(_needs_rescue(direct_sum), rescued, plain)


def _global_max(arrays):
    import jax.numpy as jnp
    from jax import lax

    return lax.stop_gradient(jnp.max(jnp.stack([jnp.max(jnp.abs(_f32(x))) for x in arrays])))


def _pow2_inverse(largest):
    """(2**e, 2**-e) with 2**e >= largest (1 for 0/non-finite): exact rescaling factors."""
    import jax.numpy as jnp

    ok = (largest > 0) & jnp.isfinite(largest)
    _, e = jnp.frexp(jnp.where(ok, largest, 1.0))
    e = jnp.where(ok, e, 0)
    return jnp.ldexp(jnp.float32(1), e), jnp.ldexp(jnp.float32(1), -e)


def _rescued_pow2(arrays):
    import jax.numpy as jnp

    def rescued():
        up, down = _pow2_inverse(_global_max(arrays))
        total = jnp.sum(jnp.stack([_sq(_f32(x) * down) for x in arrays]))
        return up * jnp.sqrt(total)

    return rescued


def norm_optax(leaves):
    import optax

    return optax.tree.norm(leaves)


def norm_current(leaves):
    from optaxclip._numerics import norm_of_leaves

    return norm_of_leaves(leaves, 2.0, [()] * len(leaves))


def norm_stack_direct(leaves):
    import jax.numpy as jnp

    return jnp.sqrt(jnp.sum(jnp.stack([_sq(x) for x in leaves])))


def norm_pow2_rescue(leaves):
    import jax.numpy as jnp

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))
    return _with_rescue(total, _rescued_pow2(leaves))


def norm_recip_rescue(leaves):
    import jax.numpy as jnp

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))

    def rescued():
        largest = _global_max(leaves)
        divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
        inverse = 1 / divisor
        return divisor * jnp.sqrt(jnp.sum(jnp.stack([_sq(_f32(x) * inverse) for x in leaves])))

    return _with_rescue(total, rescued)


def norm_own_max_rescue(leaves):
    import jax.numpy as jnp
    from jax import lax

    from optaxclip._numerics import combine_norms

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))

    def rescued():
        norms = []
        for x in leaves:
            m = lax.stop_gradient(jnp.max(jnp.abs(_f32(x))))
            d = jnp.where((m > 0) & jnp.isfinite(m), m, 1)
            norms.append(d * jnp.sqrt(_sq(_f32(x) / d)))
        return combine_norms(jnp.stack(norms), 2.0)

    return _with_rescue(total, rescued)


def _concat(arrays):
    import jax.numpy as jnp

    if len(arrays) == 1:
        return _f32(arrays[0]).ravel()
    return jnp.concatenate([_f32(x).ravel() for x in arrays])


def norm_pow2_barrier(leaves):
    import jax.numpy as jnp
    from jax import lax

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))

    def rescued():
        up, down = _pow2_inverse(_global_max(leaves))
        # The barrier keeps XLA from fusing the scalar computation into every leaf's loop.
        up, down = lax.optimization_barrier((up, down))
        return up * jnp.sqrt(jnp.sum(jnp.stack([_sq(_f32(x) * down) for x in leaves])))

    return _with_rescue(total, rescued)


def norm_concat_rescue(leaves):
    import jax.numpy as jnp

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))
    return _with_rescue(total, lambda: _rescued_pow2([_concat(leaves)])())


def _reduce_max_abs(x):
    """max |x| as one plain XLA reduce (jnp.max adds a NaN check that materializes |x|)."""
    import jax.numpy as jnp
    from jax import lax

    y = jnp.abs(x)
    return (lax.reduce_max(y, tuple(range(y.ndim))) if y.ndim else y).astype(jnp.float32)


def _lean_rescue(arrays_for_max, scaled_sums):
    """Rescue: global max by plain reduces, then sums of squares of x * (1/max)."""
    import jax.numpy as jnp
    from jax import lax

    def rescued():
        largest = lax.stop_gradient(
            jnp.max(jnp.stack([_reduce_max_abs(x) for x in arrays_for_max()]))
        )
        divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
        return divisor * jnp.sqrt(jnp.sum(jnp.stack(scaled_sums(1 / divisor))))

    return rescued


def norm_lean_rescue(leaves):
    import jax.numpy as jnp

    total = jnp.sum(jnp.stack([_sq(x) for x in leaves]))
    rescued = _lean_rescue(lambda: leaves, lambda inv: [_sq(_f32(x) * inv) for x in leaves])
    return _with_rescue(total, rescued)


def norm_concat_direct(leaves):
    import jax.numpy as jnp

    return jnp.sqrt(_sq(_concat(leaves)))


GROUP_LEAVES = 64


def groups_of(leaves: Sequence[Any], size: int = GROUP_LEAVES) -> list[list[Any]]:
    """Leaves of one dtype in groups of at most ``size`` (the reductions run per group)."""
    by_dtype: dict[Any, list[Any]] = {}
    for x in leaves:
        by_dtype.setdefault(x.dtype, []).append(x)
    return [same[i : i + size] for same in by_dtype.values() for i in range(0, len(same), size)]


def _ravel_concat(xs, transform, upcast: bool = True):
    import jax.numpy as jnp

    parts = [transform(_f32(x) if upcast else x).ravel() for x in xs]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def norm_grouped_lean(leaves):
    """One reduction per group of <= 64 same-dtype leaves over the concatenation of the group.

    Each concatenation feeds a single reduction (a different elementwise op goes in first
    for the direct sum, the max and the rescaled sum), so XLA can fuse it into the reduce
    instead of materialising a copy of the gradient. The rescue's max is taken in the leaves'
    own dtype (exact), so its only float32 convert is the one of the rescaled sum.
    """
    import jax.numpy as jnp

    groups = groups_of(leaves)
    total = jnp.sum(jnp.stack([jnp.sum(_ravel_concat(g, lambda y: y * y)) for g in groups]))

    def rescued():
        from jax import lax

        maxima = [
            lax.reduce_max(_ravel_concat(g, jnp.abs, upcast=False), (0,)).astype(jnp.float32)
            for g in groups
        ]
        largest = lax.stop_gradient(jnp.max(jnp.stack(maxima)))
        divisor = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
        inv = 1 / divisor
        sums = [jnp.sum(_ravel_concat(g, lambda y: (y * inv) * (y * inv))) for g in groups]
        return divisor * jnp.sqrt(jnp.sum(jnp.stack(sums)))

    return _with_rescue(total, rescued)


def _shield_low_precision(leaves):
    """fp16/bf16 leaves behind lax.optimization_barrier, f32/f64 leaves as they are.

    The clip multiplies ``x.astype(float32)`` by the scale; without the barrier XLA:CPU merges
    that convert with the norm's own (CSE) and then materialises a float32 copy of the whole
    gradient for the two consumers.
    """
    import jax.numpy as jnp
    from jax import lax

    low = [i for i, x in enumerate(leaves) if x.dtype in (jnp.float16, jnp.bfloat16)]
    if not low:
        return list(leaves)
    shielded = lax.optimization_barrier([leaves[i] for i in low])
    out = list(leaves)
    for i, x in zip(low, shielded, strict=True):
        out[i] = x
    return out


def dtype_buckets(leaves: Sequence[Any], small: int = SMALL_LEAF, limit: int = BUCKET) -> list[Any]:
    """Big leaves alone; small leaves of one dtype concatenated (in that dtype) up to ``limit``."""
    by_dtype: dict[Any, list[Any]] = {}
    for x in leaves:
        by_dtype.setdefault(x.dtype, []).append(x)
    arrays: list[Any] = []
    for same in by_dtype.values():
        arrays += buckets(same, small, limit)
    return arrays


def norm_proposed(leaves):
    """Bucketed reductions, lean rescue, fp16/bf16 leaves behind an optimization barrier.

    Reductions: one per leaf above 65536 elements, one per bucket of small same-dtype leaves
    (their concatenation is a copy, bounded by the size of the small leaves). The rescue takes
    the max with plain reduces in the leaves' own dtype and multiplies by 1/max.
    """
    import jax.numpy as jnp

    arrays = dtype_buckets(_shield_low_precision(leaves))
    total = jnp.sum(jnp.stack([_sq(a) for a in arrays]))
    rescued = _lean_rescue(lambda: arrays, lambda inv: [_sq(_f32(a) * inv) for a in arrays])
    return _with_rescue(total, rescued)


def norm_concat(leaves):
    flat = _concat(leaves)
    return _with_rescue(_sq(flat), _rescued_pow2([flat]))


def buckets(leaves: Sequence[Any], small: int = SMALL_LEAF, limit: int = BUCKET) -> list[Any]:
    """Big leaves alone; consecutive small leaves concatenated up to ``limit`` elements."""
    groups: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for x in leaves:
        if x.size > small:
            groups.append([x])
            continue
        if current and size + x.size > limit:
            groups.append(current)
            current, size = [], 0
        current.append(x)
        size += x.size
    if current:
        groups.append(current)
    return [g[0] if len(g) == 1 else _concat_native(g) for g in groups]


def _concat_native(arrays):
    """Concatenation of raveled leaves, in their dtype when they share one (else float32)."""
    import jax.numpy as jnp

    if len({x.dtype for x in arrays}) == 1:
        return jnp.concatenate([x.ravel() for x in arrays])
    return _concat(arrays)


def norm_bucketed(leaves):
    import jax.numpy as jnp

    arrays = buckets(leaves)
    total = jnp.sum(jnp.stack([_sq(x) for x in arrays]))
    return _with_rescue(total, _rescued_pow2(arrays))


def norm_sequential(leaves):
    import jax.numpy as jnp

    total = jnp.zeros((), jnp.float32)
    for x in leaves:
        total = total + _sq(x)
    return jnp.sqrt(total)


def norm_reduce_associative(leaves):
    import jax
    import jax.numpy as jnp

    return jnp.sqrt(jax.tree.reduce_associative(operator.add, [_sq(x) for x in leaves]))


def norm_dot(leaves):
    import jax.numpy as jnp

    sums = [
        jnp.vdot(x.ravel(), x.ravel(), preferred_element_type=jnp.float32)
        if x.dtype == jnp.float32
        else jnp.vdot(_f32(x).ravel(), _f32(x).ravel())
        for x in leaves
    ]
    return jnp.sqrt(jnp.sum(jnp.stack(sums)))


NORMS: dict[str, Callable[[list[Any]], Any]] = {
    name: globals()[f"norm_{name}"] for name in FORMULATIONS
}


def clip_with(norm_fn: Callable[[list[Any]], Any], max_norm: float = 1.0):
    """A stats-free global clip built on ``norm_fn`` (double-where scale, dtype kept)."""
    import jax
    import jax.numpy as jnp
    import optax

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        norm = norm_fn(leaves)
        over = (norm > max_norm) & jnp.isfinite(norm)
        scale = jnp.where(over, max_norm / jnp.where(over, norm, 1), 1)
        out = [(_f32(x) * scale).astype(x.dtype) for x in leaves]
        return jax.tree.unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


def check_formulations(formulations: Sequence[str]) -> list[str]:
    """Each formulation's norm against a float64 NumPy reference on small awkward trees."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    cases = {
        "normal": [rng.normal(size=s) for s in [(7, 5), (300,), (64, 64), (3,)]],
        "huge (1e25)": [rng.normal(size=s) * 1e25 for s in [(50,), (20, 20)]],
        "tiny (1e-30)": [rng.normal(size=s) * 1e-30 for s in [(50,), (20, 20)]],
        "mixed 1e-30 and 1": [rng.normal(size=(50,)) * 1e-30, rng.normal(size=(40,))],
        "zeros": [np.zeros((10,)), np.zeros((3, 3))],
        "many leaves": [rng.normal(size=(8,)) for _ in range(300)],
    }
    lines = []
    for f in formulations:
        fn = jax.jit(NORMS[f])
        errors = []
        for name, arrays in cases.items():
            ref = float(np.sqrt(sum(np.sum(np.square(a.astype(np.float64))) for a in arrays)))
            for dtype in ("float32", "bfloat16"):
                leaves = [jnp.asarray(a, dtype) for a in arrays]
                exact = float(
                    np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in leaves))
                )
                got = float(fn(leaves))
                ref_d = exact if dtype == "bfloat16" else ref
                rel = abs(got - ref_d) / ref_d if ref_d else abs(got)
                if not (rel < 1e-5) and not (dtype == "bfloat16" and "1e25" in name):
                    errors.append(f"{name}/{dtype}: {got:.6g} vs {ref_d:.6g}")
        lines.append(f"{f}: " + ("ok" if not errors else "; ".join(errors)))
    return lines


# --------------------------------------------------------------------------------------
# Child jobs
# --------------------------------------------------------------------------------------


def _fn_and_args(formulation: str, mode: str):
    """(step fn, donate_argnums, feed, make_args(params, grads) -> args) for one case."""
    import jax
    import methods
    import optax

    if mode == "adam":
        tx = methods.optimizer("adam")
        fn, donate, feed = methods.train_step(tx)
        return fn, donate, feed, lambda p, g: (p, tx.init(p), g)
    norm_fn = NORMS[formulation]
    if mode == "norm":

        def norm_only(g):
            return norm_fn(jax.tree.leaves(g))

        return norm_only, (), (lambda args, out: args), lambda p, g: (g,)
    clipper = optax.clip_by_global_norm(1.0) if formulation == "optax" else clip_with(norm_fn)
    if mode == "clip":
        fn, donate, feed = methods.clip_step(clipper, False)
        return fn, donate, feed, lambda p, g: (g, clipper.init(g))
    tx = optax.chain(clipper, methods.optimizer("adam"))
    fn, donate, feed = methods.train_step(tx)
    return fn, donate, feed, lambda p, g: (p, tx.init(p), g)


def compile_point(job: dict[str, Any]) -> None:
    import harness
    import jax
    import jobs

    n = job["n_leaves"]
    if job["shapes"] == "uniform":
        shapes = harness.uniform_shapes(n)
    else:
        shapes = harness.many_small_shapes(1.0, n)
    spec = harness.TreeSpec(f"{job['shapes']}{n}", job["dtype"], tuple(shapes), "")
    tree = harness.abstract_tree(spec)
    for case in job["cases"]:
        jobs.emit({"event": "start", "id": case["id"]})
        try:
            fn, donate, _, make_args = _fn_and_args(case["formulation"], case["mode"])
            args = jax.eval_shape(make_args, tree, tree)
            t0 = time.perf_counter()
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            record = {
                **job["common"],
                **case,
                "n_leaves": n,
                "status": "ok",
                "lower_s": t1 - t0,
                "compile_s": t2 - t1,
                "total_s": t2 - t0,
            }
        except Exception as exc:
            record = {
                **job["common"],
                **case,
                "n_leaves": n,
                "status": "error",
                "reason": repr(exc),
            }
        jobs.emit({"event": "result", "id": case["id"], "record": record})


def runtime_point(job: dict[str, Any]) -> None:
    import harness
    import jobs

    spec = harness.tree_spec(job["tree"], job["scale"])
    grads = harness.make_tree(spec, 1, spec.grad_std)
    params = harness.make_tree(spec, 2, harness.PARAM_STD)
    for case in job["cases"]:
        jobs.emit({"event": "start", "id": case["id"]})
        try:
            fn, donate, feed, make_args = _fn_and_args(case["formulation"], case["mode"])
            # Donated arguments get their own buffers; the gradients of a chain are shared.
            args = tuple(
                harness.fresh_copy(a) if i in donate else a
                for i, a in enumerate(make_args(params, grads))
            )
            timing, args = harness.time_step(
                fn, args, donate_argnums=donate, feed=feed, reps=job["reps"], warmup=job["warmup"]
            )
            del args
            record = {
                **job["common"],
                **case,
                "tree": spec.name,
                "tree_summary": spec.summary(),
                "status": "ok",
                "timing": timing.as_dict(),
            }
        except Exception as exc:
            record = {**job["common"], **case, "status": "error", "reason": repr(exc)}
        jobs.emit({"event": "result", "id": case["id"], "record": record})


# --------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------


def render(records: list[dict[str, Any]]) -> str:
    from report import growth_exponent

    out = []
    comp = [r for r in records if r["section"] == "compile"]
    if comp:
        leaves = sorted({r["n_leaves"] for r in comp})
        out.append("| formulation | mode | " + " | ".join(f"{n}" for n in leaves) + " | k |")
        out.append("|---|---|" + "---|" * (len(leaves) + 1))
        keys: list[tuple[str, str]] = []
        for r in comp:
            if (r["formulation"], r["mode"]) not in keys:
                keys.append((r["formulation"], r["mode"]))
        idx = {(r["formulation"], r["mode"], r["n_leaves"]): r for r in comp}
        for f, m in keys:
            cells, pts = [], []
            for n in leaves:
                r = idx.get((f, m, n))
                if r is None:
                    cells.append("-")
                elif r["status"] == "ok":
                    cells.append(f"{r['total_s']:.2f}")
                    pts.append((n, r["total_s"]))
                else:
                    cells.append(r.get("reason", r["status"]))
            k = growth_exponent(pts)
            out.append(
                f"| {f} | {m} | " + " | ".join(cells) + f" | {'-' if k is None else f'{k:.2f}'} |"
            )
        out.append("")
        out.append("lower + compile seconds against the number of leaves; k: time ~ leaves^k.")
        out.append("")
    run = [r for r in records if r["section"] == "runtime"]
    for tree in dict.fromkeys(r.get("tree") or r.get("tree_name") for r in run):
        rows = [r for r in run if (r.get("tree") or r.get("tree_name")) == tree]
        summary = next((r["tree_summary"] for r in rows if r.get("tree_summary")), tree)
        out.append(f"Run time, {summary} (ms, median (min-max))")
        out.append("")
        out.append("| formulation | norm | clip | chain(clip, adam) (adam row: adam alone) |")
        out.append("|---|---|---|---|")
        idx = {(r["formulation"], r["mode"]): r for r in rows}
        for f in dict.fromkeys(r["formulation"] for r in rows):
            cells = []
            for m in MODES:
                r = idx.get((f, "adam" if f == "adam" and m == "chain" else m))
                if r is None:
                    cells.append("-")
                elif r["status"] == "ok":
                    t = r["timing"]
                    cells.append(f"{t['median_ms']:.2f} ({t['min_ms']:.1f}-{t['max_ms']:.1f})")
                else:
                    cells.append(r["status"])
            out.append(f"| {f} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--leaves", default="100,300,1000,2000")
    p.add_argument("--formulations", default=",".join(FORMULATIONS))
    p.add_argument("--modes", default="norm,clip,chain", help="any of norm,clip,chain")
    p.add_argument("--shapes", default="uniform", choices=("uniform", "mixed"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per compile point")
    p.add_argument("--runtime", default="", help="trees to time on, e.g. transformer,many_small")
    p.add_argument("--scale", type=float, default=0.25, help="scale of the --runtime trees")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--out", default=HERE)
    p.add_argument("--tag", default="compile_scaling")
    p.add_argument("--check", action="store_true", help="check each formulation's accuracy")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.check:
        for line in check_formulations([f for f in args.formulations.split(",") if f]):
            print(line)
        return
    if args.worker is not None:
        job = json.loads(args.worker)
        {"compile": compile_point, "runtime": runtime_point}[job["kind"]](job)
        return

    import jobs

    records: list[dict[str, Any]] = []
    results_dir = os.path.join(args.out, "results")
    os.makedirs(results_dir, exist_ok=True)
    json_path = os.path.join(results_dir, f"{args.tag}.json")
    md_path = os.path.join(results_dir, f"{args.tag}.md")

    def save() -> None:
        with open(json_path, "w") as f:
            json.dump({"args": vars(args), "records": records}, f, indent=1)
        with open(md_path, "w") as f:
            f.write(render(records))

    def on_record(r: dict[str, Any]) -> None:
        records.append(r)
        what = f"{r.get('formulation')} [{r.get('mode')}] {r.get('n_leaves', r.get('tree', ''))}"
        if r["status"] == "ok":
            value = r["total_s"] if "total_s" in r else r["timing"]["median_ms"]
            unit = "s" if "total_s" in r else "ms"
            print(f"{what}: {value:.2f} {unit}", file=sys.stderr, flush=True)
        else:
            print(f"{what}: {r['status']} {r.get('reason', '')}", file=sys.stderr, flush=True)
        save()

    formulations = [f for f in args.formulations.split(",") if f]
    unknown = set(formulations) - set(FORMULATIONS)
    if unknown:
        raise SystemExit(f"unknown formulations {sorted(unknown)}")
    modes = [m for m in args.modes.split(",") if m]
    cases = [{"id": "adam|adam", "formulation": "adam", "mode": "adam"}] if "chain" in modes else []
    cases += [{"id": f"{f}|{m}", "formulation": f, "mode": m} for f in formulations for m in modes]
    leaves = sorted(int(x) for x in args.leaves.split(",") if x)
    for case in cases:
        timed_out = None
        for n in leaves:
            if timed_out is not None:
                on_record(
                    {
                        "section": "compile",
                        **case,
                        "n_leaves": n,
                        "status": "timeout",
                        "reason": f"not run (timeout at {timed_out})",
                    }
                )
                continue
            job = {
                "kind": "compile",
                "n_leaves": n,
                "shapes": args.shapes,
                "dtype": args.dtype,
                "common": {"section": "compile", "n_leaves": n},
                "cases": [case],
            }
            out = jobs.run_job(__file__, job, case_timeout=args.timeout, on_record=on_record)
            if any(r["status"] == "timeout" for r in out):
                timed_out = n
    for tree in [t for t in args.runtime.split(",") if t]:
        job = {
            "kind": "runtime",
            "tree": tree,
            "scale": args.scale,
            "reps": args.reps,
            "warmup": 2,
            "common": {"section": "runtime", "tree_name": tree},
            "cases": [
                {"id": f"{f}|{m}", "formulation": f, "mode": m} for f in formulations for m in MODES
            ]
            + [{"id": "adam|adam", "formulation": "adam", "mode": "adam"}],
        }
        jobs.run_job(__file__, job, case_timeout=max(args.timeout, 600), on_record=on_record)
    save()
    print(render(records))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
