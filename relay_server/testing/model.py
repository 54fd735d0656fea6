"""A chat model whose answers the test releases step by step.

Each request the agent makes gets a :class:`FakeReply`. The test scripts it before or after the
request is made: :meth:`FakeReply.say` releases tokens, :meth:`FakeReply.call_tool` a tool call,
:meth:`FakeReply.end` the end of the answer and :meth:`FakeReply.fail` an
:class:`~relay_server.chat.LLMError`. Until a step is released the agent waits for it, exactly as
for a slow model, so barge-in, the filler, tool rounds and faults happen where the test says,
with no sleeps and no wall clock.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Union

from relay_server.chat import LLMError, Message, ToolCall


@dataclass(frozen=True)
class ChatRequest:
    """What the agent asked for: the history as it was at the request (a copy)."""

    model: str
    messages: list[Message]
    tools: list[dict[str, Any]] | None
    temperature: float | None

    @property
    def tool_names(self) -> list[str]:
        """The names of the tools offered."""
        return [t["function"]["name"] for t in self.tools or ()]


_ids = itertools.count(1)


class _End:
    pass


_Step = Union[str, ToolCall, LLMError, _End]


class FakeReply:
    """One answer of :class:`FakeChatModel`; a :class:`~relay_server.chat.ChatReply`."""

    def __init__(self) -> None:
        self._steps: asyncio.Queue[_Step] = asyncio.Queue()
        self._calls: list[ToolCall] = []
        #: The request this answer is for (``None`` until the agent asks).
        self.request: ChatRequest | None = None
        #: Set when the agent opened the answer, and when it closed it (read to its end or not).
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        #: The agent read the answer to its end.
        self.completed = False
        #: Tokens the agent took.
        self.tokens_taken = 0

    # ------------------------------------------------------------------------ test side
    def say(self, *tokens: str) -> FakeReply:
        """Release ``tokens``, in order."""
        for token in tokens:
            self._steps.put_nowait(token)
        return self

    def call_tool(self, name: str, arguments: str = "{}", call_id: str | None = None) -> FakeReply:
        """Release a complete tool call (after the tokens released before it)."""
        self._steps.put_nowait(ToolCall(call_id or f"call_{next(_ids)}", name, arguments))
        return self

    def end(self) -> FakeReply:
        """Release the end of the answer."""
        self._steps.put_nowait(_End())
        return self

    def fail(self, kind: str = "server", detail: str = "the fake model failed") -> FakeReply:
        """Release a fault: the agent's read raises :class:`LLMError` (``kind``, ``detail``)."""
        self._steps.put_nowait(LLMError(kind, detail))
        return self

    # ----------------------------------------------------------------------- agent side
    @property
    def tool_calls(self) -> Sequence[ToolCall]:
        """The tool calls released so far (all of them once the answer ended)."""
        return self._calls

    async def __aenter__(self) -> FakeReply:
        self.opened.set()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.closed.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._tokens()

    async def _tokens(self) -> AsyncGenerator[str, None]:
        while True:
            step = await self._steps.get()
            if isinstance(step, _End):
                self.completed = True
                return
            if isinstance(step, LLMError):
                raise step
            if isinstance(step, ToolCall):
                self._calls.append(step)
                continue
            self.tokens_taken += 1
            yield step


class FakeChatModel:
    """A :class:`~relay_server.chat.ChatModel` for tests.

    With ``echo``, a request nothing was queued for is answered "You said: <the caller's last
    words>" at once.
    """

    def __init__(self, *, echo: bool = False) -> None:
        self.echo = echo
        #: Every answer handed out, in request order.
        self.replies: list[FakeReply] = []
        self._queued: deque[FakeReply] = deque()
        self._asked = asyncio.Event()
        self.closed = False

    def queue(self) -> FakeReply:
        """The answer to the next request not yet queued for (script it now or later)."""
        reply = FakeReply()
        self._queued.append(reply)
        return reply

    @property
    def requests(self) -> list[ChatRequest]:
        """The requests made so far."""
        return [r.request for r in self.replies if r.request is not None]

    async def requested(self, count: int) -> FakeReply:
        """Wait until the agent made ``count`` requests in all; the answer to the last one."""
        while len(self.replies) < count:
            self._asked.clear()
            await self._asked.wait()
        return self.replies[count - 1]

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> FakeReply:
        """Hand out the next answer (queued, echoed or gated)."""
        if self._queued:
            reply = self._queued.popleft()
        else:
            reply = FakeReply()
            if self.echo:
                reply.say(*_echo(messages)).end()
        offered = copy.deepcopy(list(tools)) if tools else None
        reply.request = ChatRequest(model, copy.deepcopy(list(messages)), offered, temperature)
        self.replies.append(reply)
        self._asked.set()
        return reply

    async def aclose(self) -> None:
        """Nothing to release."""
        self.closed = True


def _echo(messages: Sequence[Message]) -> list[str]:
    users = (m for m in reversed(messages) if m.get("role") == "user")
    said = str(next(users, {}).get("content") or "")
    return ["You", " said", ":", *(f" {w}" for w in said.split())]
