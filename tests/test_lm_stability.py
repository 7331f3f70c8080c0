"""``examples/lm_stability.py --quick`` runs end to end and its outputs say what they claim.

The script runs once in a subprocess, as a user would run it, into a fresh ``--out`` folder
(module fixture). The tests then read what it wrote: ``results.md`` (settings and tables),
``summary.json`` (the numbers behind the tables) and the two PNGs. The learning-rate
sensitivity is recomputed here from the per-learning-rate final losses, with Wortsman et
al.'s formula written out, and compared with what the script reports.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "lm_stability.py"
LABELS = (
    "no clipping",
    "clip_by_global_norm(1.0)",
    "zclip()",
    "adagc()",
    "autoclip()",
    "adaclip()",
    "skip_spikes(adamw)",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_S = 600  # a hang guard only
# XLA:CPU compiles faster without backend optimisation and fusion emitters; the smoke run is
# mostly compilation (seven methods, one program each).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("lm_stability")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()
    env["MPLBACKEND"] = "Agg"
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=out,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, (out / "results.md").read_text()


@pytest.fixture(scope="module")
def summary(quick_run: tuple[Path, str]) -> dict[str, Any]:
    return json.loads((quick_run[0] / "summary.json").read_text())


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The first table after ``heading``, as label -> cells (header and rule dropped)."""
    block: list[str] = []
    for line in markdown.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            block.append(line)
        elif block:
            break
    rows = {}
    for line in block[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?|nan|inf", cell)]


def test_both_figures_are_written_as_non_empty_pngs(quick_run):
    out, _ = quick_run
    for name in ("lm_bad_batches.png", "lm_lr_sensitivity.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000, name
        assert data.startswith(PNG_MAGIC), name


def test_results_state_every_setting(quick_run):
    _, text = quick_run
    for needle in (
        "python examples/lm_stability.py --quick",
        "standard library",
        "validation split",
        "Model:",
        "context 16 bytes",
        "parameters",
        "AdamW (b1 0.9, b2 0.95",
        "weight decay",
        "warm-up from 0 over 10 steps",
        "cosine decay",
        "120 steps, batch 8 sequences",
        "peak lr 0.003, seeds [0, 1]",
        "random bytes",
        "peak lr 0.001, 0.01, 0.1",
        "s wall",
        "CPU time",
    ):
        assert needle in text, needle


def test_bad_batch_table_lists_every_method_with_finite_numbers(quick_run):
    _, text = quick_run
    rows = table_rows(text, "### Bad batches")
    assert set(rows) == set(LABELS)
    for label, cells in rows.items():
        final_mean, final_sd = numbers(cells[0])
        jump_mean, jump_max = numbers(cells[1])
        for value in (final_mean, final_sd, jump_mean, jump_max):
            assert math.isfinite(value), (label, cells)
        assert 0 < final_mean < math.log(256) + 1, (label, cells)
        assert jump_mean <= jump_max, (label, cells)
        clipped = numbers(cells[-1])[0]
        assert 0 <= clipped <= 100, (label, cells)
    assert rows["no clipping"][-1] == "0.0%"


def test_sensitivity_table_lists_every_method_with_a_finite_value(quick_run):
    _, text = quick_run
    rows = table_rows(text, "### Learning-rate sensitivity")
    assert set(rows) == set(LABELS)
    for label, cells in rows.items():
        (value,) = numbers(cells[0])
        assert math.isfinite(value) and value >= 0, (label, cells)


def test_lr_sensitivity_matches_wortsman_formula_recomputed_from_final_losses(quick_run, summary):
    _, text = quick_run
    rows = table_rows(text, "### Learning-rate sensitivity")
    for result in summary["methods"].values():
        grid = result["lr_grid"]
        init = result["loss_at_init"]
        # JSON null stands for a NaN/Inf final loss, which counts as the loss at init.
        finals = [init if v is None else v for v in result["sweep_final_losses"]]
        assert len(finals) == len(grid) == 3
        capped = [min(loss, init) for loss in finals]
        best = min(capped)
        expected = sum(c - best for c in capped) / len(capped)
        assert expected >= 0
        assert result["lr_sensitivity"] == pytest.approx(expected, abs=1e-9)
        (shown,) = numbers(rows[result["label"]][0])
        assert shown == pytest.approx(expected, abs=5e-4)


def test_loss_at_init_is_near_a_uniform_guess_over_bytes(summary):
    # GPT-2 initialisation makes the first predictions nearly uniform over the 256 bytes.
    for result in summary["methods"].values():
        assert result["loss_at_init"] == pytest.approx(math.log(256), abs=0.1)


def test_summary_counts_every_bad_batch_event(summary):
    bad_steps = summary["bad_steps"]
    seeds = summary["config"]["seeds"]
    assert bad_steps == [40, 80]
    for result in summary["methods"].values():
        assert result["events"] == seeds * len(bad_steps)
        assert 0 <= result["bad_batches_clipped"] <= result["events"]
        assert 0 <= result["not_recovered"] <= result["events"]
        assert len(result["jumps"]) == seeds
        assert all(len(per_seed) == len(bad_steps) for per_seed in result["jumps"])
