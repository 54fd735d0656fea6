"""The call socket against abuse.

Deeply nested JSON, sockets that never send setup, HTTP requests that dribble their headers, browser
pages opening /ws, invalid UTF-8.

Everything runs over real sockets on 127.0.0.1. A deadline the relay enforces is made short
here through the relay's own knobs, and the test waits (with a generous outer timeout) for the
relay to act.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from http.client import HTTPConnection
from urllib.parse import parse_qsl, urlsplit

import pytest
import websockets

from crctl.serve import run_relay
from crctl.settings import Settings
from relay_server.protocol import ProtocolError, decode
from relay_server.protocol.codec import decode_outbound
from tests.support import PUBLIC_URL, RelayServer, TwilioCaller, config, sign, wait_until

DEEP = "[" * 1000 + "]" * 1000


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


# -- item 1: JSON nested ~1,000 deep ------------------------------------------------------------
# Raw text on purpose here and in item 12a: malformed frames that no typed message can build.


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"somethingNew","a":' + DEEP + "}",  # unknown type: 2 KB
        '{"a":' + DEEP + ',"type":"somethingNew"}',  # the type after the nesting
        '{"type":"prompt","voicePrompt":' + DEEP + ',"last":true}',  # a known type
    ],
)
def test_deeply_nested_json_is_a_protocol_error(frame: str) -> None:
    assert len(frame) < 2100
    with pytest.raises(ProtocolError, match="nested too deeply"):
        decode(frame)


def test_deeply_nested_outbound_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not a valid outbound message"):
        decode_outbound('{"type":"text","last":true,"x":' + DEEP + ',"token":"a"}')


async def test_deeply_nested_frame_is_a_bad_frame_and_the_call_goes_on(relay, fake_llm, caplog):
    caller = await TwilioCaller(relay).connect()
    await caller.send('{"type":"somethingNew","a":' + DEEP + "}")
    await caller.prompt("still there")
    assert await caller.reply_text() == "You said: still there"
    assert relay.kinds(caller.call_sid).count("frame.bad") == 1
    warnings = [r.getMessage() for r in _records(caplog, "relay_server.calls")]
    assert any("nested too deeply" in w and caller.call_sid in w for w in warnings)
    assert not [r for r in caplog.records if r.exc_info]
    await caller.hangup()


# -- item 9: sockets that never send setup, requests that dribble headers -----------------------


async def test_a_socket_without_setup_is_closed_at_its_deadline(relay, caplog):
    relay.app.asgi_app.setup_timeout = 1.0
    caller = await TwilioCaller(relay).connect(setup=False)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await caller.send("not a setup")  # frames before setup do not extend the deadline
        await asyncio.wait_for(caller.ws.recv(), 15)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008
    assert closed.value.rcvd.reason == "no setup message within 1 s"
    lines = [r.getMessage() for r in _records(caplog, "relay_server.socket")]
    assert any("no setup message within 1 s of the upgrade" in line for line in lines)
    assert wait_until(lambda: len(relay.registry) == 0)


async def test_a_call_that_sent_setup_outlives_the_setup_deadline(relay, fake_llm):
    relay.app.asgi_app.setup_timeout = 1.0
    caller = await TwilioCaller(relay).connect()
    await asyncio.sleep(2.5)  # well past the deadline
    await caller.prompt("still here")
    assert await caller.reply_text() == "You said: still here"
    await caller.hangup()


class _ShortHeaderRelay(RelayServer):
    """The relay with a short header deadline (``run_relay(header_timeout=…)``)."""

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        settings = Settings(host="127.0.0.1", port=self.port)
        run = run_relay(self.app, settings, self._stop, header_timeout=0.3)
        self._loop.run_until_complete(run)


@pytest.fixture
def short_header_relay(fake_llm):
    relay = _ShortHeaderRelay(config(llm_api_key="sk-test", llm_base_url=fake_llm.base_url))
    with relay:
        yield relay


def _read_all(sock: socket.socket) -> bytes:
    """Everything the relay sends until it closes the connection (at most 15 s)."""
    sock.settimeout(15)
    data = b""
    # A reset after the answer (a byte sent after the relay closed) ends the read too.
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            data += chunk
    return data


def test_dribbled_headers_get_408_and_the_connection_closes(short_header_relay, caplog):
    with socket.create_connection(("127.0.0.1", short_header_relay.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        time.sleep(0.1)
        sock.sendall(b"a")  # a byte now and then does not extend the deadline
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    lines = [r.getMessage() for r in _records(caplog, "crctl.serve")]
    assert any("request headers not complete within 0.3 s" in line for line in lines)


def test_a_connection_that_sends_nothing_is_closed(short_header_relay, caplog):
    with socket.create_connection(("127.0.0.1", short_header_relay.port)) as sock:
        assert _read_all(sock) == b""
    lines = [r.getMessage() for r in _records(caplog, "crctl.serve")]
    assert any("no request within 0.3 s" in line for line in lines)


def test_requests_in_time_are_served_on_a_kept_alive_connection(short_header_relay):
    http = HTTPConnection("127.0.0.1", short_header_relay.port, timeout=15)
    try:
        sockets = []
        for _ in range(2):
            http.request("GET", "/healthz")
            response = http.getresponse()
            assert response.status == 200
            response.read()
            sockets.append(http.sock)
            time.sleep(0.5)  # idle past the header deadline between requests: keep-alive's
        assert sockets[0] is sockets[1]  # the same connection served both
    finally:
        http.close()


async def test_a_websocket_upgrade_is_not_cut_by_the_header_deadline(short_header_relay):
    caller = await TwilioCaller(short_header_relay).connect()
    await asyncio.sleep(0.8)
    await caller.prompt("hello")
    assert await caller.reply_text() == "You said: hello"
    await caller.hangup()


# -- item 10: a browser's Origin ----------------------------------------------------------------


async def _socket_query(relay: RelayServer, call_sid: str) -> str:
    """The query of the socket URL the relay's /twiml gives ``call_sid`` (its one-time token)."""
    return urlsplit(await relay.socket_url(call_sid)).query


