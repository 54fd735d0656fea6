"""The floor: the least a ConversationRelay relay can do, run beside crctl by bench/run.py.

Same server, WebSocket implementation and event loop as ``crctl serve`` (uvicorn, crctl's lean
websockets-sansio protocol, no per-message deflate, uvloop where crctl uses it, a listening socket
with TCP_NODELAY, the start-up objects frozen out of the collector, full collections 10x rarer), so
the difference with crctl is the relay's own work. Per call: accept the socket, read ``setup``; on
a final prompt POST one chat request to the LLM (aiohttp, one client session for the process:
connections kept alive, as crctl's openai transport), split the SSE stream into lines, decode each
``data:`` line with msgspec, send one text frame per token and ``last:true`` at the end; on
``interrupt`` cancel the stream (the HTTP connection is closed, so the LLM stops) and send
``last:true``. Nothing else: no signature check, no events, no history (the prompt is the only
message), no call log.

It also serves what the load generator needs: ``POST /twiml`` (TwiML naming the plain ``/ws``,
so callers connect without a per-call token) and ``GET /healthz`` (``{"calls": N}``, calls that
sent their setup). Run by bench/procs.py like crctl: ``python -m bench.floor serve --host H
--port P [crctl serve's other options, ignored]`` with ``OPENAI_BASE_URL`` naming the LLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import msgspec
import uvicorn

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = msgspec.field(default_factory=list)


class _Inbound(msgspec.Struct):
    type: str
    voicePrompt: str = ""  # Twilio's field name
    last: bool = True


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_inbound = msgspec.json.Decoder(_Inbound).decode
_encode = msgspec.json.Encoder().encode

LAST = {"type": "websocket.send", "text": '{"type":"text","token":"","last":true}'}
TWIML = (
    b'<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
    b'<ConversationRelay url="wss://relay.bench.test/ws"/></Connect></Response>'
)


class _Call:
    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: asyncio.Task[None] | None = None  # the reply still streaming, if any


class Floor:
    """The bare relay, as an ASGI app."""

    def __init__(self, llm_base_url: str) -> None:
        self.url = llm_base_url.rstrip("/") + "/chat/completions"
        self.calls = 0
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self.socket(receive, send)
        elif kind == "http":
            await self.http(scope, receive, send)
        elif kind == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    headers={"Authorization": "Bearer x", "Content-Type": "application/json"},
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:  # the request body (the /twiml form) is read and ignored
            message = await receive()
            more = message.get("more_body", False)
        status, ctype, body = 404, b"text/plain", b"not found"
        if scope["path"] == "/healthz":
            status, ctype, body = 200, b"application/json", b'{"calls":%d}' % self.calls
        elif scope["path"] == "/twiml":
            status, ctype, body = 200, b"text/xml", TWIML
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]}
        )
        await send({"type": "http.response.body", "body": body})

    async def socket(self, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        call = _Call()
        registered = False
        try:
            while True:
                message = await receive()
                text = message.get("text")
                if text is None:
                    if message["type"] == "websocket.disconnect":
                        return
                    continue
                frame = _decode_inbound(text)
                if frame.type == "prompt" and frame.last:
                    await _stop(call.reply)
                    call.reply = asyncio.create_task(self.reply(call, frame.voicePrompt, send))
                elif frame.type == "interrupt":
                    if call.reply is not None:  # still streaming: stop it, close the cycle
                        await _stop(call.reply)
                        call.reply = None
                        await send(LAST)
                elif frame.type == "setup" and not registered:
                    registered = True
                    self.calls += 1
        finally:
            await _stop(call.reply)
            if registered:
                self.calls -= 1

    async def reply(self, call: _Call, prompt: str, send: Send) -> None:
        """Stream one reply: one frame per token, then ``last:true``."""
        assert self.session is not None
        body = _encode(
            {"model": "fake-llm", "messages": [{"role": "user", "content": prompt}], "stream": True}
        )
        with contextlib.suppress(aiohttp.ClientError, msgspec.DecodeError):
            async with self.session.post(self.url, data=body) as resp:
                try:
                    rest = b""
                    async for data in resp.content.iter_any():
                        lines = (rest + data if rest else data).split(b"\n")
                        rest = lines.pop()
                        for line in lines:
                            if not line.startswith(b"data: "):
                                continue
                            payload = line[6:]
                            if payload == b"[DONE]":
                                break
                            for choice in _decode_chunk(payload).choices:
                                if choice.delta is not None and choice.delta.content:
                                    token = _encode(choice.delta.content).decode()
                                    await send(
                                        {
                                            "type": "websocket.send",
                                            "text": '{"type":"text","token":'
                                            + token
                                            + ',"last":false}',
                                        }
                                    )
                        else:
                            continue
                        break  # [DONE]
                except asyncio.CancelledError:
                    resp.close()  # an unfinished response: the connection closes, the LLM stops
                    raise
        call.reply = None  # from here an interrupt has nothing to stop (last:true is ours)
        await send(LAST)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args, _ = parser.parse_known_args(argv)  # crctl serve's other options: ignored
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    app = Floor(os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8099/v1"))
    # crctl's own server pieces: what differs between the two is then the relay's work only
    from crctl.serve import _lean_websockets_sansio, event_loop_factory

    config = uvicorn.Config(
        app,
        http="h11",
        ws=_lean_websockets_sansio(),
        ws_per_message_deflate=False,
        loop="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    gc.collect()
    gc.freeze()
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 100)  # full collections 10x rarer, as crctl serve
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
