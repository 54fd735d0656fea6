"""The graceful drain (SIGTERM), ``/readyz`` and ``crctl serve --workers N``, on real processes.

Every relay here is a ``crctl serve`` process (tests/cluster_support.py) on a real redis-server,
its model the fake LLM over HTTP, its callers WebSocket clients that sign like Twilio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fakes.fake_llm import FakeLLM, Script
from relay_server.drain import GOODBYE, RECONNECT_CODE
from relay_server.protocol import End, Text
from tests.cluster_support import PATIENCE, Replica
from tests.support import TwilioCaller, free_port

#: Each reply: 30 tokens, 50 ms apart, so a turn is still streaming when SIGTERM comes.
SLOW = Script(tokens=[f"w{i} " for i in range(30)], delay=0.05)


def slow_replies(fake_llm: FakeLLM, script: Script = SLOW) -> None:
    fake_llm.responder = lambda _body: script


def wait_for(predicate: Any, what: str, timeout: float = PATIENCE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def status(replica: Replica, path: str) -> int:
    return httpx.get(replica.base_url + path, timeout=PATIENCE).status_code


def readyz(replica: Replica) -> Any:
    return httpx.get(replica.base_url + "/readyz", timeout=PATIENCE).json()


def sigterm(replica: Replica) -> None:
    assert replica.proc is not None
    replica.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: status(replica, "/readyz") == 503, "/readyz to answer 503")


def sid(i: int) -> str:
    return f"CA{i:032d}"


def drained_events(replica: Replica) -> list[dict[str, Any]]:
    """The ``call.drained`` events in the replica's call log (read after it stopped)."""
    path = replica.home / ".crctl" / "events.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT call_sid, data FROM events WHERE kind = 'call.drained'")
        return [{"call_sid": s, **json.loads(d)} for s, d in rows.fetchall()]


@contextlib.contextmanager
def replica(redis_url: str, llm_url: str, *args: str) -> Any:
    started = Replica(redis_url, llm_url, extra_args=args).start()
    try:
        yield started
    finally:
        started.close()


async def test_sigterm_with_20_live_calls_loses_no_turn(redis_server: Any, fake_llm: FakeLLM):
    """SIGTERM on a replica with 20 turns streaming: none is lost.

    /readyz says 503 at once (/healthz 200), a new socket is refused with 503, every turn in
    progress finishes with last:true, and the process exits 0 once the calls hang up.
    """
    slow_replies(fake_llm)
    with replica(redis_server.url, fake_llm.base_url) as relay:
        callers = [await TwilioCaller(relay, sid(i)).connect() for i in range(20)]  # type: ignore[arg-type]
        for caller in callers:
            await caller.prompt("hello there")
        assert fake_llm.wait_for(lambda: len(fake_llm.records) == 20, PATIENCE)
        sigterm(relay)
        assert status(relay, "/healthz") == 200
        assert readyz(relay)["status"] == "draining"
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await TwilioCaller(relay, sid(99)).connect()  # type: ignore[arg-type]
        assert refused.value.response.status_code == 503
        replies = await asyncio.gather(*(c.reply_text(timeout=PATIENCE) for c in callers))
        assert replies == ["".join(SLOW.tokens)] * 20  # every token of every turn
        for caller in callers:
            assert isinstance(caller.received[-1], Text) and caller.received[-1].last
        assert relay.proc is not None and relay.proc.poll() is None  # the calls are still open
        for caller in callers:
            await caller.hangup()
        assert relay.proc.wait(PATIENCE) == 0
        log = relay.log()
        assert "draining: 20 live call(s)" in log
        assert "drained: every call ended" in log
        assert "Traceback" not in log


TEMPLATE_RECONNECT = """\
extends = "basic"

[relay]
applicationReconnect = true
"""


