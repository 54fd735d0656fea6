"""The LLM agent's tool rounds in-process: built-in actions, and a tool cut by the caller.

The built-in actions are end, hand-off, keys and language; the test gates the cut tool so the cut
lands while the tool runs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from relay_server import LLMAgent
from relay_server.config import AgentConfig, RelayConfig
from relay_server.protocol import End, Language, SendDigits, Text
from relay_server.services import Services
from relay_server.testing import FakeCall, FakeChatModel, FakeClock
from relay_server.tools import Tool

pytestmark = pytest.mark.asyncio

CLOSE = Text(token="", last=True)


class Gate:
    """A tool that runs until the test lets it finish."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def slow_lookup(self, q: str) -> str:
        """Slow."""
        self.started.set()
        await self.release.wait()
        return "found"


class Weird:
    pass


def weird() -> object:
    """Returns something JSON cannot hold."""
    return Weird()


@pytest.fixture
def model() -> FakeChatModel:
    return FakeChatModel(echo=True)


@pytest.fixture
def gate() -> Gate:
    return Gate()


async def connect(model: FakeChatModel, gate: Gate | None = None) -> FakeCall:
    tools = (Tool(gate.slow_lookup), Tool(weird)) if gate else ()
    config = RelayConfig(agent_config=AgentConfig(silence_timeout=0))
    services = Services(chat=model, clock=FakeClock(), tools=tools)
    return await FakeCall(LLMAgent, services=services, config=config).connect()


def unanswered_tool_calls(history: list[dict[str, Any]]) -> set[str]:
    asked = {c["id"] for m in history for c in m.get("tool_calls") or []}
    answered = {m["tool_call_id"] for m in history if m["role"] == "tool"}
    return asked - answered


async def test_end_call_tool_sends_end_after_the_goodbye(model):
    model.queue().say("Goodbye", "!").call_tool("end_call", '{"reason": "bye"}').end()
    call = await connect(model)
    await call.prompt("bye")
    frames = [await call.recv() for _ in range(4)]
    assert frames == [
        Text(token="Goodbye", last=False),
        Text(token="!", last=False),
        CLOSE,
        End(),
    ]
    assert len(model.replies) == 1  # the goodbye came with the call: no extra round
    await call.hangup()


async def test_end_call_without_words_asks_for_a_goodbye_first(model):
    model.queue().call_tool("end_call").end()
    model.queue().say("Bye", " now.").end()
    call = await connect(model)
    await call.prompt("hang up")
    assert await call.reply_text() == "Bye now."
    assert await call.recv() == End()
    assert model.requests[0].tool_names[:2] == ["end_call", "transfer_to_human"]
    assert model.requests[1].tools is None  # the goodbye round offers no tools
    await call.hangup()


async def test_handoff_tool_ends_with_json_handoff_data(model):
    model.queue().say("Transferring", " you.").call_tool(
        "transfer_to_human", '{"reason": "billing dispute"}'
    ).end()
    call = await connect(model)
    await call.prompt("I want a person")
    await call.turn()
    end = await call.recv()
    assert isinstance(end, End) and isinstance(end.handoff_data, str)
    assert json.loads(end.handoff_data) == {
        "reasonCode": "live-agent-handoff",
        "reason": "billing dispute",
        "summary": "",
    }
    await call.hangup()


async def test_send_dtmf_and_switch_language_tools(model):
    model.queue().call_tool("send_dtmf", '{"digits": "1w2#"}').call_tool(
        "send_dtmf", '{"digits": "12a"}'
    ).call_tool("switch_language", '{"language": "es-ES"}').end()
    model.queue().say("Hola.").end()
    call = await connect(model)
    await call.prompt("press one two and speak spanish")
    assert await call.recv() == SendDigits(digits="1w2#")
    assert await call.recv() == Language(tts_language="es-ES", transcription_language="es-ES")
    assert await call.reply_text() == "Hola."
    results = [m["content"] for m in model.requests[-1].messages if m["role"] == "tool"]
    assert results[0] == "sent 1w2#"
    assert "error" in results[1] and "0-9, w, #, *" in results[1]
    assert results[2] == "switched to es-ES"
    assert call.kinds().count("tool.call") == 3
    await call.hangup()


async def test_barge_in_during_a_tool_keeps_history_valid(model, gate):
    model.queue().say("Let", " me", " check.").call_tool("slow_lookup", '{"q": "x"}').end()
    call = await connect(model, gate)
    await call.prompt("look it up")
    for _ in range(3):
        await call.recv()  # "Let me check." is spoken, then the tool runs until released
    await gate.started.wait()
    await call.interrupt("Let me", 400)
    assert call.received() == [CLOSE]
    await call.prompt("hello?")
    assert await call.reply_text() == "You said: hello?"
    history = model.requests[-1].messages
    # The API refuses a tool call without its answer (HTTP 400) for the rest of the call.
    assert unanswered_tool_calls(history) == set()
    said = next(m for m in history if m.get("tool_calls"))
    assert said["content"] == "Let me"  # what the caller heard of what came with the call
    tool_msg = next(m for m in history if m["role"] == "tool")
    assert tool_msg["content"].startswith("cancelled")
    assert history[-1] == {"role": "user", "content": "hello?"}
    assert len(model.replies) == 2  # no second round for the cut turn
    await call.hangup()


async def test_new_prompt_during_a_tool_keeps_history_valid(model, gate):
    model.queue().call_tool("slow_lookup", '{"q": "x"}').end()
    call = await connect(model, gate)
    await call.prompt("look it up")
    await gate.started.wait()
    await call.prompt("never mind")
    assert await call.reply_text() == "You said: never mind"
    history = model.requests[-1].messages
    assert unanswered_tool_calls(history) == set()
    roles = [m["role"] for m in history[-4:]]
    assert roles == ["user", "assistant", "tool", "user"]  # tool answer before the new input
    await call.hangup()


async def test_tool_result_that_json_cannot_hold_is_reported(model, gate):
    model.queue().call_tool("weird").end()
    model.queue().say("Ok.").end()
    call = await connect(model, gate)
    await call.prompt("do the weird thing")
    assert await call.reply_text() == "Ok."
    result = next(m for m in model.requests[-1].messages if m["role"] == "tool")["content"]
    assert result.startswith("error: weird failed: TypeError")
    await call.hangup()


async def test_a_tool_round_then_the_answer_of_the_next_round(model, gate):
    model.queue().say("Looking.").call_tool("slow_lookup", '{"q": "order 42"}').end()
    second = model.queue()
    call = await connect(model, gate)
    await call.prompt("where is my order")
    await gate.started.wait()
    gate.release.set()
    await model.requested(2)
    second.say(" It shipped.").end()
    assert await call.reply_text() == "Looking. It shipped."
    history = model.requests[1].messages
    assert history[-2]["tool_calls"][0]["function"] == {
        "name": "slow_lookup",
        "arguments": '{"q": "order 42"}',
    }
    assert history[-1]["content"] == "found"
    await call.hangup()
