"""Jobs run in child processes, and the parent side that runs them with per-case timeouts.

Every measurement runs in a child process (``python <script> --worker JSON``), so that a
compile that runs away can be stopped, the parent holds no device memory, and compile times
are taken in a fresh process. The child prints one ``@@BENCH {json}`` line when a case
starts and one when it ends; the parent kills the child when a case runs past its timeout,
records "timeout > Ns" for it and starts a new child for the remaining cases.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

MARK = "@@BENCH "


def emit(event: dict[str, Any]) -> None:
    print(MARK + json.dumps(event), flush=True)


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------


def _lines(fd: int, timeout: float, buffer: bytearray) -> tuple[list[str], bool]:
    """Complete lines available on ``fd`` within ``timeout`` seconds, and whether EOF."""
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return [], False
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        rest = buffer.decode(errors="replace")
        buffer.clear()
        return ([rest] if rest else []), True
    buffer.extend(chunk)
    *complete, tail = buffer.split(b"\n")
    buffer[:] = tail
    return [c.decode(errors="replace") for c in complete], False


def run_job(
    script: str,
    job: dict[str, Any],
    *,
    case_timeout: float,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs ``job["cases"]`` in child processes of ``script``; one record per case.

    A case that does not finish within ``case_timeout`` seconds (its set-up included) gets
    ``status="timeout"``; a child that dies gets ``status="error"`` for the case it was on.
    """
    remaining = [c["id"] for c in job["cases"]]
    by_id = {c["id"]: c for c in job["cases"]}
    records: dict[str, dict[str, Any]] = {}

    def finish(case_id: str, record: dict[str, Any]) -> None:
        records[case_id] = record
        if case_id in remaining:
            remaining.remove(case_id)
        if on_record is not None:
            on_record(record)

    def failed(case_id: str, status: str, reason: str) -> dict[str, Any]:
        return {**job.get("common", {}), **by_id[case_id], "status": status, "reason": reason}

    while remaining:
        sub = dict(job, cases=[by_id[i] for i in remaining])
        proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(sub)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        buffer = bytearray()
        current: str | None = None
        progressed = False
        deadline = time.monotonic() + case_timeout
        eof = False
        timed_out = False
        while not eof:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            lines, eof = _lines(fd, deadline - now, buffer)
            for line in lines:
                if not line.startswith(MARK):
                    if line.strip():
                        print(line, file=sys.stderr, flush=True)
                    continue
                event = json.loads(line[len(MARK) :])
                if event["event"] == "start":
                    current = event["id"]
                    deadline = time.monotonic() + case_timeout
                elif event["event"] == "result":
                    finish(event["id"], event["record"])
                    current = None
                    progressed = True
                    deadline = time.monotonic() + case_timeout
        if timed_out:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            victim = current if current is not None else remaining[0]
            finish(
                victim,
                failed(victim, "timeout", f"timeout > {case_timeout:.0f}s"),
            )
            continue
        rc = proc.wait()
        proc.stdout.close()
        if current is not None:
            finish(current, failed(current, "error", f"worker exited with code {rc}"))
        elif remaining and not progressed:
            for case_id in list(remaining):
                finish(case_id, failed(case_id, "error", f"worker exited with code {rc}"))
    return [records[c["id"]] for c in job["cases"] if c["id"] in records]


# --------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------


def _error_record(case: dict[str, Any], common: dict[str, Any], exc: BaseException) -> dict:
    lines = traceback.format_exception_only(type(exc), exc)
    return {**common, **case, "status": "error", "reason": "".join(lines).strip()[-600:]}


def _tree_info(spec: Any) -> dict[str, Any]:
    return {
        "tree": spec.name,
        "tree_summary": spec.summary(),
        "n_params": spec.n_params,
        "n_leaves": spec.n_leaves,
        "dtype": spec.dtype,
        "itemsize": spec.itemsize,
    }


