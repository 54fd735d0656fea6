"""Call events: what happened on which call, typed, published to subscribers.

* :mod:`~relay_server.events.kinds`: one msgspec Struct per kind, tagged by ``kind`` (the
  table of kinds and their data is there);
* :mod:`~relay_server.events.codec`: the data encoded once for SQLite and ``/events``, and
  decoded once in the CLI;
* :mod:`~relay_server.events.bus`: :class:`EventBus`, ``emit`` (typed) and ``publish``
  (``kind`` and keyword data);
* :mod:`~relay_server.events.explain`: words for the codes of error-bearing events.

Callers say ``from relay_server import events as ev`` and use ``ev.Dtmf``, ``ev.DTMF``,
``ev.EventBus``…: the names below are this package's public face.
"""

from __future__ import annotations

from relay_server.events.bus import SAID_BY_EVENT, EventBus, Subscriber, said_by
from relay_server.events.codec import Wire, build, data_of, decode, encode_data, from_wire
from relay_server.events.explain import TWILIO_ERRORS, enrich, explain, pushed
from relay_server.events.kinds import (
    AGENT_PUSHED,
    AGENT_REPLY,
    BAD_FRAME,
    BARGE_IN,
    CALL_DRAINED,
    CALL_LOST,
    CALL_OVER,
    CALL_STARTED,
    CALL_STATUS,
    CALLER_SPEECH,
    DTMF,
    ERROR,
    KINDS,
    LANGUAGE,
    LLM_FAULT,
    SESSION_END,
    SOCKET_CLOSED,
    TOOL_CALL,
    TURN_TIMELINE,
    AgentPushed,
    AgentReply,
    AnyEvent,
    BadFrame,
    BargeIn,
    CallDrained,
    CallerSpeech,
    CallEvent,
    CallLost,
    CallStarted,
    CallStatus,
    Dtmf,
    Error,
    LanguageSwitched,
    LlmFault,
    Other,
    SessionEnd,
    SocketClosed,
    ToolCall,
    TurnTimeline,
)

__all__ = [
    "AGENT_PUSHED",
    "AGENT_REPLY",
    "BAD_FRAME",
    "BARGE_IN",
    "CALLER_SPEECH",
    "CALL_DRAINED",
    "CALL_LOST",
    "CALL_OVER",
    "CALL_STARTED",
    "CALL_STATUS",
    "DTMF",
    "ERROR",
    "KINDS",
    "LANGUAGE",
    "LLM_FAULT",
    "SAID_BY_EVENT",
    "SESSION_END",
    "SOCKET_CLOSED",
    "TOOL_CALL",
    "TURN_TIMELINE",
    "TWILIO_ERRORS",
    "AgentPushed",
    "AgentReply",
    "AnyEvent",
    "BadFrame",
    "BargeIn",
    "CallDrained",
    "CallEvent",
    "CallLost",
    "CallStarted",
    "CallStatus",
    "CallerSpeech",
    "Dtmf",
    "Error",
    "EventBus",
    "LanguageSwitched",
    "LlmFault",
    "Other",
    "SessionEnd",
    "SocketClosed",
    "Subscriber",
    "ToolCall",
    "TurnTimeline",
    "Wire",
    "build",
    "data_of",
    "decode",
    "encode_data",
    "enrich",
    "explain",
    "from_wire",
    "pushed",
    "said_by",
]
