"""Decode Twilio's frames and encode ours: pure functions, no I/O, no event loop.

This is the only module that turns ConversationRelay JSON into values and back, after the
sans-I/O model of python-websockets: one place holds the wire rules (Twilio docs:
ConversationRelay WebSocket messages), and every caller, test and benchmark gets the same ones.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from relay_server.protocol.errors import ProtocolError
from relay_server.protocol.messages import Error, Inbound, Outbound, Received, Text, Unknown

#: Twilio publishes no message-size cap (Twilio docs: error codes); a frame larger than this is
#: refused by the relay.
DEFAULT_MAX_FRAME_BYTES = 64 * 1024

_inbound = msgspec.json.Decoder(Inbound)
_outbound = msgspec.json.Decoder(Outbound)
_envelope = msgspec.json.Decoder(Unknown)
_received = msgspec.json.Decoder(Received)
_encoder = msgspec.json.Encoder()
_KNOWN_INBOUND = frozenset({"setup", "prompt", "dtmf", "interrupt", "error", "info"})
_KNOWN_OUTBOUND = frozenset({"text", "play", "sendDigits", "language", "end"})


def decode(
    frame: Union[str, bytes], *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> Union[Inbound, Unknown]:
    """Decode one frame from Twilio.

    Returns a typed message, or :class:`Unknown` for a well-formed frame of a type this relay
    does not know (Twilio docs: WebSocket messages: unknown types and fields must be ignored).
    Raises :class:`ProtocolError` for a binary frame, an oversized frame, non-JSON, JSON nested
    too deeply, a JSON value that is not an object with a string ``type``, or a known type with
    wrong field types.
    """
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(
            f"binary frame of {len(frame)} bytes: ConversationRelay sends JSON text frames only"
        )
    # A str of n characters is at most 4n UTF-8 bytes: only long frames need the exact size.
    if len(frame) * 4 > max_bytes and (size := len(frame.encode())) > max_bytes:
        raise ProtocolError(f"frame of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        message: Union[Inbound, Unknown] = _inbound.decode(frame)
        return message
    except msgspec.ValidationError as exc:
        return _unknown_or_raise(frame, exc)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    except RecursionError:
        # msgspec guards its recursion with the interpreter's limit: JSON nested ~1,000 deep
        # (2 KB is enough, whatever the type) raises this, not a DecodeError.
        raise ProtocolError(_TOO_DEEP) from None


_TOO_DEEP = "JSON nested too deeply"


def _unknown_or_raise(frame: str, exc: msgspec.ValidationError) -> Unknown:
    # The slow path: only reached for frames that did not decode as a known message.
    try:
        envelope = _envelope.decode(frame)
    except RecursionError:
        raise ProtocolError(_TOO_DEEP) from None
    except msgspec.ValidationError:
        raise ProtocolError(
            f"not a ConversationRelay message (needs a string 'type'): {exc}"
        ) from exc
    if envelope.type in _KNOWN_INBOUND:
        raise ProtocolError(f"malformed {envelope.type!r} message: {exc}") from exc
    return envelope


def encode(message: Outbound) -> str:
    """Encode one of our messages as the JSON text Twilio validates.

    Twilio docs: ConversationRelay WebSocket messages.
    """
    return _encoder.encode(message).decode()


def decode_outbound(data: Union[str, bytes]) -> Outbound:
    """Parse an outbound message given as JSON (the relay's messages API).

    The rules are the same the constructors enforce. Raises :class:`ProtocolError` with the
    reason.
    """
    try:
        message: Outbound = _outbound.decode(data)
        return message
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(f"not a valid outbound message: {exc}") from exc
    except RecursionError:
        raise ProtocolError(f"not a valid outbound message: {_TOO_DEEP}") from None


def text_frame(token: str, last: bool) -> str:
    """Encode the common ``text`` frame (the per-token hot path) without building a Struct."""
    return TEXT_HEAD + json_bytes(token).decode() + (_LAST_TRUE if last else TEXT_MORE)


#: A token's frame in an open talk cycle, built where a function call per token counts
#: (``ConversationAgent.speak``): ``TEXT_HEAD + json_bytes(token).decode() + TEXT_MORE``, the
#: frame :func:`text_frame` makes with ``last=False``.
TEXT_HEAD = '{"type":"text","token":'
TEXT_MORE = ',"last":false}'
_LAST_TRUE = ',"last":true}'
#: A value as compact JSON bytes (msgspec).
json_bytes = _encoder.encode


# ------------------------------------------------------------------------ the Twilio side


def encode_inbound(message: Inbound) -> str:
    """Encode a frame as Twilio sends it to an app.

    The simulated caller, the test clients and the load generator speak as Twilio (Twilio docs:
    ConversationRelay WebSocket messages).
    """
    return _encoder.encode(message).decode()


def decode_received(frame: Union[str, bytes]) -> Outbound:
    """Decode a frame an app sent, checked as Twilio checks it.

    Twilio docs: ConversationRelay WebSocket messages; error 64107: a message that matches none
    of the supported messages.

    Raises :class:`ProtocolError` whose message is the reason Twilio would reject the frame:
    binary data, not JSON, no string ``type``, an unknown type, or a field Twilio would refuse.
    """
    if isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("a binary frame (ConversationRelay takes JSON text)")
    try:
        message: Outbound = _received.decode(frame)
        return message
    except msgspec.ValidationError as exc:  # a DecodeError too: caught first
        try:
            kind = _envelope.decode(frame).type
        except (msgspec.ValidationError, RecursionError):
            raise ProtocolError("not a JSON object with a string type") from exc
        if kind not in _KNOWN_OUTBOUND:
            raise ProtocolError(f"unknown message type {kind!r}") from exc
        raise ProtocolError(f"malformed {kind!r} message: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    except RecursionError:
        raise ProtocolError(_TOO_DEEP) from None


def invalid_message(frame: Union[str, bytes]) -> Error:
    """The ``error`` frame Twilio answers a rejected frame with.

    One per bad frame, code 64107, the frame quoted (Twilio docs: ConversationRelay WebSocket
    messages, error; error 64107).
    """
    shown = frame if isinstance(frame, str) else f"<{len(frame)} bytes of binary data>"
    return Error(description=f"Invalid message received, code: 64107, {shown}")


def as_fields(message: Union[Inbound, Outbound]) -> dict[str, Any]:
    """``message`` as the JSON object it is on the wire, for assertions that read like frames.

    A ``text`` always shows ``last``: the relay always sends it, even where Twilio defaults it.
    """
    fields: dict[str, Any] = msgspec.to_builtins(message)
    if isinstance(message, Text):
        fields["last"] = message.last
    return fields
