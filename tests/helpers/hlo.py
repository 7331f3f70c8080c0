"""Reading compiled HLO text: every cross-device operation and the bytes it moves."""

from __future__ import annotations

import math
import re
from typing import NamedTuple

# The ops that move data between devices. Asynchronous forms are counted at their start.
COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "collective-broadcast",
    "ragged-all-to-all",
)
_OP = re.compile(
    r"\s(?P<op>" + "|".join(re.escape(op) for op in COLLECTIVE_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}


class Collective(NamedTuple):
    """One cross-device op: its name, the arrays it produces, and the bytes they hold."""

    op: str
    shapes: list[tuple[str, tuple[int, ...]]]  # (dtype, dims) of each array it produces
    bytes: int
    line: str

    @property
    def largest(self) -> int:
        """Entries of the largest array it produces."""
        return max((math.prod(dims) for _, dims in self.shapes), default=0)


def _result_type(line: str, end: int) -> str:
    """The text of the result type between ``=`` and the op name (tuples included)."""
    head = line[:end]
    return head[head.index("=") + 1 :] if "=" in head else head


def collectives(hlo: str) -> list[Collective]:
    """Every collective op in compiled HLO text, tuple-shaped ones included.

    The result type of a tuple-shaped op may hold comments such as ``/*index=5*/``, which XLA
    prints inside tuples of six or more elements; they are dropped before the arrays are read.
    For an asynchronous start op the result tuple also holds the operands, so only its second
    half (the results) is counted.
    """
    found = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match or "=" not in line[: match.start()]:
            continue
        text = _COMMENT.sub("", _result_type(line, match.start()))
        arrays = [
            (m.group("dtype"), tuple(int(d) for d in m.group("dims").split(",") if d))
            for m in _ARRAY.finditer(text)
        ]
        if match.group("start") and len(arrays) >= 2:
            arrays = arrays[len(arrays) // 2 :]
        size = sum(_BYTES.get(dtype, 4) * math.prod(dims) for dtype, dims in arrays)
        found.append(Collective(match.group("op"), arrays, size, line.strip()[:400]))
    return found
