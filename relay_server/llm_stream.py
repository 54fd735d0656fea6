"""Reading a streaming chat completion: SSE ``data:`` lines parsed by msgspec, token by token.

Transport-neutral: :class:`ChatStream` reads a :class:`Body` (the response's bytes, one await
per network read) opened by whoever sent the request (:mod:`relay_server.llm`). Each SSE
``data:`` line is decoded by msgspec into a small typed struct: parsing every chunk into the
SDK's pydantic models costs most of a relay's CPU at 200 concurrent calls (``bench/``
measures both). Leaving the ``async with`` closes the body without draining it, so a cancelled
turn stops the upstream generation at once.

Two bounds protect the caller and the other calls from a misbehaving LLM (or a gateway in
front of it), at no cost per token: the LLM timeout counts the time without a *token* (a
content or tool-call delta; keep-alive comments, empty and role-only chunks do not count), and
a line of the stream may not exceed ``LLMConfig.max_line_bytes`` (1 MiB): an unfinished line is
kept as its pieces, never re-copied per network read, and a longer one ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, Union

import aiohttp
import httpx2
import msgspec

from relay_server.chat import LLMError, ToolCall

#: How long to wait for the end of the HTTP response after ``[DONE]`` (to reuse the connection).
_TAIL_SECONDS = 0.5


class Body(Protocol):
    """An open response body: ``read()`` awaits the next network read, ``b""`` at the end."""

    #: The bytes of the next network read; ``b""`` once the body has ended.
    read: Callable[[], Awaitable[bytes]]

    async def aclose(self) -> None:
        """Close the response; the connection is kept only if the body was read to its end."""
        ...


# ---------------------------------------------------------------- chunk structs (the hot path)
class _FunctionDelta(msgspec.Struct):
    name: Union[str, None] = None
    arguments: Union[str, None] = None


class _ToolCallDelta(msgspec.Struct):
    index: int = 0
    id: Union[str, None] = None
    function: Union[_FunctionDelta, None] = None


class _Delta(msgspec.Struct):
    content: Union[str, None] = None
    tool_calls: Union[list[_ToolCallDelta], None] = None


class _Choice(msgspec.Struct):
    delta: Union[_Delta, None] = None
    finish_reason: Union[str, None] = None


class _ErrorBody(msgspec.Struct):
    message: str = ""


class Usage(msgspec.Struct):
    """The stream's usage report (asked with ``stream_options: {"include_usage": true}``)."""

    prompt_tokens: Union[int, None] = None
    completion_tokens: Union[int, None] = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    error: Union[_ErrorBody, None] = None
    #: ``null`` on every chunk but the last (``"choices": []``) when usage is asked for;
    #: absent otherwise. Some servers put it on their last content chunk instead.
    usage: Union[Usage, None] = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _unreadable(payload: bytes) -> LLMError:
    return LLMError("bad_chunk", f"unreadable chunk: {payload[:80]!r}")


@dataclass
class _Pending:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


#: Seconds between watchdog looks while an overdue stream's consumer holds a token.
_RECHECK = 0.05


