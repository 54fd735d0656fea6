"""``HandoffData``: the string an ``end`` frame carries, parsed.

Twilio posts it to the ``<Connect>`` action URL as the ``HandoffData`` form field (Twilio docs:
ConversationRelay, the ``end`` message and the action callback).

Twilio passes the string verbatim and gives it no shape; this relay's agents send a JSON object
(``{"reasonCode": "live-agent-handoff", "reason": ..., "summary": ...}``, the shape Twilio's
examples use). Parsing is pure, like the rest of ``protocol/``: no I/O, no event loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec

from relay_server.protocol.errors import ProtocolError

#: The ``reasonCode`` that asks for a person (Twilio docs: ConversationRelay, live agent handoff).
LIVE_AGENT_HANDOFF = "live-agent-handoff"


class HandoffData(msgspec.Struct, frozen=True):
    """A parsed ``HandoffData`` object: the fields the relay acts on, and all of them as sent."""

    #: ``reasonCode`` when it is a string, else ``None``.
    reason_code: str | None = None
    #: ``reason`` when it is a string, else ``None``.
    reason: str | None = None
    #: A truthy ``handoff`` key: the other way an agent may ask for a person.
    handoff: bool = False
    #: Every key of the object, values as decoded.
    fields: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def wants_person(self) -> bool:
        """Whether the agent asked to hand the caller to a person."""
        return self.reason_code == LIVE_AGENT_HANDOFF or self.handoff


class HandoffDataError(ProtocolError):
    """``HandoffData`` that is not a JSON object.

    ``not_json`` tells free text (a custom agent's own words) from JSON of another kind (an
    array, a string, a number).
    """

    def __init__(self, message: str, *, not_json: bool) -> None:
        super().__init__(message)
        self.not_json = not_json


_decoder = msgspec.json.Decoder()


def parse_handoff(text: str) -> HandoffData:
    """Parse the ``HandoffData`` of an ended session.

    Raises:
        HandoffDataError: ``text`` is not JSON (``not_json`` is True; this includes JSON nested
            too deeply to decode), or is JSON but not an object (``not_json`` is False).
    """
    try:
        value = _decoder.decode(text)
    except msgspec.DecodeError as exc:
        raise HandoffDataError(f"HandoffData is not JSON: {exc}", not_json=True) from exc
    except RecursionError:
        # msgspec guards its recursion with the interpreter's limit (see codec.decode).
        raise HandoffDataError("HandoffData is JSON nested too deeply", not_json=True) from None
    if not isinstance(value, dict):
        raise HandoffDataError(
            f"HandoffData is a JSON {_json_kind(value)}, not an object", not_json=False
        )
    code, reason = value.get("reasonCode"), value.get("reason")
    return HandoffData(
        reason_code=code if isinstance(code, str) else None,
        reason=reason if isinstance(reason, str) else None,
        handoff=bool(value.get("handoff")),
        fields=value,
    )


def encode_handoff(fields: Mapping[str, Any]) -> str:
    """Encode an object as the ``HandoffData`` string of an ``end`` frame.

    ``handoffData`` is a string on the wire (Twilio docs: WebSocket messages, end). Encoded
    with the standard library's separators (``", "``, ``": "``): the exact text the relay
    has always sent, which an action handler may compare verbatim.
    """
    return json.dumps(dict(fields))


def wants_person(text: str | None) -> bool:
    """Whether an ended session's ``HandoffData`` asks for a person.

    An object asks with ``reasonCode: "live-agent-handoff"`` or a truthy ``handoff``; free text
    (not JSON, from a custom agent) is taken as a request; other JSON, or nothing, is not one.
    """
    if not text:
        return False
    try:
        return parse_handoff(text).wants_person
    except HandoffDataError as exc:
        return exc.not_json


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
