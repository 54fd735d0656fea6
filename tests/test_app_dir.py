"""The README's own agent and tools, run as a user runs them.

``crctl serve --agent my_agent:Parrot --tools my_tools`` from the folder that holds the files,
through the installed ``crctl`` console script (which, unlike ``python -m crctl``, does not put the
current folder on ``sys.path``), driven over a real WebSocket; ``--app-dir`` / ``CRCTL_APP_DIR``
from elsewhere; and the one-line errors for every way naming user code can go wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from relay_server.app import resolve_agent
from relay_server.config import RelayConfig
from relay_server.errors import ConfigError
from relay_server.protocol import Text
from relay_server.tools import load_tool_modules
from tests.support import TwilioCaller, free_port

ROOT = Path(__file__).resolve().parent.parent
#: The venv's console script, as `pip install .` makes it (beside the interpreter).
CRCTL = Path(sys.executable).parent / "crctl"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def readme_module(filename: str) -> str:
    """The README's code block that starts with ``# <filename>``, exactly as printed there."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        if block.startswith(f"# {filename}\n"):
            return block
    raise AssertionError(f"README.md has no ```python block starting with '# {filename}'")


@pytest.fixture
def user_folder(tmp_path: Path) -> Path:
    """A user's project: the README's my_agent.py and my_tools.py, nothing else."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_agent.py").write_text(readme_module("my_agent.py"))
    (folder / "my_tools.py").write_text(readme_module("my_tools.py"))
    return folder


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment minus anything that configures crctl, with scratch state and home."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_", "NGROK_", "PYTHON"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy")
    }
    (tmp_path / "home").mkdir(exist_ok=True)
    env.update(
        HOME=str(tmp_path / "home"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        CRCTL_STATE_DIR=str(tmp_path / "state"),
        CRCTL_EVENTS_DB="",
    )
    env.update(extra)
    return env


def _healthy(port: int) -> bool:
    try:
        with _NO_PROXY.open(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as response:
            return bool(json.loads(response.read())["status"] == "ok")
    except (OSError, ValueError):
        return False


@contextmanager
def crctl_serve(cwd: Path, args: Sequence[str], env: dict[str, str]) -> Iterator[int]:
    """Run ``crctl serve --port <free> *args`` through the console script and yield the port.

    The port is yielded once /healthz answers; the server is always stopped at the end.
    """
    port = free_port()
    log = cwd.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CRCTL), "serve", "--port", str(port), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 20
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"crctl serve did not come up ({proc.poll()}):\n{log.read_text()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_crctl(
    cwd: Path, args: Sequence[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """A crctl command that is expected to stop by itself (a start-up error)."""
    return subprocess.run(
        [str(CRCTL), *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _parrot_reply(port: int, said: str) -> str:
    """One call, as Twilio places it (loopback, no auth token: no signature), one prompt."""
    # the call's own socket URL, from the relay's /twiml
    caller = await TwilioCaller.at(f"http://127.0.0.1:{port}", "CA" + "5" * 32).connect()
    await caller.prompt(said)
    text = ""
    while True:
        frame = await caller.recv(5)
        if isinstance(frame, Text):
            text += frame.token
            if frame.last:
                await caller.hangup()
                return text


def test_the_console_script_is_the_installed_one() -> None:
    assert CRCTL.is_file() and os.access(CRCTL, os.X_OK), CRCTL
    assert "crctl.cli" in CRCTL.read_text()


def test_readme_agent_and_tools_run_from_the_current_folder(
    user_folder: Path, tmp_path: Path
) -> None:
    env = _env(tmp_path)
    args = ["--agent", "my_agent:Parrot", "--tools", "my_tools"]
    with crctl_serve(user_folder, args, env) as port:
        assert asyncio.run(_parrot_reply(port, "hello there")) == "You said hello there"
    log = next(tmp_path.glob("serve-*.log")).read_text()
    assert "agent: Parrot" in log, log


@pytest.mark.parametrize("how", ["--app-dir", "CRCTL_APP_DIR"])
def test_app_dir_imports_from_another_folder(user_folder: Path, tmp_path: Path, how: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    relative = os.path.relpath(user_folder, elsewhere)  # ../project: resolved against the cwd
    args = ["--agent", "my_agent:Parrot", "--tools", "my_tools"]
    if how == "--app-dir":
        env, args = _env(tmp_path), [*args, "--app-dir", relative]
    else:
        env = _env(tmp_path, CRCTL_APP_DIR=relative)
    with crctl_serve(elsewhere, args, env) as port:
        assert asyncio.run(_parrot_reply(port, "from afar")) == "You said from afar"


def test_up_takes_the_app_dir_too(user_folder: Path, tmp_path: Path) -> None:
    """`crctl up --no-tunnel --call` with the README's agent: the same import path as serve."""
    script = tmp_path / "parrot.yaml"
    script.write_text("- say: hello parrot\n  expect:\n    contains: You said hello parrot\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["up", "--port", str(free_port()), "--no-tunnel", "--agent", "my_agent:Parrot"]
    result = run_crctl(
        elsewhere, [*args, "--app-dir", str(user_folder), "--call", str(script)], _env(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 of 1 turns passed" in result.stdout, result.stdout


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit code 2 and said so in one line, without a traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return " ".join(output.split())  # rich may fold the line on a narrow terminal


def test_not_found_says_where_it_looked_and_what_to_do(user_folder: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_crctl(
        elsewhere, ["serve", "--agent", "my_agent:Parrot"], _env(tmp_path, COLUMNS="400")
    )
    line = _one_error_line(result)
    assert (
        f"error: agent 'my_agent:Parrot': no module named 'my_agent' in {elsewhere.resolve()} "
        "(the app dir) or in the installed packages; run crctl from the folder that holds "
        "my_agent.py, or pass --app-dir DIR (env CRCTL_APP_DIR)"
    ) in line


def test_a_missing_dependency_of_the_users_module_is_named_as_such(
    user_folder: Path, tmp_path: Path
) -> None:
    agent = user_folder / "my_agent.py"
    agent.write_text("import crctl_test_not_installed_xyz\n" + agent.read_text())
    result = run_crctl(
        user_folder, ["serve", "--agent", "my_agent:Parrot"], _env(tmp_path, COLUMNS="400")
    )
    line = _one_error_line(result)
    assert "no module named 'my_agent'" not in line
    assert (
        f"error: agent 'my_agent:Parrot': importing my_agent failed at {agent.resolve()}:1: "
        "ModuleNotFoundError: No module named 'crctl_test_not_installed_xyz' (my_agent imports "
        "crctl_test_not_installed_xyz, which is not installed in the Python crctl runs with"
    ) in line


def test_a_missing_app_dir_is_one_line(tmp_path: Path) -> None:
    result = run_crctl(
        tmp_path,
        ["serve", "--agent", "my_agent:Parrot", "--app-dir", str(tmp_path / "nope")],
        _env(tmp_path, COLUMNS="400"),
    )
    assert f"the app dir {tmp_path / 'nope'} is not a folder" in _one_error_line(result)


# ------------------------------------------------------- every message, in this process
@pytest.fixture
def scratch_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what resolve_agent does to sys.path and the module cache, after each test.

    resolve_agent puts the app dir on sys.path (and keeps it, as uvicorn does): undo that after each
    test, and forget the modules it imported (the next test's my_agent differs).
    """
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def _agent(folder: Path, spec: str) -> type:
    return resolve_agent(RelayConfig(agent=spec, app_dir=str(folder)))


AGENT_CASES = [
    # (file contents, --agent, the message after "agent '<spec>': ")
    (
        None,
        "my_agent",
        "expected llm, echo or module:Class (a CallSession subclass); to use a "
        "class from my_agent.py, name it: my_agent:ClassName",
    ),
    (None, "my_agent:", "expected module:Class, e.g. my_agent:MyAgent"),
    (None, "my_agent:Parot", "my_agent ({file}) has no 'Parot'; it defines Parrot"),
    (
        None,
        "my_agent:Prompt",
        "my_agent.Prompt is a class, not a subclass of relay_server.CallSession",
    ),
    (
        None,
        "my_agent:CallSession",
        "my_agent.CallSession is a class, not a subclass of relay_server.CallSession",
    ),
    (
        "def helper():\n    pass\n",
        "my_agent:helper",
        "my_agent.helper is a function, not a subclass of relay_server.CallSession",
    ),
    (
        "x = 1\n",
        "my_agent:Agent",
        "my_agent ({file}) has no 'Agent'; it defines no CallSession subclass",
    ),
    (
        "\n\nx = 1 / 0\n",
        "my_agent:Agent",
        "importing my_agent failed at {file}:3: ZeroDivisionError: division by zero",
    ),
    (
        "def broken(:\n",
        "my_agent:Agent",
        "importing my_agent failed at {file}:1: SyntaxError: invalid syntax",
    ),
    (
        "from relay_server import NoSuchName\n",
        "my_agent:Agent",
        "importing my_agent failed at "
        "{file}:1: ImportError: cannot import name 'NoSuchName' from 'relay_server'",
    ),
]


@pytest.mark.usefixtures("scratch_path")
@pytest.mark.parametrize(("source", "spec", "message"), AGENT_CASES)
def test_agent_errors_are_one_clear_line(
    user_folder: Path, source: str | None, spec: str, message: str
) -> None:
    agent = user_folder / "my_agent.py"
    if source is not None:
        agent.write_text(source)
    with pytest.raises(ConfigError) as caught:
        _agent(user_folder, spec)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"agent {spec!r}: " + message.format(file=agent.resolve())), text


@pytest.mark.usefixtures("scratch_path")
def test_a_package_module_is_found_and_a_missing_one_names_its_path(tmp_path: Path) -> None:
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    (tmp_path / "shop" / "voice.py").write_text(readme_module("my_agent.py"))
    assert _agent(tmp_path, "shop.voice:Parrot").__name__ == "Parrot"
    with pytest.raises(ConfigError, match=r"run crctl from the folder that holds shop/desk\.py"):
        _agent(tmp_path, "shop.desk:Parrot")


@pytest.mark.usefixtures("scratch_path")
def test_the_app_dir_goes_first_on_sys_path_and_stays(user_folder: Path) -> None:
    """The app dir goes on sys.path as with uvicorn's --app-dir: first, and kept.

    First, so a user's module beats an installed one of the same name; kept, since the module may
    import its neighbours later, inside a function.
    """
    (user_folder / "later.py").write_text("ANSWER = 42\n")
    (user_folder / "my_agent.py").write_text(
        readme_module("my_agent.py") + "\n\ndef answer():\n    import later\n\n"
        "    return later.ANSWER\n"
    )
    cls = _agent(user_folder, "my_agent:Parrot")
    assert sys.path[0] == str(user_folder.resolve())
    assert sys.modules[cls.__module__].answer() == 42  # type: ignore[attr-defined]
    _agent(user_folder, "my_agent:Parrot")
    assert sys.path.count(str(user_folder.resolve())) == 1


def test_llm_and_echo_touch_no_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    assert _agent(tmp_path, "echo").__name__ == "EchoAgent"
    assert _agent(tmp_path, "llm").__name__ == "LLMAgent"
    assert sys.path == before


@pytest.mark.usefixtures("scratch_path")
def test_tools_errors_are_one_clear_line(user_folder: Path) -> None:
    tools = user_folder / "my_tools.py"
    assert [t.name for t in load_tool_modules(["my_tools"], str(user_folder))] == ["order_status"]
    (user_folder / "plain.py").write_text("def helper() -> None:\n    pass\n")
    with pytest.raises(ConfigError) as caught:
        load_tool_modules(["plain"], str(user_folder))
    assert str(caught.value) == (
        f"tools 'plain': plain ({(user_folder / 'plain.py').resolve()}) has no @tool function; "
        "mark the functions the model may call with @tool (from relay_server import tool)"
    )
    with pytest.raises(ConfigError, match=r"^tools 'nope': no module named 'nope' in "):
        load_tool_modules(["nope"], str(user_folder))
    (user_folder / "bad_tools.py").write_text(
        "import crctl_test_not_installed_xyz\n" + tools.read_text()
    )
    with pytest.raises(ConfigError) as caught:
        load_tool_modules(["bad_tools"], str(user_folder))
    assert "No module named 'crctl_test_not_installed_xyz' (bad_tools imports" in str(caught.value)
