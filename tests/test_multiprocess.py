"""Two JAX processes (4 CPU devices each, gloo collectives) train like one process does.

Three fresh Pythons run ``tests/distributed_scripts/dist_multiprocess_worker.py`` at the same
time: two join a ``jax.distributed`` run on 127.0.0.1 (port chosen free at run time) and train
a tiny Flax NNX model sharded over a (data=2, model=4) mesh that spans both; the third trains
the same model on one device. Each child has a time limit and is killed if the test fails or
times out.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

WORKER = Path(__file__).parent / "distributed_scripts" / "dist_multiprocess_worker.py"
TIMEOUT_S = 300  # for the three children together; generous for a shared 2-core machine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags += [
        f"--xla_force_host_platform_device_count={devices}",
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


def run_children(commands: list[tuple[list[str], dict[str, str]]], logs: list[Path]) -> None:
    """Starts every command, waits for all within TIMEOUT_S, kills the rest on any failure."""
    procs: list[subprocess.Popen[bytes]] = []
    handles = []
    try:
        for (argv, env), log in zip(commands, logs, strict=True):
            handle = open(log, "wb")  # noqa: SIM115 (closed in the finally below)
            handles.append(handle)
            procs.append(subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        pending = list(range(len(procs)))
        while pending:
            for i in list(pending):
                code = procs[i].poll()
                if code is None:
                    continue
                pending.remove(i)
                if code != 0:
                    tail = logs[i].read_text(errors="replace")[-4000:]
                    pytest.fail(f"child {i} ({commands[i][0][2:]}) exited with {code}:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"children {pending} did not finish within {TIMEOUT_S} s")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for handle in handles:
            handle.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("multiprocess")
    coordinator = f"127.0.0.1:{free_port()}"
    worker = [sys.executable, str(WORKER)]
    commands = [
        ([*worker, str(tmp / f"p{i}.pkl"), "distributed", coordinator, "2", str(i)], child_env(4))
        for i in range(2)
    ]
    commands.append(([*worker, str(tmp / "single.pkl"), "single"], child_env(1)))
    run_children(commands, [tmp / "p0.log", tmp / "p1.log", tmp / "single.log"])
    with open(tmp / "p0.pkl", "rb") as f:
        distributed = pickle.load(f)
    with open(tmp / "single.pkl", "rb") as f:
        single = pickle.load(f)
    return {"distributed": distributed, "single": single}


def test_run_spans_two_processes_with_model_axis_across_them(runs: dict[str, Any]) -> None:
    distributed = runs["distributed"]
    assert distributed["processes"] == 2
    assert distributed["devices"] == 8
    assert distributed["model_rows_processes"] == [[0, 1], [0, 1]]
    assert runs["single"]["devices"] == 1
    specs = distributed["global_norm"]["specs"]
    assert "P(None, 'model')" in specs["['up']['kernel'].value"]
    assert "P('model'" in specs["['down']['kernel'].value"]


@pytest.mark.parametrize("optimizer", ["global_norm", "zclip"])
def test_clip_stats_of_every_step_match_single_process(
    runs: dict[str, Any], optimizer: str
) -> None:
    distributed = runs["distributed"][optimizer]["stats"]
    single = runs["single"][optimizer]["stats"]
    assert len(distributed) == len(single) > 0
    for t, (d, s) in enumerate(zip(distributed, single, strict=True)):
        assert d.keys() == s.keys()
        for key in s:
            np.testing.assert_allclose(
                d[key], s[key], rtol=1e-6, atol=1e-7, err_msg=f"step {t} {key}"
            )
    label = "clip_by_global_norm" if optimizer == "global_norm" else "zclip"
    # The spike step must have been clipped, or this test would not exercise the clipper.
    assert min(float(s[f"{label}/scale"]) for s in single) < 0.1


@pytest.mark.parametrize("optimizer", ["global_norm", "zclip"])
def test_params_after_training_match_single_process(runs: dict[str, Any], optimizer: str) -> None:
    distributed = runs["distributed"][optimizer]["params"]
    single = runs["single"][optimizer]["params"]
    assert distributed.keys() == single.keys()
    for path, expected in single.items():
        scale = float(np.max(np.abs(expected)))
        # AdamW divides by sqrt(v): rounding-level differences of the gradient can grow a
        # little, so the bound is 1e-5 of the leaf's scale rather than the clippers' 1e-6.
        np.testing.assert_allclose(
            distributed[path], expected, rtol=1e-5, atol=1e-5 * scale, err_msg=path
        )
