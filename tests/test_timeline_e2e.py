"""The per-turn timeline end to end: a real relay, a caller that sends Twilio's info frames.

Speaker events in Twilio's order (Twilio docs, ConversationRelay WebSocket messages), then the
stored ``turn.timeline`` events through ``crctl calls show`` / ``calls stats`` and ``tail``'s
printer; on SQLite and on a Redis cluster (one ``crctl serve`` replica).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from rich.console import Console
from typer.testing import CliRunner

from crctl.cli import app as cli
from crctl.console import CallLog
from fakes.fake_llm import FakeLLM, Script
from relay_server import events as ev
from tests.cluster_support import API_TOKEN, replicas
from tests.events_support import TOKEN, client, wait_kind
from tests.redis_support import RedisServer
from tests.support import TwilioCaller

CA = "CA" + "7" * 32
STAGES = ev.TIMELINE_STAGES


async def two_turns(caller: TwilioCaller, fake_llm: FakeLLM, relay: Any = None) -> None:
    """A normal turn, then one the caller cuts into, then the hang-up."""
    fake_llm.enqueue(
        Script(tokens=["Hello", " there."], ttft=0.05),
        Script(tokens=["A long", " story", " begins."], ttft=0.02),
    )
    await caller.info("clientSpeaking", "on")
    await caller.prompt("hi", last=False)
    await caller.info("clientSpeaking", "off")
    await caller.prompt("hi there")
    assert await caller.reply_text(timeout=30) == "Hello there."
    await caller.info("agentSpeaking", "on")
    await caller.info("tokensPlayed", "Hello there.")
    await caller.info("agentSpeaking", "off")
    if relay is not None:
        await wait_kind(relay, CA, "turn.timeline")
    # turn 2: the caller cuts in (Twilio's barge-in order)
    await caller.info("clientSpeaking", "on")
    await caller.info("clientSpeaking", "off")
    await caller.prompt("tell me a story")
    await caller.reply_text(timeout=30)
    await caller.info("agentSpeaking", "on")
    await caller.info("clientSpeaking", "on")
    await caller.info("tokensPlayed", "A long")
    await caller.interrupt("A long", 400)
    await caller.info("agentSpeaking", "off")
    if relay is not None:
        await wait_kind(relay, CA, "turn.timeline", 2)
    await caller.hangup()


def run(args: list[str], tmp_path: Any) -> Any:
    result = CliRunner().invoke(cli, args, env={"CRCTL_STATE_DIR": str(tmp_path), "COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


async def test_timeline_stored_shown_and_summed_on_sqlite(relay_factory, fake_llm, tmp_path):
    relay = relay_factory(api_token=TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await two_turns(caller, fake_llm, relay)
    await wait_kind(relay, CA, "socket.closed")

    async with client(relay) as http:
        stored = (await http.get(f"/calls/{CA}")).json()["events"]
    timelines = [e for e in stored if e["kind"] == "turn.timeline"]
    assert [(t["data"]["turn"], t["data"]["end"], t["data"]["barge_in"]) for t in timelines] == [
        (1, "completed", False),
        (2, "interrupted", True),
    ]
    first = timelines[0]["data"]
    for stage in STAGES:
        assert first[stage] is not None and first[stage] >= 0, (stage, first)
    assert first["llm_first_token_ms"] >= 50  # the fake model's own delay
    parts = ("transcription_ms", "relay_ms", "llm_first_token_ms", "speech_start_ms")
    assert abs(sum(first[p] for p in parts) - first["caller_wait_ms"]) < 0.5

    url = ["--url", relay.base_url, "--token", TOKEN]
    shown = await asyncio.to_thread(run, ["calls", "show", CA, "--json", *url], tmp_path)
    call = json.loads(shown.output)
    assert [t["turn"] for t in call["turns"]] == [1, 2]
    assert call["turns"][0]["caller_wait_ms"] == first["caller_wait_ms"]
    assert call["turns"][1]["barge_in"] is True
    assert call["summary"]["turns"] == 2 and call["summary"]["barge_ins"] == 1
    assert call["summary"]["caller_wait_ms"]["p50"] is not None

    text = await asyncio.to_thread(run, ["calls", "show", CA, *url], tmp_path)
    assert "turn 1  caller wait " in text.output and "+ LLM 0." in text.output
    assert "caller cut in" in text.output and "1 barge-in, caller wait p50" in text.output

    stats = await asyncio.to_thread(
        run, ["calls", "stats", "--since", "10m", "--json", *url], tmp_path
    )
    found = json.loads(stats.output)
    assert (found["calls"], found["turns"], found["barge_ins"]) == (1, 2, 1)
    assert found["ends"] == {"completed": 1, "interrupted": 1}
    wait = found["stages"]["caller_wait_ms"]
    assert wait["count"] == 2 and wait["p50"] <= wait["p95"] <= wait["p99"]
    table = await asyncio.to_thread(run, ["calls", "stats", "--since", "10m", *url], tmp_path)
    assert "caller wait" in table.output and "1 calls, 2 turns" in table.output

    # tail's printer (also crctl up's) shows one line per turn
    out = io.StringIO()
    CallLog(Console(file=out, width=200)).add_all(stored)
    assert out.getvalue().count("caller wait") == 2


async def test_stats_bad_since_is_one_line(relay_factory, tmp_path):
    relay = relay_factory(api_token=TOKEN, events_db="")
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["calls", "stats", "--since", "yesterday", "--url", relay.base_url, "--token", TOKEN],
        env={"CRCTL_STATE_DIR": str(tmp_path)},
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "since: expected" in lines[0], result.output


async def test_stats_on_a_redis_cluster(redis_server: RedisServer, fake_llm, tmp_path):
    with replicas(redis_server.url, fake_llm.base_url, count=1) as (a,):
        caller = await TwilioCaller(a, CA).connect()  # type: ignore[arg-type]
        await two_turns(caller, fake_llm)
        args = ["calls", "stats", "--since", "10m", "--json", "--url", a.base_url]
        args += ["--token", API_TOKEN]
        for _ in range(100):  # the events reach Redis in the background
            found = json.loads((await asyncio.to_thread(run, args, tmp_path)).output)
            if found["turns"] == 2:
                break
            await asyncio.sleep(0.2)
        assert (found["turns"], found["barge_ins"]) == (2, 1)
        assert found["stages"]["llm_first_token_ms"]["count"] == 2
