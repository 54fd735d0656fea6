"""Every command's --help speaks in one voice (crctl/helptext.py).

Real metavars, every option described, environment names and defaults said once, -h as well as
--help, and `crctl up` taking every agent flag `crctl serve` takes.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.core import TyperArgument, TyperOption
from typer.testing import CliRunner

from crctl import console
from crctl.cli import COMMANDS, app
from crctl.helptext import env_names_in

runner = CliRunner()
WIDE = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def _commands() -> Iterator[tuple[list[str], Any]]:
    """(path, click command) for every command and subcommand."""

    def walk(path: list[str], command: Any) -> Iterator[tuple[list[str], Any]]:
        yield path, command
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            yield from walk([*path, name], sub)

    for name, lazy in COMMANDS.items():
        yield from walk([name], lazy.load(name))


ALL = list(_commands())
IDS = [" ".join(path) for path, _ in ALL]


def _help(args: list[str]) -> str:
    result = runner.invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_walked() -> None:
    # the tree is really there: commands, subcommands of the groups
    assert {"serve", "up", "call", "tail", "calls list", "twiml render", "numbers point"} <= set(
        IDS
    )


@pytest.mark.parametrize(("path", "command"), ALL, ids=IDS)
def test_help_shows_real_metavars_and_no_typer_brackets(path: list[str], command: Any) -> None:
    text = _help([*path, "--help"])
    assert not re.search(r"<(str|int|float|bool|path|list\[[^>]*\]|[a-z]+ range)>", text), text
    assert "[env var:" not in text and "[default:" not in text, text
    # -h is the same help
    assert _help([*path, "-h"]) == text


@pytest.mark.parametrize(("path", "command"), ALL, ids=IDS)
def test_every_parameter_is_described_once(path: list[str], command: Any) -> None:
    _help([*path, "--help"])  # builds the help option too
    for param in command.params:
        if not isinstance(param, (TyperOption, TyperArgument)):
            continue
        name = param.opts[0]
        text = param.help or ""
        # said in words, not only "(env X)"
        assert re.sub(r"\([^()]*\)", "", text).strip(), f"{path} {name}: no description"
        envs = env_names_in(text)
        assert len(envs) == len(set(envs)), f"{path} {name}: env said twice: {text}"
        assert text.count("default") <= 1, f"{path} {name}: default said twice: {text}"
        if isinstance(param, TyperOption) and not param.is_flag:
            assert param.metavar and not param.metavar.startswith("<"), (path, name)
        if isinstance(param, TyperOption) and param.is_flag:
            assert param.metavar == "", (path, name)


def test_serve_options_name_env_and_default_from_settings() -> None:
    text = " ".join(_help(["serve", "--help"]).split())
    assert "--port PORT Port of the relay. (env CRCTL_PORT; default 8080)" in text
    assert "(env OPENAI_BASE_URL)" in text
    assert "--llm-timeout SECONDS" in text and "(env CRCTL_LLM_TIMEOUT; default 15)" in text


def test_up_takes_every_agent_flag_serve_takes() -> None:
    serve = {p.name for p in dict(ALL_BY_PATH)["serve"].params}
    up = {p.name for p in dict(ALL_BY_PATH)["up"].params}
    # serve-only: where and how the relay listens (up binds 127.0.0.1 and checks signatures
    # against its own tunnel; the drain and the workers are a deployment's)
    assert serve - up == {"host", "verify_signatures", "drain_timeout", "workers"}


ALL_BY_PATH = [(" ".join(path), command) for path, command in ALL]


def test_root_help_has_short_flag_and_no_type_column() -> None:
    text = _help(["-h"])
    assert "--version" in text and "<bool>" not in text


def test_a_printed_hint_runs_as_printed(tmp_path: Path) -> None:
    """Run from a checkout's .venv, crctl is not on PATH: its hints name scripts/dev.sh instead.

    That path is relative to where the user is, and that command is really there and runs.
    """
    missing = tmp_path / "none.sqlite3"
    env = {**os.environ, "CRCTL_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "crctl", "calls", "list", "--db", str(missing)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    hint = re.search(r"`([^`]+) serve` creates it", done.stderr)
    assert hint, done.stderr
    command = hint.group(1)
    if Path(sys.prefix).name == ".venv" and (Path(sys.prefix).parent / "scripts").is_dir():
        assert command.endswith("scripts/dev.sh"), command
    ran = subprocess.run(
        [*shlex.split(command), "calls", "list", "--db", str(missing)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.stderr == done.stderr  # the same crctl answered


def test_hints_keep_crctl_when_it_is_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "crctl_command", lambda: "crctl")
    assert console.runnable("run `crctl numbers list`") == "run `crctl numbers list`"
    monkeypatch.setattr(console, "crctl_command", lambda: "python -m crctl")
    assert console.runnable("run `crctl numbers list`") == "run `python -m crctl numbers list`"
