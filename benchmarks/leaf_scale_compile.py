"""Compile time of ways to give every leaf its own scale (per-leaf clippers, AdaGC, AGC).

    python benchmarks/leaf_scale_compile.py                      # 2000 leaves, all variants
    python benchmarks/leaf_scale_compile.py --leaves 500,2000 --variants shipped,optax_shape
    python benchmarks/leaf_scale_compile.py --modes clip --timeout 120

A per-leaf clip computes one scale per leaf from that leaf's norm, then multiplies the leaf
by it. XLA:CPU's compile time depends on how the scale reaches the leaf's kernel, far more
than on the arithmetic. Each variant is compiled (``lower`` + ``compile``, leaves of
(32, 32) float32, buffers donated) alone (``clip``) and chained with Adam + apply_updates
(``chain``), each point in a fresh process with a timeout. Adam alone is the baseline.

Variants:
  shared_scalar   one scale for all leaves (the shape of a global clip): the floor
  optax_shape     each leaf's own reduction, ``x * min(1, c / norm)`` (Optax's block RMS
                  shape): no overflow rescue, no two-factor scale, no statistics
  three_sums      optax_shape without a rescue conditional: one pass keeps three sums of
                  squares (scaled by 2^64, 1, 2^-64) and takes the first finite one; the
                  two-factor scale is computed per leaf
  fused_factors   the norms reduced together with the rescue (optaxclip's norms_per_leaf),
                  scale factors computed on the vector but fused into every leaf's kernel,
                  two slices per leaf at runtime positions (optaxclip up to session 5)
  shipped_form    as fused_factors, but the factors computed once under a conditional
                  (optaxclip._numerics.computed_once) before the leaves read them
  packed          shipped_form with both factors packed in one vector (sign says which
                  coarse factor), unpacked in each leaf's kernel: one slice per leaf
  static_slices   shipped_form, but each leaf reads its factor at a constant offset
  cond_scalars    shipped_form, but the per-leaf scalars come out of conditionals (64 each)
  shipped         optaxclip.clip_by_leaf_norm itself (statistics included)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = (
    "shared_scalar",
    "optax_shape",
    "three_sums",
    "fused_factors",
    "shipped_form",
    "packed",
    "static_slices",
    "cond_scalars",
    "shipped",
)


def _clip_fn(variant: str) -> Any:
    """The clip of ``variant``: a function from a list of leaves to a list of leaves."""
    import jax.numpy as jnp

    import optaxclip
    from optaxclip import _numerics as N

    limit = 1.0

    def factors(norms: Any) -> tuple[Any, Any]:
        return N.shrink_factors(jnp.asarray(limit, norms.dtype), norms, norms > limit)

    def stacked_norms(leaves: list[Any]) -> Any:
        return N.norms_per_leaf(leaves, 2.0, [()] * len(leaves))

    def pack(coarse: Any, fine: Any) -> Any:
        return jnp.where(coarse == 1, fine, -fine)

    def unpack(packed: Any) -> tuple[Any, Any]:
        return jnp.where(packed < 0, 2.0**-100, 1.0).astype(packed.dtype), jnp.abs(packed)

    def three_sums_norm(x: Any) -> Any:
        up, down = 2.0**64, 2.0**-64
        low, mid, high = (jnp.sum(jnp.square(x * s)) for s in (up, 1.0, down))
        return jnp.where(
            jnp.isfinite(low),
            jnp.sqrt(low) * down,
            jnp.where(jnp.isfinite(mid), jnp.sqrt(mid), jnp.sqrt(high) * up),
        )

    def clip(leaves: list[Any]) -> list[Any]:
        if variant == "shared_scalar":
            scale = jnp.minimum(1.0, limit / jnp.sqrt(jnp.sum(leaves[0] * leaves[0])))
            return [x * scale for x in leaves]
        if variant == "optax_shape":
            return [x * jnp.minimum(1.0, limit / jnp.sqrt(jnp.sum(x * x))) for x in leaves]
        if variant == "three_sums":
            out = []
            for x in leaves:
                coarse, fine = factors(three_sums_norm(x))
                out.append((x * coarse) * fine)
            return out
        norms = stacked_norms(leaves)
        anchor = norms[0]
        if variant == "fused_factors":
            coarse, fine = factors(norms)
            coarse_of, fine_of = N.leaf_entries([coarse, fine])
        elif variant == "shipped_form":
            coarse, fine = N.computed_once(factors, norms, anchor)
            coarse_of, fine_of = N.leaf_entries([coarse, fine])
        elif variant == "packed":
            packed = N.computed_once(lambda v: pack(*factors(v)), norms, anchor)
            pairs = [unpack(p) for p in N.leaf_entries([packed])[0]]
            coarse_of, fine_of = [c for c, _ in pairs], [f for _, f in pairs]
        elif variant == "static_slices":
            coarse, fine = N.computed_once(factors, norms, anchor)
            coarse_of = [coarse[i] for i in range(len(leaves))]
            fine_of = [fine[i] for i in range(len(leaves))]
        elif variant == "cond_scalars":
            coarse, fine = N.computed_once(factors, norms, anchor)
            coarse_of, fine_of = [], []
            for start in range(0, len(leaves), 64):
                idx = range(start, min(len(leaves), start + 64))

                def pick(v: Any, idx: range = idx) -> tuple[Any, ...]:
                    return tuple(v[0][i] for i in idx) + tuple(v[1][i] for i in idx)

                got = N.computed_once(pick, (coarse, fine), anchor)
                coarse_of += got[: len(idx)]
                fine_of += got[len(idx) :]
        else:
            raise SystemExit(f"unknown variant {variant}")
        return [(x * c) * f for x, c, f in zip(leaves, coarse_of, fine_of, strict=True)]

    if variant == "shipped":
        return optaxclip.clip_by_leaf_norm(limit)
    return clip


def _child(variant: str, mode: str, n: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax

    leaves = [jnp.ones((32, 32), jnp.float32) for _ in range(n)]
    if variant == "adam":
        tx = None
    else:
        made = _clip_fn(variant)
        if isinstance(made, optax.GradientTransformation):
            tx = made
        else:
            tx = optax.GradientTransformation(
                lambda params: optax.EmptyState(),
                lambda updates, state, params=None, fn=made: (fn(updates), state),
            )
    if mode == "clip":
        assert tx is not None
        state = tx.init(leaves)
        fn = jax.jit(lambda g, s: tx.update(g, s, None), donate_argnums=(0, 1))
        args: tuple[Any, ...] = (leaves, state)
    else:
        opt = optax.adam(1e-3) if tx is None else optax.chain(tx, optax.adam(1e-3))

        def step(p: Any, s: Any, g: Any) -> Any:
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        args = (leaves, opt.init(leaves), leaves)
    start = time.perf_counter()
    lowered = fn.lower(*args)
    middle = time.perf_counter()
    lowered.compile()
    end = time.perf_counter()
    return {"lower_s": middle - start, "compile_s": end - middle, "total_s": end - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--leaves", default="2000")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--modes", default="clip,chain")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="leaf_scale_compile")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "MODE", "N"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        variant, mode, n = a.child
        print(json.dumps(_child(variant, mode, int(n))))
        return
    leaves = [int(x) for x in a.leaves.split(",") if x.strip()]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    cases = [("adam", "chain")] if "chain" in modes else []
    cases += [(v, m) for v in variants for m in modes]
    records = []
    for n in leaves:
        for variant, mode in cases:
            cmd = [sys.executable, "-W", "ignore", __file__, "--child", variant, mode, str(n)]
            record: dict[str, Any] = {"variant": variant, "mode": mode, "n_leaves": n}
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=a.timeout, check=False
                )
                if done.returncode == 0:
                    record.update(json.loads(done.stdout.strip().splitlines()[-1]))
                    record["status"] = "ok"
                else:
                    record["status"] = "error"
                    record["reason"] = done.stderr.strip().splitlines()[-1:]
            except subprocess.TimeoutExpired:
                record["status"] = "timeout"
                record["reason"] = f"timeout > {a.timeout:.0f} s"
            records.append(record)
            shown = f"{record['total_s']:.2f} s" if record["status"] == "ok" else record["reason"]
            print(f"{n} leaves  {variant:14s} {mode:5s} {shown}", file=sys.stderr, flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{a.tag}.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "records": records}, f, indent=1)
    lines = [
        f"Command: `python benchmarks/leaf_scale_compile.py {' '.join(sys.argv[1:])}`. "
        "Seconds of `lower()` + `compile()`, leaves of (32, 32) float32, each point in a "
        "fresh process.",
        "",
        "| variant | leaves | clip alone | chain with Adam + apply | chain / Adam alone |",
        "|---|---|---|---|---|",
    ]
    by_key = {(r["variant"], r["mode"], r["n_leaves"]): r for r in records}

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{r['total_s']:.2f}" if r["status"] == "ok" else str(r.get("reason"))

    for n in leaves:
        adam = by_key.get(("adam", "chain", n))
        lines.append(f"| Adam alone (baseline) | {n} | - | {cell(adam)} | 1.00 |")
        for v in variants:
            chain = by_key.get((v, "chain", n))
            ratio = "-"
            if chain and adam and chain["status"] == "ok" and adam["status"] == "ok":
                ratio = f"{chain['total_s'] / adam['total_s']:.2f}"
            lines.append(
                f"| {v} | {n} | {cell(by_key.get((v, 'clip', n)))} | {cell(chain)} | {ratio} |"
            )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, f"{a.tag}.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