async def test_drain_timeout_with_redis_and_application_reconnect_closes_with_1012(
    redis_server: Any, fake_llm: FakeLLM, tmp_path: Path
):
    template = tmp_path / "reconnect.toml"
    template.write_text(TEMPLATE_RECONNECT)
    args = ("--drain-timeout", "1", "--twiml-template", str(template))
    with replica(redis_server.url, fake_llm.base_url, *args) as relay:
        caller = await TwilioCaller(relay, sid(1)).connect()  # type: ignore[arg-type]
        await caller.prompt("hello")
        assert (await caller.reply_text(timeout=PATIENCE)).startswith("You said")
        sigterm(relay)
        await asyncio.wait_for(caller.ws.wait_closed(), PATIENCE)
        assert caller.ws.close_code == RECONNECT_CODE
        assert relay.proc is not None and relay.proc.wait(PATIENCE) == 0
        log = relay.log()
        assert f"call {sid(1)}: drain timeout reached: closed with 1012" in log
        assert "drained: drain timeout reached, 1 call(s) closed" in log
        (event,) = drained_events(relay)
        assert event["call_sid"] == sid(1)
        assert event["action"] == "reconnect" and event["code"] == RECONNECT_CODE
        assert event["replica"]


async def test_drain_timeout_without_application_reconnect_ends_politely(
    redis_server: Any, fake_llm: FakeLLM
):
    """Without applicationReconnect (the default template) a call left open ends politely.

    The caller hears the goodbye, then ``end``; Twilio then closes the socket (1000), as after
    an agent's own end.
    """
    with replica(redis_server.url, fake_llm.base_url, "--drain-timeout", "1") as relay:
        caller = await TwilioCaller(relay, sid(2)).connect()  # type: ignore[arg-type]
        sigterm(relay)
        assert await caller.reply_text(timeout=PATIENCE) == GOODBYE
        assert isinstance(await caller.recv(timeout=PATIENCE), End)
        await caller.hangup()
        assert relay.proc is not None and relay.proc.wait(PATIENCE) == 0
        assert f"call {sid(2)}: drain timeout reached: ended politely" in relay.log()
        (event,) = drained_events(relay)
        assert event["call_sid"] == sid(2)
        assert event["action"] == "end" and event["code"] is None


async def test_second_sigterm_stops_at_once(redis_server: Any, fake_llm: FakeLLM):
    """A drain of 300 s (the default) with a call open: a second SIGTERM stops the process."""
    with replica(redis_server.url, fake_llm.base_url) as relay:
        caller = await TwilioCaller(relay, sid(3)).connect()  # type: ignore[arg-type]
        sigterm(relay)
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(PATIENCE) == 0
        await asyncio.wait_for(caller.ws.wait_closed(), PATIENCE)
        assert "SIGTERM again: stopping now" in relay.log()


def test_workers_without_redis_is_one_line_and_exit_2(fake_llm: FakeLLM):
    probe = Replica("redis://127.0.0.1:1/0", fake_llm.base_url)
    args = [sys.executable, "-m", "crctl", "serve", "--port", str(free_port()), "--workers", "2"]
    env = {k: v for k, v in probe.env.items() if k != "TWILIO_AUTH_TOKEN"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=PATIENCE)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "workers" in lines[0] and "--redis-url" in lines[0]


def test_two_workers_share_one_port_and_sigterm_stops_both(redis_server: Any, fake_llm: FakeLLM):
    with replica(redis_server.url, fake_llm.base_url, "--workers", "2") as relay:
        pids: set[int] = set()
        for _ in range(400):  # each request a new connection: the kernel spreads them
            answer = httpx.get(relay.base_url + "/readyz", timeout=PATIENCE)
            assert answer.status_code == 200
            pids.add(answer.json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        assert relay.pid not in pids  # the supervisor serves nothing itself
        assert relay.terminate() == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert relay.log().count("drained: every call ended") == 2


def test_workers_whose_supervisor_is_killed_drain_and_stop(redis_server: Any, fake_llm: FakeLLM):
    """SIGKILL on the supervisor (nothing forwarded): its workers notice, drain and exit."""
    with replica(redis_server.url, fake_llm.base_url, "--workers", "2") as relay:
        pids: set[int] = set()
        for _ in range(400):
            pids.add(httpx.get(relay.base_url + "/readyz", timeout=PATIENCE).json()["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, pids
        relay.kill()

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True

        deadline = time.monotonic() + PATIENCE
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids), "the orphaned workers kept serving"
        assert relay.log().count("supervisor (pid") == 2
