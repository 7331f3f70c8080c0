"""Exact clipping on sharded gradients: GSPMD (jit + NamedSharding), shard_map and pmap.

The sharded runs need 8 host devices, and XLA reads the device count only when JAX starts,
so they run in a fresh Python (``tests/distributed_scripts/dist_sharded_checks.py``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; that script only records what it saw
and the assertions are made here. The checks at the end trace transforms inside
``shard_map`` in this process, on a one-device mesh (nothing is compiled). The resolution of
layouts themselves is tested in ``test_layout.py``.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.hlo import collectives
from helpers.runs import one_device_mesh, trace_in_shard_map
from jax.sharding import PartitionSpec as P

import optaxclip
from optaxclip._spec.layout import _manual_axis_types

SCRIPTS = Path(__file__).parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
import dist_cases as dc  # noqa: E402

MODES = ("gspmd", "gspmd_auto", "shard_map_types", "shard_map_layout", "pmap")
RTOL = 1e-6
# Generous: the script compiles five programs, on a machine that may be shared.
SCRIPT_TIMEOUT_S = 400


def host_device_env() -> dict[str, str]:
    """The environment for a fresh Python with 8 CPU devices (and fast, unoptimised codegen)."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags += [
        "--xla_force_host_platform_device_count=8",
        # Backend (LLVM) optimisation does not change the HLO, the collectives or the order of
        # the reductions; turning it off shortens the compile time of these small programs.
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    return env


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sharded") / "results.pkl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "dist_sharded_checks.py"), str(out)],
        env=host_device_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,  # subprocess.run kills the child when this expires
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the 8-device script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


def run_of(sharded: dict[str, Any], name: str, mode: str) -> dict[str, Any]:
    run = sharded["cases"][name][mode]
    if "error" in run:
        pytest.fail(f"{name} failed under {mode}:\n{run['error']}")
    return run


def assert_close_per_leaf(actual: list[Any], expected: list[Any], what: str) -> None:
    """Each leaf within RTOL of the reference, relative to the leaf's largest magnitude."""
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, f"{what} leaf {i}: shape {a.shape} vs {e.shape}"
        if e.dtype == bool or np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(a, e, err_msg=f"{what} leaf {i}")
            continue
        finite = np.isfinite(e)
        np.testing.assert_array_equal(np.isfinite(a), finite, err_msg=f"{what} leaf {i}")
        np.testing.assert_array_equal(a[~finite], e[~finite], err_msg=f"{what} leaf {i}")
        scale = float(np.max(np.abs(e[finite]), initial=0.0))
        np.testing.assert_allclose(
            a[finite], e[finite], rtol=RTOL, atol=RTOL * scale, err_msg=f"{what} leaf {i}"
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(dc.CASES))
def test_sharded_update_and_state_match_single_device_every_step(
    sharded: dict[str, Any], name: str, mode: str
) -> None:
    reference = run_of(sharded, name, "reference")
    run = run_of(sharded, name, mode)
    for t in range(dc.STEPS):
        assert_close_per_leaf(run["updates"][t], reference["updates"][t], f"step {t} update")
        states = run["state"][t]
        if run.get("per_device_state"):
            states = [np.asarray(x)[0] for x in states]
        assert_close_per_leaf(states, reference["state"][t], f"step {t} state")


@pytest.mark.parametrize("name", sorted(dc.CASES))
def test_every_case_changes_the_gradient_after_its_warmup_so_the_comparison_has_teeth(
    sharded: dict[str, Any], name: str
) -> None:
    reference = run_of(sharded, name, "reference")
    changed = [
        t
        for t in range(2, dc.STEPS)  # warm-ups and histories are 2 steps long
        if any(
            not np.array_equal(out, g, equal_nan=True)
            for out, g in zip(
                reference["updates"][t], jax.tree_util.tree_leaves(dc.grads(t)), strict=True
            )
        )
    ]
    assert changed, f"{name} never clipped after step 1"


