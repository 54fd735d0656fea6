"""Request bodies and the API token under abuse (issue 9).

A webhook body is bounded before it is read (with or without Content-Length), a pushed message is
bounded by the frame limit, and the ``Bearer`` scheme is matched case-insensitively. Real sockets on
127.0.0.1, real HTTP.
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from relay_server.protocol import Text, encode
from relay_server.webhooks import BODY_MAX_BYTES
from tests.events_support import TOKEN
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer, sign

CA1 = "CA" + "1" * 32


def raw_post(relay: RelayServer, path: str, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send a POST by hand (headers ``head``, then ``body_parts``) and return the whole answer.

    The connection is closed after it.
    """
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as sock:
        sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n" + head + b"\r\n"
        )
        try:
            for part in body_parts:
                sock.sendall(part)
        except OSError:
            pass  # the relay answered and closed before reading it all: that is the point
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


def big_form(size: int) -> bytes:
    return b"CallSid=" + CA1.encode() + b"&Junk=" + b"x" * size


@pytest.mark.parametrize("path", ["/action", "/status", "/twiml"])
async def test_an_oversized_webhook_is_refused_with_413_before_it_is_read(relay, path, caplog):
    """10 MiB with a Content-Length: 413 at once, whatever the signature.

    The body is never read, so never parsed; the relay goes on answering.
    """
    body = big_form(10 << 20)
    answer = await asyncio.to_thread(
        raw_post, relay, path, b"Content-Length: %d\r\n" % len(body), [body]
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"request body too large: at most 65536 bytes" in answer
    assert any("refused POST " + path in r.message for r in caplog.records)
    async with httpx.AsyncClient(base_url=relay.base_url, trust_env=False) as http:
        assert (await http.get("/healthz")).status_code == 200


async def test_a_chunked_webhook_without_content_length_is_bounded_too(relay):
    """No Content-Length: the body is counted as it arrives, and refused past 64 KiB."""
    body = big_form(1 << 20)
    chunks = [
        b"%x\r\n" % len(part) + part + b"\r\n"
        for part in (body[i : i + 8192] for i in range(0, len(body), 8192))
    ] + [b"0\r\n\r\n"]
    answer = await asyncio.to_thread(
        raw_post, relay, "/action", b"Transfer-Encoding: chunked\r\n", chunks
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


async def test_a_webhook_of_twilios_size_is_still_served(relay):
    """A signed /status with a few KiB of form fields (the size of Twilio's) passes."""
    params = {"CallSid": CA1, "CallStatus": "completed", "Extra": "y" * 8000}
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/status", params, AUTH_TOKEN)}
    async with httpx.AsyncClient(base_url=relay.base_url, trust_env=False) as http:
        response = await http.post("/status", data=params, headers=headers)
    assert response.status_code == 204
    assert BODY_MAX_BYTES == 64 << 10


async def test_a_pushed_message_is_bounded_by_the_frame_limit(relay_factory):
    relay = relay_factory(api_token=TOKEN)
    frame = encode(Text(token="x" * (70 << 10), last=True)).encode()
    auth = b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    path = f"/calls/{CA1}/messages"
    answer = await asyncio.to_thread(
        raw_post, relay, path, auth + b"Content-Length: %d\r\n" % len(frame), [frame]
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"message too large: at most 65536 bytes" in answer
    # without Content-Length: the framework's bound (64 KiB) while it is read
    chunked = [b"%x\r\n" % len(frame) + frame + b"\r\n", b"0\r\n\r\n"]
    answer = await asyncio.to_thread(
        raw_post, relay, path, auth + b"Transfer-Encoding: chunked\r\n", chunked
    )
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_the_bearer_scheme_is_case_insensitive(relay_factory, scheme):
    relay = relay_factory(api_token=TOKEN)
    async with httpx.AsyncClient(base_url=relay.base_url, trust_env=False) as http:
        good = await http.get("/calls", headers={"Authorization": f"{scheme} {TOKEN}"})
        wrong = await http.get("/calls", headers={"Authorization": f"{scheme} not-the-token"})
        push = await http.post(
            f"/calls/{CA1}/messages",
            headers={"Authorization": f"{scheme} {TOKEN}"},
            content=encode(Text(token="hi", last=True)),
        )
    assert good.status_code == 200, good.text
    assert wrong.status_code == 401
    assert push.status_code == 404  # past the token check: there is no such live call
