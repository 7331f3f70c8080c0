"""Records the runs of ``equivalence_runs.py`` into ``recorded_run.npz``, next to this file.

The record must come from the reference implementation, an unchanged copy of the package
outside this working tree, so that the working tree's code can be compared against it::

    PYTHONPATH=/path/to/reference python tests/data/record_run.py

The script prints where ``optaxclip`` was imported from and refuses to write a record from this
working tree's own package unless ``--allow-working-tree`` is given (for a record of code
that is known to be the reference). ``--check`` reruns every configuration and compares it
with the existing record instead of writing, which shows that the runs are deterministic.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RECORD = HERE / "recorded_run.npz"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RECORD, help="where to write the record")
    parser.add_argument(
        "--allow-working-tree",
        action="store_true",
        help="record even when optaxclip is imported from this working tree",
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the record at --out, write nothing"
    )
    args = parser.parse_args()

    # One CPU device: the record holds CPU results (the runs place every array on the CPU
    # anyway; this keeps an accelerator from being set up for nothing).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(HERE))
    import equivalence_runs as runs
    import jax
    import numpy as np

    import optaxclip

    package = Path(optaxclip.__file__).resolve().parent
    print(f"optaxclip imported from {optaxclip.__file__}")
    print(f"devices {jax.devices()}; " + ", ".join(runs.environment()))
    if package.is_relative_to(REPO) and not (args.allow_working_tree or args.check):
        print(
            "refusing to record: optaxclip comes from this working tree, not from a reference "
            "copy (set PYTHONPATH to the reference copy, or pass --allow-working-tree)",
            file=sys.stderr,
        )
        return 2

    arrays: dict[str, np.ndarray] = {"meta/step_kinds": np.array(runs.STEP_KINDS)}
    arrays["meta/configs"] = np.array(list(runs.CONFIGS))
    arrays["meta/environment"] = np.array(runs.environment())
    for name in runs.CONFIGS:
        arrays.update(runs.run(name))
        print(f"  {name}")

    if args.check:
        with np.load(args.out) as record:
            stored = {key: record[key] for key in record.files}
        differing = sorted(
            key
            for key in set(stored) | set(arrays)
            if key not in stored
            or key not in arrays
            or stored[key].dtype != arrays[key].dtype
            or stored[key].tobytes() != arrays[key].tobytes()
        )
        print(f"{len(differing)} of {len(arrays)} arrays differ from {args.out}")
        for key in differing:
            print(f"  {key}")
        return 1 if differing else 0

    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
