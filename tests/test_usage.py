"""Token usage from the stream, and each chat request reported once.

A request that asked for tools is its own ``llm.request`` event; the one that ended a reply
rides in that reply's ``agent.reply`` (``llm``), one stored row per turn fewer.

The fake LLM over real HTTP on 127.0.0.1, both ways the relay sends a chat request (directly,
or through the SDK when retries are configured), and a real relay for the events: a plain
turn, a tool round, a barge-in, and the setting that stops asking for usage.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from crctl.settings import load_settings
from fakes.fake_llm import FakeLLM, Script, ToolCallSpec, prompt_tokens
from relay_server import events as ev
from relay_server.chat import LLMError
from relay_server.config import LLMConfig
from relay_server.llm import LLMClient
from relay_server.protocol import Language, Text
from tests.events_support import wait_kind
from tests.support import RelayServer, TwilioCaller

#: max_retries -> the path it selects.
PATHS = {"direct": 0, "sdk": 1}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
CA = "CA" + "5" * 32


def client(base_url: str, path: str, *, usage: bool = True) -> LLMClient:
    config = LLMConfig(
        base_url=base_url,
        api_key="sk-test",
        max_retries=PATHS[path],
        timeout=5.0,
        stream_usage=usage,
    )
    return LLMClient(config)


async def read(llm: LLMClient) -> tuple[str, Any]:
    """The reply's text and its usage report."""
    async with llm.stream(model="fake-llm", messages=MESSAGES) as stream:
        text = "".join([token async for token in stream])
    return text, stream.usage


def requests(relay: RelayServer, sid: str = CA) -> list[ev.LlmRequest]:
    """Every chat request the call's events report, in order (:func:`ev.requests_in`)."""
    return [r for e in list(relay.events) if e.call_sid == sid for r in ev.requests_in(e)]


# ------------------------------------------------------------------ the stream's usage
@pytest.mark.parametrize("path", PATHS)
async def test_usage_is_read_from_the_streams_last_chunk(fake_llm: FakeLLM, path: str) -> None:
    llm = client(fake_llm.base_url, path)
    fake_llm.enqueue(Script(tokens=["Hello", " there", "."]))
    try:
        text, usage = await read(llm)
    finally:
        await llm.aclose()
    (record,) = fake_llm.records
    assert record.body["stream_options"] == {"include_usage": True}
    assert text == "Hello there."
    # the fake counts the words of the messages in ("Be brief." "hi") and its tokens out
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 3)


@pytest.mark.parametrize("path", PATHS)
async def test_usage_off_asks_for_none(fake_llm: FakeLLM, path: str) -> None:
    llm = client(fake_llm.base_url, path, usage=False)
    try:
        text, usage = await read(llm)
    finally:
        await llm.aclose()
    (record,) = fake_llm.records
    assert "stream_options" not in record.body
    assert text == "You said: hi" and usage is None


@pytest.mark.parametrize("path", PATHS)
async def test_a_server_refusing_stream_options_says_how_to_turn_it_off(
    fake_llm: FakeLLM, path: str
) -> None:
    fake_llm.refused_params = {"stream_options"}
    llm = client(fake_llm.base_url, path)
    try:
        with pytest.raises(LLMError) as raised:
            await read(llm)
    finally:
        await llm.aclose()
    fault = raised.value
    assert (fault.kind, fault.status) == ("status", 400)
    assert "stream_options" in fault.detail
    assert fault.fix is not None and "--no-llm-usage" in fault.fix
    assert "CRCTL_LLM_USAGE=false" in fault.fix

    llm = client(fake_llm.base_url, path, usage=False)  # the fix works
    try:
        assert (await read(llm))[0] == "You said: hi"
    finally:
        await llm.aclose()


async def test_another_400_gets_no_usage_fix(fake_llm: FakeLLM) -> None:
    fake_llm.enqueue(Script(fault="status", status=400))
    llm = client(fake_llm.base_url, "direct")
    try:
        with pytest.raises(LLMError) as raised:
            await read(llm)
    finally:
        await llm.aclose()
    assert raised.value.status == 400 and raised.value.fix is None


def test_the_setting_reaches_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().relay_config().llm.stream_usage is True
    assert load_settings(llm_usage=False).relay_config().llm.stream_usage is False
    monkeypatch.setenv("CRCTL_LLM_USAGE", "false")
    assert load_settings().relay_config().llm.stream_usage is False


