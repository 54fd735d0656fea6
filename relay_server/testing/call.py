"""Drive one agent in-process, as the relay would: frames in, encoded frames out, no socket.

:class:`FakeCall` creates the session from an agent class with a :class:`SessionLink` whose
``send`` decodes each frame back into a typed message, and dispatches the caller's messages to it
one at a time, as the relay's receive loop does. When :meth:`FakeCall.interrupt` (or any other
caller message) returns, the agent's handler has run to its end: what it sent is in the
:attr:`FakeCall.sent` list, with no wait. :class:`FakeClock` runs the session's timers (filler,
silence, DTMF pause) when the test moves it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from relay_server.calls import SessionFactory
from relay_server.config import RelayConfig
from relay_server.events import CallEvent, EventBus
from relay_server.protocol import (
    Dtmf,
    Inbound,
    Info,
    Interrupt,
    Outbound,
    Prompt,
    Setup,
    Text,
    decode_outbound,
)
from relay_server.services import Services
from relay_server.session import CallSession, SessionLink

#: How long a :meth:`FakeCall.recv` waits before the test fails instead of hanging (never a
#: figure under test: in-process frames arrive without delay).
PATIENCE = 30.0


class _FakeTimer:
    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A :class:`relay_server.services.Clock` that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._order = itertools.count()
        self._timers: list[tuple[float, int, _FakeTimer]] = []

    def time(self) -> float:
        """The fake time."""
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> _FakeTimer:
        """Run ``callback`` when the clock has moved ``delay`` seconds."""
        timer = _FakeTimer(self.now + delay, callback)
        heapq.heappush(self._timers, (timer.due, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> int:
        """Move the clock, running the timers that come due, in order; how many ran."""
        until = self.now + seconds
        ran = 0
        while self._timers and self._timers[0][0] <= until:
            due, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, due)
            timer.callback()
            ran += 1
        self.now = until
        return ran

    @property
    def armed(self) -> list[float]:
        """Seconds from now until each armed timer is due, soonest first."""
        return sorted(t.due - self.now for _, _, t in self._timers if not t.cancelled)


class FakeCall:
    """One call to ``agent`` (a :class:`CallSession` class or factory)."""

    def __init__(
        self,
        agent: SessionFactory,
        *,
        services: Services,
        config: RelayConfig | None = None,
        call_sid: str = "CA" + "0" * 32,
    ) -> None:
        self.events: list[CallEvent] = []
        bus = EventBus()
        bus.subscribe(self.events.append)
        self.link = SessionLink(self._send, bus, config or RelayConfig(), services)
        self.factory = agent
        self.call_sid = call_sid
        #: Every message the agent sent, in order.
        self.sent: list[Outbound] = []
        self._frames: asyncio.Queue[Outbound] = asyncio.Queue()
        self._session: CallSession | None = None

    async def _send(self, frame: str) -> None:
        message = decode_outbound(frame)  # what Twilio would validate
        self.sent.append(message)
        self._frames.put_nowait(message)

    @property
    def session(self) -> CallSession:
        """The agent's session (after :meth:`connect`)."""
        assert self._session is not None, "connect() first"
        return self._session

    # ---------------------------------------------------------------------- the caller
    async def connect(self, **setup: Any) -> FakeCall:
        """The socket opens: ``setup`` (fields of :class:`Setup`) creates the session."""
        message = Setup(call_sid=self.call_sid, **setup)
        self._session = self.factory(self.link, message)
        await self._session.on_setup(message)
        return self

    async def send(self, message: Inbound) -> None:
        """Dispatch one caller message; returns when the agent's handler has."""
        await self.session.dispatch(message)

    async def prompt(self, text: str, last: bool = True) -> None:
        """The caller said ``text`` (``last=False``: a partial transcript)."""
        await self.send(Prompt(voice_prompt=text, last=last))

    async def dtmf(self, digit: str) -> None:
        """The caller pressed a key."""
        await self.send(Dtmf(digit=digit))

    async def interrupt(self, heard: str, duration_ms: int | str = 0) -> None:
        """The caller barged in, having heard ``heard`` of the reply."""
        await self.send(
            Interrupt(utterance_until_interrupt=heard, duration_until_interrupt_ms=duration_ms)
        )

    async def info(self, name: str, value: str) -> None:
        """A speaker event (``agentSpeaking``/``clientSpeaking`` ``on``/``off``)."""
        await self.send(Info(name=name, value=value))

    async def hangup(self) -> None:
        """The socket closes."""
        await self.session.close()

    # ------------------------------------------------------------------- what came back
    async def recv(self) -> Outbound:
        """The next message the agent sends."""
        async with asyncio.timeout(PATIENCE):
            return await self._frames.get()

    def received(self) -> list[Outbound]:
        """The messages already sent and not yet taken by :meth:`recv` (no wait)."""
        taken: list[Outbound] = []
        while not self._frames.empty():
            taken.append(self._frames.get_nowait())
        return taken

    async def turn(self) -> list[Text]:
        """The next talk cycle: ``text`` messages up to one with ``last: true``."""
        frames: list[Text] = []
        while True:
            message = await self.recv()
            assert isinstance(message, Text), f"expected text, got {message!r}"
            frames.append(message)
            if message.last:
                return frames

    async def reply_text(self) -> str:
        """The next talk cycle's words."""
        return "".join(t.token for t in await self.turn())

    def kinds(self) -> list[str]:
        """The kinds of the call events published so far."""
        return [e.kind for e in self.events]
