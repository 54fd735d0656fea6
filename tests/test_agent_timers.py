"""The agent's timers in-process on a fake clock: the filler, silence reminders, the DTMF buffer.

The test moves the clock; nothing waits for wall time.
"""

from __future__ import annotations

from typing import Any

import pytest

from relay_server import CallSession, LLMAgent
from relay_server.config import AgentConfig, RelayConfig
from relay_server.protocol import End, Prompt, Text
from relay_server.services import Services
from relay_server.testing import FakeCall, FakeChatModel, FakeClock

pytestmark = pytest.mark.asyncio


@pytest.fixture
def model() -> FakeChatModel:
    return FakeChatModel(echo=True)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def connect(model: FakeChatModel, clock: FakeClock, **agent: Any) -> FakeCall:
    config = RelayConfig(agent_config=AgentConfig(**agent))
    services = Services(chat=model, clock=clock)
    return await FakeCall(LLMAgent, services=services, config=config).connect()


async def test_slow_first_token_triggers_a_preemptible_filler(model, clock):
    call = await connect(
        model, clock, filler_after_ms=1200, filler="Let me see.", silence_timeout=0
    )
    reply = model.queue()
    await call.prompt("look it up")
    await model.requested(1)
    assert clock.advance(1.19) == 0
    assert call.received() == []
    assert clock.advance(0.01) == 1  # the first token is 1.2 s late
    assert await call.recv() == Text(token="Let me see.", last=True, preemptible=True)
    reply.say("Found", " it.").end()
    assert await call.reply_text() == "Found it."
    assert clock.armed == []

    model.queue().say("Quick.").end()  # the first token in time: no filler
    await call.prompt("again")
    assert await call.recv() == Text(token="Quick.", last=False)
    assert clock.advance(60) == 0
    assert await call.recv() == Text(token="", last=True)
    await call.hangup()


async def test_a_filler_for_an_answer_that_fails(model, clock):
    call = await connect(model, clock, filler="Hmm.", silence_timeout=0)
    reply = model.queue()
    await call.prompt("hello")
    await model.requested(1)
    clock.advance(10)
    assert await call.recv() == Text(token="Hmm.", last=True, preemptible=True)
    reply.fail("timeout", "no token for 15 s")
    assert await call.reply_text() == call.link.config.agent_config.apology
    await call.hangup()


async def test_silence_reminders_then_goodbye_and_end(model, clock):
    call = await connect(model, clock, silence_timeout=15, silence_max_reminders=2)
    await call.prompt("hi")
    await call.reply_text()
    # speaker events: the reminder clock starts when Twilio stops speaking
    await call.info("agentSpeaking", "on")
    assert clock.advance(100) == 0
    assert call.received() == []
    await call.info("agentSpeaking", "off")
    assert clock.advance(14.9) == 0
    assert clock.advance(0.1) == 1
    assert await call.reply_text() == "Are you still there?"
    assert clock.advance(15) == 1
    assert await call.reply_text() == "Are you still there?"
    assert clock.advance(15) == 1
    assert await call.reply_text() == call.link.config.agent_config.silence_goodbye
    assert await call.recv() == End()
    clock.advance(60)
    assert call.received() == []  # nothing follows the end
    await call.hangup()


async def test_caller_speech_resets_the_silence_count(model, clock):
    call = await connect(model, clock, silence_timeout=15, silence_max_reminders=1)
    await call.prompt("hi")
    await call.reply_text()
    clock.advance(15)
    assert await call.reply_text() == "Are you still there?"
    await call.prompt("yes")
    assert await call.reply_text() == "You said: yes"
    clock.advance(15)
    assert await call.reply_text() == "Are you still there?"  # not the goodbye
    await call.hangup()


async def test_dtmf_becomes_a_turn(model, clock):
    call = await connect(model, clock, silence_timeout=0)
    await call.dtmf("5")
    await call.reply_text()
    assert model.requests[-1].messages[-1] == {
        "role": "user",
        "content": "[The caller pressed 5 on the keypad]",
    }
    await call.hangup()


async def test_dtmf_buffer_collects_until_hash_or_pause(model, clock):
    call = await connect(model, clock, dtmf_buffer=True, dtmf_pause=2.0, silence_timeout=0)
    for digit in "1234#":
        await call.dtmf(digit)
    await call.reply_text()
    assert model.requests[-1].messages[-1]["content"] == "[The caller entered 1234 on the keypad]"
    await call.dtmf("9")
    clock.advance(1.5)
    await call.dtmf("8")  # a key restarts the pause
    assert clock.advance(1.5) == 0
    assert call.received() == [] and len(model.replies) == 1
    assert clock.advance(0.5) == 1
    await call.reply_text()  # after the pause
    assert model.requests[-1].messages[-1]["content"] == "[The caller entered 98 on the keypad]"
    await call.hangup()


async def test_hangup_with_a_pending_dtmf_flush_starts_nothing(model, clock):
    call = await connect(model, clock, dtmf_buffer=True, dtmf_pause=2.0)
    await call.dtmf("9")
    await call.hangup()
    assert clock.advance(10) == 0
    assert model.replies == []
    assert "agent.reply" not in call.kinds()


class Parrot(CallSession):
    """The README's own agent."""

    async def on_prompt(self, prompt: Prompt) -> None:
        if prompt.last:
            await self.start_turn(self.answer(prompt.voice_prompt))

    async def answer(self, text: str) -> None:
        await self.send_text("You said ")
        await self.send_text(text, last=True)


async def test_an_agent_written_against_the_readme_runs_in_process():
    call = await FakeCall(Parrot, services=Services()).connect()
    await call.prompt("hello", last=False)
    await call.prompt("hello there")
    assert await call.reply_text() == "You said hello there"
    await call.hangup()
    assert call.session.closed
