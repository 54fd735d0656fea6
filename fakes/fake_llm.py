"""Fake OpenAI-compatible Chat Completions server over real HTTP (aiohttp).

Serves ``POST /v1/chat/completions`` (SSE streaming exactly like OpenAI, or a plain
``chat.completion`` JSON) and ``GET /v1/models`` on 127.0.0.1, from a background thread
with its own event loop. Each request is answered by a :class:`Script` (queued with
:meth:`FakeLLM.enqueue`, else produced by ``FakeLLM.responder``) and logged as a
:class:`StreamRecord`. Used by the test suite and by benchmarks, so it stays lean.

Structured output: a request with ``response_format: {type: json_schema, json_schema: {name,
schema}}`` is answered, before any queued script, with a JSON object scripted for that schema's
name (:meth:`FakeLLM.answer`: queued objects, then ``FakeLLM.structured[name](body)``), checked
against the schema (its required keys, no others when ``additionalProperties`` is false; a misfit
is answered HTTP 500 and noted in ``FakeLLM.misfits``). With nothing scripted for the name, the
request is answered as any other.

CLI for benchmarks::

    python -m fakes.fake_llm --port 8099 --ttft 0.3 --delay 0.02 --tokens 40
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import signal
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakes.background import BackgroundServer

MODEL = "fake-llm"
FAULTS = (None, "status", "hang", "cut", "garbage", "reset")
KEEPALIVES = ("comment", "empty", "role")
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
}
_SERVER_ERROR = ("The server had an error processing your request.", "server_error", None)


@dataclass
class ToolCallSpec:
    """One tool call; ``arguments`` (JSON text) is streamed in ``fragments`` pieces."""

    name: str
    arguments: str
    id: str | None = None  # auto "call_<n>" if None
    fragments: int = 3


@dataclass
class Script:
    """How to answer one request.

    Timing: the first content/tool chunk is written ``ttft`` s after the request
    arrived, then one chunk every ``delay`` s. A "token" below is one content token
    *or* one tool-call chunk (a call's header chunk and each argument fragment count).

    Faults: ``"status"`` -> HTTP ``status`` with OpenAI's error JSON (429 adds
    ``retry-after: 0``); ``"hang"`` -> send nothing (not even headers) until the
    client goes away; ``"cut"`` -> close the connection (FIN; no final chunk, no
    ``[DONE]``, no terminating HTTP chunk) after ``cut_after`` tokens; ``"reset"`` ->
    the same but abort the socket with a real RST; ``"garbage"`` -> after
    ``cut_after`` tokens send the line ``data: {not json``, then continue normally.
    """

    tokens: list[str] = field(default_factory=list)
    ttft: float = 0.0
    delay: float = 0.0
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    fault: str | None = None
    status: int = 500
    cut_after: int = 0
    #: Compress the SSE body with gzip (as some proxies in front of LLM servers do).
    gzip: bool = False
    #: End with ``data: [DONE]``; False ends cleanly after the finish_reason chunk.
    done: bool = True
    #: Keep-alives, as queuing gateways send them: after ``keepalive_after`` tokens, one every
    #: ``keepalive_every`` s for ``keepalive`` s (``math.inf``: until the client goes away),
    #: then the rest of the script. ``keepalive_kind``: "comment" (the SSE comment
    #: ``: keep-alive``), "empty" (a chunk with an empty delta) or "role" (a role-only chunk).
    keepalive: float = 0.0
    keepalive_every: float = 0.05
    keepalive_after: int = 0
    keepalive_kind: str = "comment"
    #: Before the first token, one ``data:`` line of this many bytes of content, streamed in
    #: pieces of ``line_piece`` bytes (one reused block: the fake never holds the whole line)
    #: with no newline until the end; then the line is closed (a valid chunk) and the script
    #: goes on. ``math.inf``: the line never ends.
    long_line: float = 0
    line_piece: int = 65536
    #: Send ``tokens`` this many times over: a very long reply without a very long list.
    repeat: int = 1
    #: A shared clock (s; 0: off): every token leaves on a tick, a multiple of ``tick`` of
    #: ``time.monotonic()`` (one clock for every stream of the process): the first on the first
    #: tick at or after ``ttft``, each next one on the first tick at least ``delay`` after the
    #: previous one's (its target, so lateness does not accumulate). Streams that run at once
    #: then write their tokens in the same instant, as a busy provider's streams reach a relay.
    tick: float = 0.0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")
        if self.keepalive_kind not in KEEPALIVES:
            raise ValueError(f"unknown keepalive_kind {self.keepalive_kind!r}: {KEEPALIVES}")
        if self.tick < 0:
            raise ValueError(f"tick must be >= 0, got {self.tick}")


@dataclass
class StreamRecord:
    """What happened to one request (times are ``time.monotonic()``)."""

    body: dict[str, Any]
    received_at: float
    first_chunk_at: float | None
    tokens_sent: int
    completed: bool  # [DONE] (or the full non-streaming body) written
    client_disconnected: bool  # client went away before the script finished
    disconnected_at: float | None
    script: Script
    #: The request's headers, and the client's ``host:port`` (one per connection).
    headers: dict[str, str] = field(default_factory=dict)
    peer: str = ""


def echo_responder(body: dict[str, Any]) -> Script:
    """Default responder: ``"You said: <words of the last user message>"``.

    One token per word, leading space kept: ``["You", " said", ":", " hi"]``.
    """
    content: Any = ""
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            content = msg.get("content") or ""
            break
    if isinstance(content, list):  # content parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return Script(tokens=["You", " said", ":"] + [f" {w}" for w in str(content).split()])


def _split(text: str, parts: int) -> list[str]:
    """Split ``text`` into ``parts`` (at most ``len(text)``) non-empty pieces."""
    n = max(1, min(parts, len(text)))
    size, extra = divmod(len(text), n)
    bounds = list(itertools.accumulate([0] + [size + (i < extra) for i in range(n)]))
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object, counted simply: the words of the messages in, the tokens out."""
    prompt = prompt_tokens(body)
    n = completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}


