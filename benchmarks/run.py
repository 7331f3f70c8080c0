"""optaxclip benchmark suite: one command, JSON + markdown results.

    python benchmarks/run.py                 # the headline CPU run (about half an hour)
    python benchmarks/run.py --full          # every tree, every method, compile to 5000 leaves
    python benchmarks/run.py --quick         # smoke run, a few minutes
    python benchmarks/run.py --gpu           # clip + AdamW on a 1B-parameter tree (GPU)
    python benchmarks/run.py --report benchmarks/results/suite.json   # print the tables again

Sections (``--sections``): bandwidth (reference memory bandwidth), steps (every clipper
alone and chained with Adam, against Adam alone and Optax's equivalents, on each tree), torch
(PyTorch's clip and Adam on the same trees), train_step (whole training steps of a small
GPT-like model in Flax NNX and in PyTorch, with and without the clip), compile (lower +
compile against the number of leaves, one fresh process per point). ``--gpu`` runs
bandwidth, gpu and train_step. Results go to ``--out``/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

TREES = ("transformer", "many_small", "single", "transformer_bf16")
# The headline run: every method on the float32 transformer tree, the global clip in bfloat16.
DEFAULT_TREES = "transformer,transformer_bf16:global"
# The clippers of the train_step section, each chained with AdamW; AdamW alone is the baseline.
TRAIN_METHODS = ("optaxclip:global", "optax:global", "optaxclip:zclip", "optaxclip:autoclip")
TORCH_CASES = (
    ("torch:adam_fused", "optimizer", 7, "Adam(fused=True).step"),
    ("torch:clip_norm+adam_fused", "chain", 8, "clip_grad_norm_(1.0, foreach=True) + Adam(fused)"),
    ("torch:clip_norm", "clip", 3, "clip_grad_norm_(1.0, foreach=True)"),
    ("torch:clip_value_foreach", "clip", 2, "clip_grad_value_(sigma, foreach=True)"),
    ("torch:clip_value_loop", "clip", 2, "clip_grad_value_(sigma, foreach=False)"),
)
BANDWIDTH_KERNELS = (
    "sum (read only)",
    "x * s in place (donated)",
    "triad x + s * y in place (donated)",
    "copy to a new buffer",
)
# The GPU tree: the transformer shapes at 20x the CPU size, about 1.02B parameters.
GPU_BASE_SCALE = 20.0
DOCS_PAGE = os.path.join(ROOT, "docs", "performance.md")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small smoke run (a few minutes)")
    p.add_argument(
        "--full",
        action="store_true",
        help="every tree and method, compile of every family at 100-5000 leaves (hours)",
    )
    p.add_argument("--gpu", action="store_true", help="GPU mode: clip + AdamW, 1B params")
    p.add_argument(
        "--out", default=HERE, help="folder that receives results/ (default: benchmarks/)"
    )
    p.add_argument("--tag", default=None, help="results file name stem (default: suite/quick/gpu)")
    p.add_argument(
        "--sections",
        default=None,
        help="comma list of bandwidth,steps,torch,train_step,compile,gpu",
    )
    p.add_argument("--scale", type=float, default=None, help="multiplies the parameter counts")
    p.add_argument(
        "--trees",
        default=None,
        help=f"comma list of {','.join(TREES)}; tree:fam1+fam2 limits that tree's method "
        f"families (default {DEFAULT_TREES})",
    )
    p.add_argument("--methods", default=None, help="comma list of method families (default all)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case (default 21)")
    p.add_argument(
        "--paired-reps",
        type=int,
        default=None,
        help="rounds of the comparisons timed in alternation (default 61)",
    )
    p.add_argument(
        "--paired-only",
        action="store_true",
        help="in the steps/gpu sections, time only the comparisons behind the targets",
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 2)")
    p.add_argument("--layers", type=int, default=None, help="transformer blocks (default 16)")
    p.add_argument("--small-leaves", type=int, default=None, help="leaves of many_small (2000)")
    p.add_argument("--case-timeout", type=float, default=None, help="seconds per timed case")
    p.add_argument(
        "--train-reps",
        type=int,
        default=None,
        help="rounds of the train_step section's steps timed in alternation (default 101)",
    )
    p.add_argument(
        "--train-model",
        default=None,
        help="size of the train_step model: tiny, small (CPU default) or gpt2 (GPU default)",
    )
    p.add_argument("--compile-leaves", default=None, help="e.g. 100,1000,2000,5000")
    p.add_argument(
        "--compile-mesh",
        default="none",
        help="comma list of none (one device), auto (jax.sharding.Mesh), explicit "
        "(jax.make_mesh, Explicit axes): the compile section's leaves are then split along "
        "'model' of a (data=2, model=4) mesh of 8 host devices",
    )
    p.add_argument("--compile-timeout", type=float, default=None, help="seconds per compile point")
    p.add_argument("--compile-methods", default=None, help="families for the compile section")
    p.add_argument(
        "--compile-repeats",
        type=int,
        default=None,
        help="fresh processes per compile point, cases alternated; the tables show the median",
    )
    p.add_argument(
        "--compile-libraries",
        default="optaxclip,optax",
        help="libraries for the compile section (adam alone is always measured); e.g. "
        "optaxclip to rerun only ours and merge with --report",
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch section")
    p.add_argument(
        "--no-paired",
        action="store_true",
        help="skip the interleaved comparisons behind the targets (steps/gpu sections)",
    )
    p.add_argument(
        "--report",
        default=None,
        help="render results JSON file(s) (comma-separated; records are merged) and exit",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help="write the page's tables (results, training step, compile) into "
        "docs/performance.md, between its markers",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import model

    defaults: dict[str, Any] = {
        "scale": 1.0,
        "reps": 21,
        "paired_reps": 61,
        "warmup": 2,
        "layers": 16,
        "small_leaves": 2000,
        "case_timeout": 1800.0,
        "compile_leaves": "2000",
        "compile_timeout": 300.0,
        "compile_methods": "global",
        "compile_repeats": 3,
        "trees": DEFAULT_TREES,
        "train_model": "small",
        "train_reps": 101,
        "sections": "bandwidth,steps,torch,train_step,compile",
        "tag": "suite",
    }
    if args.full:
        defaults.update(
            trees=",".join(TREES),
            compile_leaves="100,1000,2000,5000",
            compile_methods="",
            compile_repeats=1,
            tag="full",
        )
    if args.quick:
        defaults.update(
            scale=0.02,
            reps=5,
            paired_reps=5,
            warmup=1,
            layers=2,
            small_leaves=48,
            case_timeout=300.0,
            compile_leaves="100,300",
            compile_timeout=120.0,
            compile_methods="global",
            compile_repeats=1,
            trees="transformer,transformer_bf16:global",
            train_model="tiny",
            train_reps=5,
            tag="quick",
        )
    if args.gpu:
        defaults.update(
            trees="transformer,transformer_bf16",
            sections="bandwidth,gpu,train_step",
            methods="global",
            train_model="gpt2" if not args.quick else "tiny",
            tag="gpu" if not args.quick else "gpu_quick",
        )
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.compile_repeats < 1:
        p.error(f"--compile-repeats must be at least 1, got {args.compile_repeats}")
    if args.train_model not in model.TRAIN_MODELS:
        p.error(f"--train-model: one of {', '.join(model.TRAIN_MODELS)}, got {args.train_model!r}")
    if args.train_reps < 1:
        p.error(f"--train-reps must be at least 1, got {args.train_reps}")
    if args.paired_reps < 1:
        p.error(f"--paired-reps must be at least 1, got {args.paired_reps}")
    if args.paired_only and args.no_paired:
        p.error("--paired-only and --no-paired leave nothing to time in the steps section")
    return args


def _families(text: str | None) -> list[str] | None:
    return None if not text else [x.strip() for x in text.split(",") if x.strip()]


def _tree_plan(text: str) -> list[tuple[str, list[str] | None]]:
    """``tree[:fam1+fam2],...`` as (tree, families or None for --methods)."""
    plan = []
    for item in _families(text) or []:
        tree, _, fams = item.partition(":")
        if tree not in TREES:
            raise SystemExit(f"--trees: unknown tree {tree!r}; known: {', '.join(TREES)}")
        plan.append((tree, [f for f in fams.split("+") if f] if fams else None))
    return plan


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _record_line(r: dict[str, Any]) -> str:
    what = r.get("method") or r.get("kernel") or r.get("mode")
    where = r.get("tree") or (f"{r['n_leaves']} leaves" if "n_leaves" in r else "")
    if r.get("status") != "ok":
        return f"{where} {what} [{r.get('mode', '')}]: {r.get('status')}: {r.get('reason')}"
    if "total_s" in r:
        return f"{where} {what} [{r['mode']}]: {r['total_s']:.2f} s"
    if r.get("section") == "train_step":
        parts = [
            f"{m['label']} {m['timing']['median_ms']:.1f} ms"
            + (f" (cost {m['cost']['median']:+.1%})" if "cost" in m else "")
            for m in r["members"]
            if m.get("status") == "ok"
        ]
        return f"train step [{r['framework']}], alternating: " + ", ".join(parts)
    if "members" in r:
        parts = [
            f"{m.get('method') or m['mode']}[{m['mode']}] {m['timing']['median_ms']:.2f} ms"
            for m in r["members"]
            if m.get("status") == "ok"
        ]
        return f"{where} alternating {r['group']}: " + ", ".join(parts)
    t = r["timing"]
    gb = f", {r['gbps']:.1f} GB/s" if r.get("gbps") is not None else ""
    return f"{where} {what} [{r.get('mode', '')}]: {t['median_ms']:.2f} ms{gb}"


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.records: list[dict[str, Any]] = []
        self.meta: dict[str, Any] = {
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "reps": args.reps,
            "paired_reps": args.paired_reps,
            "warmup": args.warmup,
            "scale": args.scale,
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "host": _host_info(),
            "commit": _commit(),
            "loadavg_1min_samples": [],
        }
        self._t0 = time.monotonic()
        self.results_dir = os.path.join(args.out, "results")
        os.makedirs(self.results_dir, exist_ok=True)
        self.json_path = os.path.join(self.results_dir, f"{args.tag}.json")
        self.md_path = os.path.join(self.results_dir, f"{args.tag}.md")

    def _on_record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with contextlib.suppress(OSError):
            load = os.getloadavg()[0]
            self.meta["loadavg_1min_samples"].append([round(time.monotonic() - self._t0), load])
        log(_record_line(record))

    def _run(self, job: dict[str, Any], timeout: float) -> None:
        import jobs

        jobs.run_job(__file__, job, case_timeout=timeout, on_record=self._on_record)
        self.save()

    def save(self) -> None:
        import report

        self.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.meta["wall_s"] = time.monotonic() - self._t0
        with contextlib.suppress(OSError):
            self.meta["loadavg_end"] = os.getloadavg()
        results = {"meta": self.meta, "records": self.records}
        with open(self.json_path, "w") as f:
            json.dump(results, f, indent=1)
        with open(self.md_path, "w") as f:
            f.write(report.render(results))

    def bandwidth(self) -> None:
        a = self.args
        base = 256 * 2**20 if a.gpu else 64 * 2**20  # elements: 1 GiB (GPU), 256 MiB (CPU)
        n = max(2**20, int(base * a.scale))
        cases = [{"id": k, "kernel": k, "section": "bandwidth"} for k in BANDWIDTH_KERNELS]
        job = {
            "kind": "bandwidth",
            "n_elements": n,
            "dtype": "float32",
            "reps": a.reps,
            "warmup": a.warmup,
            "common": {"section": "bandwidth"},
            "cases": cases,
        }
        log(f"bandwidth: {n * 4 / 2**20:.0f} MiB buffers")
        self._run(job, a.case_timeout)

    def steps(self, section: str) -> None:
        import methods

        a = self.args
        scale = a.scale * (GPU_BASE_SCALE if section == "gpu" else 1.0)
        opt = "adamw" if section == "gpu" else "adam"
        for tree, tree_families in _tree_plan(a.trees):
            families = _families(a.methods)
            if tree_families is not None:
                families = [f for f in tree_families if families is None or f in families]
            chosen = methods.select_methods(families)
            cases: list[dict[str, Any]] = [
                {"id": "optimizer", "method": None, "mode": "optimizer", "label": opt},
                {"id": "dispatch", "method": None, "mode": "dispatch", "label": "dispatch"},
            ]
            for m in chosen:
                for mode in ("clip", "chain"):
                    cases.append(
                        {
                            "id": f"{m.key}|{mode}",
                            "method": m.key,
                            "family": m.family,
                            "library": m.library,
                            "label": m.label,
                            "mode": mode,
                        }
                    )
            job = {
                "kind": "steps",
                "tree": tree,
                "scale": scale,
                "tree_args": self._tree_args(tree),
                "optimizer": opt,
                "reps": a.reps,
                "warmup": a.warmup,
                "common": {"section": section},
                "cases": cases,
            }
            if not a.paired_only:
                log(f"{section}: tree {tree} (scale {scale:g}), {len(cases)} cases")
                self._run(job, a.case_timeout)
            if not a.no_paired:
                groups = self._paired_groups(chosen, opt, section)
                if groups:
                    log(f"{section}: tree {tree}, interleaved comparisons")
                    paired = {**job, "kind": "paired", "cases": groups, "reps": a.paired_reps}
                    self._run(paired, a.case_timeout)

    @staticmethod
    def _paired_groups(chosen: list[Any], opt: str, section: str) -> list[dict[str, Any]]:
        """The comparisons timed in alternation, each group in one process.

        "chain" and "clip": the global clip, the local variants that attribute its cost,
        Optax's global clip and the adaptive clippers. "chain-other" and "clip-other": the
        other clippers of optaxclip beside their Optax equivalents. Every chain group starts
        with the optimizer alone, every clip group with our global clip, the baselines of
        the ratios. Two groups rather than one bound the memory: each member holds its own
        parameters and optimizer state. On the GPU (1B parameters) only the global clip, the
        stats-free variant and the adaptive clippers are timed.
        """
        import methods

        keys = [m.key for m in chosen]
        wanted = ["optaxclip:global", "variant:global_nostats"]
        other: list[str] = []
        if section != "gpu":
            # The A/A control (the same clip, compiled and timed again) shows the run's noise.
            wanted += ["variant:global_again", "variant:global_bare"]
            # A step that logs our norm beside Adam: the floor of any norm-based clip. (Optax's
            # norm beside Adam writes the squares out, and its page faults would slow the next
            # member; it is timed on its own with the other cases.)
            wanted += ["variant:norm_beside", "optax:global"]
            other = [
                m.key
                for m in chosen
                if m.library in ("optaxclip", "optax")
                and m.family != "global"
                and m.family not in methods.ADAPTIVE_FAMILIES
            ]
        wanted += [m.key for m in chosen if m.family in methods.ADAPTIVE_FAMILIES]
        present = [k for k in wanted if k in keys]

        def member(key: str | None, mode: str) -> dict[str, Any]:
            if key is None:
                return {"method": None, "mode": "optimizer", "label": f"optax.{opt} alone"}
            m = next(x for x in chosen if x.key == key)
            return {
                "method": key,
                "family": m.family,
                "library": m.library,
                "label": m.label,
                "mode": mode,
            }

        groups = []
        if "optaxclip:global" in present:
            # The bare clip stays out of the clip group: alone, on bfloat16 trees, its float32
            # temporaries fault in fresh pages on every call and slow down whichever member
            # runs after it, which would distort the ClipStats comparison this group serves.
            # A norm stored beside is a reference for the chain only: alone it writes nothing.
            clip_keys = [
                k for k in present if k not in ("variant:global_bare", "variant:norm_beside")
            ]
            groups += [
                {
                    "id": "paired-chain",
                    "group": "chain",
                    "members": [member(None, "optimizer")] + [member(k, "chain") for k in present],
                },
                {
                    "id": "paired-clip",
                    "group": "clip",
                    "members": [member(k, "clip") for k in clip_keys],
                },
            ]
        if other:
            reference = ["optaxclip:global"] if "optaxclip:global" in keys else []
            groups += [
                {
                    "id": "paired-chain-other",
                    "group": "chain-other",
                    "members": [member(None, "optimizer")] + [member(k, "chain") for k in other],
                },
                {
                    "id": "paired-clip-other",
                    "group": "clip-other",
                    "members": [member(k, "clip") for k in reference + other],
                },
            ]
        return groups

    def _tree_args(self, tree: str) -> dict[str, Any]:
        if tree.startswith("transformer"):
            return {"layers": self.args.layers}
        if tree == "many_small":
            return {"small_leaves": self.args.small_leaves}
        return {}

    def torch(self) -> None:
        a = self.args
        for tree, _ in _tree_plan(a.trees):
            cases = [
                {"id": key, "method": key, "mode": mode, "passes": passes, "label": label}
                for key, mode, passes, label in TORCH_CASES
            ]
            job = {
                "kind": "torch",
                "tree": tree,
                "scale": a.scale,
                "tree_args": self._tree_args(tree),
                "reps": a.reps,
                "warmup": max(a.warmup, 3),
                "common": {"section": "torch"},
                "cases": cases,
            }
            log(f"torch: tree {tree}")
            self._run(job, a.case_timeout)

    def train_step(self) -> None:
        """Whole training steps of the GPT-like model, with and without a clip, alternated."""
        import methods
        import model

        a = self.args
        cfg = model.TRAIN_MODELS[a.train_model]
        families = _families(a.methods)
        keys = [m.key for m in methods.select_methods(families) if m.key in TRAIN_METHODS]
        baseline = [
            {"method": None, "label": "AdamW alone"},
            {"method": None, "label": "AdamW alone again (A/A control)", "control": True},
        ]
        jax_members = baseline + [
            {"method": k, "label": f"{methods.method_by_key(k).label} + AdamW"} for k in keys
        ]
        torch_members = [
            {"method": None, "label": "AdamW(fused) alone"},
            {"method": None, "label": "AdamW(fused) alone again (A/A control)", "control": True},
            {
                "method": "torch:clip_norm",
                "label": "clip_grad_norm_(1.0, foreach=True) + AdamW(fused)",
            },
        ]
        common = {"section": "train_step"}
        job = {
            "kind": "train_step",
            "model": cfg.as_dict(),
            "reps": a.train_reps,
            "warmup": a.warmup,
            "common": common,
            "cases": [{"id": "train-jax", "members": jax_members}],
        }
        log(f"train_step: {cfg.summary()}, {len(jax_members)} JAX steps in alternation")
        self._run(job, a.case_timeout)
        if not a.no_torch:
            log("train_step: the same model in PyTorch")
            torch_job = {
                **job,
                "kind": "train_step_torch",
                "cases": [{"id": "train-torch", "members": torch_members}],
            }
            self._run(torch_job, a.case_timeout)

    def compile(self) -> None:
        import methods

        a = self.args
        leaves = [int(x) for x in a.compile_leaves.split(",") if x.strip()]
        families = _families(a.compile_methods) or _families(a.methods)
        libraries = {x.strip() for x in a.compile_libraries.split(",") if x.strip()}
        chosen = [
            m
            for m in methods.select_methods(families)
            if m.library in libraries or m.key in methods.COMPILE_REFERENCES
        ]
        cases: list[dict[str, Any]] = [
            {"id": "optimizer", "method": None, "mode": "optimizer", "label": "optax.adam + apply"}
        ]
        for m in chosen:
            for mode in ("clip", "chain"):
                label = m.label if mode == "clip" else f"chain({m.label}, adam) + apply"
                cases.append(
                    {
                        "id": f"{m.key}|{mode}",
                        "method": m.key,
                        "family": m.family,
                        "library": m.library,
                        "label": label,
                        "mode": mode,
                    }
                )
        # Leaf count by leaf count, every case once per round, so that slow drifts of a shared
        # machine hit all cases alike; a case that timed out is not run at larger counts.
        timed_out_at: dict[str, int] = {}
        repeats = a.compile_repeats
        meshes = [m.strip() for m in a.compile_mesh.split(",") if m.strip()]
        for bad in set(meshes) - {"none", "auto", "explicit"}:
            raise SystemExit(f"--compile-mesh: unknown mesh kind {bad!r}")
        # The variants ravel a leaf, which a sharded leaf does not allow: one device only.
        cases = [
            {
                **case,
                "id": case["id"] if mesh == "none" else f"{case['id']}@{mesh}",
                "label": case["label"] if mesh == "none" else f"{case['label']} [{mesh} mesh]",
                "mesh": mesh,
            }
            for mesh in meshes
            for case in cases
            if mesh == "none" or not str(case.get("method") or "").startswith("variant:")
        ]
        for n in sorted(leaves):
            for repeat in range(repeats):
                for case in cases:
                    if case["id"] in timed_out_at:
                        if repeat == 0:
                            self._on_record(
                                {
                                    "section": "compile",
                                    **case,
                                    "n_leaves": n,
                                    "status": "timeout",
                                    "reason": "not run (timeout at "
                                    f"{timed_out_at[case['id']]} leaves)",
                                }
                            )
                        continue
                    job = {
                        "kind": "compile",
                        "n_leaves": n,
                        "optimizer": "adam",
                        "common": {"section": "compile", "n_leaves": n, "repeat": repeat},
                        "cases": [case],
                    }
                    before = len(self.records)
                    self._run(job, a.compile_timeout)
                    if any(r.get("status") == "timeout" for r in self.records[before:]):
                        timed_out_at[case["id"]] = n

    def run(self) -> None:
        sections = _families(self.args.sections) or []
        log(f"sections {sections}; results -> {self.json_path}")
        for section in sections:
            if section == "bandwidth":
                self.bandwidth()
            elif section in ("steps", "gpu"):
                self.steps(section)
            elif section == "torch":
                if not self.args.no_torch:
                    self.torch()
            elif section == "train_step":
                self.train_step()
            elif section == "compile":
                self.compile()
            else:
                raise SystemExit(f"unknown section {section!r}")
        self.save()
        log(f"wrote {self.json_path} and {self.md_path}")


def _commit() -> str | None:
    """The checkout's HEAD commit (read only; local edits are not recorded)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _host_info() -> dict[str, Any]:
    """Host facts without initialising JAX in the parent (the children own the device)."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        import importlib.metadata as md

        for pkg in ("jax", "jaxlib", "optax", "flax", "torch", "numpy"):
            with contextlib.suppress(md.PackageNotFoundError):
                info[pkg] = md.version(pkg)
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["loadavg_start"] = os.getloadavg()
    return info


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        import jobs

        jobs.child_main(args.worker)
        return
    if args.report is not None:
        import report

        parts = []
        for path in args.report.split(","):
            with open(path) as f:
                parts.append(json.load(f))
        results = {
            "meta": {
                **parts[0].get("meta", {}),
                "command": " + ".join(p.get("meta", {}).get("command", "?") for p in parts),
                "finished": parts[-1].get("meta", {}).get("finished"),
                "loadavg_end": parts[-1].get("meta", {}).get("loadavg_end"),
            },
            "records": [r for p in parts for r in p["records"]],
        }
        markdown = report.render(results)
        print(markdown)
        if args.write_docs:
            report.write_docs(DOCS_PAGE, report.page_blocks(results))
        return
    if args.gpu:
        # Every child inherits this: the 1B-parameter comparisons hold up to ~11 trees of
        # 4 GiB at once, more than JAX's default 75% preallocation of an 80 GB card.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    suite = Suite(args)
    suite.run()
    import report

    with open(suite.json_path) as f:
        results = json.load(f)
    print(report.render(results))
    if args.write_docs:
        report.write_docs(DOCS_PAGE, report.page_blocks(results))


if __name__ == "__main__":
    main()
