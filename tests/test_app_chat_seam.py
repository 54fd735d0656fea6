"""The whole relay (real sockets, signed like Twilio) against a chat model the test scripts.

The app is ``create_app(chat=FakeChatModel())``: the LLM seam reaches through the app, not only
through in-process sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from relay_server.protocol import Text
from relay_server.testing import FakeChatModel
from tests.support import RelayServer, TwilioCaller, config


@pytest.fixture
def model() -> FakeChatModel:
    return FakeChatModel()


@pytest.fixture
def relay(model: FakeChatModel) -> Iterator[RelayServer]:
    with RelayServer(config(agent="llm", events_db=""), chat=model) as server:
        yield server


async def test_the_app_talks_to_the_model_it_was_given(
    relay: RelayServer, model: FakeChatModel
) -> None:
    model.queue().say("Hello", " there").end()
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    assert await caller.reply_text() == "Hello there"
    (request,) = model.requests
    assert request.messages[-1] == {"role": "user", "content": "hi"}
    await caller.hangup()
    assert not model.closed  # the test's model: the app leaves it open


async def test_a_model_fault_through_the_app_is_an_apology_and_an_event(
    relay: RelayServer, model: FakeChatModel
) -> None:
    model.queue().fail("rate_limit", "429 from the fake")
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hello?")
    frames = await caller.recv_turn()
    assert all(isinstance(f, Text) for f in frames) and frames[-1].last is True
    assert "".join(f.token for f in frames if isinstance(f, Text)).strip()  # not silence
    await caller.hangup()
    faults = [e for e in relay.events if e.kind == "llm.fault"]
    assert [(e.data["kind"], e.data["detail"]) for e in faults] == [
        ("rate_limit", "429 from the fake")
    ]