@pytest.mark.parametrize("mode", ["shard_map_layout", "pmap"])
@pytest.mark.parametrize("name", sorted(dc.CASES))
def test_state_is_bitwise_identical_on_every_device(
    sharded: dict[str, Any], name: str, mode: str
) -> None:
    run = run_of(sharded, name, mode)
    for t in range(dc.STEPS):
        for i, copies in enumerate(run["state"][t]):
            copies = np.asarray(copies)
            assert copies.shape[0] == dc.N_DEVICES
            for d in range(1, dc.N_DEVICES):
                np.testing.assert_array_equal(
                    copies[d], copies[0], err_msg=f"step {t} state leaf {i} device {d}"
                )
    if mode == "pmap":
        assert run["replicated_updates_agree"]


@pytest.mark.parametrize("name", sorted(dc.CASES))
def test_gspmd_keeps_every_update_leaf_sharded_as_its_gradient(
    sharded: dict[str, Any], name: str
) -> None:
    run = run_of(sharded, name, "gspmd")
    expected = []
    for spec in jax.tree_util.tree_leaves(dc.SPECS):
        entries = [None, *spec]  # the leading step axis of the scanned run
        while entries and entries[-1] is None:
            entries.pop()
        expected.append(tuple(entries))
    assert run["out_specs"] == expected


def test_collective_parser_reads_every_collective_and_the_bytes_it_moves() -> None:
    text = """
  %a = f32[] all-reduce(f32[] %x), replica_groups={}
  %b = (f32[], f32[4]{0}) all-reduce(%y, %z), channel_id=2
  %c = f32[16,8]{1,0} all-gather(f32[2,8]{1,0} %w), dimensions={0}
  %d = f32[8]{0} all-reduce-start(f32[8]{0} %v)
  %e = bf16[2,3]{1,0} collective-permute(bf16[2,3]{1,0} %u), source_target_pairs={{0,1}}
  %f = (f32[], f32[], f32[], f32[], f32[], /*index=5*/f32[], s32[7]{0}) all-reduce(%p0, %p1)
  %g = (f32[4]{0}, f32[32]{0}) all-gather-start(f32[4]{0} %q), dimensions={0}
  %h = f32[32]{0} all-gather-done((f32[4]{0}, f32[32]{0}) %g)
  %all-reduce.1 = f32[] add(f32[] %r, f32[] %s)
"""
    found = [(c.op, c.shapes, c.bytes) for c in collectives(text)]
    assert found == [
        ("all-reduce", [("f32", ())], 4),
        ("all-reduce", [("f32", ()), ("f32", (4,))], 20),
        ("all-gather", [("f32", (16, 8))], 512),
        ("all-reduce", [("f32", (8,))], 32),
        ("collective-permute", [("bf16", (2, 3))], 12),
        ("all-reduce", [("f32", ())] * 6 + [("s32", (7,))], 52),
        ("all-gather", [("f32", (32,))], 128),
    ]


@pytest.mark.compiled_program
@pytest.mark.parametrize("mode", ["gspmd", "gspmd_auto"])
@pytest.mark.parametrize("name", sorted(dc.CASES))
def test_gspmd_hlo_reduces_only_scalars_and_small_stat_vectors_never_gradients(
    sharded: dict[str, Any], name: str, mode: str
) -> None:
    """No gradient crosses devices: only all-reduces of scalars and of short statistics vectors.

    Per-leaf norms and AGC's per-unit norms of kernels split along their inputs travel as
    vectors of at most ``STATS_REDUCTION_LIMIT`` entries, fewer than any split gradient leaf
    holds, so an all-reduce standing in for a gather of a gradient would fail too. (The cases
    share one compiled program; a case that cannot be lowered with the others gets its own.)
    """
    hlo = run_of(sharded, name, mode)["hlo"]
    ops = collectives(hlo)
    assert any(c.op == "all-reduce" for c in ops), "the norm must be reduced across devices"
    smallest_split_leaf = min(
        math.prod(s)
        for s, spec in zip(
            jax.tree_util.tree_leaves(dc.SHAPES, is_leaf=lambda x: isinstance(x, tuple)),
            jax.tree_util.tree_leaves(dc.SPECS),
            strict=True,
        )
        if any(entry is not None for entry in spec)
    )
    assert smallest_split_leaf > dc.STATS_REDUCTION_LIMIT
    for op, shapes, _, line in ops:
        assert op == "all-reduce", f"{name}: gradient data moved between devices: {line}"
        for _, shape in shapes:
            assert len(shape) <= 1 and math.prod(shape) <= dc.STATS_REDUCTION_LIMIT, (
                f"{name}: an all-reduce of more than scalars / per-leaf or per-unit "
                f"statistics: {line}"
            )


