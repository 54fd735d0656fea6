"""Fast start: the everyday commands import none of the server's or the caller's libraries.

``crctl --help`` used to import every command module (openai, Quart, uvicorn, aiohttp,
websockets, the twilio REST client: ~1.7 s). Each command below runs in a fresh interpreter,
through the console-script entry point, and the test fails if a forbidden module is in
``sys.modules`` afterwards. No timing is asserted here: bench/startup.py measures it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from crctl.cli import COMMANDS
from relay_server.store import EventStore

ROOT = Path(__file__).resolve().parent.parent

#: Libraries only serving a relay or placing a call needs.
SERVER_LIBS = (
    "openai",
    "quart",
    "uvicorn",
    "hypercorn",
    "aiohttp",
    "websockets",
    "httpx",
    "httpx2",
)
#: Any I/O library at all: the protocol package is pure.
IO_LIBS = (*SERVER_LIBS, "twilio", "requests", "urllib3", "asyncio", "sqlite3")

#: Run crctl's entry point with ``argv``, then report which watched modules got imported.
_PROBE = """
import importlib, json, sys
args, watched, path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name in json.loads(sys.argv[4]):  # the control: what the check must see
    importlib.import_module(name)
from crctl.cli import main
sys.argv = ["crctl", *args]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
with open(path, "w") as report:
    json.dump({"code": code, "imported": [m for m in watched if m in sys.modules]}, report)
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """No crctl settings from outside, state and home in scratch folders, an empty call log."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_", "PYTHON"))
    }
    (tmp_path / "home").mkdir()
    (tmp_path / "state").mkdir()
    EventStore(str(tmp_path / "state" / "events.sqlite3")).close()  # for `calls list`
    clean.update(HOME=str(tmp_path / "home"), CRCTL_STATE_DIR=str(tmp_path / "state"))
    return clean


def imported_by(
    args: Sequence[str],
    watched: Sequence[str],
    env: dict[str, str],
    tmp_path: Path,
    also: Sequence[str] = (),
) -> tuple[int, list[str]]:
    """The exit code and the watched modules imported for ``crctl *args`` in a fresh interpreter.

    The interpreter imports ``also`` first.
    """
    report = tmp_path / "report.json"
    probe = [_PROBE, json.dumps(list(args)), json.dumps(list(watched)), report, json.dumps(also)]
    result = subprocess.run(
        [sys.executable, "-c", *map(str, probe)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and report.exists(), result.stdout + result.stderr
    data = json.loads(report.read_text())
    return int(data["code"]), list(data["imported"])


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["twiml", "--help"],
        ["twiml", "list"],
        ["twiml", "show", "basic"],
        ["twiml", "render", "basic", "--url", "wss://relay.example.test/ws"],
        ["calls", "--help"],
        ["calls", "list"],
        ["tail", "--help"],
        ["serve", "--help"],
        ["test", "--help"],
    ],
    ids=" ".join,
)
def test_everyday_commands_import_no_server_library(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    code, imported = imported_by(args, [*SERVER_LIBS, "twilio.rest"], env, tmp_path)
    assert code == 0
    assert imported == [], f"crctl {' '.join(args)} imported {imported}"


def test_a_bad_setting_stops_serve_before_the_server_is_loaded(
    env: dict[str, str], tmp_path: Path
) -> None:
    code, imported = imported_by(["serve", "--port", "0"], SERVER_LIBS, env, tmp_path)
    assert code == 2
    assert imported == []


@pytest.mark.parametrize(
    "args", [["numbers", "--help"], ["app", "--help"], ["whoami", "--help"]], ids=" ".join
)
def test_number_commands_import_no_server_library(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    # (they still import the twilio REST client: crctl/provisioning.py imports it at the top)
    code, imported = imported_by(args, SERVER_LIBS, env, tmp_path)
    assert code == 0
    assert imported == [], f"crctl {' '.join(args)} imported {imported}"


def test_the_probe_sees_imports(env: dict[str, str], tmp_path: Path) -> None:
    """The checks above can fail: a server library imported in the process is reported."""
    code, imported = imported_by(["--help"], SERVER_LIBS, env, tmp_path, also=["uvicorn"])
    assert code == 0
    assert imported == ["uvicorn"]


def test_the_protocol_package_imports_no_io_library(env: dict[str, str], tmp_path: Path) -> None:
    probe = (
        "import json, sys; import relay_server.protocol; "
        f"print(json.dumps([m for m in {list(IO_LIBS)!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_the_lazy_packages_keep_their_public_names() -> None:
    import relay_server
    import relay_server.agents
    from relay_server.agents.echo import EchoAgent
    from relay_server.session import CallSession
    from relay_server.tools import tool

    assert relay_server.CallSession is CallSession and relay_server.tool is tool
    assert relay_server.agents.EchoAgent is EchoAgent and relay_server.EchoAgent is EchoAgent
    for name in relay_server.__all__:
        assert getattr(relay_server, name) is not None
        assert name in dir(relay_server)
    for name in relay_server.agents.__all__:
        assert getattr(relay_server.agents, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        relay_server.Nope  # noqa: B018
    with pytest.raises(ImportError):
        from relay_server import Nope  # noqa: F401


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lines_are_the_commands_own(name: str) -> None:
    """`crctl --help` shows the help lines written in cli.py without importing the commands.

    They must be the first paragraph of each command's own help.
    """
    real = COMMANDS[name].load(name)
    assert real.name == name
    assert (real.help or "").split("\n\n")[0] == COMMANDS[name].help


def test_root_help_lists_every_command_once(env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crctl", "--help"],
        cwd=tmp_path,
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    listed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│ ")]
    assert [n for n in listed if n in COMMANDS] == list(COMMANDS)
