"""What crosses devices when a clipper runs on sharded gradients: all-reduces of short vectors.

Every transform, alone and chained with Adam, is compiled on 8 host devices in four kinds of
sharded program (``tests/distributed_scripts/dist_collectives.py``): ``jit`` on an Auto mesh,
on an Explicit mesh, on an Explicit mesh under ``jax.set_mesh``, and a ``shard_map`` manual
over one axis with the other left to the partitioner. The trees hold leaves split over both
axes (FSDP x TP), below and above the size up to which small leaves are joined, split along
either dimension, replicated, and many small split leaves. No gradient or parameter data may
move: no gather, all-to-all, reduce-scatter or permute, and every all-reduce carries at most
one value per leaf or per unit.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from typing import Any

import pytest
from test_distributed import SCRIPT_TIMEOUT_S, SCRIPTS, host_device_env

sys.path.insert(0, str(SCRIPTS))
import dist_collectives as dcol

KINDS = ("auto", "explicit", "explicit_set_mesh", "partial_shard_map")
TREES = ("mixed", "many_small")
NAMES = tuple(dcol.transforms(None, None))
MANY_SMALL_LEAVES = 64

pytestmark = pytest.mark.compiled_program


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    out = tmp_path_factory.mktemp("collectives") / "ops.pkl"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "dist_collectives.py"),
            str(out),
            "--leaves",
            str(MANY_SMALL_LEAVES),
        ],
        env=host_device_env(),
        capture_output=True,
        text=True,
        timeout=3 * SCRIPT_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"the 8-device script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)


def _stats_limit(tree: str, name: str) -> int:
    """The most values one all-reduce may carry: one per leaf, or for AGC one per unit."""
    shapes, _ = dcol.trees(MANY_SMALL_LEAVES)[tree]
    if name == "adaptive_grad_clip":
        return max(shape[-1] for shape in shapes.values())  # units of the flax preset
    return len(shapes)


def _smallest_split_leaf(tree: str) -> int:
    shapes, specs = dcol.trees(MANY_SMALL_LEAVES)[tree]
    return min(
        math.prod(shapes[k]) for k, spec in specs.items() if any(e is not None for e in spec)
    )


@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tree", TREES)
@pytest.mark.parametrize("kind", KINDS)
def test_no_gradient_data_crosses_devices(
    compiled: dict[Any, Any], kind: str, tree: str, name: str, chained: bool
) -> None:
    record = compiled[(kind, tree, name, chained)]
    assert "error" not in record, record.get("error")
    limit = _stats_limit(tree, name)
    if name != "adaptive_grad_clip":
        # A statistics vector is shorter than any split leaf, so that an all-reduce standing
        # in for a gather of a gradient leaf would fail too. (AGC's units of one large leaf
        # outnumber the entries of a small one.)
        assert limit < _smallest_split_leaf(tree)
    for op, shapes, _, line in record["ops"]:
        assert op == "all-reduce", f"gradient data moved between devices: {line}"
        for _, dims in shapes:
            assert math.prod(dims) <= limit, f"an all-reduce of more than statistics: {line}"


def test_every_norm_is_reduced_across_devices_somewhere(compiled: dict[Any, Any]) -> None:
    # The runs above would pass vacuously if nothing were sharded: every program must reduce
    # its norm across devices.
    for key, record in compiled.items():
        assert "error" not in record, key
        assert any(op[0] == "all-reduce" for op in record["ops"]), key
