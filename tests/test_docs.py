"""The Python blocks of the documentation pages run as written, page by page in order.

The blocks of one page share a namespace, as a reader running them one after another would.
"""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
PAGES = ["custom_rules.md"]


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_page_python_blocks_run_in_order(page):
    blocks = _blocks(page)
    assert blocks, f"{page} should show Python examples"
    namespace = {"__name__": f"__docs_{page}__"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"docs/{page}[block {index}]", "exec"), namespace)
