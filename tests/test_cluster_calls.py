"""Calls across replicas (``crctl serve --redis-url``): resumes, reconnects, the shared replay set.

Real ``crctl serve`` processes on a real redis-server, the fake LLM over HTTP, a WebSocket client
that signs like Twilio. Every wait is for a condition, with a generous bound.
"""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.exceptions import InvalidStatus

from tests.cluster_support import Replica, replicas
from tests.support import PUBLIC_URL, TwilioCaller, sign

RECONNECT_GREETING = "Sorry, we were cut off. Where were we?"
WS_PUBLIC = PUBLIC_URL.replace("https://", "wss://") + "/ws"
PATIENCE = 60.0


async def until(predicate: Callable[[], Awaitable[bool]], patience: float = PATIENCE) -> None:
    """Wait for ``predicate`` (a generous bound, never the figure under test)."""
    deadline = asyncio.get_running_loop().time() + patience
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def kept(redis_url: str, call_sid: str) -> list[dict[str, Any]]:
    """The conversation Redis keeps for ``call_sid`` (``[]``: none, or Redis away)."""
    client = aioredis.from_url(redis_url)
    try:
        raw = await client.get(f"crctl:conv:{call_sid}")
    except Exception:
        return []
    finally:
        await client.aclose()
    return json.loads(raw) if raw else []


async def kept_says(redis_url: str, call_sid: str, text: str) -> bool:
    return any(m.get("content") == text for m in await kept(redis_url, call_sid))


async def alive(redis_url: str) -> int:
    """How many replicas' alive keys Redis holds."""
    client = aioredis.from_url(redis_url)
    try:
        return len(await client.keys("crctl:replica:*"))
    finally:
        await client.aclose()


async def exchange(caller: TwilioCaller, said: str) -> str:
    await caller.prompt(said)
    return await caller.reply_text(timeout=PATIENCE)


def contents(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in messages]


async def failed_action(replica: Replica, call_sid: str) -> ET.Element:
    """The ``/action`` Twilio posts when the socket failed (64105), signed as Twilio signs it."""
    form = {
        "AccountSid": "AC" + "0" * 32,
        "CallSid": call_sid,
        "CallStatus": "in-progress",
        "SessionId": "VX" + call_sid[2:],
        "SessionStatus": "failed",
        "SessionDuration": "8",
        "ErrorCode": "64105",
        "ErrorMessage": "Websocket ended",
    }
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/action", form)}
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(replica.base_url + "/action", data=form, headers=headers)
    assert response.status_code == 200, response.text
    return ET.fromstring(response.text)


async def refused(replica: Replica, query: str) -> int:
    """Open ``replica``'s socket with ``query``, signed; the HTTP status of its refusal."""
    headers = {"X-Twilio-Signature": sign(WS_PUBLIC, dict(parse_qsl(query)))}
    with pytest.raises(InvalidStatus) as info:
        ws = await websockets.connect(
            replica.ws_url + "?" + query, additional_headers=headers, open_timeout=10
        )
        await ws.close()
    return int(info.value.response.status_code)


async def test_a_call_resumes_on_b_after_its_replica_is_killed(redis_server, fake_llm):
    sid = "CA" + "a" * 32
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await TwilioCaller(a, sid).connect()
        assert await exchange(caller, "my order is 42") == "You said: my order is 42"
        await until(lambda: kept_says(redis_server.url, sid, "You said: my order is 42"))
        a.kill()  # SIGKILL mid-call: nothing of A's memory survives

        root = await failed_action(b, sid)
        relay_el = root.find("Connect/ConversationRelay")
        assert relay_el is not None, ET.tostring(root)
        assert relay_el.get("welcomeGreeting") == RECONNECT_GREETING
        query = urlsplit(relay_el.get("url", "")).query
        assert dict(parse_qsl(query))["callSid"] == sid

        again = await TwilioCaller(b, sid).connect(
            query=query, call_status="IN_PROGRESS", session_id="VX" + "2" * 32
        )
        assert await exchange(again, "what was it") == "You said: what was it"
        sent = contents(fake_llm.records[-1].body["messages"])
        await again.hangup()
    assert sent[-4:] == [
        ("user", "my order is 42"),  # turn 1, said on A, reached B through Redis
        ("assistant", "You said: my order is 42"),
        ("assistant", RECONNECT_GREETING),  # heard by the caller on the new socket
        ("user", "what was it"),
    ]