def bandwidth_job(job: dict[str, Any]) -> None:
    import harness

    common = job.get("common", {})
    kernels = {k["name"]: k for k in harness.bandwidth_cases(job["n_elements"], job["dtype"])}
    itemsize = harness.jnp.dtype(job["dtype"]).itemsize
    for case in job["cases"]:
        emit({"event": "start", "id": case["id"]})
        try:
            kernel = kernels[case["kernel"]]
            timing, args = harness.time_step(
                kernel["fn"],
                kernel["make"](),
                donate_argnums=kernel["donate"],
                feed=kernel["feed"],
                reps=job["reps"],
                warmup=job["warmup"],
            )
            del args
            gbps = harness.gb_per_s(kernel["passes"], job["n_elements"], itemsize, timing.median_ms)
            record = {
                **common,
                **case,
                "status": "ok",
                "kind": kernel["kind"],
                "passes": kernel["passes"],
                "n_elements": job["n_elements"],
                "mib": job["n_elements"] * itemsize / 2**20,
                "timing": timing.as_dict(),
                "gbps": gbps,
            }
        except Exception as exc:
            record = _error_record(case, common, exc)
        emit({"event": "result", "id": case["id"], "record": record})


def _tree_inputs(job: dict[str, Any]) -> tuple[Any, dict[str, Any], Any, Any]:
    """The job's tree spec, the fields every record shares, and its gradients and params."""
    import harness

    spec = harness.tree_spec(job["tree"], job["scale"], **job.get("tree_args", {}))
    common = {**job.get("common", {}), **_tree_info(spec), "optimizer": job["optimizer"]}
    grads = harness.make_tree(spec, seed=1, std=spec.grad_std)
    params = harness.make_tree(spec, seed=2, std=harness.PARAM_STD)
    return spec, common, grads, params


def steps_job(job: dict[str, Any]) -> None:
    spec, common, grads, params = _tree_inputs(job)
    for case in job["cases"]:
        emit({"event": "start", "id": case["id"]})
        try:
            record = _run_step_case(case, common, spec, grads, params, job)
        except Exception as exc:
            record = _error_record(case, common, exc)
        emit({"event": "result", "id": case["id"], "record": record})


def _prepare_step_case(case, spec, grads, params, job):
    """(fn, donate_argnums, feed, args, passes) for one case, or a skip reason (str)."""
    import harness
    import methods
    import optax

    mode = case["mode"]
    if mode in ("optimizer", "dispatch"):
        tx = methods.optimizer(job["optimizer"])
        if mode == "optimizer":
            fn, donate, feed = methods.train_step(tx)
            passes: int | None = harness.ADAM_PASSES
        else:
            fn, donate, feed = methods.dispatch_step()
            passes = None
        p = harness.fresh_copy(params)
        return fn, donate, feed, (p, harness.fresh_copy(tx.init(p)), grads), passes
    method = methods.method_by_key(case["method"])
    if method.factory is None:
        return method.missing
    clipper = method.factory(spec)
    if mode == "chain":
        tx = optax.chain(clipper, methods.optimizer(job["optimizer"]))
        fn, donate, feed = methods.train_step(tx)
        p = harness.fresh_copy(params)
        args = (p, harness.fresh_copy(tx.init(p)), grads)
        return fn, donate, feed, args, method.chain_passes
    if mode == "clip":
        fn, donate, feed = methods.clip_step(clipper, method.needs_params)
        state = harness.fresh_copy(clipper.init(params))
        g = harness.fresh_copy(grads)
        args = (g, state, params) if method.needs_params else (g, state)
        return fn, donate, feed, args, method.clip_passes
    raise ValueError(f"unknown mode {mode!r}")


def _run_step_case(case, common, spec, grads, params, job) -> dict[str, Any]:
    import harness

    prepared = _prepare_step_case(case, spec, grads, params, job)
    if isinstance(prepared, str):
        return {**common, **case, "status": "skipped", "reason": prepared}
    fn, donate, feed, args, passes = prepared
    timing, args = harness.time_step(
        fn, args, donate_argnums=donate, feed=feed, reps=job["reps"], warmup=job["warmup"]
    )
    del args
    record = {**common, **case, "status": "ok", "passes": passes, "timing": timing.as_dict()}
    if passes is not None:
        record["gbps"] = harness.gb_per_s(passes, spec.n_params, spec.itemsize, timing.median_ms)
    return record


