"""The chat model's reply in-process, and the conversation's history bookkeeping.

ChatStream runs over a fake HTTP response (no socket); the history bookkeeping needs no event loop
at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay_server.agents.history import Conversation
from relay_server.chat import LLMError, ToolCall
from relay_server.llm import ChatStream


class _Response:
    """What the SDK's raw streaming response offers ChatStream: ``http_response.aiter_bytes``."""

    def __init__(self, chunks: asyncio.Queue[bytes | None]) -> None:
        self.http_response = self
        self._chunks = chunks

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk


class _Manager:
    def __init__(self) -> None:
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.exited = False

    async def __aenter__(self) -> _Response:
        return _Response(self.chunks)

    async def __aexit__(self, *exc: Any) -> None:
        self.exited = True


def _token(text: str) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"' + text.encode() + b'"}}]}\n\n'


@pytest.mark.asyncio
async def test_leaving_the_stream_with_a_token_in_hand_closes_it_and_its_watchdog():
    manager = _Manager()
    stream = ChatStream(manager, timeout=3600)
    manager.chunks.put_nowait(_token("Hello"))  # one network read each: one token each
    manager.chunks.put_nowait(_token(" there"))
    async with stream:
        async for token in stream:
            assert token == "Hello"
            break  # as a cancelled turn does: the generator is left at its yield
    assert manager.exited
    assert stream._watch is None  # the watchdog timer went with the generator


@pytest.mark.asyncio
async def test_the_tokens_of_one_network_read_are_forwarded_together():
    manager = _Manager()
    stream = ChatStream(manager, timeout=3600)
    manager.chunks.put_nowait(_token("Hello") + b": keep-alive\n\n" + _token(" there"))
    manager.chunks.put_nowait(_token(" you") + b"data: [DONE]\n\n")
    manager.chunks.put_nowait(None)
    async with stream:
        assert [token async for token in stream] == ["Hello there", " you"]


@pytest.mark.asyncio
async def test_keepalives_hold_no_token_and_the_watchdog_ends_the_stream():
    manager = _Manager()
    stream = ChatStream(manager, timeout=0.01)
    manager.chunks.put_nowait(b": keep-alive\n\n")  # then nothing: the read waits for ever
    with pytest.raises(LLMError) as raised:
        async with stream:
            async for _ in stream:
                pass
    assert raised.value.kind == "timeout"
    assert manager.exited


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
