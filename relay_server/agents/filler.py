"""The filler: a short preemptible phrase said when the model's first token is late.

A timer, not a task racing the stream: it is armed when the request leaves, called off by the
first token, and when it fires it sends the filler as its own talk cycle (``last: true``,
``preemptible: true``), which the real answer then cuts (Twilio docs: WebSocket messages,
"text").
"""

from __future__ import annotations

import asyncio

from relay_server.services import Clock, Timer
from relay_server.session import CallSession


class Filler:
    """One turn's filler timer."""

    def __init__(self, session: CallSession, clock: Clock, delay: float, text: str) -> None:
        self._session = session
        self._text = text
        self._sending: asyncio.Task[None] | None = None
        self._timer: Timer | None = clock.call_later(delay, self._fire) if delay > 0 else None

    def _fire(self) -> None:
        self._timer = None
        self._sending = asyncio.ensure_future(
            self._session.send_text(self._text, last=True, preemptible=True)
        )

    async def stop(self) -> None:
        """The first token (or the end of the answer) is here: stop the filler.

        Call the timer off, or let a filler already on its way reach the socket first, whole.
        """
        self.cancel_timer()
        sending, self._sending = self._sending, None
        if sending is not None:
            await sending

    def cancel_timer(self) -> None:
        """Call the timer off (a filler already on its way goes on)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def cancel(self) -> None:
        """The turn is over: nothing more is said."""
        self.cancel_timer()
        sending, self._sending = self._sending, None
        if sending is not None:
            sending.cancel()
