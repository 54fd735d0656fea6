"""Live calls by callSid, one socket's frame loop, and the history kept for a reconnect.

:class:`CallConnection` is what the WebSocket handler drives: it decodes each frame, creates the
session on ``setup``, dispatches the rest and survives anything a frame or an agent does wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from relay_server import events as ev
from relay_server.protocol import Prompt, ProtocolError, Setup, Unknown, decode
from relay_server.routing import ANSWERED_PARAMETER
from relay_server.session import CallSession, SessionLink

if TYPE_CHECKING:
    from relay_server.cluster.conversations import Conversations
    from relay_server.cluster.directory import Directory

log = logging.getLogger("relay_server.calls")

SessionFactory = Callable[[SessionLink, Setup], CallSession]

#: Seconds after a resume in which Twilio's replay of buffered events is expected (see
#: :meth:`CallConnection._replayed`).
REPLAY_WINDOW = 3.0


@dataclass
class _Parked:
    state: Any
    expires: float
    reconnects: int = 0
    resume: bool = False


class CallRegistry:
    """Sessions of live sockets by callSid, plus the state of recently closed ones.

    A session is removed as soon as its socket closes. Its resumable state is parked for
    ``ttl`` seconds so that ``/action`` can reconnect a dropped socket (``failed``/64105) to the
    same conversation; parked entries expire, so nothing grows without bound.
    """

    def __init__(
        self,
        ttl: float = 120.0,
        max_reconnects: int = 3,
        directory: Directory | None = None,
        conversations: Conversations | None = None,
    ) -> None:
        self.sessions: dict[str, CallSession] = {}
        #: The replicas' shared directory (``--redis-url``): told of every socket here.
        self.directory = directory
        #: The replicas' kept conversations (``--redis-url``): a reconnect resumes anywhere.
        self.conversations = conversations
        self._parked: dict[str, _Parked] = {}
        #: Answering machine results (``/amd``) that came before their call's socket, with
        #: when they came: kept ``ttl`` seconds (a result whose socket never opens goes).
        self._early_answers: dict[str, tuple[str, float]] = {}
        self.ttl = ttl
        self.max_reconnects = max_reconnects

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, call_sid: str) -> CallSession | None:
        """The live session of a call, if its socket is open."""
        return self.sessions.get(call_sid)

    def add(self, session: CallSession) -> Any:
        """Register a new socket's session; returns parked state to restore, if it resumes."""
        self._expire()
        self.sessions[session.call_sid] = session
        if self.directory is not None:
            self.directory.add(session.call_sid)
        parked = self._parked.get(session.call_sid)
        if parked is not None and parked.resume:
            parked.resume = False
            return parked.state
        return None

    def remove(self, session: CallSession) -> None:
        """Drop a closed socket's session and park its state for a possible reconnect."""
        if self.sessions.get(session.call_sid) is session:
            del self.sessions[session.call_sid]
            if self.directory is not None:
                self.directory.remove(session.call_sid)
        state = session.resume_state()
        if self.conversations is not None:
            self.conversations.save(session.call_sid, state, now=True)  # a reconnect may follow
        if state is not None:
            previous = self._parked.get(session.call_sid)
            self._parked[session.call_sid] = _Parked(
                state, time.monotonic() + self.ttl, previous.reconnects if previous else 0
            )

    def claim_reconnect(self, call_sid: str) -> bool:
        """Whether a dropped call may reconnect (state parked, under the limit); marks it so."""
        parked = self._parked.get(call_sid)
        if parked is None or parked.reconnects >= self.max_reconnects:
            return False
        parked.reconnects += 1
        parked.resume = True
        parked.expires = time.monotonic() + self.ttl
        return True

    async def claim(self, call_sid: str) -> bool:
        """:meth:`claim_reconnect`, across the replicas with ``--redis-url``.

        There the count is kept in Redis and the conversation read from it, so the reconnect may
        land on any replica; Redis down: decided by this replica's parked state.
        """
        if self.conversations is None:
            return self.claim_reconnect(call_sid)
        granted = await self.conversations.claim(call_sid, self.max_reconnects)
        if granted is None:
            return self.claim_reconnect(call_sid)
        parked = self._parked.get(call_sid)
        if granted and parked is not None:  # the socket may come back here: resume from memory
            parked.resume = True
            parked.expires = time.monotonic() + self.ttl
        return granted

    async def resumable(self, call_sid: str) -> tuple[Any, bool]:
        """The state a new socket of ``call_sid`` resumes from Redis, if any.

        Returns:
            The state (``None``: none) and whether Twilio may replay events to it (no reconnect
            was granted: its ``applicationReconnect`` brought the socket back).
        """
        if self.conversations is None:
            return None, False
        found = await self.conversations.take(call_sid)
        return found if found is not None else (None, False)

    def on_event(self, event: ev.CallEvent) -> None:
        """A bus subscriber: at each turn boundary the call's conversation is kept in Redis.

        A reply ended (or was cut: ``agent.reply``), a barge-in trimmed it (``barge_in``).
        """
        if self.conversations is not None and isinstance(event, ev.AgentReply | ev.BargeIn):
            session = self.sessions.get(event.call_sid)
            if session is not None:
                self.conversations.save(event.call_sid, session.resume_state())

    def forget(self, call_sid: str) -> None:
        """The call is over: drop its parked state."""
        self._parked.pop(call_sid, None)
        self._early_answers.pop(call_sid, None)
        if self.conversations is not None:
            self.conversations.forget(call_sid)

    def answered_early(self, call_sid: str, answered_by: str) -> None:
        """Keep an ``/amd`` result that came before its call's socket (for ``ttl`` seconds)."""
        now = time.monotonic()
        self._early_answers = {
            sid: kept for sid, kept in self._early_answers.items() if now - kept[1] < self.ttl
        }
        self._early_answers[call_sid] = (answered_by, now)

    def early_answer(self, call_sid: str) -> str | None:
        """The ``/amd`` result kept for a call whose socket just opened (taken: once)."""
        kept = self._early_answers.pop(call_sid, None)
        return kept[0] if kept is not None and time.monotonic() - kept[1] < self.ttl else None

    @property
    def parked(self) -> int:
        """How many closed calls' states are kept."""
        return len(self._parked)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, p in self._parked.items() if p.expires < now]:
            del self._parked[sid]


