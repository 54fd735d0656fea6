"""The graceful drain of a stopping relay (SIGTERM).

At once: ``/readyz`` answers 503 (a load balancer stops sending calls) and new sockets are
refused with 503. The live calls go on until they end, or until the drain timeout; then each
socket still open is closed, one log line and one ``call.drained`` event each:

* with ``--redis-url`` and ``applicationReconnect="true"`` in the TwiML, with close code
  :data:`RECONNECT_CODE`, so Twilio reopens it, to another replica, and the conversation goes
  on there (Twilio's changelog, "Conversation Relay: ... Application Reconnect": on an
  unexpected drop Twilio buffers the call's events and reconnects to the application; 1000 is
  the normal close that ends the session, Twilio docs: WebSocket messages);
* otherwise politely: the agent's turn is cut, the caller hears :data:`GOODBYE`, and the
  session gets ``end`` (as an agent's own end), after which Twilio closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from relay_server import events as ev
from relay_server.protocol import Text

if TYPE_CHECKING:
    from relay_server.calls import CallConnection
    from relay_server.state import RelayState

log = logging.getLogger("relay_server.drain")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: 1012 "Service Restart" (RFC 6455 section 7.4, IANA registry): not 1000, so Twilio takes it
#: for a drop and its applicationReconnect reopens the socket.
RECONNECT_CODE = 1012
#: What the caller hears when a stopping relay ends the call.
GOODBYE = "Sorry, I have to end our call now. Please call again. Goodbye."
#: Seconds the closed sockets have to go away before the server stops anyway.
CLOSE_GRACE = 10.0


class Drain:
    """This relay's live sockets, and whether it is draining (stopping)."""

    def __init__(self) -> None:
        #: Set once, on SIGTERM: ``/readyz`` says 503 and new sockets are refused.
        self.active = False
        self._sockets: dict[CallConnection, Send] = {}
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._sockets)

    def track(self, conn: CallConnection, send: Send) -> None:
        """A socket was accepted."""
        self._sockets[conn] = send

    def untrack(self, conn: CallConnection) -> None:
        """A socket is gone."""
        self._sockets.pop(conn, None)
        if not self._sockets and self._idle is not None:
            self._idle.set()

    def begin(self) -> int:
        """Start draining; returns the number of live sockets."""
        self.active = True
        self._idle = asyncio.Event()
        if not self._sockets:
            self._idle.set()
        return len(self._sockets)

    async def wait_idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the last socket to close; whether it did."""
        if self._idle is None:
            raise RuntimeError("wait_idle before begin")
        try:
            async with asyncio.timeout(seconds):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close_remaining(self, state: RelayState) -> int:
        """Close every socket still open (reconnect code or polite end); how many."""
        reconnect = state.cluster is not None and reconnects(state)
        replica = state.cluster.replica if state.cluster is not None else f"pid {os.getpid()}"
        remaining = list(self._sockets.items())
        for conn, send in remaining:
            session = conn.session
            sid = session.call_sid if session is not None else ""
            if reconnect or session is None:
                # Before setup there is no call to end politely: the socket just closes.
                code = RECONNECT_CODE
                reason = "relay stopping; reconnect"
                with contextlib.suppress(ConnectionError, RuntimeError, OSError):  # closing
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                action, words = "reconnect", f"closed with {code} for Twilio to reconnect it"
            else:
                code = None
                await _end_politely(conn)
                action, words = "end", "ended politely (goodbye, then end)"
            log.info("call %s: drain timeout reached: %s", sid or conn.call_id, words)
            if sid:
                state.bus.emit(
                    ev.CallDrained(call_sid=sid, action=action, code=code, replica=replica)
                )
        return len(remaining)


def reconnects(state: RelayState) -> bool:
    """Whether the TwiML asks Twilio to reconnect a dropped socket (``applicationReconnect``)."""
    return state.template.relay.get("applicationReconnect") == "true"


async def _end_politely(conn: CallConnection) -> None:
    session = conn.session
    if session is None:
        return
    try:
        await session.push(Text(token=GOODBYE, last=True))  # cuts a running turn first
        await session.end()
    except Exception:  # the agent's state is not the drain's business: it must go on
        log.exception("call %s: the polite end failed", session.call_sid)


async def run_drain(state: RelayState, drain_timeout: float, grace: float = CLOSE_GRACE) -> None:
    """Drain ``state``'s relay: refuse new calls, wait for live ones, then close the rest."""
    drain = state.drain
    count = drain.begin()
    log.info(
        "draining: %d live call(s) go on, new sockets are refused and /readyz answers 503; "
        "stopping when they end or in %g s (a second signal stops at once)",
        count,
        drain_timeout,
    )
    if await drain.wait_idle(drain_timeout):
        log.info("drained: every call ended; stopping")
        return
    closed = await drain.close_remaining(state)
    done = await drain.wait_idle(grace)
    left = "" if done else f"; {len(drain)} socket(s) still open are cut by the stop"
    log.info("drained: drain timeout reached, %d call(s) closed%s; stopping", closed, left)
