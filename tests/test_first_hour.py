"""The first hour without surprises (issue 8, item 6).

A local model with one variable, the LLM and its reachability said at start, faults said as what
they are and once, pushed messages in the call log, one name for latency (first token), ``call_sid``
in every JSON output.

``crctl serve`` and ``crctl up`` run as real processes against the fake LLM over real HTTP; an
unresolvable host is a ``.invalid`` name (it never resolves, and fails fast offline) and a
closed port is a port nothing listens on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from rich.console import Console

from crctl.console import CallLog
from fakes.fake_llm import FakeLLM, Script
from relay_server import events as ev
from relay_server.config import LLMConfig
from relay_server.errors import ConfigError
from relay_server.llm import check_llm
from relay_server.protocol import SendDigits, Text, encode
from relay_server.store import EventStore
from tests.events_support import AUTH, TOKEN
from tests.support import TwilioCaller, free_port, wait_until
from tests.test_cli_serve import _connect, _env, _open, _spoken, _turn, serve

ROOT = Path(__file__).resolve().parent.parent
UNRESOLVABLE = "http://llm.invalid/v1"


def _closed() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def _run(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crctl", *args],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


def _render(*events: dict[str, Any]) -> str:
    console = Console(width=400, record=True, force_terminal=False)
    CallLog(console).add_all(events)
    return console.export_text()


# ------------------------------------------------------------ (a) a local model, one variable


def test_resolving_an_unresolvable_name_fails_fast_offline() -> None:
    # What the tests below rely on: a .invalid name never resolves, and says so at once.
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("llm.invalid", 80)


async def test_the_servers_only_model_is_used_and_said(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.models = ["llama3.2:1b"]
    with serve(tmp_path, [], _env(OPENAI_BASE_URL=fake_llm.base_url)) as relay:
        banner = relay.stderr
        assert f"LLM: {fake_llm.base_url}" in banner, banner
        assert f"model: llama3.2:1b (the only model {fake_llm.base_url} lists)" in banner
        assert "warning: LLM" not in banner
        async with _connect(relay, None) as ws:  # the socket URL /twiml gives CALL
            assert _spoken(await _turn(await _open(ws), "hi")) == "You said: hi"
        assert fake_llm.records[-1].body["model"] == "llama3.2:1b"
        assert relay.terminate() == 0


def test_several_models_stop_start_with_one_line_saying_how_to_pick(
    tmp_path: Path, fake_llm: FakeLLM
) -> None:
    fake_llm.models = ["qwen2.5:7b", "llama3.2:1b"]
    line = _one_error_line(_run(tmp_path, ["serve"], _env(OPENAI_BASE_URL=fake_llm.base_url)))
    assert "lists 2: llama3.2:1b, qwen2.5:7b" in line
    assert "--model NAME" in line and "CRCTL_MODEL" in line


def test_a_chosen_model_needs_no_discovery(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.models = ["qwen2.5:7b", "llama3.2:1b"]
    env = _env(OPENAI_BASE_URL=fake_llm.base_url, CRCTL_MODEL="qwen2.5:7b")
    with serve(tmp_path, [], env) as relay:
        assert "model: qwen2.5:7b" in relay.stderr
        assert "(the only model" not in relay.stderr and "warning: LLM" not in relay.stderr
        assert relay.terminate() == 0


@pytest.mark.parametrize("where", ["none", "unresolvable", "closed"])
def test_no_model_and_nothing_to_pick_from_is_one_line(
    tmp_path: Path, fake_llm: FakeLLM, where: str
) -> None:
    fake_llm.models = []
    base = {"none": fake_llm.base_url, "unresolvable": UNRESOLVABLE, "closed": _closed()}[where]
    line = _one_error_line(_run(tmp_path, ["serve"], _env(OPENAI_BASE_URL=base)))
    assert "no model chosen" in line and "--model NAME" in line
    expected = {
        "none": "lists none",
        "unresolvable": "cannot resolve host llm.invalid",
        "closed": f"connection refused to 127.0.0.1:{urlsplit(base).port}",
    }[where]
    assert expected in line, line
    assert "timeout" not in line and "timed out" not in line


def test_the_check_in_words(fake_llm: FakeLLM) -> None:
    config = LLMConfig(base_url=fake_llm.base_url)
    found = check_llm(config, None, "gpt-4o-mini")
    assert (found.model, found.warning) == ("fake-llm", None)
    assert fake_llm.models_requests == 1  # one GET /models at start
    listed = check_llm(config, "other", "gpt-4o-mini")
    assert listed.model == "other" and listed.source == "given"
    assert listed.warning is not None and "not one the LLM" in listed.warning
    fake_llm.models_status = 401
    refused = check_llm(config, "m", "gpt-4o-mini")
    assert refused.warning is not None and "OPENAI_API_KEY" in refused.warning
    with pytest.raises(ConfigError, match="HTTP 401"):
        check_llm(config, None, "gpt-4o-mini")
    fake_llm.models_status = 404  # a server without GET /models is still reachable
    assert check_llm(config, "m", "gpt-4o-mini").warning is None


# ------------------------------------------------------------ (b) reachability, subclasses


@pytest.mark.parametrize("where", ["unresolvable", "closed"])
def test_an_unreachable_llm_is_a_warning_at_start_not_a_stop(tmp_path: Path, where: str) -> None:
    base = UNRESOLVABLE if where == "unresolvable" else _closed()
    env = _env(OPENAI_BASE_URL=base, CRCTL_MODEL="llama3.2:1b")
    with serve(tmp_path, [], env) as relay:
        warnings = [line for line in relay.stderr.splitlines() if "LLM not reachable" in line]
        assert len(warnings) == 1, relay.stderr
        assert warnings[0].startswith("warning: ")
        host = urlsplit(base).netloc
        reason = "cannot resolve host" if where == "unresolvable" else "connection refused to"
        assert f"{reason} {host}" in warnings[0]
        assert relay.terminate() == 0


def test_an_llm_agent_subclass_without_an_llm_is_one_line_at_start(tmp_path: Path) -> None:
    (tmp_path / "my_agent.py").write_text(
        "from relay_server import LLMAgent\n\n\nclass MyLLM(LLMAgent):\n    pass\n"
    )
    env = _env(PYTHONPATH=str(ROOT))
    line = _one_error_line(_run(tmp_path, ["serve", "--agent", "my_agent:MyLLM"], env))
    assert "MyLLM" in line and "OPENAI_API_KEY" in line and "OPENAI_BASE_URL" in line
    # ... while the default agent still falls back to echo without a word of error
    with serve(tmp_path, [], env) as relay:
        assert "agent: echo" in relay.stderr
        assert relay.terminate() == 0


# ------------------------------------------------------------ (c) faults said as they are


@pytest.mark.parametrize("where", ["unresolvable", "closed"])
async def test_an_unreachable_llm_is_said_as_that(relay_factory: Any, where: str) -> None:
    base = UNRESOLVABLE if where == "unresolvable" else _closed()
    relay = relay_factory(llm_base_url=base)
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hello")
    assert await caller.reply_text() == relay.config.agent_config.apology
    faults = [e for e in list(relay.events) if e.kind == ev.LLM_FAULT]
    assert len(faults) == 1
    data = faults[0].data
    assert data["kind"] == "connection"
    if where == "unresolvable":
        assert data["detail"] == "cannot resolve host llm.invalid"
        assert "host name" in data["fix"]
    else:
        assert data["detail"] == f"connection refused to {urlsplit(base).netloc}"
        assert "start the model server" in data["fix"]
    assert ev.ERROR not in relay.kinds(caller.call_sid)  # one event for one fault
    shown = _render({"kind": ev.LLM_FAULT, "call_sid": caller.call_sid, "ts": 0, "data": data})
    assert f"LLM unreachable: {data['detail']}" in shown
    assert "timeout" not in shown
    await caller.hangup()


def test_up_local_only_shows_the_llm_and_says_a_fault_once(tmp_path: Path) -> None:
    closed = _closed()
    env = _env(
        OPENAI_BASE_URL=closed,
        CRCTL_MODEL="llama3.2:1b",
        CRCTL_EVENTS_DB="",
        HOME=str(tmp_path),  # no twilio-cli profile of the machine's user
        COLUMNS="200",
        PYTHONPATH=str(ROOT),
    )
    output = _up_live_log(tmp_path, env, [], _one_turn, ["LLM FAULT"])
    assert re.search(rf"LLM\s+{re.escape(closed)}", output), output
    assert re.search(r"model\s+llama3\.2:1b", output), output
    assert output.count("LLM not reachable") == 1, output
    assert "Twilio not configured" not in output
    assert output.count(f"connection refused to {urlsplit(closed).netloc}") == 2, (
        output
    )  # start + call
    assert output.count("LLM FAULT") == 1, output
    assert "LLM fault" not in output  # the relay's log line is said by the event instead


BROKEN_AGENT = """
from relay_server import CallSession