# ------------------------------------------------------------------ llm.request events
async def test_a_plain_turn_is_one_completed_request(relay_factory, fake_llm: FakeLLM) -> None:
    relay = relay_factory()
    fake_llm.enqueue(Script(tokens=["Hello", " there."], ttft=0.05))
    before = time.time()
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await caller.prompt("how are you")
    assert await caller.reply_text() == "Hello there."
    await wait_kind(relay, CA, "agent.reply")
    await caller.hangup()

    (request,) = requests(relay)
    (record,) = fake_llm.records
    assert request.model == "gpt-4o-mini" and request.round == 0
    assert request.outcome == "completed"
    assert request.input_tokens == prompt_tokens(record.body) > 0
    assert request.output_tokens == 2
    assert request.started is not None and before <= request.started <= time.time()
    assert request.first_token_ms is not None and request.first_token_ms >= 50  # the fake's ttft
    assert request.duration_ms is not None and request.duration_ms >= request.first_token_ms
    kinds = relay.kinds(CA)
    assert "llm.request" not in kinds  # the turn's only request rides in its reply
    (reply,) = [e for e in list(relay.events) if isinstance(e, ev.AgentReply)]
    assert isinstance(reply.llm, dict) and reply.llm["outcome"] == "completed"
    assert reply.data["llm"]["output_tokens"] == 2  # stored and served as the reply's data
    assert request.ts == reply.ts and request.call_sid == CA


async def test_a_tool_round_is_a_tool_calls_request_then_the_answer(
    relay_factory, fake_llm: FakeLLM
) -> None:
    relay = relay_factory()
    fake_llm.enqueue(
        Script(tool_calls=[ToolCallSpec("switch_language", '{"language": "es-ES"}')]),
        Script(tokens=["Hola."], ttft=0.02),
    )
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await caller.prompt("en español")
    assert isinstance(await caller.recv(), Language)
    assert await caller.reply_text() == "Hola."
    await wait_kind(relay, CA, "agent.reply")
    await caller.hangup()

    tool_round, answer = requests(relay)
    assert (tool_round.round, tool_round.outcome) == (0, "tool_calls")
    assert tool_round.first_token_ms is None  # no content token: only the tool call
    assert tool_round.output_tokens == 4  # the call's header and its 3 argument fragments
    assert (answer.round, answer.outcome, answer.output_tokens) == (1, "completed", 1)
    first, second = fake_llm.records
    assert tool_round.input_tokens == prompt_tokens(first.body)
    assert answer.input_tokens == prompt_tokens(second.body)
    assert answer.first_token_ms is not None and answer.first_token_ms >= 20
    (tool,) = [e for e in list(relay.events) if isinstance(e, ev.ToolCall)]
    assert isinstance(tool.duration_ms, float) and tool.duration_ms >= 0
    assert "duration_ms" in tool.data
    kinds = [k for k in relay.kinds(CA) if k in ("llm.request", "tool.call", "agent.reply")]
    assert kinds == ["llm.request", "tool.call", "agent.reply"]  # the answer rides in the reply


async def test_a_barge_in_cancels_the_request_without_tokens(
    relay_factory, fake_llm: FakeLLM
) -> None:
    relay = relay_factory()
    fake_llm.enqueue(Script(tokens=["A long", " story", " begins", " here."] * 20, delay=0.1))
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await caller.prompt("tell me a story")
    first = await caller.recv()
    assert isinstance(first, Text) and first.token == "A long"
    await caller.info("clientSpeaking", "on")
    await caller.interrupt("A long", 300)
    await wait_kind(relay, CA, "agent.reply")
    await caller.hangup()

    (request,) = requests(relay)
    assert request.outcome == "cancelled"
    assert request.input_tokens is None and request.output_tokens is None
    assert request.first_token_ms is not None
    assert request.duration_ms is not None and request.duration_ms >= request.first_token_ms
    (record,) = fake_llm.records
    assert fake_llm.wait_for(lambda: record.client_disconnected)  # the generation stopped


async def test_a_failed_request_is_a_fault(relay_factory, fake_llm: FakeLLM) -> None:
    relay = relay_factory()
    fake_llm.enqueue(Script(fault="status", status=500))
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await caller.prompt("hello")
    await caller.reply_text()  # the apology
    await wait_kind(relay, CA, "agent.reply")
    await caller.hangup()
    (request,) = requests(relay)
    assert request.outcome == "fault" and request.input_tokens is None
    assert request.first_token_ms is None and request.duration_ms is not None


async def test_usage_off_on_the_relay(relay_factory, fake_llm: FakeLLM) -> None:
    relay = relay_factory(llm_stream_usage=False)
    caller = await TwilioCaller(relay, call_sid=CA).connect()
    await caller.prompt("hello")
    assert await caller.reply_text() == "You said: hello"
    await wait_kind(relay, CA, "agent.reply")
    await caller.hangup()
    (record,) = fake_llm.records
    assert "stream_options" not in record.body
    (request,) = requests(relay)
    assert request.outcome == "completed"
    assert (request.input_tokens, request.output_tokens) == (None, None)