def paired_job(job: dict[str, Any]) -> None:
    """Each case is a group of steps timed in alternation (harness.time_interleaved)."""
    import harness

    spec, common, grads, params = _tree_inputs(job)
    for case in job["cases"]:
        emit({"event": "start", "id": case["id"]})
        try:
            members, kept, skipped = [], [], []
            for member in case["members"]:
                prepared = _prepare_step_case(member, spec, grads, params, job)
                if isinstance(prepared, str):
                    skipped.append({**member, "status": "skipped", "reason": prepared})
                    continue
                fn, donate, feed, args, passes = prepared
                compiled, lower_s, compile_s, temp = harness.compile_step(fn, args, donate)
                members.append(harness.Member(compiled, args, feed, lower_s, compile_s, temp))
                kept.append({**member, "passes": passes})
            timings = harness.time_interleaved(members, reps=job["reps"], warmup=job["warmup"])
            results = []
            for member, timing in zip(kept, timings, strict=True):
                entry = {**member, "status": "ok", "timing": timing.as_dict()}
                if member["passes"] is not None:
                    entry["gbps"] = harness.gb_per_s(
                        member["passes"], spec.n_params, spec.itemsize, timing.median_ms
                    )
                results.append(entry)
            del members
            record = {
                **common,
                "id": case["id"],
                "group": case["group"],
                "mode": "paired",
                "status": "ok",
                "members": results + skipped,
            }
        except Exception as exc:
            group = {"id": case["id"], "group": case["group"], "mode": "paired"}
            record = _error_record(group, common, exc)
        emit({"event": "result", "id": case["id"], "record": record})


def torch_job(job: dict[str, Any]) -> None:
    """PyTorch's clip and optimizer ops on the job's tree, timed in alternation in one process.

    The cases share the parameters and the gradients (a clip rescales the gradients in
    place, which changes no case's work); each optimizer case has its own state.
    """
    import harness

    spec = harness.tree_spec(job["tree"], job["scale"], **job.get("tree_args", {}))
    common = {**job.get("common", {}), **_tree_info(spec)}
    try:
        import torch
    except ImportError as exc:
        for case in job["cases"]:
            emit({"event": "start", "id": case["id"]})
            record = {**common, **case, "status": "skipped", "reason": f"no torch: {exc}"}
            emit({"event": "result", "id": case["id"], "record": record})
        return

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    gen = torch.Generator().manual_seed(0)
    shapes = [s for _, s in spec.shapes]
    params = [
        torch.nn.Parameter((torch.randn(s, generator=gen) * harness.PARAM_STD).to(dtype))
        for s in shapes
    ]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * spec.grad_std).to(dtype)
    std = spec.grad_std

    def make_step(name: str):
        if name in ("torch:adam_fused", "torch:clip_norm+adam_fused"):
            opt = torch.optim.Adam(params, lr=1e-3, fused=True)
            if name == "torch:adam_fused":
                return opt.step

            def clip_and_step() -> None:
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()

            return clip_and_step
        if name == "torch:clip_norm":
            return lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        if name == "torch:clip_value_foreach":
            return lambda: torch.nn.utils.clip_grad_value_(params, std, foreach=True)
        if name == "torch:clip_value_loop":
            return lambda: torch.nn.utils.clip_grad_value_(params, std, foreach=False)
        raise ValueError(name)

    cases, calls = [], []
    for case in job["cases"]:
        emit({"event": "start", "id": case["id"]})
        try:
            calls.append(harness.python_caller(make_step(case["method"])))
            cases.append(case)
        except Exception as exc:
            emit({"event": "result", "id": case["id"], "record": _error_record(case, common, exc)})
    if not cases:
        return
    try:
        with torch.no_grad():
            first, times = harness.alternate(calls, reps=job["reps"], warmup=job["warmup"])
    except Exception as exc:
        for case in cases:
            emit({"event": "result", "id": case["id"], "record": _error_record(case, common, exc)})
        return
    for case, t, f in zip(cases, times, first, strict=True):
        timing = harness.python_summary(t, f)
        record = {
            **common,
            **case,
            "status": "ok",
            "alternated": True,
            "timing": timing.as_dict(),
            **_torch_threading(torch),
            "gbps": harness.gb_per_s(
                case["passes"], spec.n_params, spec.itemsize, timing.median_ms
            ),
        }
        emit({"event": "result", "id": case["id"], "record": record})