class CallConnection:
    """One ConversationRelay socket: frames in, session handlers called, errors contained."""

    __slots__ = ("_broken", "_replay", "factory", "link", "peer", "registry", "session")

    def __init__(
        self, registry: CallRegistry, factory: SessionFactory, link: SessionLink, peer: str = ""
    ) -> None:
        self.registry = registry
        self.factory = factory
        #: This socket's way to send, with what every call shares.
        self.link = link
        self.session: CallSession | None = None
        self.peer = peer
        #: The agent could not be created: frames are dropped quietly (logged once).
        self._broken = False
        #: After an ``applicationReconnect`` resume: (last answered caller words, deadline).
        self._replay: tuple[str, float] | None = None

    @property
    def call_id(self) -> str:
        """The callSid once known, else the peer address (for logs)."""
        return self.session.call_sid if self.session else f"(no setup yet, {self.peer})"

    @property
    def started(self) -> bool:
        """Whether ``setup`` has arrived (even if the agent then could not be created)."""
        return self.session is not None or self._broken

    async def receive(self, frame: Union[str, bytes]) -> None:
        """Handle one frame. Never raises for bad input or a failing handler."""
        try:
            message = decode(frame, max_bytes=self.link.config.max_frame_bytes)
        except ProtocolError as exc:
            self._bad(str(exc))
            return
        if self._broken:
            return
        if isinstance(message, Unknown):
            log.debug("call %s: unknown message type %r skipped", self.call_id, message.type)
            return
        if self.session is None:
            if not isinstance(message, Setup):
                self._bad(f"{type(message).__name__.lower()} before setup")
                return
            await self._start(message)
            return
        if self._replay is not None and self._replayed(message):
            return
        try:
            await self.session.dispatch(message)
        except Exception:
            log.exception("call %s: agent handler failed; the call goes on", self.call_id)

    async def _start(self, setup: Setup) -> None:
        try:
            session = self.factory(self.link, setup)
        except Exception:
            log.exception(
                "call %s: the agent could not be created; the call gets no answers", setup.call_sid
            )
            self._broken = True
            return
        self.session = session
        state = self.registry.add(session)
        if state is None and self.registry.conversations is not None:
            state, replays = await self.registry.resumable(setup.call_sid)
            if replays and state is not None:
                self._guard_replay(state)
        if state is not None:
            session.restore(state)
            log.info("call %s: reconnected, conversation resumed", setup.call_sid)
        try:
            await session.on_setup(setup)
        except Exception:
            log.exception("call %s: on_setup failed; the call goes on", setup.call_sid)
        # /amd came first, or the TwiML carried a synchronous result (routing's contract)
        answered_by = self.registry.early_answer(setup.call_sid) or setup.custom_parameters.get(
            ANSWERED_PARAMETER
        )
        if answered_by:
            await session.answered(answered_by)

    def _guard_replay(self, state: Any) -> None:
        """Expect Twilio's replay of what the dropped socket was sent (``applicationReconnect``).

        Assumption (Twilio's docs say the events buffered during the drop are replayed, not which
        ones): a final prompt the old socket already answered may come again; the caller's last
        words that have a reply in the restored conversation, repeated within
        :data:`REPLAY_WINDOW` s of the setup, are not answered twice.
        """
        if not isinstance(state, list):
            return
        answered = False
        for message in reversed(state):
            if not isinstance(message, dict):
                return
            if message.get("role") == "assistant" and message.get("content"):
                answered = True
            elif message.get("role") == "user":
                if answered and isinstance(message.get("content"), str):
                    deadline = asyncio.get_running_loop().time() + REPLAY_WINDOW
                    self._replay = (message["content"], deadline)
                return

    def _replayed(self, message: Any) -> bool:
        if not isinstance(message, Prompt) or self._replay is None:
            return False
        words, deadline = self._replay
        if message.last:
            self._replay = None  # one final prompt ends the replay window either way
        if asyncio.get_running_loop().time() > deadline or message.voice_prompt != words:
            return False
        if message.last:
            log.info("call %s: replayed prompt already answered; not answered again", self.call_id)
        return True

    def _bad(self, reason: str) -> None:
        # Said by the ``frame.bad`` event too: ``call_event`` lets `crctl up` show it once.
        log.warning(
            "call %s: bad frame dropped: %s",
            self.call_id,
            reason,
            extra=ev.said_by(ev.BAD_FRAME, self.call_id),
        )
        sid = self.session.call_sid if self.session else ""
        self.link.events.emit(ev.BadFrame(call_sid=sid, reason=reason))

    async def close(self, code: int | None = None) -> None:
        """The socket is gone: stop the session and unregister it.

        ``code``: its close code, if known.
        """
        session, self.session = self.session, None
        if session is None:
            return
        try:
            await session.close()
        finally:
            self.registry.remove(session)
            self.link.events.emit(ev.SocketClosed(call_sid=session.call_sid, code=code))
