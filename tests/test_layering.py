"""The house's layering, checked on the import graph of every module (the data goes one
way; each outside library has one door).

Imports are read from the source with ``ast`` (function-level imports included), so a lazy
``import openai`` inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crctl", "relay_server", "twiml_templates")


def _modules() -> dict[str, set[str]]:
    """Every module of the three packages -> the absolute names it imports."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            imported: set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against this module's package
                        base = parts[: len(parts) - node.level + (path.stem == "__init__")]
                        stem = ".".join([*base, node.module] if node.module else base)
                    else:
                        stem = node.module or ""
                    imported.add(stem)
                    imported.update(f"{stem}.{alias.name}" for alias in node.names)
            graph[name] = imported
    return graph


GRAPH = _modules()


def _importers(prefix: str) -> set[str]:
    return {
        module
        for module, names in GRAPH.items()
        if any(n == prefix or n.startswith(prefix + ".") for n in names)
    }


def test_the_graph_covers_the_house() -> None:
    # a broken walk would make every rule below pass vacuously
    assert {"relay_server.llm", "crctl.cli", "twiml_templates.render"} <= GRAPH.keys()
    assert "openai" in GRAPH["relay_server.llm"]


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("openai", {"relay_server.llm"}),
        ("twilio.rest", {"crctl.provisioning"}),
        ("pyngrok", {"crctl.tunnel"}),
    ],
)
def test_each_outside_service_has_one_door(library: str, allowed: set[str]) -> None:
    assert _importers(library) == allowed


def test_the_relay_never_imports_the_cli() -> None:
    relay = {m for m in GRAPH if m.startswith("relay_server")}
    assert not relay & _importers("crctl")


def test_templates_stand_alone() -> None:
    templates = {m for m in GRAPH if m.startswith("twiml_templates")}
    assert not templates & (_importers("crctl") | _importers("relay_server"))


def test_only_the_cli_prints() -> None:
    # the relay reports through call events and logging; crctl renders them
    assert all(m.startswith("crctl") for m in _importers("rich"))
