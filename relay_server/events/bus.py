"""The event bus: call events fanned out to subscribers, synchronously and in order.

The relay reports through it (the httpx habit: the library calls back, the CLI renders).
Subscribers are plain callables that receive typed events; a failing subscriber is logged and
never breaks a call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from relay_server.events.codec import build
from relay_server.events.explain import EXPLAINED, enrich
from relay_server.events.kinds import CallEvent

log = logging.getLogger("relay_server.events")

Subscriber = Callable[[CallEvent], None]

#: The attribute that marks a log record an event also says (:func:`said_by`).
SAID_BY_EVENT = "call_event"


def said_by(kind: str, call_sid: str) -> dict[str, str]:
    """``extra`` for a log line that the event ``kind`` says too.

    A call log that shows the events (`crctl up`) leaves such lines out, so each fault is
    said once.
    """
    return {SAID_BY_EVENT: kind, "call_sid": call_sid}


class EventBus:
    """Fan-out of :class:`CallEvent` values to subscribers, synchronously and in order."""

    def __init__(self) -> None:
        #: A new tuple at each change: an emit that runs while a subscriber (un)subscribes goes
        #: on with the ones it started with, and no emit copies the list.
        self._subscribers: tuple[Subscriber, ...] = ()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            subscribers = list(self._subscribers)
            subscribers.remove(subscriber)
            self._subscribers = tuple(subscribers)

        return unsubscribe

    def emit(self, event: CallEvent) -> None:
        """Give ``event`` to every subscriber (with the words for its error code, if any)."""
        subscribers = self._subscribers
        if not subscribers:
            return
        if type(event) in EXPLAINED:
            event = enrich(event)
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:  # a subscriber bug must not end a call
                log.exception("event subscriber failed on %s", event.kind)

    def publish(self, kind: str, call_sid: str, /, **data: Any) -> None:
        """Publish the event of ``kind`` with ``data`` (its wire keys).

        The same as :meth:`emit` of the typed event built from them.
        """
        if self._subscribers:
            self.emit(build(kind, call_sid, data))