class ChatStream:
    """One streaming completion (a :class:`relay_server.chat.ChatReply`).

    Iterate for content tokens (strings, never trimmed); after the loop, :attr:`tool_calls`,
    :attr:`finish_reason` and :attr:`usage` (the token counts, when the server reported them)
    hold the rest. Use as ``async with``: entering sends the request
    (``open`` returns its :class:`Body`), leaving closes the response without draining it.

    ``timeout``: seconds without a token (from the request on) before the stream is a
    ``timeout`` fault; ``None``: no limit beyond the HTTP client's. ``max_line``: the longest
    SSE line accepted, in bytes.
    """

    __slots__ = (
        "_body", "_fed", "_iterator", "_last", "_max_line", "_open", "_pending", "_reader",
        "_stalled", "_timeout", "_watch", "finish_reason", "tool_calls", "usage",
    )  # fmt: skip

    def __init__(
        self,
        open_body: Callable[[], Awaitable[Body]],
        *,
        timeout: float | None = None,
        max_line: int = 1 << 20,
    ) -> None:
        self._open = open_body
        self._body: Body | None = None
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        #: The server's usage report (``None``: none came, or not yet).
        self.usage: Usage | None = None
        self._pending: dict[int, _Pending] = {}
        self._timeout = timeout
        self._max_line = max_line
        #: Content and tool-call deltas parsed so far (what counts as a token for the timeout).
        self._fed = 0
        #: Loop time of the last token, or of the request before the first one.
        self._last = 0.0
        #: The task waiting for the network on this stream's behalf; ``None`` while the
        #: consumer holds a token (its time is not the LLM's).
        self._reader: asyncio.Task[object] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._stalled = False
        self._iterator: AsyncGenerator[str, None] | None = None

    async def __aenter__(self) -> ChatStream:
        self._last = asyncio.get_running_loop().time()
        self._body = await self._open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closes the connection; does not read the rest of the stream (no drain). The token
        # generator is closed first: a turn cancelled while it held a token never resumed it,
        # and its watchdog timer must not outlive the stream.
        try:
            if self._iterator is not None:
                await self._iterator.aclose()
        finally:
            if self._body is not None:
                await self._body.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        self._iterator = self._tokens()
        return self._iterator

    def _check(self) -> None:
        """The token watchdog: one timer per stream, moved only when it fires.

        A token costs a counter and a clock read per network read, not a timer. Cancels the
        waiting read once ``timeout`` seconds passed without a token.
        """
        assert self._timeout is not None
        loop = asyncio.get_running_loop()
        now, due = loop.time(), self._last + self._timeout
        if now >= due and self._reader is not None:
            self._watch = None
            self._stalled = True
            self._reader.cancel()
            return
        # Overdue while the consumer holds a token: look again soon after the read resumes,
        # not a whole timeout later.
        self._watch = loop.call_at(due if due > now else now + _RECHECK, self._check)

    def _oversized(self) -> LLMError:
        limit = self._max_line
        size = f"{limit / (1 << 20):g} MiB" if limit >= 1 << 20 else f"{limit} bytes"
        return LLMError(
            "bad_chunk",
            f"a line of the stream is longer than {size} (the relay's limit); stream closed",
            fix="the LLM server (or a proxy in front of it) is not streaming chat chunks: "
            "check OPENAI_BASE_URL",
        )

    async def _tokens(self) -> AsyncGenerator[str, None]:
        """Content tokens, all those of one network read in one string.

        A read holding several SSE events (a busy relay, or a provider's burst) is forwarded at
        once as their concatenation: nothing is held back waiting for more.
        """
        done = False
        # The unfinished last line, as the pieces it came in (joined once, when it ends).
        pending: list[bytes] = []
        pending_size = 0
        max_line = self._max_line
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        fed = self._fed
        if self._timeout:
            self._watch = loop.call_at(self._last + self._timeout, self._check)
        assert self._body is not None, "use the stream as 'async with'"
        read = self._body.read
        take = self._take
        decode = _decode_chunk
        try:
            while True:
                self._reader = task
                chunk = await read()
                self._reader = None
                if not chunk:
                    break
                if pending:
                    pending.append(chunk)
                    if b"\n" not in chunk:
                        pending_size += len(chunk)
                        if pending_size > max_line:
                            raise self._oversized()
                        continue
                    chunk = b"".join(pending)
                    pending = []
                # One split per network read: no copy of the rest of the buffer per line.
                lines = chunk.split(b"\n")
                rest = lines.pop()  # the unfinished last line, if any
                if rest:
                    pending, pending_size = [rest], len(rest)
                    if pending_size > max_line:
                        raise self._oversized()
                if len(chunk) > max_line and any(len(raw) > max_line for raw in lines):
                    raise self._oversized()
                said: str | None = None  # the read's content, all its tokens in one string
                try:
                    for raw in lines:
                        if not raw.startswith(b"data:"):
                            continue  # blank separators, comments, event: lines
                        payload = raw[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        try:
                            parsed = decode(payload)
                        except msgspec.DecodeError as exc:
                            raise _unreadable(payload) from exc
                        # The common chunk, one choice with a content token, here: a method
                        # call fewer per token. Anything else goes through _take.
                        choices = parsed.choices
                        if len(choices) == 1 and parsed.error is None and parsed.usage is None:
                            choice = choices[0]
                            delta = choice.delta
                            if (
                                delta is not None
                                and delta.content
                                and delta.tool_calls is None
                                and choice.finish_reason is None
                            ):
                                if said is None:
                                    said = delta.content
                                else:  # in place (CPython appends to a local it owns)
                                    said += delta.content
                                self._fed += 1
                                continue
                        said = take(parsed, said)
                except LLMError:
                    if said is not None:  # a fault later in the same read: what was said first
                        yield said
                    raise
                if said is not None:
                    yield said
                if self._fed != fed:
                    fed, self._last = self._fed, loop.time()
                if done:
                    break
        except asyncio.CancelledError:
            if self._stalled and task is not None and task.uncancel() == 0:
                raise LLMError("timeout", f"no token for {self._timeout:g} s") from None
            raise
        except (httpx2.TimeoutException, aiohttp.ServerTimeoutError) as exc:
            raise LLMError("timeout", "the stream stalled (read timeout)") from exc
        except (httpx2.TransportError, aiohttp.ClientError) as exc:
            raise LLMError("stream_cut", f"the stream broke: {type(exc).__name__}: {exc}") from exc
        finally:
            self._reader = None
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
        if done:
            # Read the end of the HTTP response (the last chunk of the chunked body) so the
            # connection goes back to the pool; a cancelled turn never gets here (no drain).
            # Bounded: a server that holds the stream open after [DONE] costs its connection,
            # never the caller's time.
            with contextlib.suppress(httpx2.HTTPError, aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(_TAIL_SECONDS):
                    while await read():
                        pass
        elif self.finish_reason is None:
            # Some servers end with the finish_reason chunk and no [DONE]: that is complete.
            raise LLMError("stream_cut", "the stream ended without [DONE]")
        self._finish_tools()

    def _take(self, chunk: _Chunk, said: str | None) -> str | None:
        """One parsed chunk: ``said`` (the read's content so far) with its content, if any."""
        if chunk.error is not None:
            raise LLMError("server", chunk.error.message or "error event in the stream")
        if chunk.usage is not None:  # once per stream: ``null`` decodes to None
            self.usage = chunk.usage
        for choice in chunk.choices:
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                if said is None:
                    said = delta.content
                else:
                    said += delta.content
                self._fed += 1
            if delta.tool_calls:
                self._fed += 1
                for call in delta.tool_calls:
                    pending = self._pending.setdefault(call.index, _Pending())
                    if call.id:
                        pending.id = call.id
                    if call.function is not None:
                        if call.function.name:
                            pending.name += call.function.name
                        if call.function.arguments:
                            pending.arguments.append(call.function.arguments)
        return said

    def _finish_tools(self) -> None:
        self.tool_calls = [
            ToolCall(p.id or f"call_{i}", p.name, "".join(p.arguments))
            for i, p in sorted(self._pending.items())
        ]