async def test_application_reconnect_resumes_on_b_and_replays_are_not_answered_twice(
    redis_server, fake_llm
):
    sid = "CA" + "b" * 32
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await TwilioCaller(a, sid).connect()
        assert await exchange(caller, "hello") == "You said: hello"
        await until(lambda: kept_says(redis_server.url, sid, "You said: hello"))
        a.kill()

        async def a_is_gone() -> bool:
            return await alive(redis_server.url) == 1

        await until(a_is_gone)  # A's alive key lapsed: no live replica holds the call
        # Twilio's applicationReconnect: the same URL again, a setup for the same call, then
        # the events it buffered (here the prompt A already answered), then new speech.
        again = await TwilioCaller(b, sid).connect(query=caller.query, call_status="IN_PROGRESS")
        await again.prompt("hello")
        assert await exchange(again, "and again") == "You said: and again"
        sent = contents(fake_llm.records[-1].body["messages"])
        await again.hangup()
    assert len(fake_llm.records) == 2  # "hello" was answered once, on A
    assert ("user", "hello") in sent and ("assistant", "You said: hello") in sent
    assert sent[-1] == ("user", "and again")
    assert sent.index(("assistant", "You said: hello")) < sent.index(("user", "and again"))


async def test_a_socket_token_used_on_a_is_refused_on_b(redis_server, fake_llm):
    sid = "CA" + "c" * 32
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await TwilioCaller(a, sid).connect()
        assert await exchange(caller, "hi") == "You said: hi"
        query = caller.query or ""
        assert await refused(b, query) == 403  # open on A: not a second socket on B
        assert "already in use by an open socket on another replica" in b.log()
        await caller.hangup()  # 1000: the URL is spent, everywhere

        async def b_refuses_spent() -> bool:
            return await refused(b, query) == 403 and "already used" in b.log()

        await until(b_refuses_spent)
        assert "Traceback" not in a.log() + b.log()


async def test_redis_stopped_mid_call_the_call_goes_on_and_is_kept_again_after(
    redis_server, fake_llm
):
    sid = "CA" + "d" * 32
    with replicas(redis_server.url, fake_llm.base_url, count=1) as (a,):
        caller = await TwilioCaller(a, sid).connect()
        assert await exchange(caller, "one") == "You said: one"
        await until(lambda: kept_says(redis_server.url, sid, "You said: one"))

        redis_server.stop()
        assert await exchange(caller, "two") == "You said: two"
        assert await exchange(caller, "three") == "You said: three"

        async def fault_said() -> bool:  # the writer met the outage (it gathers for a moment)
            return "conversations are kept again when" in a.log()

        await until(fault_said)
        redis_server.start()  # same port, empty: the next turn boundary writes the call again
        assert await exchange(caller, "four") == "You said: four"
        await until(lambda: kept_says(redis_server.url, sid, "You said: four"))
        conversation = contents(await kept(redis_server.url, sid))
        await caller.hangup()
        log = a.log()
    assert ("user", "two") in conversation and ("assistant", "You said: three") in conversation
    assert "Traceback" not in log
    faults = [line for line in log.splitlines() if "conversations are kept again when" in line]
    assert len(faults) == 1, log  # once per outage, not per turn
    assert "conversations are kept again" in log.split(faults[0])[1]  # and said when it is back


async def test_the_reconnect_limit_holds_across_replicas(redis_server, fake_llm):
    sid = "CA" + "e" * 32
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await TwilioCaller(a, sid).connect()
        assert await exchange(caller, "hello") == "You said: hello"
        for n, replica in enumerate((b, a, b)):  # max_reconnects is 3, counted in Redis
            caller.ws.transport.abort()  # the socket fails (1006)
            await until(lambda: kept_says(redis_server.url, sid, "You said: hello"))
            relay_el = (await failed_action(replica, sid)).find("Connect/ConversationRelay")
            assert relay_el is not None, f"reconnect {n + 1} refused"
            query = urlsplit(relay_el.get("url", "")).query
            caller = await TwilioCaller(replica, sid).connect(query=query)
            assert await exchange(caller, f"turn {n}") == f"You said: turn {n}"
        caller.ws.transport.abort()
        root = await failed_action(a, sid)
        sent = contents(fake_llm.records[-1].body["messages"])
    assert root.find("Connect") is None and root.find("Hangup") is not None
    assert ("user", "hello") in sent and sent[-1] == ("user", "turn 2")