def test_reference_run_of_global_norm_clip_matches_float64_formula(
    sharded: dict[str, Any],
) -> None:
    reference = run_of(sharded, "clip_by_global_norm", "reference")
    for t in range(dc.STEPS):
        g = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(dc.grads(t))]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
        # A NaN gradient passes through unscaled (nonfinite="propagate").
        scale = min(1.0, 1.5 / norm) if math.isfinite(norm) else 1.0
        for out, x in zip(reference["updates"][t], g, strict=True):
            np.testing.assert_allclose(out, x * scale, rtol=1e-6, atol=1e-9)


def test_pmap_counts_replicated_leaf_once_only_with_layout(sharded: dict[str, Any]) -> None:
    g = {
        k: np.asarray(v, np.float64)
        for k, v in zip(
            ["dense", "embed", "norm", "proj"], jax.tree_util.tree_leaves(dc.grads(0)), strict=True
        )
    }
    split = sum(float(np.sum(g[k] ** 2)) for k in ("dense", "embed", "proj"))
    replicated = float(np.sum(g["norm"] ** 2))
    norms = sharded["norms"]
    assert norms["with_layout"] == pytest.approx(math.sqrt(split + replicated), rel=1e-6)
    # Without a layout, pmap cannot know the replicated leaf is replicated: once per device.
    assert norms["without_layout"] == pytest.approx(
        math.sqrt(split + dc.N_DEVICES * replicated), rel=1e-6
    )


# ---- transforms traced in shard_map, in this process, on a one-device mesh -------------------


GRADS = {"w": jnp.ones((2, 4)), "b": jnp.ones(4), "s": jnp.ones(())}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_outputs_and_stats_keep_each_leafs_device_types_in_shard_map(dtype: Any) -> None:
    # Replicated leaves stay replicated through every transform (the optimization barriers
    # in the norms and in clip_by_value act leaf by leaf), and the stats are replicated.
    mesh = one_device_mesh("data", "model")
    specs = {"w": P(None, "model"), "b": P(), "s": P()}
    grads = jax.tree.map(lambda x: x.astype(dtype), GRADS)
    axes = ("data", "model")
    for tx in [
        optaxclip.clip_by_global_norm(1.0, axis_name=axes),
        optaxclip.clip_by_leaf_norm(1.0, axis_name=axes),
        optaxclip.clip_by_value(0.5, axis_name=axes),
    ]:

        def types(t: Any, tx: Any = tx) -> Any:
            out, state = tx.update(t, tx.init(t))
            stats = optaxclip.clip_stats(state)
            return (
                {k: set(_manual_axis_types(v).varying) for k, v in out.items()},
                {k: set(_manual_axis_types(v).varying) for k, v in stats.items()},
            )

        out_types, stat_types = trace_in_shard_map(types, grads, specs, mesh)
        assert out_types == {"w": {"model"}, "b": set(), "s": set()}
        assert all(v == set() for v in stat_types.values()), stat_types


@pytest.mark.parametrize("axis_name", [None, "model"], ids=["per_device", "shared"])
def test_nonfinite_guard_traces_in_shard_map_with_and_without_axis_name(axis_name: Any) -> None:
    # Without axis_name each device decides on its own shard, so the decision varies along
    # the axis the leaves are split on; with it, every device takes the same one. Both
    # branches of the guard's check must carry the same device-variance type (check_vma).
    mesh = one_device_mesh("model")
    grads = {"w": jnp.ones((2, 4)), "b": jnp.ones(4)}
    specs = {"w": P(None, "model"), "b": P("model")}
    tx = optaxclip.skip_nonfinite(optax.sgd(1.0), axis_name=axis_name)

    def decision_type(t: Any) -> set[str]:
        _, state = tx.update(t, tx.init(t))
        return set(_manual_axis_types(state.last_finite).varying)

    varying = trace_in_shard_map(decision_type, grads, specs, mesh)
    assert varying == (set() if axis_name else {"model"})
