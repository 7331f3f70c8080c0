"""The package's layout: layers, private names, module size, and where backend devices live."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "optaxclip"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _is_module(dotted: str) -> bool:
    relative = pathlib.Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative).is_dir()


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_no_module_imports_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    offending = [
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("optaxclip")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
        if not _is_module(f"{node.module}.{alias.name}")
    ]
    # A module imported as a name (``from optaxclip import _lowering as lowering``) is used
    # through its public names only.
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "optaxclip"
        for alias in node.names
    }
    offending += [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    ]
    assert not offending, f"{_module_name(path)} reaches private names: {offending}"


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_every_module_holds_at_most_about_400_lines(path):
    assert len(path.read_text().splitlines()) <= 440


def test_barriers_and_platform_switches_live_in_the_lowering_module_only():
    users = {
        _module_name(path)
        for path in MODULES
        if "optimization_barrier" in path.read_text() or "platform_dependent" in path.read_text()
    }
    assert users == {"optaxclip._lowering"}


def test_every_module_under_the_package_belongs_to_one_layer():
    layers = ("_guards", "_transforms", "_engine", "_numerics", "_lowering", "_spec")
    strays = [
        _module_name(path)
        for path in MODULES
        if path.parent != PACKAGE or path.stem not in ("__init__", "_lowering")
        if not any(f"optaxclip.{layer}" in _module_name(path) for layer in layers)
    ]
    assert not strays
