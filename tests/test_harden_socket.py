"""The call socket against abuse: deeply nested JSON, sockets that never send setup, HTTP
requests that dribble their headers, browser pages opening /ws, invalid UTF-8.

Everything runs over real sockets on 127.0.0.1. A deadline the relay enforces is made short
here through the relay's own knobs, and the test waits (with a generous outer timeout) for the
relay to act."""

from __future__ import annotations

import logging

import pytest

from relay_server.protocol import ProtocolError, decode
from relay_server.protocol.codec import decode_outbound
from tests.support import TwilioCaller

DEEP = "[" * 1000 + "]" * 1000


def _records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


# -- item 1: JSON nested ~1,000 deep ------------------------------------------------------------


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
