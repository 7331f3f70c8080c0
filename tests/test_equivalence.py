"""Outputs and states of every transform equal, bit for bit, a recorded run of the reference
implementation.

``data/recorded_run.npz`` holds, for each configuration of ``data/equivalence_runs.py`` (every
public transform and norm function, in several settings, float32 and bfloat16), a run of 60
spiky steps on one CPU device: per step a SHA-256 of every output and every state, the exact
bytes of the leaves of at most 10,000 entries, and a digest, sum and sum of squares of the
larger leaf. ``data/record_run.py`` wrote it from the reference implementation. Each case here
reruns one configuration with the importable ``optaxclip`` and requires every digest to match;
a mismatch names the first differing step and leaf and, where values are stored, the largest
absolute and relative differences.

A configuration in ``WITHIN_ROUNDING`` is compared on its stored values with a relative
tolerance of four float32 ulps instead of by digest, for a change that is known to move results
by rounding only.

The bits of a run depend on more than optaxclip: XLA:CPU splits large reductions across one
thread per available CPU, so the number of CPUs changes the order of the partial sums, and so
do the vector instructions it compiles for and the library versions. The record stores these
(``equivalence_runs.environment``); where they differ, the comparisons are skipped, naming the
difference, and the record is to be made again from the reference implementation.
"""

from __future__ import annotations

import importlib.util
import sys
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"


def _load_runs() -> Any:
    """``data/equivalence_runs.py``, the runs ``data/record_run.py`` recorded."""
    name = "optaxclip_equivalence_runs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DATA / "equivalence_runs.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs: dataclasses look their module up by name.
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


runs = _load_runs()

# Configurations compared with a relative tolerance of ROUNDING_RTOL (2**-21) on the stored
# values instead of by digest.
WITHIN_ROUNDING: set[str] = set()


@pytest.fixture(scope="module")
def record() -> dict[str, np.ndarray]:
    with np.load(DATA / "recorded_run.npz") as stored:
        return {key: stored[key] for key in stored.files}


def test_record_matches_the_configurations(record: dict[str, np.ndarray]) -> None:
    assert [str(name) for name in record["meta/configs"]] == list(runs.CONFIGS)
    assert tuple(record["meta/step_kinds"]) == runs.STEP_KINDS
    assert set(WITHIN_ROUNDING) <= set(runs.CONFIGS)


def _environment_difference(record: dict[str, np.ndarray]) -> list[str]:
    recorded = [str(line) for line in record["meta/environment"]]
    current = runs.environment()
    return [f"recorded {r!r}, now {c!r}" for r, c in zip_longest(recorded, current) if r != c]


def _skip_if_not_reproducible(record: dict[str, np.ndarray]) -> None:
    differences = _environment_difference(record)
    if differences:
        pytest.skip(
            "this process cannot reproduce the record's bits (see equivalence_runs.environment): "
            + "; ".join(differences)
            + ". Record the reference implementation again here: "
            "PYTHONPATH=<unchanged copy of the package> python tests/data/record_run.py"
        )


# ----------------------------------------------------------------------------------- reporting


def _row_label(part: str, row: int) -> str:
    """Where a stored row lies in the run: output row k is step k, state row k + 1 follows it."""
    if part == "state":
        if row == 0:
            return "the state after init"
        step = row - 1
        return f"the state after step {step} ({runs.STEP_KINDS[step]})"
    return f"the output of step {row} ({runs.STEP_KINDS[row]})"


def _rows_in_order(n_steps: int) -> list[tuple[str, int]]:
    """Every (part, row) in the order the run produced them."""
    order = [("state", 0)]
    for step in range(n_steps):
        order += [("out", step), ("state", step + 1)]
    return order


def _value_difference(expected: np.ndarray, actual: np.ndarray) -> str:
    """How two arrays of one small leaf differ: bits, NaN positions, largest differences."""
    size = expected.size
    e_bits = expected.reshape(-1).view(np.uint8).reshape(size, -1)
    a_bits = actual.reshape(-1).view(np.uint8).reshape(size, -1)
    lines = [f"{int(np.sum(np.any(e_bits != a_bits, axis=1)))} of {size} entries differ in bits"]
    e = expected.astype(np.float64).ravel()
    a = actual.astype(np.float64).ravel()
    nan_e, nan_a = np.isnan(e), np.isnan(a)
    if np.any(nan_e != nan_a):
        lines.append(
            f"NaN at entries {np.flatnonzero(nan_e).tolist()} recorded, "
            f"{np.flatnonzero(nan_a).tolist()} now"
        )
    both = ~nan_e & ~nan_a
    if np.any(both):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            abs_diff = np.where(both, np.abs(a - e), 0.0)
            # inf - inf, an infinity of one sign recorded and the other now.
            abs_diff = np.where(np.isnan(abs_diff), np.inf, abs_diff)
            rel_diff = np.where(e != 0, abs_diff / np.abs(e), np.where(abs_diff > 0, np.inf, 0))
        worst = int(np.argmax(abs_diff))
        lines.append(
            f"max abs diff {np.max(abs_diff):.6g}, max rel diff {np.max(rel_diff):.6g} "
            f"(entry {worst}: recorded {float(e[worst])!r}, now {float(a[worst])!r})"
        )
    return "; ".join(lines)


