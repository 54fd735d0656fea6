"""Helpers shared by the call-log tests (test_events.py, test_tail.py).

A relay with an events database and an API token, one scripted call that produces every kind of
event, and an SSE reader over httpx.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from fakes.fake_llm import FakeLLM, Script, ToolCallSpec
from relay_server.protocol import Error, Language
from tests.support import PUBLIC_URL, RelayServer, TwilioCaller, sign

TOKEN = "crctl-events-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parent.parent

#: The kinds the scripted call produces, in order (``call_part1`` then ``call_part2``).
PART1 = [
    "call.started",
    "caller.speech",
    "caller.speech",
    "llm.request",  # the tool round
    "language",
    "tool.call",
    "agent.reply",  # with the answer's request in it
]
PART2 = [
    "barge_in",
    "turn.timeline",
    "dtmf",
    "agent.reply",
    "error",
    "turn.timeline",
    "socket.closed",
    "session.end",
    "call.status",
]


def client(relay: RelayServer, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=relay.base_url, headers=headers, trust_env=False)


def count(relay: RelayServer, sid: str, kind: str) -> int:
    return sum(1 for e in list(relay.events) if e.call_sid == sid and e.kind == kind)


async def wait_kind(relay: RelayServer, sid: str, kind: str, n: int = 1) -> None:
    """Wait until ``relay`` published ``n`` events of ``kind`` for ``sid``.

    Frames that follow then cannot overtake them.
    """
    deadline = time.monotonic() + 5
    while count(relay, sid, kind) < n:
        assert time.monotonic() < deadline, f"no {kind} #{n} for {sid}: {relay.kinds(sid)}"
        await asyncio.sleep(0.005)


async def post_signed(relay: RelayServer, path: str, params: dict[str, str]) -> httpx.Response:
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + path, params)}
    async with httpx.AsyncClient(base_url=relay.base_url, trust_env=False) as http:
        return await http.post(path, data=params, headers=headers)


async def call_part1(relay: RelayServer, fake_llm: FakeLLM, sid: str) -> TwilioCaller:
    """Setup (custom parameters), a partial and a final prompt.

    The agent switches to Spanish with a tool and answers.
    """
    fake_llm.enqueue(
        Script(tool_calls=[ToolCallSpec("switch_language", '{"language": "es-ES"}')]),
        Script(tokens=["Your order", " has shipped."], ttft=0.05),
    )
    caller = await TwilioCaller(relay, call_sid=sid).connect(custom_parameters={"customerId": "42"})
    await caller.prompt("where is", last=False)
    await caller.prompt("where is my order")
    assert isinstance(await caller.recv(), Language)
    assert await caller.reply_text() == "Your order has shipped."
    await wait_kind(relay, sid, "agent.reply")
    return caller


async def call_part2(relay: RelayServer, caller: TwilioCaller) -> None:
    """A barge-in, a key press (answered), Twilio's 64107 error, the hang-up, then the callbacks.

    The callbacks are the ``/action`` and status callbacks Twilio sends.
    """
    sid = caller.call_sid
    await caller.interrupt("Your order", 640)
    await wait_kind(relay, sid, "barge_in")
    await caller.dtmf("5")
    await caller.reply_text()
    await wait_kind(relay, sid, "agent.reply", 2)
    await caller.send(
        Error(description="Invalid message received, code: 64107, this is not json #1")
    )
    await wait_kind(relay, sid, "error")
    await caller.hangup()
    await wait_kind(relay, sid, "socket.closed")
    action = {
        "CallSid": sid,
        "AccountSid": "AC" + "0" * 32,
        "SessionStatus": "completed",
        "SessionDuration": "8",
    }
    assert (await post_signed(relay, "/action", action)).status_code == 200
    status = {"CallSid": sid, "CallStatus": "completed", "CallDuration": "9"}
    assert (await post_signed(relay, "/status", status)).status_code == 204


async def echo_call(relay: RelayServer, sid: str, text: str = "hello there") -> None:
    """A short call: one turn (the fake LLM's echo), then hang up."""
    caller = await TwilioCaller(relay, call_sid=sid).connect()
    await caller.prompt(text)
    await caller.reply_text()
    await wait_kind(relay, sid, "agent.reply")
    await caller.hangup()
    await wait_kind(relay, sid, "socket.closed")


async def sse(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Events of an open ``/events`` response, each with the SSE ``id:`` it came with."""
    event_id: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith(":"):
            continue
        if not line:
            if data:
                event = json.loads("\n".join(data))
                event["sse_id"] = event_id
                yield event
            event_id, data = None, []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line.startswith("id:"):
            event_id = line[3:].strip()


async def collect(
    http: httpx.AsyncClient,
    params: dict[str, str],
    until: Callable[[list[dict[str, Any]]], bool],
    # the timeout turns a hang into a failing test instead of a stuck one (ASYNC109)
    timeout: float = 10,  # noqa: ASYNC109
    started: asyncio.Event | None = None,
) -> list[dict[str, Any]]:
    """Events from ``/events?params`` until ``until(events)`` holds."""
    got: list[dict[str, Any]] = []

    async def read() -> None:
        async with http.stream("GET", "/events", params=params, timeout=None) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            if started is not None:
                started.set()
            async for event in sse(response):
                got.append(event)
                if until(got):
                    return

    await asyncio.wait_for(read(), timeout)
    return got


def subprocess_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """The environment minus anything that configures crctl or a proxy, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        CRCTL_STATE_DIR=str(state_dir),
        NO_PROXY="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env
