"""The relay's API across replicas: pushes reach the socket's replica, the call log is shared.

Real ``crctl serve`` replicas on a real redis-server, the fake LLM over HTTP, callers that sign
like Twilio.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fakes.fake_llm import FakeLLM
from relay_server.protocol import Text
from tests.cluster_support import API_TOKEN, Replica, replicas
from tests.redis_support import RedisServer
from tests.support import TwilioCaller

SID = "CA" + "c" * 32
PATIENCE = 60.0


async def _api(replica: Replica, method: str, path: str, body: Any = None) -> httpx.Response:
    return await asyncio.to_thread(replica.api, method, path, body)


async def _until(check: Callable[[], Any], patience: float = PATIENCE) -> Any:
    """Poll an async ``check`` until it returns something true (a generous bound)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while True:
        found = await check()
        if found or loop.time() > deadline:
            return found
        await asyncio.sleep(0.2)


def _push(text: str) -> dict[str, Any]:
    return {"type": "text", "token": text, "last": True}


async def _talking(replica: Replica, sid: str = SID) -> TwilioCaller:
    """A caller on ``replica`` who has had one turn, and whose socket the directory knows."""
    caller = await TwilioCaller(replica, sid).connect()  # type: ignore[arg-type]
    await caller.prompt("hello there")
    assert await caller.reply_text(timeout=30) == "You said: hello there"
    return caller


@pytest.mark.asyncio
async def test_a_push_through_b_reaches_the_call_on_a(
    redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await _talking(a)
        pushed = await _api(b, "POST", f"/calls/{SID}/messages", _push("Hello from B"))
        assert (pushed.status_code, pushed.json()) == (202, {"sent": "text"})
        frame = await caller.recv(timeout=30)
        assert isinstance(frame, Text) and frame.token == "Hello from B"

        gone = await _api(b, "POST", "/calls/CA" + "0" * 32 + "/messages", _push("x"))
        assert gone.status_code == 404 and "no live call" in gone.json()["error"]
        bad = await _api(b, "POST", f"/calls/{SID}/messages", {"type": "nonsense"})
        assert bad.status_code == 400
        await caller.hangup()


@pytest.mark.asyncio
async def test_b_lists_and_tails_the_calls_of_a(
    redis_server: RedisServer, fake_llm: FakeLLM, tmp_path: Any
) -> None:
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await _talking(a)

        async def listed() -> Any:
            calls = (await _api(b, "GET", "/calls")).json()["calls"]
            return [c for c in calls if c["call_sid"] == SID and c["turns"] == 1]

        (row,) = await _until(listed)
        assert row["status"] == "live" and row["ended"] is None
        shown = (await _api(b, "GET", f"/calls/{SID[:10]}")).json()
        kinds = [e["kind"] for e in shown["events"]]
        assert shown["call_sid"] == SID and "agent.reply" in kinds, kinds
        assert all(isinstance(e["id"], int) for e in shown["events"])

        # crctl tail against B, unchanged, shows A's call: the backlog, then live events.
        tail = subprocess.Popen(  # noqa: ASYNC220 (started once; a thread reads it)
            [sys.executable, "-m", "crctl", "tail", "--url", b.base_url, "--json",
             "--since", "10m", "--token", API_TOKEN],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=tmp_path,
            env={**os.environ, "HOME": str(tmp_path), "PYTHONPATH": os.getcwd()},
        )  # fmt: skip
        lines: list[dict[str, Any]] = []
        assert tail.stdout is not None
        reader = threading.Thread(
            target=lambda: [lines.append(json.loads(line)) for line in tail.stdout],  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        try:

            async def seen(kind: str, text: str = "") -> bool:
                return any(
                    e.get("call_sid") == SID and e.get("kind") == kind and text in json.dumps(e)
                    for e in list(lines)
                )

            assert await _until(lambda: seen("agent.reply", "hello there")), lines
            await caller.prompt("second words")
            assert await caller.reply_text(timeout=30) == "You said: second words"
            assert await _until(lambda: seen("agent.reply", "second words")), lines
        finally:
            tail.kill()
            tail.wait()
            reader.join(10)
            tail.stdout.close()
        await caller.hangup()

        async def hung_up() -> Any:
            shown = (await _api(b, "GET", f"/calls/{SID}")).json()
            return shown["status"] != "live" and shown["ended"] is not None

        assert await _until(hung_up)


@pytest.mark.asyncio
async def test_replicas_with_another_secret_refuse_each_other(
    redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    with replicas(redis_server.url, fake_llm.base_url, count=1) as (a,):
        stranger = Replica(
            redis_server.url,
            fake_llm.base_url,
            name="x",
            auth_token="another-auth-token-" + "9" * 16,
            env={"CRCTL_SOCKET_SECRET": "another-secret"},
        ).start()
        try:
            caller = await _talking(a)
            refused = await _api(stranger, "POST", f"/calls/{SID}/messages", _push("intruder"))
            assert refused.status_code == 504, refused.text
            assert "did not confirm" in refused.json()["error"]
            assert await caller.quiet(1.0) == []

            async def logged() -> bool:
                return "refused a message" in a.log() and "signature" in a.log()

            assert await _until(logged), a.log()
            await caller.hangup()
        finally:
            stranger.close()


@pytest.mark.asyncio
async def test_redis_away_fails_clearly_and_recovers(
    redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    with replicas(redis_server.url, fake_llm.base_url) as (a, b):
        caller = await _talking(a)
        redis_server.stop()

        failed = await _api(b, "POST", f"/calls/{SID}/messages", _push("while away"))
        assert failed.status_code == 503, failed.text
        error = failed.json()["error"]
        assert "\n" not in error and "is not reachable" in error, error
        listing = await _api(b, "GET", "/calls")
        assert listing.status_code == 503 and "shared call log" in listing.json()["error"]

        # the call goes on without Redis
        await caller.prompt("still there")
        assert await caller.reply_text(timeout=30) == "You said: still there"

        redis_server.start()

        async def delivered() -> bool:
            pushed = await _api(b, "POST", f"/calls/{SID}/messages", _push("back again"))
            return pushed.status_code == 202

        assert await _until(delivered)
        frame = await caller.recv(timeout=30)
        assert isinstance(frame, Text) and frame.token == "back again"
        for replica in (a, b):
            assert replica.log().count("Traceback") == 0, replica.log()
        await caller.hangup()


@pytest.mark.asyncio
async def test_the_calls_of_a_killed_replica_show_as_lost_on_the_others(
    redis_server: RedisServer, fake_llm: FakeLLM
) -> None:
    with replicas(redis_server.url, fake_llm.base_url, 2) as (a, b):
        caller = await _talking(a)

        async def live_on_b() -> bool:
            response = await _api(b, "GET", f"/calls/{SID}")
            return response.status_code == 200 and response.json()["status"] == "live"

        assert await _until(live_on_b)
        a.kill()  # SIGKILL: A never says the call ended

        async def lost_on_b() -> bool:
            response = await _api(b, "GET", "/calls")
            rows = {row["call_sid"]: row for row in response.json()["calls"]}
            return SID in rows and rows[SID]["status"] == "lost"

        assert await _until(lost_on_b)  # once A's directory entries expire
        one = (await _api(b, "GET", f"/calls/{SID}")).json()
        assert one["status"] == "lost" and one["turns"] == 1
        assert "_last_ts" not in one
        await caller.ws.close()  # (its relay is gone: the socket is already down)
