"""Call events to and from their stored form: the data object, encoded once.

The relay encodes an event's data once (msgspec JSON): those bytes are the ``data`` column in
SQLite and, unchanged, the ``data`` of its ``/events`` message. The CLI decodes each message
once (:func:`decode`) into a typed event; a kind it does not know, or data it cannot read
(a row from another version), becomes an :class:`~relay_server.events.kinds.Other` rather
than an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cache
from typing import Any

import msgspec

from relay_server.events.kinds import KINDS, CallEvent, Other

log = logging.getLogger("relay_server.events")


class Wire(msgspec.Struct):
    """One event as ``/events`` serves it and ``crctl tail --json`` prints it."""

    kind: str = "?"
    call_sid: str = ""
    ts: float = 0.0
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    id: int | None = None


def _as_text(value: Any) -> str:
    """What JSON cannot hold (a tool's odd result) is stored as its ``str()``."""
    return str(value)


_encoder = msgspec.json.Encoder(enc_hook=_as_text)
_wire_decoder = msgspec.json.Decoder(Wire)
_ENVELOPE = frozenset({"call_sid", "ts"})


@cache
def _keys(cls: type[CallEvent]) -> tuple[tuple[str, str], ...]:
    """(attribute, data key) of each data field of ``cls``."""
    names = cls.wire_names
    return tuple(
        (f.name, names.get(f.name, f.encode_name))
        for f in msgspec.structs.fields(cls)
        if f.name not in _ENVELOPE
    )


def data_of(event: CallEvent) -> dict[str, Any]:
    """The event's data as a dict with its wire keys; extras left unset are not in it."""
    if isinstance(event, Other):
        return dict(event.fields)
    data = {}
    for attr, key in _keys(type(event)):
        value = getattr(event, attr)
        if value is not msgspec.UNSET:
            data[key] = value
    return data


def encode_data(event: CallEvent) -> bytes:
    """The event's data as JSON: the stored row's ``data`` and the SSE message's."""
    return _encoder.encode(data_of(event))


def build(kind: str, call_sid: str, data: Mapping[str, Any], ts: float | None = None) -> CallEvent:
    """The typed event of ``kind`` with ``data`` (its wire keys).

    A kind this code does not know, or data that does not fit its kind (a publisher's bug,
    logged), gives an :class:`Other` that keeps the data as it came.
    """
    cls = KINDS.get(kind)
    if cls is None:
        return _other(kind, call_sid, data, ts)
    fields = {(_renamed(cls).get(key, key)): value for key, value in data.items()}
    fields["call_sid"] = call_sid
    if ts is not None:
        fields["ts"] = ts
    try:
        return msgspec.convert(fields, cls)
    except msgspec.ValidationError as exc:
        log.warning("event %s does not fit its kind (%s): kept as it came", kind, exc)
        return _other(kind, call_sid, data, ts)


def _other(kind: str, call_sid: str, data: Mapping[str, Any], ts: float | None) -> Other:
    if ts is None:
        return Other(call_sid=call_sid, name=kind, fields=dict(data))
    return Other(call_sid=call_sid, ts=ts, name=kind, fields=dict(data))


@cache
def _renamed(cls: type[CallEvent]) -> dict[str, str]:
    """Data key -> the name msgspec knows it by (the inverse of ``wire_names``)."""
    names = {f.name: f.encode_name for f in msgspec.structs.fields(cls)}
    return {wire: names[attr] for attr, wire in cls.wire_names.items()}


def from_wire(message: Mapping[str, Any]) -> CallEvent:
    """The typed event of an ``/events`` message already parsed (a stored call's events)."""
    data = message.get("data")
    if not isinstance(data, Mapping):
        data = {} if data is None else {"value": data}
    try:
        ts = float(message.get("ts") or 0.0)
    except (TypeError, ValueError):
        ts = 0.0
    return build(str(message.get("kind") or "?"), str(message.get("call_sid") or ""), data, ts)


def decode(text: str | bytes) -> CallEvent | None:
    """The typed event of one ``/events`` message's JSON; ``None`` if it is not one."""
    try:
        wire = _wire_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return build(wire.kind, wire.call_sid, wire.data, wire.ts)
