"""The documentation pages under ``docs/`` work as a reader would use them.

* Every page is listed in ``mkdocs.yml``'s ``nav``, so none is built but unreachable.
* The ```python blocks of every page run as written, in order, in one namespace per page, as
  a reader running them one after the other would (one test per page, its id the page's path
  under ``docs/``). Pages without Python blocks pass.
* A block directly preceded by the line ``<!-- not-run: <reason> -->`` is shown, not run
  (code for another framework, a cluster, a logging service). The reason is required, and a
  marker must sit right above a ```python block.
* A page whose first line is ``<!-- devices: N -->`` runs in a fresh Python with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu``, its blocks
  concatenated in order: XLA reads the device count only when JAX starts.

Blocks run from a temporary working directory, so whatever they write lands there. Each block
keeps its line numbers from the page, so a traceback points at the line of the ``.md`` file.
The page parser itself is checked on a small made-up page.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
# Generous: a page with a device mesh compiles a handful of small programs on a shared machine.
DEVICE_PAGE_TIMEOUT_S = 600

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run\b(?P<rest>.*?)-->\s*$")
_DEVICES = re.compile(r"^<!--\s*devices:\s*(?P<count>\d+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One ```python block: its first code line (1-based, in the page) and its text."""

    line: int
    code: str


def parse_page(text: str) -> tuple[list[Block], list[str]]:
    """Returns the page's runnable Python blocks and the problems with its not-run markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = _NOT_RUN.match(line)
        if marker:
            if not marker.group("rest").strip().lstrip(":").strip():
                problems.append(f"line {index + 1}: a not-run marker needs a reason")
            if not _opens_python(lines[index + 1] if index + 1 < len(lines) else ""):
                problems.append(
                    f"line {index + 1}: a not-run marker must sit right above a python block"
                )
        fence = _FENCE.match(line)
        if not fence:
            index += 1
            continue
        indent, mark = fence.group("indent"), fence.group("fence")
        closing = re.compile(rf"^[ \t]*{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        skipped = index > 0 and _NOT_RUN.match(lines[index - 1]) is not None
        if _opens_python(line) and not skipped:
            body = [_dedent(code, indent) for code in lines[index + 1 : end]]
            blocks.append(Block(line=index + 2, code="\n".join(body) + "\n"))
        index = end + 1
    return blocks, problems


def _opens_python(line: str) -> bool:
    fence = _FENCE.match(line)
    if not fence:
        return False
    words = fence.group("info").strip().lstrip("{").lstrip(".").split()
    return bool(words) and words[0] == "python"


def _dedent(line: str, indent: str) -> str:
    """Removes the fence's indentation (a block inside a list item) from one code line."""
    return line[len(indent) :] if line.startswith(indent) else line.lstrip(" \t")


def device_count(text: str) -> int | None:
    first = text.splitlines()[0] if text else ""
    match = _DEVICES.match(first)
    return int(match.group("count")) if match else None


def _as_script(blocks: list[Block]) -> str:
    """The blocks in order, each at its own line numbers in the page, blank lines between."""
    lines: list[str] = []
    for block in blocks:
        lines.extend([""] * (block.line - 1 - len(lines)))
        lines.extend(block.code.splitlines())
    return "\n".join(lines) + "\n"


def _host_device_env(count: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.mark.parametrize("page", PAGES)
def test_page_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    text = (DOCS / page).read_text()
    blocks, problems = parse_page(text)
    assert not problems, f"docs/{page}: " + "; ".join(problems)
    if not blocks:
        return
    monkeypatch.chdir(tmp_path)
    count = device_count(text)
    if count is None:
        namespace = {"__name__": "__docs__"}
        for block in blocks:
            # Padding keeps the page's line numbers in tracebacks.
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, f"docs/{page}", "exec"), namespace)
        return
    script = tmp_path / Path(page).with_suffix(".py").name
    script.write_text(_as_script(blocks))
    proc = subprocess.run(
        [sys.executable, str(script)],
        env=_host_device_env(count),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEVICE_PAGE_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"docs/{page} on {count} devices failed (line numbers are the page's):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def nav_pages() -> set[str]:
    """The pages named in ``mkdocs.yml``'s ``nav``, relative to ``docs/``."""
    text = MKDOCS_YML.read_text()
    try:
        import yaml  # PyYAML: a dependency of flax and of mkdocs
    except ImportError:
        nav = text.split("\nnav:", 1)[1]
        return set(re.findall(r"(?:^|[\s:-])([\w./-]+\.md)\s*$", nav, flags=re.M))

    class Loader(yaml.SafeLoader):
        """SafeLoader that reads tags it does not know (``!!python/name:``, ``!ENV``) as None."""

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)

    def walk(entry: object) -> list[str]:
        if isinstance(entry, str):
            return [entry] if entry.endswith(".md") else []
        if isinstance(entry, dict):
            return [page for value in entry.values() for page in walk(value)]
        if isinstance(entry, list):
            return [page for item in entry for page in walk(item)]
        return []

    return set(walk(yaml.load(text, Loader=Loader)["nav"]))


def test_every_page_is_in_the_nav():
    missing = sorted(set(PAGES) - nav_pages())
    assert not missing, f"pages under docs/ that mkdocs.yml's nav does not list: {missing}"


def test_page_parser_reads_markers_and_indented_blocks():
    page = "\n".join(
        [
            "<!-- devices: 4 -->",
            "```python",
            "a = 1",
            "```",
            "<!-- not-run: PyTorch -->",
            "```python",
            "import torch",
            "```",
            "* item",
            "",
            "  ```python",
            "  if a:",
            "      b = 2",
            "  ```",
            "```text",
            "<!-- not-run -->",
            "```",
        ]
    )
    blocks, problems = parse_page(page)
    assert [(b.line, b.code) for b in blocks] == [(3, "a = 1\n"), (12, "if a:\n    b = 2\n")]
    assert problems == []
    assert device_count(page) == 4
    assert device_count("# Title") is None
    _, problems = parse_page("<!-- not-run: -->\n```python\nx\n```\n<!-- not-run: why -->\ntext")
    assert problems == [
        "line 1: a not-run marker needs a reason",
        "line 5: a not-run marker must sit right above a python block",
    ]
