"""Small helpers shared by the example scripts (not part of the optaxclip package).

Each example stays runnable on its own (``python examples/<name>.py``); this module only holds
the plumbing they would otherwise repeat: the output folder, the JSON summary the tests read,
a Markdown table printer, seed stacking for ``jax.vmap`` and a headless matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Where the examples other than the demo write by default (ignored by git).
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "output"


def parse_with_quick(parser: Any, argv: list[str] | None, quick: dict[str, Any]) -> Any:
    """Parses ``argv``; with ``--quick``, ``quick`` replaces the defaults (explicit flags win)."""
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def output_dir(path: str | os.PathLike[str]) -> Path:
    """Creates (if needed) and returns the folder an example writes into."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, so examples run without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 80) -> Path:
    """Saves and closes a figure; a modest dpi keeps each PNG small enough for the README."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    fig.clf()
    pyplot().close(fig)
    return path


def finite_or_none(value: Any) -> float | None:
    """A float for JSON, or None where the value is NaN or infinite (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def jsonable(obj: Any) -> Any:
    """Converts NumPy scalars/arrays to plain Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(obj)
    return obj


def write_summary(out: Path, summary: dict[str, Any], name: str = "summary.json") -> Path:
    """Writes the machine-readable summary that ``tests/test_examples.py`` checks."""
    path = out / name
    path.write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns (readable in a terminal, pasteable in docs)."""
    text_rows = [[str(cell) for cell in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), rule, *(line(r) for r in text_rows)])


def fmt(value: float | None, spec: str = ".4f") -> str:
    """Formats a number for a table; None/NaN/Inf print as ``nan``/``inf``."""
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks pytrees of identical structure along a new leading axis (one entry per seed)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean along the last axis (shorter windows at the start).

    A NaN or Inf makes every later value NaN, so a run that blew up is not smoothed away.
    """
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, values.shape[-1]))
    cumsum = np.cumsum(values, axis=-1)
    out = np.empty_like(values)
    out[..., :window] = cumsum[..., :window] / np.arange(1, window + 1)
    out[..., window:] = (cumsum[..., window:] - cumsum[..., :-window]) / window
    return out


def first_step_below(curve: np.ndarray, level: float) -> int | None:
    """The first index (1-based step) at which ``curve`` drops below ``level``, else None."""
    hits = np.flatnonzero(np.asarray(curve) < level)
    return int(hits[0]) + 1 if hits.size else None


def digits_split(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's 8x8 digits (bundled, no download) scaled to [0, 1], split 80/20.

    Returns ``(x_train, y_train, x_test, y_test)`` as JAX arrays; the shuffle is fixed by
    ``seed``.
    """
    import jax.numpy as jnp
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return jnp.asarray(x[train]), jnp.asarray(y[train]), jnp.asarray(x[test]), jnp.asarray(y[test])