def prompt_tokens(body: dict[str, Any]) -> int:
    """The fake's input token count of a request: the words of its messages' text content."""
    words = 0
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str):
            words += len(content.split())
    return words


def schema_name(body: dict[str, Any]) -> str | None:
    """The json_schema name of a structured-output request (None: not one)."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    return str(spec.get("name")) if isinstance(spec, dict) and spec.get("name") else None


def _schema_problem(answer: dict[str, Any], schema: dict[str, Any]) -> str | None:
    """Why ``answer`` does not fit an object ``schema`` (required keys, extra keys), or None."""
    missing = [key for key in schema.get("required", ()) if key not in answer]
    if missing:
        return f"no {', '.join(missing)}"
    if schema.get("additionalProperties") is False:
        extra = sorted(set(answer) - set(schema.get("properties", {})))
        if extra:
            return f"keys not in the schema: {', '.join(extra)}"
    return None


def _sse(obj: dict[str, Any]) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def _on_tick(at: float, tick: float) -> float:
    """The first multiple of ``tick`` at or after ``at`` (to within a nanosecond)."""
    return math.ceil(at / tick - 1e-9) * tick


def _error_response(status: int) -> web.Response:
    message, kind, code = _ERRORS.get(status, _SERVER_ERROR)
    error = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {"retry-after": "0"} if status == 429 else None
    return web.json_response(error, status=status, headers=headers)


def _drop(request: web.Request, *, reset: bool) -> None:
    """Close the client connection mid-response: FIN (flushes first) or RST."""
    transport = request.transport
    if transport is None:
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0 => close() sends RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()


class FakeLLM(BackgroundServer):
    """Fake OpenAI Chat Completions server on 127.0.0.1, run in a background thread."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], Script] | None = None,
        *,
        port: int = 0,
        keep_records: bool = True,
    ) -> None:
        self.responder: Callable[[dict[str, Any]], Script] = responder or echo_responder
        self.records: list[StreamRecord] = []
        #: What ``GET /v1/models`` lists (ids), and its HTTP status (non-200: an error body).
        self.models: list[str] = [MODEL]
        self.models_status = 200
        #: How many times ``GET /v1/models`` was asked.
        self.models_requests = 0
        #: Request parameters refused with HTTP 400, as some OpenAI-compatible servers refuse
        #: what they do not know (``{"stream_options"}``).
        self.refused_params: set[str] = set()
        #: Structured-output answers by schema name: ``fn(body) -> dict`` (after :meth:`answer`'s).
        self.structured: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        #: Scripted structured answers that did not fit the request's schema (answered HTTP 500).
        self.misfits: list[str] = []
        self.base_url = ""
        self._answers: dict[str, deque[dict[str, Any]]] = {}
        self._port = port
        self._keep_records = keep_records
        self._queue: deque[Script] = deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        super().__init__()
        self._stopping = False

    # ---- public API ----------------------------------------------------------
    def enqueue(self, *scripts: Script) -> None:
        """Queue scripts, used FIFO (one per request) before ``responder``."""
        with self._lock:
            self._queue.extend(scripts)

    def answer(self, name: str, *answers: dict[str, Any]) -> None:
        """Queue answers to structured-output requests of the schema ``name``, used FIFO."""
        with self._lock:
            self._answers.setdefault(name, deque()).extend(answers)

    def structured_records(self, name: str | None = None) -> list[StreamRecord]:
        """The structured-output requests so far (of the schema ``name``, or all)."""
        with self._lock:
            return [
                r
                for r in self.records
                if (schema_name(r.body) is not None and name is None)
                or (name is not None and schema_name(r.body) == name)
            ]

    def _structured_script(self, body: dict[str, Any]) -> Script | None:
        """The answer to a structured-output request, or None when nothing is scripted for it."""
        name = schema_name(body)
        if name is None:
            return None
        with self._lock:
            queued = self._answers.get(name)
            answer = queued.popleft() if queued else None
        if answer is None and name in self.structured:
            answer = self.structured[name](body)
        if answer is None:
            return None
        schema = body["response_format"]["json_schema"].get("schema") or {}
        if problem := _schema_problem(answer, schema):
            with self._lock:
                self.misfits.append(f"the answer scripted for {name!r} does not fit: {problem}")
            return Script(fault="status", status=500)
        return Script(tokens=[json.dumps(answer)])

    def _starting(self) -> None:
        self._stopping = False

    def _stopping_now(self) -> None:
        self._stopping = True  # streams cancelled by stop() are not client disconnects

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate`` every 10 ms until true or ``timeout`` s; return it."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                return predicate()
            time.sleep(0.01)
        return True

    async def _main(self, ready: threading.Event) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: aiohttp cancels the handler once the client goes away.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port, backlog=1024)
            await site.start()
            self.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
            self._loop, self._stop_event = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await self._stop_event.wait()
        finally:
            await runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        self.models_requests += 1
        if self.models_status != 200:
            return _error_response(self.models_status)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "fake-llm"}
            for name in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    def _next_script(self, body: dict[str, Any]) -> Script:
        structured = self._structured_script(body)
        if structured is not None:
            return structured
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        return self.responder(body)

    def _mark_disconnected(self, rec: StreamRecord) -> None:
        if not self._stopping and not rec.completed and not rec.client_disconnected:
            rec.client_disconnected, rec.disconnected_at = True, time.monotonic()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        try:
            body = await request.json()
        except ValueError:
            return _error_response(400)
        refused = sorted(self.refused_params & set(body)) if isinstance(body, dict) else []
        if refused:
            message = f"Unrecognized request argument supplied: {refused[0]}"
            error = {"message": message, "type": "invalid_request_error", "param": None}
            return web.json_response({"error": error}, status=400)
        script = self._next_script(body)
        rec = StreamRecord(body, received, None, 0, False, False, None, script)
        rec.headers = dict(request.headers)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        if self._keep_records:
            with self._lock:
                self.records.append(rec)
        try:
            if script.fault == "hang":
                await asyncio.Event().wait()  # until cancelled: client gone or stop()
            if script.fault == "status":
                return _error_response(script.status)
            ids = [tc.id or f"call_{next(self._ids)}" for tc in script.tool_calls]
            if body.get("stream"):
                return await self._stream(request, rec, ids)
            return await self._complete(request, rec, ids)
        except asyncio.CancelledError:
            self._mark_disconnected(rec)
            raise

    @staticmethod
    def _deltas(script: Script, ids: list[str]) -> tuple[int, Iterator[dict[str, Any]]]:
        """How many deltas the script streams, and the deltas (made as they are sent)."""
        tools: list[dict[str, Any]] = []
        for i, (tc, call_id) in enumerate(zip(script.tool_calls, ids, strict=True)):
            func = {"name": tc.name, "arguments": ""}
            head = {"index": i, "id": call_id, "type": "function", "function": func}
            tools.append({"tool_calls": [head]})
            tools += [
                {"tool_calls": [{"index": i, "function": {"arguments": frag}}]}
                for frag in _split(tc.arguments, tc.fragments)
            ]
        repeat = max(1, script.repeat)
        content = ({"content": t} for _ in range(repeat) for t in script.tokens)
        return len(script.tokens) * repeat + len(tools), itertools.chain(content, tools)

    @staticmethod
    async def _keepalive(resp: web.StreamResponse, script: Script, event: Any) -> None:
        """Keep-alives for ``script.keepalive`` seconds (see :class:`Script`)."""
        line = {
            "comment": b": keep-alive\n\n",
            "empty": event({}),
            "role": event({"role": "assistant"}),
        }[script.keepalive_kind]
        until = time.monotonic() + script.keepalive
        while time.monotonic() < until:
            await resp.write(line)
            await asyncio.sleep(script.keepalive_every)

    @staticmethod
    async def _long_line(resp: web.StreamResponse, script: Script) -> None:
        """One ``data:`` line of ``script.long_line`` bytes of content, in pieces."""
        await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"')
        block = b"x" * max(1, script.line_piece)
        left = script.long_line
        while left > 0:
            piece = block if left >= len(block) else block[: int(left)]
            await resp.write(piece)
            left -= len(piece)
        await resp.write(b'"},"finish_reason":null}]}\n\n')

    async def _stream(
        self, request: web.Request, rec: StreamRecord, ids: list[str]
    ) -> web.StreamResponse:
        body, script = rec.body, rec.script
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model") or MODEL,
        }
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if usage:
            base["usage"] = None

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        count, deltas = self._deltas(script, ids)
        due = 0.0  # with script.tick: when the last token was due
        midstream = script.fault in ("cut", "reset", "garbage")
        fault_at = min(script.cut_after, count) if midstream else -1
        keepalive_at = min(script.keepalive_after, count) if script.keepalive > 0 else -1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        if script.gzip:
            resp.enable_compression(web.ContentCoding.gzip)
        try:
            await resp.prepare(request)
            await resp.write(event({"role": "assistant", "content": ""}))
            if script.long_line:
                await self._long_line(resp, script)
            for i, delta in enumerate(itertools.chain(deltas, [None])):
                if i == keepalive_at:
                    await self._keepalive(resp, script, event)
                if i == fault_at:
                    if script.fault == "garbage":
                        await resp.write(b"data: {not json\n\n")
                    else:
                        _drop(request, reset=script.fault == "reset")
                        return resp
                if delta is None:
                    break
                if script.tick > 0:
                    due = _on_tick(due + script.delay if i else rec.received_at + script.ttft,
                                   script.tick)  # fmt: skip
                    pause = due - time.monotonic()
                elif i == 0:
                    pause = rec.received_at + script.ttft - time.monotonic()
                else:
                    pause = script.delay
                if pause > 0:
                    await asyncio.sleep(pause)
                await resp.write(event(delta))
                rec.tokens_sent += 1
                if rec.first_chunk_at is None:
                    rec.first_chunk_at = time.monotonic()
            await resp.write(event({}, "tool_calls" if script.tool_calls else "stop"))
            if usage:
                tail = {**base, "choices": [], "usage": _usage(body, rec.tokens_sent)}
                await resp.write(_sse(tail))
            if script.done:
                await resp.write(b"data: [DONE]\n\n")
            rec.completed = True
            await resp.write_eof()
        except ConnectionError:  # client went away between two writes
            self._mark_disconnected(rec)
        return resp

    async def _complete(
        self, request: web.Request, rec: StreamRecord, ids: list[str]
    ) -> web.StreamResponse:
        body, script = rec.body, rec.script
        n = len(script.tokens) * max(1, script.repeat) + len(script.tool_calls)
        done_at = rec.received_at + script.ttft + script.delay * max(0, n - 1)
        if (pause := done_at - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        if script.fault in ("cut", "reset"):
            _drop(request, reset=script.fault == "reset")
            return web.Response()  # aiohttp ignores the failed write on a dropped socket
        if script.fault == "garbage":
            return web.Response(text="{not json", content_type="application/json")
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(script.tokens) * max(1, script.repeat) or None,
        }
        if script.tool_calls:
            message["tool_calls"] = [
                {
                    "id": cid,
                    "type": "function",
                    "function": {"name": tc.name, "arguments": tc.arguments},
                }
                for tc, cid in zip(script.tool_calls, ids, strict=True)
            ]
        finish = "tool_calls" if script.tool_calls else "stop"
        rec.first_chunk_at, rec.tokens_sent, rec.completed = time.monotonic(), n, True
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": _usage(body, n),
            }
        )


def main(argv: list[str] | None = None) -> None:
    """Serve ``--tokens`` tokens (" tok1", " tok2", ...) until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="fake_llm", description=main.__doc__)
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--ttft", type=float, default=0.0, help="s to first token")
    parser.add_argument("--delay", type=float, default=0.0, help="s between tokens")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per reply")
    args = parser.parse_args(argv)
    tokens = [f" tok{i}" for i in range(1, args.tokens + 1)]

    def responder(_body: dict[str, Any]) -> Script:
        return Script(tokens=tokens, ttft=args.ttft, delay=args.delay)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    with FakeLLM(responder, port=args.port, keep_records=False) as fake:
        print(fake.base_url, flush=True)
        while not done.wait(0.5):
            pass


if __name__ == "__main__":
    main()