def _leaf_difference(
    record: dict[str, np.ndarray],
    new: dict[str, np.ndarray],
    prefix: str,
    row: int,
    rtol: float | None,
) -> str | None:
    """The first leaf of a row that differs (bitwise, or beyond ``rtol``), described."""
    leaves = runs.parse_leaves(record[f"{prefix}/leaves"])
    old_small = runs.small_values(leaves, record[f"{prefix}/small"][row])
    new_small = runs.small_values(leaves, new[f"{prefix}/small"][row])
    big = 0
    for i, leaf in enumerate(leaves):
        where = f"leaf {leaf.path} ({leaf.dtype.name} {leaf.shape})"
        if leaf.small:
            e, a = old_small[i], new_small[i]
            if rtol is None:
                same = e.tobytes() == a.tobytes()
            else:
                same = bool(np.allclose(a.astype(float), e.astype(float), rtol, 0, True))
            if not same:
                return f"{where}: {_value_difference(e, a)}"
            continue
        e_sums = record[f"{prefix}/big_sums"][row, big]
        a_sums = new[f"{prefix}/big_sums"][row, big]
        if rtol is None:
            same = bytes(record[f"{prefix}/big_digest"][row, big]) == bytes(
                new[f"{prefix}/big_digest"][row, big]
            )
        else:
            same = bool(np.allclose(a_sums, e_sums, rtol, 0, True))
        if not same:
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = np.abs(a_sums - e_sums) / np.abs(e_sums)
            return (
                f"{where}: {'sums differ' if rtol is not None else 'digest differs'}; "
                f"sum {float(a_sums[0])!r} (recorded {float(e_sums[0])!r}), "
                f"sum of squares {float(a_sums[1])!r} (recorded {float(e_sums[1])!r}), "
                f"relative differences {rel[0]:.3g} and {rel[1]:.3g}"
            )
        big += 1
    return None


def _compare(
    name: str, record: dict[str, np.ndarray], new: dict[str, np.ndarray], rtol: float | None
) -> list[str]:
    """Every difference between a rerun and the record, first one first (empty if none)."""
    for part in runs.PARTS:
        old_lines = [str(line) for line in record[f"{name}/{part}/leaves"]]
        new_lines = [str(line) for line in new[f"{name}/{part}/leaves"]]
        if old_lines != new_lines:
            return [f"{name}: the {part} leaves differ: recorded {old_lines}, now {new_lines}"]
    old_in, new_in = record[f"{name}/in/digest"], new[f"{name}/in/digest"]
    if old_in.tobytes() != new_in.tobytes():
        step = int(np.flatnonzero(np.any(old_in != new_in, axis=1))[0])
        return [
            f"{name}: the inputs differ from the recorded ones from step {step} on: the "
            f"gradients are generated differently (NumPy, ml_dtypes or the run definitions "
            f"changed), so this is not a comparison of optaxclip"
        ]
    first = None
    differing = {"out": 0, "state": 0}
    n_steps = len(record[f"{name}/out/digest"])
    for part, row in _rows_in_order(n_steps):
        prefix = f"{name}/{part}"
        if rtol is None and bytes(record[f"{prefix}/digest"][row]) == bytes(
            new[f"{prefix}/digest"][row]
        ):
            continue
        leaf = _leaf_difference(record, new, prefix, row, rtol)
        if leaf is None and rtol is not None:
            continue
        differing[part] += 1
        if first is None:
            first = f"{_row_label(part, row)}: " + (
                leaf or "the digest differs, yet every leaf compares equal"
            )
    if first is None:
        return []
    return [
        f"{name}: first difference in {first}",
        f"(optaxclip imported from {runs.optaxclip.__file__})",
        f"{differing['out']} of {n_steps} outputs and {differing['state']} of {n_steps + 1} "
        f"states differ",
    ]


@pytest.mark.parametrize("name", list(runs.CONFIGS))
def test_same_as_recorded_run(name: str, record: dict[str, np.ndarray]) -> None:
    _skip_if_not_reproducible(record)
    new = runs.run(name)
    rtol = runs.ROUNDING_RTOL if name in WITHIN_ROUNDING else None
    problems = _compare(name, record, new, rtol)
    assert not problems, "\n".join(problems)
