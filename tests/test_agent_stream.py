"""The chat model's reply in-process, and the conversation's history bookkeeping.

ChatStream runs over a fake response body (no socket); the history bookkeeping needs no event loop
at all.
"""

from __future__ import annotations

import asyncio

import pytest

from relay_server.agents.history import Conversation
from relay_server.chat import LLMError, ToolCall
from relay_server.llm import ChatStream


class _Body:
    """A response body as ChatStream reads it: one ``read()`` per network read."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def read(self) -> bytes:
        return (await self.chunks.get()) or b""

    async def aclose(self) -> None:
        self.closed = True

    async def open(self) -> _Body:
        return self


def _token(text: str) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


@pytest.mark.asyncio
async def test_leaving_the_stream_with_a_token_in_hand_closes_it_and_its_watchdog():
    body = _Body()
    stream = ChatStream(body.open, timeout=3600)
    body.chunks.put_nowait(_token("Hello"))  # one network read each: one token each
    body.chunks.put_nowait(_token(" there"))
    async with stream:
        async for token in stream:
            assert token == "Hello"
            break  # as a cancelled turn does: the generator is left at its yield
    assert body.closed
    assert stream._watch is None  # the watchdog timer went with the generator


@pytest.mark.asyncio
async def test_the_tokens_of_one_network_read_are_forwarded_together():
    body = _Body()
    stream = ChatStream(body.open, timeout=3600)
    body.chunks.put_nowait(_token("Hello") + b": keep-alive\n\n" + _token(" there"))
    body.chunks.put_nowait(_token(" you") + b"data: [DONE]\n\n")
    body.chunks.put_nowait(None)
    async with stream:
        assert [token async for token in stream] == ["Hello there", " you"]


@pytest.mark.asyncio
async def test_keepalives_hold_no_token_and_the_watchdog_ends_the_stream():
    body = _Body()
    stream = ChatStream(body.open, timeout=0.01)
    body.chunks.put_nowait(b": keep-alive\n\n")  # then nothing: the read waits for ever
    with pytest.raises(LLMError) as raised:
        async with stream:
            async for _ in stream:
                pass
    assert raised.value.kind == "timeout"
    assert body.closed


def test_trimming_never_starts_with_an_orphaned_tool_result():
    conversation = Conversation("system")
    conversation.add_user("look it up", max_turns=10)
    conversation.add_tool_calls([ToolCall("c1", "lookup", "{}")])
    conversation.add_tool_results([ToolCall("c1", "lookup", "{}")], {"c1": "found"})
    conversation.add_token("Found it.")
    conversation.close_message()
    conversation.add_user("thanks", max_turns=1)
    assert conversation.messages == [
        {"role": "system", "content": "system"},
        {"role": "user", "content": "thanks"},
    ]


def test_a_cut_reply_keeps_what_was_heard_across_tool_rounds():
    conversation = Conversation("system")
    conversation.add_user("q", max_turns=10)
    conversation.begin_reply()
    for token in ("Let", " me", " check."):
        conversation.add_token(token)
    calls = [ToolCall("c1", "lookup", "{}")]
    conversation.add_tool_calls(calls)
    conversation.add_tool_results(calls, {})
    conversation.add_token(" It shipped.")
    conversation.keep_heard("Let me check. It")
    assert conversation.messages[2:] == [
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "cancelled: the caller interrupted"},
        {"role": "assistant", "content": " It"},
    ]


def test_a_reply_s_tokens_go_to_the_speaker_s_list_and_its_rounds_stay_in_order():
    """begin_reply hands the speaker the list it appends to; each round is its own message."""
    conversation = Conversation("system")
    conversation.add_user("q", max_turns=10)
    spoken = conversation.begin_reply()
    spoken += ["Let", " me", " look."]
    calls = [ToolCall("c1", "lookup", "{}")]
    conversation.add_tool_calls(calls)  # the first round's words, with its tool calls
    conversation.add_tool_results(calls, {"c1": "found"})
    assert conversation.messages[-1]["role"] == "tool"  # no message yet for round two
    spoken += [" Found", " it."]
    conversation.end_reply()
    assert [m["role"] for m in conversation.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert conversation.messages[2]["content"] == "Let me look."
    assert conversation.messages[4] == {"role": "assistant", "content": " Found it."}
    assert spoken == ["Let", " me", " look.", " Found", " it."]  # the whole reply, for its event
    # the reply is over: its tokens are let go, and the next one starts a list of its own
    assert conversation.begin_reply() == [] and conversation.begin_reply() is not spoken
    conversation.add_user("and then?", max_turns=10)
    assert conversation.messages[-1] == {"role": "user", "content": "and then?"}
