"""``crctl tail`` and ``crctl calls``.

The rendering on a file-backed rich Console and in a pseudo-terminal, ``--json`` lines, reconnecting
across a relay restart, stored calls.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from crctl.cli import app as cli
from crctl.console import CallLog
from crctl.errors import UsageError, exit_code
from crctl.tail import Follower, TailError
from relay_server.events import explain
from tests.events_support import (
    REPO,
    TOKEN,
    call_part1,
    call_part2,
    client,
    echo_call,
    subprocess_env,
)
from tests.support import Pty, TwilioCaller, free_port

CA1, CA2 = "CA" + "1" * 32, "CA" + "2" * 32
ANSI = re.compile(r"\x1b\[[0-9;]*m")


async def stored_call(relay_factory, fake_llm, tmp_path: Path) -> list[dict[str, Any]]:
    """The events of a real call with every kind of event, as the relay serves them."""
    relay = relay_factory(api_token=TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    await call_part2(relay, await call_part1(relay, fake_llm, CA1))
    async with client(relay) as http:
        events: list[dict[str, Any]] = (await http.get(f"/calls/{CA1}")).json()["events"]
    return events


def render(events: list[dict[str, Any]], *, colour: bool = False) -> str:
    out = io.StringIO()
    console = Console(
        file=out, width=120, force_terminal=colour, color_system="standard" if colour else None
    )
    CallLog(console).add_all(events)
    return out.getvalue()


# ------------------------------------------------------------------- file-backed Console
async def test_call_log_renders_a_real_call(relay_factory, fake_llm, tmp_path):
    text = render(await stored_call(relay_factory, fake_llm, tmp_path))
    assert "\x1b[" not in text  # a plain file: no escape codes
    lines = text.splitlines()
    assert CA1 in lines[0] and "+15550100001 → +15550100002" in lines[0]
    assert "customerId=42" in lines[0]
    body = [line for line in lines[1:] if line.strip()]
    assert all(line.startswith("┃ ") or line.startswith(" ") for line in body), text

    def line_of(role: str) -> str:
        found = [line for line in lines if re.match(rf"┃ [\d:]{{8}} \S+ {re.escape(role)}\s", line)]
        assert found, f"no {role} line in:\n{text}"
        return found[0]

    assert line_of("caller").endswith("where is my order")
    assert "where is\n" not in text  # partial transcripts are not shown by default
    agent = line_of("agent")
    assert "Your order has shipped." in agent
    assert re.search(r"first token \d+ ms · took \d+ ms", agent), agent
    assert "switch_language" in line_of("tool") and "switched to es-ES" in line_of("tool")
    assert "tts es-ES, transcription es-ES" in line_of("language")
    assert "heard “Your order” after 640 ms" in line_of("barge-in")
    assert "pressed 5" in line_of("keypad")
    error = text[text.index("ERROR") :]
    assert "64107 Invalid message received: Twilio rejected a frame the relay sent" in " ".join(
        error.split()
    )
    assert "fix: check what the agent sends against the protocol" in " ".join(error.split())
    assert "hung up (1000)" in line_of("socket")
    assert "session completed after 8 s" in line_of("end")
    assert "call completed (9 s)" in line_of("status")


def test_call_log_colours_each_call_and_highlights_errors():
    now = time.time()
    events = [
        {"kind": "call.started", "call_sid": CA1, "ts": now, "data": {"from": "+1", "to": "+2"}},
        {"kind": "call.started", "call_sid": CA2, "ts": now, "data": {"from": "+3", "to": "+2"}},
        {"kind": "caller.speech", "call_sid": CA1, "ts": now, "data": {"text": "hi", "last": True}},
        {"kind": "caller.speech", "call_sid": CA2, "ts": now, "data": {"text": "yo", "last": True}},
        {
            "kind": "session.end",
            "call_sid": CA2,
            "ts": now,
            "data": {"status": "failed", "error_code": "64105", **explain(64105)},
        },
        {
            "kind": "llm.fault",
            "call_sid": CA1,
            "ts": now,
            "data": {"kind": "rate_limit", "detail": "HTTP 429", "fix": "slow down"},
        },
    ]
    text = render(events, colour=True)
    lines = text.splitlines()
    bar = re.compile(r"\x1b\[([0-9;]*)m┃")

    def bar_colour(said: str) -> str:
        line = next(line for line in lines if ANSI.sub("", line).endswith(f"caller    {said}"))
        match = bar.match(line)
        assert match, line
        return match.group(1)

    assert bar_colour("hi") != bar_colour("yo")
    assert "\x1b[1;37;41mERROR" in text  # white on red
    plain = ANSI.sub("", text)
    assert "64105 WebSocket ended: The relay's WebSocket closed" in plain
    assert "fix: end calls with an `end` message" in plain
    assert "LLM FAULT rate_limit: HTTP 429" in " ".join(plain.split())
    assert "fix: slow down" in plain


RAW_SSE = b'retry: 1000\n\n: keep-alive\n\nid: 7\ndata: {"a": 1}\n\nid: 9\n\ndata: x\ndata: y\n\n'


def _sse(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)


def test_the_follower_reads_messages_comments_and_ids_and_resumes_after_the_last_id():
    """Comments and ``retry:`` are skipped, an id-only message moves the resume point.

    A multi-line ``data`` is joined; the next request resumes with ``after`` and the token.
    """
    requests: list[httpx.Request] = []

    def relay(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if len(requests) == 1:
            return _sse(RAW_SSE)
        return httpx.Response(401, json={"error": "unauthorized: wrong API token"})

    follower = Follower(
        "http://127.0.0.1:9/",
        token="t0k",
        call=CA1,
        since="1m",
        transport=httpx.MockTransport(relay),
    )
    got: list[str] = []
    notices: list[str] = []
    with pytest.raises(TailError, match="unauthorized: wrong API token"):
        follower.run(got.append, notices.append)
    assert got == ['{"a": 1}', "x\ny"]
    assert follower.last_id == 9
    first, second = (dict(r.url.params) for r in requests)
    assert first == {"call": CA1, "since": "1m"}
    assert second == {"call": CA1, "after": "9"}  # resumes: no since, no gap
    assert all(r.headers["authorization"] == "Bearer t0k" for r in requests)
    assert requests[0].headers["accept"] == "text/event-stream"
    # refused on the way back: the error, not a "reconnected"
    assert notices == ["connected to http://127.0.0.1:9, following its calls (Ctrl-C stops)"]


def test_the_follower_waits_through_5xx_and_says_so_once():
    answers = [httpx.Response(503), httpx.Response(502), _sse(b"id: 3\n\n"), _sse(b"")]

    def relay(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if answers else httpx.Response(403, text="forbidden")

    follower = Follower("http://127.0.0.1:9", transport=httpx.MockTransport(relay))
    notices: list[str] = []
    with pytest.raises(TailError, match="forbidden"):
        follower.run(lambda data: None, notices.append)
    assert notices == [
        "waiting for the relay at http://127.0.0.1:9…",
        "connected to http://127.0.0.1:9, following its calls (Ctrl-C stops)",
        "reconnected to http://127.0.0.1:9",
    ]
    assert follower.last_id == 3


def test_the_follower_refuses_an_address_that_is_not_http():
    with pytest.raises(UsageError, match="http") as refused:
        Follower("ftp://relay").run(lambda data: None, lambda text: None)
    assert exit_code(refused.value) == 2  # a bad flag: usage


# ---------------------------------------------------------------------- pseudo-terminal
class TailPty(Pty):
    """``crctl tail`` on a pseudo-terminal."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        super().__init__(args, env, REPO)

    def text(self) -> str:
        return self.raw

    # The timeout turns a hang into a failure that shows the output so far (ASYNC109).
    async def wait_for(self, needle: str, timeout: float = 10) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while needle not in ANSI.sub("", self.text()):
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, f"{needle!r} not in:\n{self.text()}"
            await asyncio.sleep(0.02)


