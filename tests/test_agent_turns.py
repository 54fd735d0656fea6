"""The LLM agent in-process over the gated fake model.

Streaming, barge-in, what the caller heard, faults. Each step happens where the test releases it: no
socket, no sleep, no clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from relay_server import LLMAgent
from relay_server.agents.conversation import ConversationAgent
from relay_server.config import AgentConfig, RelayConfig
from relay_server.protocol import Text
from relay_server.services import Services
from relay_server.testing import FakeCall, FakeChatModel, FakeClock

pytestmark = pytest.mark.asyncio

LONG = [f" word{i}" for i in range(60)]
CLOSE = Text(token="", last=True)


@pytest.fixture
def model() -> FakeChatModel:
    return FakeChatModel(echo=True)


async def connect(model: FakeChatModel, **agent: Any) -> FakeCall:
    agent.setdefault("silence_timeout", 0)
    config = RelayConfig(agent_config=AgentConfig(**agent))
    services = Services(chat=model, clock=FakeClock())
    return await FakeCall(LLMAgent, services=services, config=config).connect()


def messages(model: FakeChatModel, i: int = -1) -> list[dict[str, Any]]:
    return model.requests[i].messages


async def test_each_token_goes_out_as_the_model_releases_it(model):
    reply = model.queue()
    call = await connect(model)
    await call.prompt("hi")
    reply.say("Hello")
    # forwarded while the model is still generating: nothing after "Hello" was released yet
    assert await call.recv() == Text(token="Hello", last=False)
    assert call.received() == []
    reply.say(" there", ",", " friend.").end()
    rest = await call.turn()
    assert [t.token for t in rest] == [" there", ",", " friend.", ""]
    assert rest[-1] == CLOSE
    request = model.requests[-1]
    assert request.model == "gpt-4o-mini"
    assert request.messages[0]["role"] == "system"
    assert request.messages[-1] == {"role": "user", "content": "hi"}
    assert reply.completed and reply.closed.is_set()
    await call.hangup()


async def test_empty_answer_still_closes_the_turn(model):
    model.queue().end()
    call = await connect(model)
    await call.prompt("say nothing")
    assert await call.recv() == CLOSE
    await call.hangup()


async def test_an_answer_of_empty_tokens_still_closes_its_cycle(model):
    """An empty token opens the talk cycle as any token does, so the turn ends with last:true."""
    model.queue().say("", "").end()
    call = await connect(model)
    await call.prompt("say nothing, twice")
    assert await call.turn() == [Text(token="", last=False)] * 2 + [CLOSE]
    await call.hangup()


async def test_partial_prompts_wait_for_the_final_one(model):
    call = await connect(model)
    await call.prompt("what is", last=False)
    await call.prompt("what is the", last=False)
    assert call.received() == [] and model.replies == []
    await call.prompt("what is the time")
    assert await call.reply_text() == "You said: what is the time"
    assert len(model.replies) == 1
    await call.hangup()


async def test_barge_in_stops_the_reply_and_closes_the_model_stream(model):
    reply = model.queue().say(*LONG[:5])
    call = await connect(model)
    await call.prompt("tell me a long story")
    got = [await call.recv() for _ in range(5)]
    assert got == [Text(token=t, last=False) for t in LONG[:5]]
    await call.interrupt("word0 word1", 700)
    # The handler returned once the turn was cancelled and cleaned up: nothing of the reply
    # follows its closing frame, and the model's stream is closed.
    assert call.received() == [CLOSE]
    assert reply.closed.is_set() and not reply.completed
    reply.say(*LONG[5:]).end()  # released too late: never read
    assert reply.tokens_taken == 5
    assert call.kinds().count("barge_in") == 1
    await call.hangup()


async def test_history_keeps_only_what_the_caller_heard(model):
    model.queue().say(*LONG[:6])
    call = await connect(model)
    await call.prompt("first question")
    for _ in range(6):
        await call.recv()
    await call.interrupt(" word0 word1 wo", "460")  # the early docs' string duration
    assert call.received() == [CLOSE]
    await call.prompt("second question")
    await call.reply_text()
    assert messages(model)[-3:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": " word0 word1 wo"},
        {"role": "user", "content": "second question"},
    ]
    await call.hangup()


async def test_interrupt_after_a_finished_reply_truncates_history(model):
    model.queue().say("One.", " Two.", " Three.").end()
    call = await connect(model)
    await call.prompt("count")
    assert await call.reply_text() == "One. Two. Three."
    await call.interrupt("One.", 300)  # Twilio was still speaking when the caller cut in
    await call.prompt("stop")
    await call.reply_text()
    assert {"role": "assistant", "content": "One."} in messages(model)
    assert all("Three" not in str(m.get("content")) for m in messages(model))
    await call.hangup()


async def test_interrupt_with_nothing_heard_drops_the_reply(model):
    model.queue().say(LONG[0])
    call = await connect(model)
    await call.prompt("question")
    await call.recv()
    await call.interrupt("", 15)
    assert call.received() == [CLOSE]
    await call.prompt("next")
    await call.reply_text()
    assert [m["role"] for m in messages(model)[-2:]] == ["user", "user"]
    await call.hangup()


async def test_new_prompt_during_a_reply_cancels_it(model):
    first = model.queue().say(*LONG[:3])
    call = await connect(model)
    await call.prompt("first")
    cut = [await call.recv() for _ in range(3)]
    await call.prompt("actually, something else")
    assert await call.recv() == CLOSE  # the cancelled reply's closing frame
    assert first.closed.is_set() and not first.completed
    assert await call.reply_text() == "You said: actually, something else"
    sent = "".join(t.token for t in cut if isinstance(t, Text))
    # Without an interrupt Twilio plays everything queued: history keeps what was sent.
    assert messages(model)[-3:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": sent},
        {"role": "user", "content": "actually, something else"},
    ]
    await call.hangup()


@pytest.mark.parametrize(
    ("kind", "said"), [("server", ()), ("timeout", ()), ("stream_cut", ("Partly", " said"))]
)
async def test_a_model_fault_ends_in_the_apology_and_the_call_goes_on(model, kind, said):
    model.queue().say(*said).fail(kind, "broken")
    call = await connect(model)
    await call.prompt("hello")
    apology = call.link.config.agent_config.apology
    frames = await call.turn()
    assert "".join(t.token for t in frames) == ("Partly said " if said else "") + apology
    assert frames[-1] == CLOSE
    (fault,) = [e for e in call.events if e.kind == "llm.fault"]
    assert (fault.data["kind"], fault.data["detail"]) == (kind, "broken")
    await call.prompt("still there")
    assert await call.reply_text() == "You said: still there"
    await call.hangup()


async def test_history_is_trimmed_to_the_last_turns(model):
    call = await connect(model, max_history_turns=2)
    for word in ("one", "two", "three", "four"):
        await call.prompt(word)
        await call.reply_text()
    sent = messages(model)
    assert sent[0]["role"] == "system"
    assert sent[1:] == [
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "You said: three"},
        {"role": "user", "content": "four"},
    ]
    await call.hangup()


async def test_a_barge_in_keeps_what_was_heard_of_a_long_reply(model):
    model.queue().say(*[" word"] * 3_000)
    call = await connect(model)
    await call.prompt("tell me everything")
    for _ in range(3_000):
        await call.recv()
    heard = " word" * 2_000 + " wo"
    await call.interrupt(heard)
    assert call.received() == [CLOSE]
    await call.prompt("stop")
    assert await call.reply_text() == "You said: stop"
    assert messages(model)[-3:] == [
        {"role": "user", "content": "tell me everything"},
        {"role": "assistant", "content": heard},
        {"role": "user", "content": "stop"},
    ]
    await call.hangup()


class _Stubborn:
    """A responder that swallows the barge-in's cancel and tries to say more."""

    def __init__(self) -> None:
        self.tried_after_cut = False

    async def reply(self, agent: Any, user_text: str) -> AsyncGenerator[str, None]:
        yield "First words."
        try:
            await asyncio.Event().wait()  # until the caller cuts in
        except asyncio.CancelledError:
            self.tried_after_cut = True
            yield " Words after the cut."


async def test_a_responder_that_swallows_the_cancel_adds_no_words_after_a_barge_in(model):
    stubborn = _Stubborn()

    class Agent(ConversationAgent):
        responder = stubborn

    config = RelayConfig(agent_config=AgentConfig(silence_timeout=0))
    call = await FakeCall(
        Agent, services=Services(chat=model, clock=FakeClock()), config=config
    ).connect()
    await call.prompt("hi")
    assert await call.recv() == Text(token="First words.", last=False)
    await call.interrupt("First words.", 500)
    # the responder did yield after the cut; the caller got only the cycle's close
    assert stubborn.tried_after_cut
    assert call.received() == [CLOSE]
    await call.hangup()
