"""The LLM seam: what an agent needs from a chat model, as a typed protocol.

Agents depend on :class:`ChatModel`, never on a concrete client: the relay's
:class:`relay_server.llm.LLMClient` (an OpenAI-compatible endpoint over HTTP) implements it, and
so does :class:`relay_server.testing.FakeChatModel`, whose replies a test releases step by step.
This module imports nothing heavy (no ``openai``): an agent that never talks to a model does not
load the SDK.

A reply is used as ``async with model.stream(...) as reply: async for token in reply``. Leaving
the ``async with`` (also by cancellation) closes the reply at once: for the HTTP client, the
response is closed without draining, so the upstream generation stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from relay_server.errors import RelayError

#: A chat message as the OpenAI-compatible API takes it (``{"role": …, "content": …}``).
Message = dict[str, Any]


class LLMError(RelayError):
    """The LLM could not answer.

    ``kind`` is one of: connection, timeout, rate_limit, server, status, stream_cut, bad_chunk
    (also a line over the limit). ``fix`` is the next step when the cause is known precisely
    (an unresolvable host, a refused connection).
    """

    def __init__(
        self, kind: str, detail: str, fix: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.fix = fix
        #: The HTTP status, for an error answer.
        self.status = status


@dataclass
class ToolCall:
    """A complete tool call, assembled from streamed fragments."""

    id: str
    name: str
    arguments: str


class ChatReply(Protocol):
    """One streamed answer: an async context manager that iterates content tokens.

    Tokens are strings, never trimmed. After the loop, :attr:`tool_calls` holds the calls the
    model asked for. Failures are :class:`LLMError`, raised on entering or while iterating.
    """

    @property
    def tool_calls(self) -> Sequence[ToolCall]:
        """The tool calls of the answer (complete once the iteration ended)."""
        ...

    async def __aenter__(self) -> ChatReply:
        """Send the request."""
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the answer at once (no drain), whether it was read to its end or not."""
        ...

    def __aiter__(self) -> AsyncIterator[str]:
        """The content tokens as they arrive."""
        ...


class ChatModel(Protocol):
    """A chat model the agents stream answers from."""

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> ChatReply:
        """Start a streaming answer to ``messages``; use the result as ``async with``."""
        ...

    async def aclose(self) -> None:
        """Release the model's resources (its connection pool)."""
        ...