class Broken(CallSession):
    async def on_prompt(self, prompt):
        if prompt.last:
            await self.start_turn(self.answer())

    async def answer(self):
        await self.send_text("Let me see")
        raise ValueError("no such order")
"""


def test_up_says_an_agent_failure_and_a_bad_frame_once_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_agent.py").write_text(BROKEN_AGENT)
    env = _env(
        CRCTL_EVENTS_DB="",
        HOME=str(tmp_path),
        COLUMNS="200",
        PYTHONPATH=os.pathsep.join((str(ROOT), str(tmp_path))),
    )
    output = _up_live_log(
        tmp_path,
        env,
        ["--agent", "broken_agent:Broken"],
        _broken_turn,
        ["no such order", "dropped:"],
    )
    # the event: the exception and where it was raised, once; no traceback in the live log
    assert output.count("turn failed: ValueError: no such order (broken_agent.py:") == 1, output
    assert "in answer)" in output
    assert "Traceback" not in output and "turn failed on" not in output, output
    # a bad frame: the event once, not also the relay's log line
    assert output.count("dropped:") == 1, output
    assert ": bad frame dropped" not in output, output


async def _broken_turn(port: int) -> None:
    # the socket URL comes from the relay's /twiml: one per call
    caller = await TwilioCaller.at(f"http://127.0.0.1:{port}", "CA" + "3" * 32).connect()
    await caller.prompt("where is it")
    await caller.recv_turn()  # "Let me see", then the session closes the talk cycle
    await caller.send("this is not json")  # raw on purpose: the bad frame the log must show
    await caller.prompt("hello?", last=False)
    await caller.hangup()


def _up_live_log(
    tmp_path: Path,
    env: dict[str, str],
    args: list[str],
    drive: Any,
    shown: list[str],
) -> str:
    """Run ``crctl up --no-tunnel`` as a process and ``drive(port)`` a call through it.

    Wait until the live log shows each of ``shown``, stop it with SIGINT; return its output.
    """
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crctl", "up", "--no-tunnel", "--port", str(port), *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert wait_until(lambda: _healthy(port), 30), log.read_text()
        asyncio_run(drive(port))
        for needle in shown:
            assert wait_until(lambda n=needle: n in log.read_text(), 10), log.read_text()
        time.sleep(0.3)  # a second rendering or log line would come right after the first
    finally:
        proc.send_signal(2)
        try:
            proc.wait(15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log.read_text()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


async def _one_turn(port: int) -> None:
    # the socket URL comes from the relay's /twiml: one per call
    caller = await TwilioCaller.at(f"http://127.0.0.1:{port}", "CA" + "2" * 32).connect()
    await _turn(caller, "hello")
    await caller.hangup()


# ------------------------------------------------------------ (d) pushed messages


async def test_a_pushed_message_is_a_call_event(relay_factory: Any) -> None:
    relay = relay_factory(api_token=TOKEN)
    caller = await TwilioCaller(relay).connect()
    async with httpx.AsyncClient(base_url=relay.base_url, headers=AUTH, trust_env=False) as http:
        frame = Text(token="A supervisor joined.", last=True)
        answer = await http.post(f"/calls/{caller.call_sid}/messages", content=encode(frame))
        assert answer.status_code == 202, answer.text
        assert await caller.recv() == frame
        digits = encode(SendDigits(digits="12#"))
        assert (await http.post(f"/calls/{caller.call_sid}/messages", content=digits)).is_success
    assert wait_until(lambda: relay.kinds(caller.call_sid).count(ev.AGENT_PUSHED) == 2)
    pushed = [e.data for e in list(relay.events) if e.kind == ev.AGENT_PUSHED]
    assert pushed == [
        {"type": "text", "text": "A supervisor joined.", "last": True},
        {"type": "sendDigits", "text": "12#"},
    ]
    shown = _render(
        *(
            {"kind": ev.AGENT_PUSHED, "call_sid": caller.call_sid, "ts": 0, "data": d}
            for d in pushed
        )
    )
    assert "pushed" in shown and "text: A supervisor joined." in shown
    assert "sendDigits: 12#" in shown
    await caller.hangup()


# ------------------------------------------------------------ (e) first token


async def test_first_token_counts_from_the_end_of_the_callers_turn(
    relay_factory: Any, fake_llm: FakeLLM
) -> None:
    relay = relay_factory(agent_silence_timeout=0.3, agent_silence_max_reminders=1)
    fake_llm.enqueue(Script(tokens=["Found", " it."], ttft=0.2))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("look it up")
    assert await caller.reply_text() == "Found it."
    await caller.dtmf("5")
    await caller.reply_text()
    assert await caller.reply_text(timeout=5) == relay.config.agent_config.silence_reminder
    assert wait_until(lambda: relay.kinds(caller.call_sid).count(ev.AGENT_REPLY) == 3)
    replies = [e.data for e in list(relay.events) if e.kind == ev.AGENT_REPLY]
    assert all("ttft_ms" not in r for r in replies)
    assert replies[0]["first_token_ms"] >= 200  # the fake LLM waited 200 ms
    assert replies[0]["duration_ms"] >= replies[0]["first_token_ms"]
    assert replies[1]["first_token_ms"] is not None  # a key is a turn too
    assert replies[2]["first_token_ms"] is None  # a reminder answers no turn
    await caller.hangup()


def test_old_rows_with_ttft_ms_render_as_first_token() -> None:
    old = {"kind": "agent.reply", "call_sid": "CA1", "ts": 0, "data": {"text": "Hi", "ttft_ms": 5}}
    new = {"kind": "agent.reply", "call_sid": "CA1", "ts": 0, "data": {"first_token_ms": 312.4}}
    shown = _render(old, new)
    assert "first token 5 ms" in shown and "first token 312 ms" in shown
    assert "ttft" not in shown


def test_calls_json_says_call_sid_and_the_list_shows_whole_sids(tmp_path: Path) -> None:
    db = tmp_path / "events.sqlite3"
    sid = "CA" + "0123456789abcdef" * 2
    store = EventStore(db)
    store.append(ev.build(ev.CALL_STARTED, sid, {"from": "+15550100001", "to": "+1555"}))
    store.append(ev.build(ev.AGENT_REPLY, sid, {"text": "hi", "first_token_ms": 1.0}))
    store.close()
    env = _env(COLUMNS="60")
    listed = _run(tmp_path, ["calls", "list", "--db", str(db), "--json"], env)
    assert listed.returncode == 0, listed.stderr
    row = json.loads(listed.stdout.splitlines()[0])
    assert row["call_sid"] == sid and "sid" not in row
    shown = _run(tmp_path, ["calls", "show", sid[:10], "--db", str(db), "--json"], env)
    call = json.loads(shown.stdout)
    assert call["call_sid"] == sid and "sid" not in call
    assert {e["call_sid"] for e in call["events"]} == {sid}
    table = _run(tmp_path, ["calls", "list", "--db", str(db)], env)
    assert table.returncode == 0, table.stderr
    assert sid in table.stdout, table.stdout  # whole, on a 60-column terminal
    assert os.environ.get("CRCTL_STATE_DIR")  # nothing of this went to the home folder