def _torch_threading(torch: Any) -> dict[str, Any]:
    return {
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }


def _train_common(job: dict[str, Any], framework: str) -> tuple[Any, dict[str, Any]]:
    import model

    cfg = model.GPTConfig(**job["model"])
    common = {
        **job.get("common", {}),
        "framework": framework,
        "model": cfg.as_dict(),
        "model_summary": cfg.summary(),
        "n_params": cfg.n_params,
        "n_leaves": cfg.n_leaves,
    }
    return cfg, common


def _train_members(samples: list[list[float]], timings: list[Any], members: list[dict]):
    """The members' records: timing, per-round samples and, against the first, the clip's cost."""
    import model

    out = []
    for i, (member, t, timing) in enumerate(zip(members, samples, timings, strict=True)):
        entry = {**member, "status": "ok", "timing": timing.as_dict(), "samples_ms": t}
        if i > 0:
            entry["cost"] = model.cost_fraction(t, samples[0])
        out.append(entry)
    return out


def train_step_job(job: dict[str, Any]) -> None:
    """Whole Flax NNX training steps (forward, backward, [clip], AdamW, apply), alternated.

    The first member is AdamW alone, the baseline of every clip's cost.
    """
    import harness
    import jax
    import methods
    import model
    import optax
    from flax import nnx

    cfg, common = _train_common(job, "jax")
    case = job["cases"][0]
    emit({"event": "start", "id": case["id"]})
    try:
        graphdef, params = nnx.split(model.flax_model(cfg), nnx.Param)
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        shapes = tuple(((jax.tree_util.keystr(path),), tuple(leaf.shape)) for path, leaf in flat)
        spec = harness.TreeSpec("gpt", "float32", shapes, cfg.summary())
        batches = model.flax_batches(cfg)
        compiled, kept, skipped = [], [], []
        for member in case["members"]:
            tx = optax.adamw(model.LEARNING_RATE, weight_decay=model.WEIGHT_DECAY)
            if member.get("method"):
                method = methods.method_by_key(member["method"])
                if method.factory is None:
                    skipped.append({**member, "status": "skipped", "reason": method.missing})
                    continue
                tx = optax.chain(method.factory(spec), tx)
            step, donate, feed = model.flax_train_step(graphdef, tx, batches)
            p = harness.fresh_copy(params)
            args = (p, harness.fresh_copy(tx.init(p)), batches[0])
            fn, lower_s, compile_s, temp = harness.compile_step(step, args, donate)
            compiled.append(harness.Member(fn, args, feed, lower_s, compile_s, temp))
            kept.append(member)
        samples, timings = harness.interleaved_samples(
            compiled, reps=job["reps"], warmup=job["warmup"]
        )
        results = _train_members(samples, timings, kept)
        for entry, member in zip(results, compiled, strict=True):
            entry["last_pre_clip_norm"] = model.last_pre_clip_norm(member.args[1])
        del compiled
        record = {**common, "id": case["id"], "status": "ok", "members": results + skipped}
    except Exception as exc:
        record = _error_record({"id": case["id"]}, common, exc)
    emit({"event": "result", "id": case["id"], "record": record})


def train_step_torch_job(job: dict[str, Any]) -> None:
    """The same model and steps in PyTorch: AdamW(fused) with and without clip_grad_norm_."""
    import harness
    import model

    cfg, common = _train_common(job, "torch")
    case = job["cases"][0]
    emit({"event": "start", "id": case["id"]})
    try:
        import torch
    except ImportError as exc:
        record = {**common, "id": case["id"], "status": "skipped", "reason": f"no torch: {exc}"}
        emit({"event": "result", "id": case["id"], "record": record})
        return
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        sync = torch.cuda.synchronize if device == "cuda" else None
        members = case["members"]
        steps = [
            model.torch_train_step(cfg, clip=bool(m.get("method")), device=device) for m in members
        ]
        calls = [harness.python_caller(step, sync) for step, _ in steps]
        first, samples = harness.alternate(calls, reps=job["reps"], warmup=job["warmup"])
        timings = [harness.python_summary(t, f) for t, f in zip(samples, first, strict=True)]
        results = _train_members(samples, timings, members)
        for entry, (_, last_norm) in zip(results, steps, strict=True):
            entry["last_pre_clip_norm"] = last_norm()
        record = {
            **common,
            "id": case["id"],
            "status": "ok",
            "device": device,
            **_torch_threading(torch),
            "members": results,
        }
    except Exception as exc:
        record = _error_record({"id": case["id"]}, common, exc)
    emit({"event": "result", "id": case["id"], "record": record})