async def test_a_browser_origin_is_refused_without_signature_checks(relay_factory, caplog):
    relay = relay_factory(public_url=None, auth_token=None)
    query = await _socket_query(relay, "CA" + "e" * 32)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            f"{relay.ws_url}?{query}", origin="https://evil.example", open_timeout=5
        )
    assert refused.value.response.status_code == 403
    lines = [r.getMessage() for r in _records(caplog, "relay_server.socket")]
    assert any("Origin header ('https://evil.example')" in line for line in lines)
    # Twilio sends no Origin: the same relay takes that socket
    caller = await TwilioCaller(relay, token=None).connect()
    await caller.prompt("hi")
    assert await caller.reply_text() == "You said: hi"
    await caller.hangup()


async def test_a_browser_origin_is_refused_with_a_valid_signature_too(relay):
    signed = PUBLIC_URL.replace("https://", "wss://") + "/ws"
    query = await _socket_query(relay, "CA" + "e" * 32)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(
            f"{relay.ws_url}?{query}",
            origin="http://localhost:3000",
            additional_headers={"X-Twilio-Signature": sign(signed, dict(parse_qsl(query)))},
            open_timeout=5,
        )
    assert refused.value.response.status_code == 403


# -- item 12a: invalid UTF-8 --------------------------------------------------------------------


async def test_invalid_utf8_closes_1007_with_one_line_and_no_traceback(relay, fake_llm, caplog):
    caller = await TwilioCaller(relay).connect()
    await caller.ws.send(b'{"type":"prompt","voicePrompt":"\xff\xfe","last":true}', text=True)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await asyncio.wait_for(caller.ws.recv(), 15)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    assert wait_until(lambda: "socket.closed" in relay.kinds(caller.call_sid))
    assert not [r for r in caplog.records if r.exc_info or r.exc_text]
    lines = [r.getMessage() for r in caplog.records if "UTF-8" in r.getMessage()]
    assert lines == ["closed a WebSocket with 1007: a text frame was not valid UTF-8"]
