"""Chat completions over HTTP: the one module that imports ``openai``.

The official SDK is the LLM's configuration (API key, base URL, organisation and project, its
headers and user agent), its start-up check (``GET /models``), its errors and, when retries are
configured, its whole request. Without retries (the default: a caller on the line waits for no
back-off), the relay sends the chat request itself, with the SDK client's own URL and headers,
on one aiohttp session: the SDK's request path (parameter transforms, httpx2 request and
response objects, the transport adapter) cost about 0.7 ms of CPU per turn, a quarter of the
relay's work per token in the burst benchmark (issue 11). Either way the response is read by
:class:`relay_server.llm_stream.ChatStream`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import msgspec
import openai

from relay_server.chat import LLMError, ToolCall
from relay_server.config import LLMConfig
from relay_server.errors import ConfigError
from relay_server.llm_stream import Body, ChatStream

# LLMError and ToolCall live in the seam (relay_server.chat); re-exported for callers of old.
__all__ = ["ChatStream", "LLMCheck", "LLMClient", "LLMError", "ToolCall", "check_llm", "describe"]

log = logging.getLogger("relay_server.llm")

#: The most of an error response's body read for its message.
_ERROR_BODY_BYTES = 64 * 1024
#: Connections the direct path keeps at most (the SDK's own default limit).
_MAX_CONNECTIONS = 1000


class _SdkBody:
    """The body of the SDK's raw streaming response (the path with retries)."""

    __slots__ = ("_chunks", "_manager", "read")
    read: Callable[[], Awaitable[bytes]]

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self._chunks: Any = None

    @classmethod
    async def open(cls, manager: Any) -> _SdkBody:
        body = cls(manager)
        try:
            response = await manager.__aenter__()
        except openai.APIError as exc:
            raise _map_error(exc) from exc
        http_response = response.http_response
        # Straight from aiohttp's buffer when the transport is aiohttp and the body is not
        # compressed (httpx2's decoders and the transport's chunk iterator cost four
        # async-generator hops per read); else httpx2's decoded bytes (a proxy may gzip).
        stream = getattr(http_response, "stream", None)
        stream = getattr(stream, "_stream", stream)  # httpx2's BoundAsyncStream wraps it
        raw = getattr(stream, "_aiohttp_response", None)
        encoding = http_response.headers.get("content-encoding", "identity") if raw else None
        if raw is not None and encoding in ("", "identity"):
            body.read = raw.content.readany
        else:
            body._chunks = chunks = http_response.aiter_bytes()
            anext_chunk = chunks.__anext__

            async def read() -> bytes:
                try:
                    return await anext_chunk()  # type: ignore[no-any-return]
                except StopAsyncIteration:
                    return b""

            body.read = read
        return body

    async def aclose(self) -> None:
        try:
            if self._chunks is not None:
                await self._chunks.aclose()
        finally:
            await self._manager.__aexit__(None, None, None)


class _DirectBody:
    """An aiohttp response read straight from its buffer (aiohttp undoes gzip itself)."""

    __slots__ = ("_response", "read")
    read: Callable[[], Awaitable[bytes]]

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.read = response.content.readany

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # read to its end: the connection goes back to the pool
        else:
            response.close()  # a cut turn: closing the connection stops the generation