def _state_like(tx: Any, tree: Any) -> Any:
    """The abstract state of ``tx``: leaves shaped like a parameter keep its sharding."""
    import jax

    return jax.eval_shape(tx.init, tree)


def _on_mesh(tree: Any, kind: str) -> Any:
    """The abstract tree, each leaf split along 'model' of a (data=2, model=4) mesh."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    if kind == "none":
        return tree
    if kind == "auto":
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    else:
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)

    def split(x: Any) -> Any:
        spec = P(*([None] * (x.ndim - 1)), "model")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(split, tree)


def compile_job(job: dict[str, Any]) -> None:
    """lower + compile of one (method, mode) at one leaf count, from abstract shapes."""
    import harness
    import jax
    import methods
    import optax

    n = job["n_leaves"]
    spec = harness.TreeSpec(
        f"uniform{n}", "float32", tuple(harness.uniform_shapes(n)), "1024-element leaves"
    )
    common = {**job.get("common", {}), "n_leaves": n}
    plain_tree = harness.abstract_tree(spec)
    for case in job["cases"]:
        emit({"event": "start", "id": case["id"]})
        try:
            tree = _on_mesh(plain_tree, case.get("mesh", "none"))
            mode = case["mode"]
            if mode == "optimizer":
                tx = methods.optimizer(job["optimizer"])
                fn, donate, _ = methods.train_step(tx)
                args = (tree, _state_like(tx, tree), tree)
            else:
                method = methods.method_by_key(case["method"])
                if method.factory is None:
                    raise LookupError(method.missing)
                clipper = method.factory(spec)
                if mode == "chain":
                    tx = optax.chain(clipper, methods.optimizer(job["optimizer"]))
                    fn, donate, _ = methods.train_step(tx)
                    args = (tree, _state_like(tx, tree), tree)
                else:
                    fn, donate, _ = methods.clip_step(clipper, method.needs_params)
                    state = _state_like(clipper, tree)
                    args = (tree, state, tree) if method.needs_params else (tree, state)
            t0 = time.perf_counter()
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
            t1 = time.perf_counter()
            lowered.compile()
            t2 = time.perf_counter()
            record = {
                **common,
                **case,
                "status": "ok",
                "lower_s": t1 - t0,
                "compile_s": t2 - t1,
                "total_s": t2 - t0,
            }
        except LookupError as exc:
            record = {**common, **case, "status": "skipped", "reason": str(exc)}
        except Exception as exc:
            record = _error_record(case, common, exc)
        emit({"event": "result", "id": case["id"], "record": record})


JOBS = {
    "bandwidth": bandwidth_job,
    "steps": steps_job,
    "paired": paired_job,
    "torch": torch_job,
    "train_step": train_step_job,
    "train_step_torch": train_step_torch_job,
    "compile": compile_job,
}


# PyTorch's OpenMP threads spin while they wait for work by default. When other processes
# share the cores, the spinning threads take the time the working one needs, and PyTorch's
# steps run several times slower than alone; threads that wait passively do not. Set before
# PyTorch loads its OpenMP runtime; a value already in the environment is kept (and recorded).
TORCH_OMP_WAIT_POLICY = "PASSIVE"
TORCH_JOBS = ("torch", "train_step_torch")


def child_main(spec: str) -> None:
    job = json.loads(spec)
    if job["kind"] in TORCH_JOBS:
        os.environ.setdefault("OMP_WAIT_POLICY", TORCH_OMP_WAIT_POLICY)
    if any(case.get("mesh", "none") != "none" for case in job.get("cases", [])):
        # Before JAX starts: the meshes need 8 devices, which a CPU host provides on request.
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    if job["kind"] not in TORCH_JOBS:
        import harness

        job["common"] = {**job.get("common", {}), "device": harness.device_description()}
    JOBS[job["kind"]](job)
