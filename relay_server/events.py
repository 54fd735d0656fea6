"""Call events: what happened on which call, published to subscribers.

The relay reports through these (the httpx habit: the library calls back, the CLI renders).
Subscribers are plain callables; a failing subscriber is logged and never breaks a call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("relay_server.events")


@dataclass(frozen=True)
class CallEvent:
    """One event. ``kind`` is one of the names below; ``data`` is JSON-serialisable."""

    kind: str
    call_sid: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


# Kinds published by the relay.
CALL_STARTED = "call.started"
CALLER_SPEECH = "caller.speech"
AGENT_REPLY = "agent.reply"
BARGE_IN = "barge_in"
DTMF = "dtmf"
TOOL_CALL = "tool.call"
LANGUAGE = "language"
ERROR = "error"
SESSION_END = "session.end"
CALL_STATUS = "call.status"
LLM_FAULT = "llm.fault"
BAD_FRAME = "frame.bad"

Subscriber = Callable[[CallEvent], None]


class EventBus:
    """Fan-out of :class:`CallEvent` to subscribers, synchronously and in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, kind: str, call_sid: str, /, **data: Any) -> None:
        """Publish one event to every subscriber."""
        if not self._subscribers:
            return
        event = CallEvent(kind, call_sid, data)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a subscriber bug must not end a call
                log.exception("event subscriber failed on %s", kind)
