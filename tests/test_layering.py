"""The house's layering, checked on the import graph of every module.

The data goes one way; each outside library has one door.

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
        # the relay's chat model; crctl's judge of `judge:` expectations (and personas)
        ("openai", {"relay_server.llm", "crctl.judge"}),
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


# ------------------------------------------------------------ only protocol/ reads frames

#: The modules that carry ConversationRelay frames: the relay's socket, call and session
#: layers and its agents; crctl's simulated caller and ``crctl call``. They hand frames to
#: ``relay_server.protocol`` (decode / encode, the Twilio side) and never parse JSON themselves.
FRAME_CARRIERS = (
    "relay_server.socket",
    "relay_server.calls",
    "relay_server.session",
    "relay_server.agents",
    "crctl.caller",
    "crctl.call",
    "crctl.call_",
)
#: Every way to turn JSON text into values and back that the environment offers.
JSON_LIBRARIES = ("json", "msgspec.json", "orjson", "ujson", "simplejson", "rapidjson")


def _carries_frames(module: str) -> bool:
    return any(
        module == p or module.startswith(p + ".") or (p.endswith("_") and module.startswith(p))
        for p in FRAME_CARRIERS
    )


def _json_uses(path: Path) -> set[str]:
    """The JSON codecs ``path`` reaches: imported (at any level) or as ``msgspec.json``."""
    used: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "json"
            and isinstance(node.value, ast.Name)
            and node.value.id == "msgspec"
        ):
            names = ["msgspec.json"]
        used.update(n for n in names if n in JSON_LIBRARIES)
    return used


def _module_paths() -> dict[str, Path]:
    paths = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            paths[".".join(parts)] = path
    return paths


def test_the_frame_carriers_are_the_modules_named() -> None:
    # a renamed module would otherwise drop out of the rule below without a sound
    carriers = {m for m in _module_paths() if _carries_frames(m)}
    assert {
        "relay_server.socket",
        "relay_server.calls",
        "relay_server.session",
        "relay_server.agents.llm_agent",
        "crctl.caller.socket",
        "crctl.caller.simulated",
        "crctl.call",
        "crctl.call_script",
    } <= carriers
    assert not any(m.startswith("relay_server.protocol") for m in carriers)


def test_the_check_sees_every_way_to_reach_a_json_codec(tmp_path: Path) -> None:
    # the rule below must not pass because the walk misses a spelling
    spellings = {
        "import json": {"json"},
        "def f():\n    import json as j": {"json"},
        "from json import loads": {"json"},
        "from msgspec import json": {"msgspec.json"},
        "import msgspec.json": {"msgspec.json"},
        "import msgspec\nmsgspec.json.decode(b'{}')": {"msgspec.json"},
        "import msgspec\nx = msgspec.UNSET": set(),
    }
    for source, wanted in spellings.items():
        path = tmp_path / "m.py"
        path.write_text(source)
        assert _json_uses(path) == wanted, source


def test_only_the_protocol_turns_frames_into_values() -> None:
    # DESIGN: one module owns the ConversationRelay wire format; the modules that carry frames
    # pass them to relay_server.protocol and never call json / msgspec.json on them.
    offenders = {
        module: sorted(used)
        for module, path in _module_paths().items()
        if _carries_frames(module) and (used := _json_uses(path))
    }
    assert offenders == {}
