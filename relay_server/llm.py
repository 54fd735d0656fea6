"""Streaming chat completions: the one module that imports ``openai``.

The per-token path is kept lean. The official SDK makes the request (auth, base URL, retries,
error mapping), but the stream is read through the SDK's *raw* streaming response and each SSE
``data:`` line is decoded by msgspec into a small typed struct. Parsing every chunk into the
SDK's pydantic models costs most of a relay's CPU at 200 concurrent calls (issue 2 figures;
``bench/`` measures both paths). Leaving the ``async with`` closes the HTTP stream without
draining it, so a cancelled turn stops the upstream generation at once.

Two bounds protect the caller and the other calls from a misbehaving LLM (or a gateway in
front of it), at no cost per token: the LLM timeout counts the time without a *token* (a
content or tool-call delta; keep-alive comments, empty and role-only chunks do not count), and
a line of the stream may not exceed ``LLMConfig.max_line_bytes`` (1 MiB): an unfinished line is
kept as its pieces, never re-copied per network read, and a longer one ends the stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import aiohttp
import httpx2
import msgspec
import openai

from relay_server.chat import LLMError, ToolCall
from relay_server.config import LLMConfig
from relay_server.errors import ConfigError

# LLMError and ToolCall live in the seam (relay_server.chat); re-exported for callers of old.
__all__ = ["ChatStream", "LLMCheck", "LLMClient", "LLMError", "ToolCall", "check_llm", "describe"]

log = logging.getLogger("relay_server.llm")

#: How long to wait for the end of the HTTP response after ``[DONE]`` (to reuse the connection).
_TAIL_SECONDS = 0.5


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


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)
    error: Union[_ErrorBody, None] = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


@dataclass
class _Pending:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


#: Seconds between watchdog looks while an overdue stream's consumer holds a token.
_RECHECK = 0.05


class ChatStream:
    """One streaming completion (a :class:`relay_server.chat.ChatReply`).

    Iterate for content tokens (strings, never trimmed); after the loop, :attr:`tool_calls`
    and :attr:`finish_reason` hold the rest. Use as ``async with``.

    ``timeout``: seconds without a token (from the request on) before the stream is a
    ``timeout`` fault; ``None``: no limit beyond the SDK's. ``max_line``: the longest SSE line
    read, in bytes.
    """

    def __init__(
        self, manager: Any, *, timeout: float | None = None, max_line: int = 1 << 20
    ) -> None:
        self._manager = manager
        self._response: Any = None
        self.tool_calls: list[ToolCall] = []
        self.finish_reason: str | None = None
        self._pending: dict[int, _Pending] = {}
        self._timeout = timeout
        self._max_line = max_line
        #: Content and tool-call deltas parsed so far (what counts as a token for the timeout).
        self._fed = 0
        #: Loop time of the last token, or of the request before the first one.
        self._last = 0.0
        #: The task waiting for the network on this stream's behalf; ``None`` while the
        #: consumer holds a token (its time is not the LLM's).
        self._reader: asyncio.Task[Any] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self._stalled = False
        self._iterator: AsyncGenerator[str, None] | None = None

    async def __aenter__(self) -> ChatStream:
        self._last = asyncio.get_running_loop().time()
        try:
            self._response = await self._manager.__aenter__()
        except openai.APIError as exc:
            raise _map_error(exc) from exc
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # Closes the connection; does not read the rest of the stream (no drain). The token
        # generator is closed first: a turn cancelled while it held a token never resumed it,
        # and its watchdog timer must not outlive the stream.
        try:
            if self._iterator is not None:
                await self._iterator.aclose()
        finally:
            await self._manager.__aexit__(*exc_info)

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

    def _reader_of(self) -> tuple[Callable[[], Awaitable[bytes]], Any]:
        """The stream's read: one await per network read, ``b""`` at its end.

        Straight from aiohttp's buffer when the SDK's transport is aiohttp and the body is not
        compressed (four async-generator hops fewer per read: httpx2's decoders and the
        transport's chunk iterator); else httpx2's decoded bytes (a proxy may gzip the stream).
        """
        http_response = self._response.http_response
        stream = getattr(http_response, "stream", None)
        stream = getattr(stream, "_stream", stream)  # httpx2's BoundAsyncStream wraps it
        raw = getattr(stream, "_aiohttp_response", None)
        encoding = http_response.headers.get("content-encoding", "identity") if raw else None
        if raw is not None and encoding in ("", "identity"):
            return raw.content.readany, None
        # aiter_bytes, not aiter_raw: a proxy may gzip the stream (the SDK accepts gzip).
        chunks = http_response.aiter_bytes()
        anext_chunk = chunks.__anext__

        async def read() -> bytes:
            try:
                return await anext_chunk()  # type: ignore[no-any-return]
            except StopAsyncIteration:
                return b""

        return read, chunks

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
        read, chunks = self._reader_of()
        feed = self._feed
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
                tokens: list[str] = []
                try:
                    for raw in lines:
                        if not raw.startswith(b"data:"):
                            continue  # blank separators, comments, event: lines
                        payload = raw[5:].strip()
                        if payload == b"[DONE]":
                            done = True
                            break
                        feed(payload, tokens)
                except LLMError:
                    if tokens:  # a fault later in the same read: what was said goes first
                        yield "".join(tokens)
                    raise
                if tokens:
                    yield tokens[0] if len(tokens) == 1 else "".join(tokens)
                if self._fed != fed:
                    fed, self._last = self._fed, loop.time()
                if done:
                    break
        except asyncio.CancelledError:
            if self._stalled and task is not None and task.uncancel() == 0:
                raise LLMError("timeout", f"no token for {self._timeout:g} s") from None
            raise
        except openai.APIError as exc:
            raise _map_error(exc) from exc
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
        if chunks is not None:
            await chunks.aclose()
        self._finish_tools()

    def _feed(self, payload: bytes, tokens: list[str]) -> None:
        """Parse one ``data:`` payload; its content token (if any) goes into ``tokens``."""
        try:
            chunk = _decode_chunk(payload)
        except msgspec.DecodeError as exc:
            raise LLMError("bad_chunk", f"unreadable chunk: {payload[:80]!r}") from exc
        if chunk.error is not None:
            raise LLMError("server", chunk.error.message or "error event in the stream")
        for choice in chunk.choices:
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                tokens.append(delta.content)
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

    def _finish_tools(self) -> None:
        self.tool_calls = [
            ToolCall(p.id or f"call_{i}", p.name, "".join(p.arguments))
            for i, p in sorted(self._pending.items())
        ]


def _map_error(exc: openai.APIError) -> LLMError:
    if isinstance(exc, openai.APIConnectionError):
        # Before the timeout check: the aiohttp transport reports an unresolvable host and a
        # refused connection as a connect *timeout*, which sends people looking at the wrong
        # thing.
        unreachable = _unreachable(exc)
        if unreachable is not None:
            return unreachable
    if isinstance(exc, openai.APITimeoutError):
        return LLMError("timeout", "the LLM did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return LLMError("connection", f"cannot connect: {exc.__cause__ or exc}")
    if isinstance(exc, openai.RateLimitError):
        return LLMError("rate_limit", "the LLM rate-limited us (HTTP 429)", status=429)
    if isinstance(exc, openai.InternalServerError):
        return LLMError(
            "server", f"the LLM failed (HTTP {exc.status_code})", status=exc.status_code
        )
    if isinstance(exc, openai.APIStatusError):
        return LLMError(
            "status",
            f"the LLM refused the request (HTTP {exc.status_code}): {exc.message}",
            status=exc.status_code,
        )
    return LLMError("connection", str(exc))


def _unreachable(exc: BaseException) -> LLMError | None:
    """The LLMError for a connection that failed before any HTTP, else ``None``.

    It failed when the host does not resolve, nothing listens on the port, or another socket
    error happened. ``None`` for anything else (a real timeout).
    """
    host: str | None = None
    port: int | None = None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        # aiohttp's ClientConnectorError knows the host and port, and keeps the socket error
        # as ``os_error``.
        found_host, found_port = getattr(cause, "host", None), getattr(cause, "port", None)
        host = host or (found_host if isinstance(found_host, str) else None)
        port = port or (found_port if isinstance(found_port, int) else None)
        errors = (cause, getattr(cause, "os_error", None))
        where = f"{host}:{port}" if host and port else (host or "the LLM's host")
        if any(isinstance(e, socket.gaierror) for e in errors):
            return LLMError(
                "connection",
                f"cannot resolve host {host or '?'}",
                fix="check the host name in OPENAI_BASE_URL (and this machine's network)",
            )
        if any(isinstance(e, ConnectionRefusedError) for e in errors):
            return LLMError(
                "connection",
                f"connection refused to {where}",
                fix="start the model server, or correct the address in OPENAI_BASE_URL",
            )
        if any(isinstance(e, ConnectionError) for e in errors):
            return LLMError("connection", f"cannot connect to {where}: {cause}")
        cause = cause.__cause__ or cause.__context__
    return None


class LLMClient:
    """A shared async OpenAI-compatible client: the relay's :class:`~relay_server.chat.ChatModel`.

    One connection pool for all calls.
    """

    def __init__(self, config: LLMConfig) -> None:
        self.config = config
        self._client = openai.AsyncOpenAI(
            api_key=config.api_key or "unset",
            base_url=config.base_url,
            timeout=config.timeout,
            max_retries=config.max_retries,
            http_client=openai.DefaultAioHttpClient(),
        )

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        """Start a streaming chat completion; use the result as ``async with``."""
        # Messages and tools go in ``extra_body``, as the JSON they already are: the SDK would
        # otherwise walk the whole history through its type transforms on every turn (~3 ms
        # of blocking CPU at 20 messages, bench/). The request is the same on the wire.
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        return ChatStream(
            self._client.chat.completions.with_streaming_response.create(
                model=model,
                messages=[],
                stream=True,
                temperature=temperature if temperature is not None else openai.omit,
                extra_body=body,
            ),
            timeout=self.config.timeout,
            max_line=self.config.max_line_bytes,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()


# ------------------------------------------------------------------------ at start-up
#: Seconds the start-up check waits for ``GET /models``.
CHECK_TIMEOUT = 3.0


def describe(config: LLMConfig) -> str:
    """The LLM in words: its base URL, or "OpenAI" for the official API."""
    return config.base_url or "OpenAI"


@dataclass(frozen=True)
class LLMCheck:
    """What the start-up check found: the model, how it was chosen, and a warning.

    The warning (one line, not fatal) says the LLM cannot be reached or refuses the key.
    """

    model: str
    #: "given" (--model / CRCTL_MODEL), "default", or "the only model <url> lists".
    source: str
    warning: str | None = None


def check_llm(
    config: LLMConfig, model: str | None, default_model: str, timeout: float = CHECK_TIMEOUT
) -> LLMCheck:
    """Ask the LLM for its models (``GET {base_url}/models``) once, at start.

    With a base URL and no ``model``, the server's only model is used; several, none, or a
    server that cannot be asked stop start-up with one line (:class:`ConfigError`) saying
    how to pick one. Otherwise ``model`` (or ``default_model``) is used, and an unreachable
    LLM, a refused key or a model the server does not list is a warning.
    """
    where = describe(config)
    models: list[str] | None = None
    problem: LLMError | None = None
    try:
        models = _run(_list_models(config, min(timeout, config.timeout)))
    except LLMError as exc:
        problem = exc
    pick = "pick one with --model NAME (or CRCTL_MODEL)"
    if model is None and config.base_url:
        if problem is not None:
            fix = f"{problem.fix}, or " if problem.fix else ""
            raise ConfigError(
                f"no model chosen, and the LLM at {where} cannot list its models "
                f"({problem.detail}): {fix}{pick}"
            )
        if models is not None and len(models) == 1:
            return LLMCheck(models[0], f"the only model {where} lists")
        if not models:
            raise ConfigError(
                f"no model chosen, and the LLM at {where} lists none (GET /models): load one "
                f"into the server, or {pick}"
            )
        raise ConfigError(
            f"no model chosen, and the LLM at {where} lists {len(models)}: "
            f"{', '.join(models)}; {pick}"
        )
    chosen = model or default_model
    source = "given" if model else "default"
    if problem is not None:
        return LLMCheck(chosen, source, _warning(where, problem))
    if models and chosen not in models:
        shown = ", ".join(models[:8]) + (", …" if len(models) > 8 else "")
        return LLMCheck(
            chosen, source, f"model {chosen!r} is not one the LLM at {where} lists ({shown})"
        )
    return LLMCheck(chosen, source)


def _warning(where: str, problem: LLMError) -> str | None:
    if problem.kind in ("connection", "timeout"):
        fix = f"; {problem.fix}" if problem.fix else ""
        return f"LLM not reachable at {where}: {problem.detail}{fix} (calls get the apology)"
    if problem.kind == "status" and problem.status in (401, 403):
        return f"the LLM at {where} refused the key (HTTP {problem.status}): check OPENAI_API_KEY"
    if problem.kind == "status" and problem.status == 404:
        return None  # reachable; it just does not list models
    return f"the LLM at {where} answered GET /models with an error: {problem.detail}"


# ``timeout`` is the HTTP client's own: running out is an LLMError(kind="timeout") with the words
# the start-up warning needs, which a cancellation from asyncio.timeout would not carry.
async def _list_models(config: LLMConfig, timeout: float) -> list[str]:  # noqa: ASYNC109
    client = openai.AsyncOpenAI(
        api_key=config.api_key or "unset",
        base_url=config.base_url,
        timeout=timeout,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    )
    try:
        page = await client.models.list()
        return sorted({model.id for model in page.data})
    except openai.APIError as exc:
        raise _map_error(exc) from exc
    finally:
        await client.close()


def _run(coro: Any) -> Any:
    """Run ``coro`` to the end from synchronous code (in a thread if a loop is running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