class _Direct:
    """The chat request sent on aiohttp with the SDK client's URL and headers."""

    def __init__(self, client: openai.AsyncOpenAI, timeout: float) -> None:
        self.url = str(client.base_url).rstrip("/") + "/chat/completions"
        headers = {k: v for k, v in client.default_headers.items() if isinstance(v, str)}
        headers.update(client.auth_headers)
        headers["Accept"] = "text/event-stream"
        self.headers = headers
        # No sock_read: aiohttp would move a timer on every network read. Until the response
        # starts, ``timeout`` bounds the wait (open); after, ChatStream's token watchdog does.
        self.timeout = timeout
        self._client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp binds a session to its loop).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=_MAX_CONNECTIONS, ssl=httpx2.create_ssl_context()
            )
            # The headers as the session's own: aiohttp then merges no per-request headers
            # into each request (some 400 bytecodes a turn, bench/instructions.py).
            self._session = aiohttp.ClientSession(connector=connector, headers=self.headers)
        return self._session

    async def open(self, body: bytes) -> Body:
        try:
            async with asyncio.timeout(self.timeout or None):
                response = await self.session().post(
                    self.url, data=body, timeout=self._client_timeout
                )
        except TimeoutError as exc:  # no connection, or no response, within the timeout
            raise LLMError("timeout", "the LLM did not answer in time") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise _unreachable(exc) or LLMError("connection", f"cannot connect: {exc}") from exc
        if response.status != 200:
            raise await _status_error(response)
        return _DirectBody(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _status_error(response: aiohttp.ClientResponse) -> LLMError:
    """The LLMError for a refused request, worded as :func:`_map_error` words the SDK's."""
    status = response.status
    message = ""
    try:
        raw = await response.content.read(_ERROR_BODY_BYTES)
        error = msgspec.json.decode(raw).get("error") if raw.startswith(b"{") else None
        if isinstance(error, dict):
            message = str(error.get("message") or "")
        elif isinstance(error, str):
            message = error
        else:
            message = raw[:200].decode("utf-8", "replace").strip()
    except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError, AttributeError):
        pass
    finally:
        response.close()
    if status == 429:
        return LLMError("rate_limit", "the LLM rate-limited us (HTTP 429)", status=429)
    if status >= 500:
        return LLMError("server", f"the LLM failed (HTTP {status})", status=status)
    return _refused(status, message)


#: The next step when a server refuses ``stream_options`` (it does not report usage).
USAGE_FIX = (
    "this LLM server does not take stream_options: turn the usage report off with "
    "--no-llm-usage (CRCTL_LLM_USAGE=false)"
)


def _refused(status: int, message: str) -> LLMError:
    """The LLMError for a 4xx answer; one that names ``stream_options`` gets its fix."""
    fix = USAGE_FIX if status == 400 and "stream_options" in message else None
    return LLMError(
        "status",
        f"the LLM refused the request (HTTP {status}): {message}",
        fix=fix,
        status=status,
    )


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
        return _refused(exc.status_code, exc.message)
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

    One connection pool for all calls. With ``max_retries`` 0 (the default) the chat request
    goes out directly (see the module's docstring); with retries, through the SDK.
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
        self._direct = _Direct(self._client, config.timeout) if not config.max_retries else None

    def stream(
        self,
        *,
        model: str,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        temperature: float | None = None,
    ) -> ChatStream:
        """Start a streaming chat completion; use the result as ``async with``."""
        direct = self._direct
        if direct is not None:
            request: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
            if self.config.stream_usage:
                request["stream_options"] = _USAGE
            if tools:
                request["tools"] = tools
            if temperature is not None:
                request["temperature"] = temperature
            payload = _encode(request)
            return ChatStream(
                lambda: direct.open(payload),
                timeout=self.config.timeout,
                max_line=self.config.max_line_bytes,
            )
        # Messages and tools go in ``extra_body``, as the JSON they already are: the SDK would
        # otherwise walk the whole history through its type transforms on every turn (~3 ms
        # of blocking CPU at 20 messages, bench/). The request is the same on the wire.
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        manager = self._client.chat.completions.with_streaming_response.create(
            model=model,
            messages=[],
            stream=True,
            temperature=temperature if temperature is not None else openai.omit,
            stream_options={"include_usage": True} if self.config.stream_usage else openai.omit,
            extra_body=body,
        )
        return ChatStream(
            lambda: _SdkBody.open(manager),
            timeout=self.config.timeout,
            max_line=self.config.max_line_bytes,
        )

    async def aclose(self) -> None:
        """Close the connection pools."""
        if self._direct is not None:
            await self._direct.aclose()
        await self._client.close()


_encode = msgspec.json.Encoder().encode
#: The stream's last chunk then carries the token counts (OpenAI API: chat streaming).
_USAGE: dict[str, Any] = {"include_usage": True}


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
