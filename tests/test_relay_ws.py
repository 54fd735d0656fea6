"""The relay's socket handling: bad input, isolation between calls, custom agents, cleanup."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest

from fakes.fake_llm import Script
from relay_server import CallSession
from relay_server.protocol import (
    Dtmf,
    End,
    Error,
    Info,
    Interrupt,
    Language,
    Play,
    Prompt,
    SendDigits,
    Setup,
    Text,
    encode_inbound,
)
from tests.support import TwilioCaller, setup_message, wait_until

pytestmark = pytest.mark.asyncio


async def test_bad_frames_are_logged_and_the_call_goes_on(relay, fake_llm, caplog):
    caller = await TwilioCaller(relay).connect()
    # Raw text on purpose: frames the protocol's types cannot build (the malformed wire is the
    # point), and one well-formed frame that is only too large.
    bad = [
        "this is not json #1",
        b"\x00\x01binary",
        '{"type": "prompt", "voicePrompt": 42, "last": true}',
        '{"type": "dtmf"}',
        '["not", "an", "object"]',
        '{"no": "type"}',
        encode_inbound(Prompt(voice_prompt="x" * 70_000, last=True)),
    ]
    for frame in bad:
        await caller.send(frame)
    await caller.send('{"type": "somethingNew", "field": 1}')  # unknown type: skipped quietly
    await caller.prompt("are you alive")
    assert await caller.reply_text() == "You said: are you alive"
    assert relay.kinds(caller.call_sid).count("frame.bad") == len(bad)
    warnings = [r.getMessage() for r in caller_records(caplog)]
    assert any("not JSON" in w and caller.call_sid in w for w in warnings)
    assert any("binary frame" in w for w in warnings)
    assert any("exceeds the 65536-byte limit" in w for w in warnings)
    await caller.hangup()


def caller_records(caplog):
    return [r for r in caplog.records if r.name == "relay_server.calls"]


async def test_frames_before_setup_are_dropped_then_setup_works(relay, fake_llm, caplog):
    caller = TwilioCaller(relay)
    await caller.connect(setup=False)
    await caller.prompt("too early")
    await caller.send(setup_message(caller.call_sid))
    await caller.prompt("now")
    assert await caller.reply_text() == "You said: now"
    assert any("prompt before setup" in r.getMessage() for r in caller_records(caplog))
    assert len(fake_llm.records) == 1
    await caller.hangup()


async def test_a_bad_call_never_affects_another(relay, fake_llm):
    good = await TwilioCaller(relay, call_sid="CA" + "a" * 32).connect()
    bad = await TwilioCaller(relay, call_sid="CA" + "b" * 32).connect()
    for _ in range(20):
        await bad.send("{broken")
    await good.prompt("fine")
    assert await good.reply_text() == "You said: fine"
    await bad.hangup()
    await good.prompt("still fine")
    assert await good.reply_text() == "You said: still fine"
    await good.hangup()


async def test_sessions_are_removed_when_sockets_close(relay, fake_llm):
    callers = [await TwilioCaller(relay, call_sid=f"CA{i:032d}").connect() for i in range(10)]
    assert wait_until(lambda: len(relay.registry) == 10)
    fake_llm.enqueue(*[Script(tokens=["slow"] * 50, delay=0.05) for _ in range(5)])
    for c in callers[:5]:
        await c.prompt("keep talking")  # hang up in the middle of a reply
    for c in callers[:5]:
        await c.recv()  # the reply has started
    for c in callers:
        await c.hangup()
    assert wait_until(lambda: len(relay.registry) == 0)
    tasks = relay.call_on_loop(
        lambda: [t for t in asyncio.all_tasks() if "_run_turn" in repr(t.get_coro())]
    )
    assert tasks == []
    assert wait_until(lambda: all(r.client_disconnected or r.completed for r in fake_llm.records))


async def test_fifty_concurrent_calls_never_cross_words(relay, fake_llm):
    async def one_call(i: int) -> list[str]:
        caller = await TwilioCaller(relay, call_sid=f"CA{i:032x}").connect()
        replies = []
        for turn in range(3):
            await caller.prompt(f"caller{i} turn{turn} alpha{i} omega{i}")
            replies.append(await caller.reply_text(timeout=20))
        await caller.hangup()
        return replies

    fake_llm.responder = lambda body: Script(
        tokens=[" " + w for w in body["messages"][-1]["content"].split()], delay=0.005
    )
    results = await asyncio.gather(*(one_call(i) for i in range(50)))
    for i, replies in enumerate(results):
        for turn, reply in enumerate(replies):
            assert reply == f" caller{i} turn{turn} alpha{i} omega{i}"
    assert len(fake_llm.records) == 150
    assert wait_until(lambda: len(relay.registry) == 0)


class RecordingAgent(CallSession):
    """A custom agent: records every handler call and answers with the helpers."""

    seen: ClassVar[list[tuple[str, object]]] = []

    async def on_setup(self, setup: Setup) -> None:
        self.seen.append(("setup", setup.custom_parameters))

    async def on_prompt(self, prompt: Prompt) -> None:
        self.seen.append(("prompt", (prompt.voice_prompt, prompt.last)))
        if prompt.last:
            await self.send_text("Hi", lang="en-US", interruptible=False)
            await self.send_text(" there", last=True)
            await self.play("https://example.test/hold.mp3", loop=2, preemptible=True)
            await self.send_digits("9w1")
            await self.set_language(tts="sv-SE", transcription="en-US")

    async def on_dtmf(self, dtmf: Dtmf) -> None:
        self.seen.append(("dtmf", dtmf.digit))
        if dtmf.digit == "0":
            await self.end({"reason": "operator"})

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        self.seen.append(("interrupt", interrupt.duration_until_interrupt_ms))

    async def on_info(self, info: Info) -> None:
        self.seen.append(("info", (info.name, info.value)))

    async def on_error(self, error: Error) -> None:
        self.seen.append(("error", error.code))

    async def on_close(self) -> None:
        self.seen.append(("close", None))


async def test_custom_agent_gets_every_message_type(relay_factory):
    RecordingAgent.seen = []
    relay = relay_factory(agent="tests.test_relay_ws:RecordingAgent")
    caller = await TwilioCaller(relay).connect(custom_parameters={"customerId": "42"})
    await caller.prompt("partial", last=False)
    await caller.prompt("full")
    frames = [await caller.recv() for _ in range(5)]
    assert frames == [
        Text(token="Hi", last=False, lang="en-US", interruptible=False),
        Text(token=" there", last=True),
        Play(source="https://example.test/hold.mp3", loop=2, preemptible=True),
        SendDigits(digits="9w1"),
        Language(tts_language="sv-SE", transcription_language="en-US"),
    ]
    await caller.interrupt("Hi", "120")
    await caller.info("roundTripDelayMs", "148")
    await caller.send(Error(description="Invalid message received, code: 64107"))
    await caller.dtmf("0")
    assert await caller.recv() == End(handoff_data='{"reason": "operator"}')
    await caller.hangup()
    assert wait_until(lambda: ("close", None) in RecordingAgent.seen)
    assert RecordingAgent.seen == [
        ("setup", {"customerId": "42"}),
        ("prompt", ("partial", False)),
        ("prompt", ("full", True)),
        ("interrupt", 120),
        ("info", ("roundTripDelayMs", "148")),
        ("error", 64107),
        ("dtmf", "0"),
        ("close", None),
    ]


class CrashingAgent(CallSession):
    async def on_prompt(self, prompt: Prompt) -> None:
        if prompt.voice_prompt == "crash":
            raise ValueError("agent bug")
        await self.send_text("ok", last=True)


async def test_an_agent_exception_is_logged_and_the_call_goes_on(relay_factory, caplog):
    relay = relay_factory(agent="tests.test_relay_ws:CrashingAgent")
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("crash")
    await caller.prompt("hello")
    assert await caller.recv() == Text(token="ok", last=True)
    assert any("handler failed" in r.getMessage() for r in caller_records(caplog))
    await caller.hangup()


async def test_echo_agent_works_without_any_llm(relay_factory):
    relay = relay_factory(agent="echo")
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("testing one two")
    assert await caller.reply_text() == "You said: testing one two"
    await caller.hangup()