async def test_tail_in_a_pseudo_terminal_is_coloured_and_ctrl_c_exits_0(
    relay_factory, fake_llm, tmp_path
):
    relay = relay_factory(api_token=TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    env = subprocess_env(tmp_path, TERM="xterm-256color", COLUMNS="120")
    env.pop("NO_COLOR", None)
    args = ["tail", "--url", relay.base_url, "--token", TOKEN, "--since", "1m"]
    term = TailPty([sys.executable, "-m", "crctl", *args], env)
    try:
        await call_part2(relay, await call_part1(relay, fake_llm, CA1))
        await term.wait_for("call completed (9 s)")
        text = term.text()
        plain = ANSI.sub("", text)
        assert "where is my order" in plain and "Your order has shipped." in plain
        assert re.search(r"first token \d+ ms", plain)
        assert "fix: check what the agent sends" in " ".join(plain.split())
        # colours: the call's bar, the caller in green, the error white on red
        assert re.search(r"\x1b\[3[0-7]m┃", text), text
        assert re.search(r"\x1b\[1;32mcaller", text), text
        assert "\x1b[1;37;41mERROR" in text or "\x1b[1;97;41mERROR" in text, text
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert term.proc.wait(5) == 0
        assert "Traceback" not in term.text()
    finally:
        term.close()


# --------------------------------------------------- crctl serve + tail --json, restarted
class Serve:
    """``crctl serve`` as a subprocess (no keys: the echo agent, on 127.0.0.1)."""

    def __init__(self, port: int, env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crctl", "serve", "--port", str(port)],
                cwd=log.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(5) == 0


async def test_tail_json_zero_config_and_reconnect_after_a_relay_restart(tmp_path):
    state = tmp_path / "state"
    port = free_port()
    env = subprocess_env(state)
    log = tmp_path / "serve.log"
    relay = Serve(port, env, log)
    args = ["tail", "--json", "--url", f"http://127.0.0.1:{port}", "--since", "1m"]
    # no --token: it reads the file crctl serve wrote. Popen only starts it; a thread reads its
    # output and this loop watches it with poll().
    tail = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "crctl", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(line.decode() for line in iter(tail.stdout.readline, b""))
    )
    reader.start()

    async def wait_for(sid: str, kind: str) -> None:
        deadline = time.monotonic() + 10
        while not any(f'"{sid}"' in line and f'"kind":"{kind}"' in line for line in lines):
            assert tail.poll() is None, tail.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"no {kind} of {sid} in {lines}"
            await asyncio.sleep(0.02)

    async def call(sid: str, text: str) -> None:
        caller = TwilioCaller(SimpleNamespace(ws_url=relay.ws_url), call_sid=sid, token=None)
        await caller.connect()
        await caller.prompt(text)
        assert await caller.reply_text() == f"You said: {text}"
        await caller.hangup()

    try:
        await call(CA1, "first call")
        await wait_for(CA1, "socket.closed")
        relay.stop()
        relay = Serve(port, env, log)  # the same port, the same events file, the same token
        await call(CA2, "second call")
        await wait_for(CA2, "socket.closed")
        tail.send_signal(signal.SIGINT)
        assert tail.wait(5) == 0
        reader.join(5)
        errors = tail.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        for proc in (tail, relay.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        reader.join(5)  # the pipe is at its end once tail exited
        tail.stdout.close()  # type: ignore[union-attr]
        tail.stderr.close()  # type: ignore[union-attr]

    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert [e["call_sid"] for e in events] == [CA1] * 5 + [CA2] * 5
    assert [e["kind"] for e in events[5:]] == [
        "call.started",
        "caller.speech",
        "agent.reply",
        "turn.timeline",
        "socket.closed",
    ]
    assert events[7]["data"]["text"] == "You said: second call"
    ids = [e["id"] for e in events]
    assert ids == sorted(set(ids))  # resumed after the last id: no gap, no repeat
    assert errors.count("relay went away, reconnecting…") == 1, errors
    assert errors.count("reconnected to http://127.0.0.1") == 1, errors
    # it says when it is connected, before any call (and once: the reconnect says reconnected)
    assert errors.count("connected to http://127.0.0.1") == 2, errors
    assert errors.index("connected to") < errors.index("relay went away")
    token_file = state / "api-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() not in log.read_text()  # never logged
    assert (state / "events.sqlite3").is_file()
    # the hint names crctl as it was run: scripts/dev.sh (relative to the relay's folder) here
    assert re.search(r"call log: \S*(crctl|scripts/dev\.sh) tail --url", log.read_text())


# ------------------------------------------------------------------------ crctl calls
async def test_calls_list_and_show_from_the_database_and_from_the_relay(relay_factory, tmp_path):
    db = tmp_path / "events.sqlite3"
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    await echo_call(relay, CA1, "first one")
    await echo_call(relay, CA2, "second one")
    runner = CliRunner()
    env = {"COLUMNS": "200", "CRCTL_STATE_DIR": str(tmp_path)}

    by_url = await asyncio.to_thread(
        runner.invoke, cli, ["calls", "list", "--url", relay.base_url, "--token", TOKEN], env=env
    )
    assert by_url.exit_code == 0, by_url.output
    assert by_url.output.index(CA2) < by_url.output.index(CA1)  # newest first
    refused = await asyncio.to_thread(
        runner.invoke, cli, ["calls", "list", "--url", relay.base_url, "--token", "x"], env=env
    )
    assert refused.exit_code == 2  # a wrong token is configuration: fix it, then retry
    assert "unauthorized: wrong API token" in refused.output
    # the token and the URL come from .env like every other setting (flags > env > .env)
    (tmp_path / ".env").write_text(f"CRCTL_API_TOKEN={TOKEN}\n")
    from_dotenv = await asyncio.to_thread(
        _in_folder, tmp_path, runner, ["calls", "list", "--url", relay.base_url], env
    )
    assert from_dotenv.exit_code == 0, from_dotenv.output
    assert CA1 in from_dotenv.output and CA2 in from_dotenv.output
    (tmp_path / ".env").unlink()

    relay.stop()  # the database is enough
    listed = runner.invoke(cli, ["calls", "list", "--db", str(db)], env=env)
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.output.splitlines() if line.lstrip("│ ").startswith("CA")]
    assert len(rows) == 2 and CA2 in rows[0] and "hung up" in rows[0]
    assert "+15550100001" in rows[0]

    shown = runner.invoke(cli, ["calls", "show", CA1[:12], "--db", str(db)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "first one" in shown.output and "You said: first one" in shown.output
    assert "second one" not in shown.output
    as_json = runner.invoke(cli, ["calls", "show", CA1, "--db", str(db), "--json"], env=env)
    assert json.loads(as_json.output)["events"][0]["kind"] == "call.started"

    missing = runner.invoke(cli, ["calls", "list", "--db", str(tmp_path / "nope.db")], env=env)
    assert missing.exit_code == 1
    assert "no events database at" in missing.output


def _in_folder(folder: Path, runner: CliRunner, args: list[str], env: dict[str, str]) -> Any:
    """``runner.invoke`` with ``folder`` as the working folder (where the .env files are read)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return runner.invoke(cli, args, env=env)
    finally:
        os.chdir(previous)


async def test_tail_refused_token_is_one_line_and_exit_2(relay_factory, tmp_path):
    relay = relay_factory(api_token=TOKEN, events_db="")
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["tail", "--url", relay.base_url],
        env={"CRCTL_STATE_DIR": str(tmp_path), "CRCTL_API_TOKEN": None},
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "unauthorized" in lines[0] and "--token" in lines[0]


@pytest.mark.parametrize("bad", ["yesterday"])
async def test_tail_bad_since_is_refused(relay_factory, tmp_path, bad):
    relay = relay_factory(api_token=TOKEN, events_db="")
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["tail", "--url", relay.base_url, "--token", TOKEN, "--since", bad],
        env={"CRCTL_STATE_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    assert "since: expected" in result.output
