"""Each caller turn's timeline, as the caller lived it: one ``turn.timeline`` event per turn.

A :class:`Timeline` belongs to one call (one socket). The agent feeds it *marks* from frames
and code that already run once per turn (never per token), on one monotonic clock (the event
loop's):

=======================  ======================================================================
``caller_stopped``       Twilio's ``info clientSpeaking off`` (``caller_speaking`` ``on`` forgets
                         an earlier ``off``: the caller went on talking)
``key``                  a DTMF key: for a keyed turn, the caller "stops" at their last key
``start``                the caller's turn ended at the relay: the final ``prompt`` (``last:
                         true``) or the key / end of a key entry that makes the turn
``llm_request``          the first LLM request of the turn is sent
``llm_first_token``      the LLM's first token arrived
``first_text``           the reply's first ``text`` frame was sent
``reply_done``           the reply's stream ended (or was cancelled)
``agent_speaking``       Twilio's ``info agentSpeaking on`` / ``off``
``barge_in``             Twilio's ``interrupt``: the caller cut in
``close``                the socket closed
=======================  ======================================================================

(Frame names and order: Twilio docs, ConversationRelay "WebSocket messages"; speaker events
need ``events="speaker-events"`` on ``<ConversationRelay>``.)

The turn's event is emitted once, when its timeline is complete: at ``agentSpeaking off`` once
the reply's stream has ended (``completed``), at a barge-in (``interrupted``, ``barge_in``; the
agent's speaking counted up to the cut), at the next turn's start when this one never got its
``off`` (``interrupted`` if the agent was still audible or the reply was cut by the new turn,
else ``completed``), or when the call closes (``closed`` if the reply was still going, else
``completed``). A stage whose frame never came is ``None``, never guessed.

What the agent says on its own (a silence reminder, the welcome greeting) is not a caller turn
and gets no timeline: marks with no open turn are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from math import floor as _floor

from relay_server import events as ev

COMPLETED = "completed"
INTERRUPTED = "interrupted"
CLOSED = "closed"


def tenths(ms: float) -> float:
    """``ms`` to 0.1, half up: how every duration in an event is given.

    Not ``round(ms, 1)``: CPython rounds a float to digits through a decimal string (some
    3,000 instructions a call, and a turn's events take eight; bench/instructions.py).
    """
    return _floor(ms * 10 + 0.5) / 10


def _ms(start: float | None, end: float | None) -> float | None:
    """``end - start`` in ms (0.1 ms), or ``None`` when either is unknown or time ran back."""
    if start is None or end is None or end < start:
        return None
    return tenths((end - start) * 1000)


class Timeline:
    """The per-turn timeline recorder of one call (module docstring).

    ``emit`` publishes a :class:`~relay_server.events.TurnTimeline` (the call's event bus);
    ``clock`` is the monotonic clock marks are taken on when no time is given.
    """

    __slots__ = (
        "_call_sid",
        "_cancelled",
        "_clock",
        "_done",
        "_emit",
        "_first_text",
        "_first_token",
        "_off",
        "_on",
        "_open",
        "_pending_stop",
        "_request",
        "_speaking",
        "_start",
        "_stopped",
        "_turns",
    )

    def __init__(
        self, call_sid: str, emit: Callable[[ev.CallEvent], None], clock: Callable[[], float]
    ) -> None:
        self._call_sid = call_sid
        self._emit = emit
        self._clock = clock
        self._turns = 0
        self._open = False
        #: When the caller last stopped speaking (or keyed), waiting for the turn it ends.
        self._pending_stop: float | None = None
        self._speaking = False  # agentSpeaking on without its off (any talk, also a greeting)
        self._reset()

    def _reset(self) -> None:
        self._stopped: float | None = None
        self._start: float | None = None
        self._request: float | None = None
        self._first_token: float | None = None
        self._first_text: float | None = None
        self._on: float | None = None
        self._off: float | None = None
        self._done = False
        self._cancelled = False

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    @property
    def turns(self) -> int:
        """How many caller turns started on this call."""
        return self._turns

    @property
    def open(self) -> bool:
        """Whether a turn's timeline is still being recorded."""
        return self._open

    # ------------------------------------------------------------------ caller side
    def caller_speaking(self, on: bool, now: float | None = None) -> None:
        """``info clientSpeaking on|off``."""
        self._pending_stop = None if on else self._now(now)

    def key(self, now: float | None = None) -> None:
        """A DTMF key reached the relay: a keyed turn's caller stopped at their last key."""
        self._pending_stop = self._now(now)

    def start(self, now: float | None = None) -> None:
        """The caller's turn ended (final prompt, key, end of a key entry): a new turn.

        ``now`` is when that frame reached the relay. A previous turn still open ends here.
        """
        now = self._now(now)
        if self._open:
            if self._speaking and self._on is not None:
                self._finish(INTERRUPTED, True, cut=now)  # a new prompt while the agent spoke
            elif self._cancelled or not self._done:
                self._finish(INTERRUPTED, False)  # superseded before it was heard
            else:
                self._finish(COMPLETED, False)
        self._reset()
        self._turns += 1
        self._open = True
        self._start = now
        stop, self._pending_stop = self._pending_stop, None
        self._stopped = stop if stop is not None and stop <= now else None

    # ------------------------------------------------------------------- agent side
    def llm_request(self, now: float | None = None) -> None:
        """The turn's first LLM request is sent."""
        if self._open and self._request is None:
            self._request = self._now(now)

    def llm_first_token(self, now: float | None = None) -> None:
        """The LLM's first token of the turn arrived."""
        if self._open and self._first_token is None:
            self._first_token = self._now(now)

    def first_text(self, now: float | None = None) -> None:
        """The reply's first ``text`` frame was sent."""
        if self._open and self._first_text is None:
            self._first_text = self._now(now)

    def reply_done(self, cancelled: bool = False) -> None:
        """The reply's stream ended (``cancelled``: cut by a barge-in or a newer turn)."""
        if self._open:
            self._done = True
            self._cancelled = cancelled

    def agent_speaking(self, on: bool, now: float | None = None) -> None:
        """``info agentSpeaking on|off``; an ``off`` after the reply's end completes the turn."""
        now = self._now(now)
        self._speaking = on
        if not self._open:
            return
        if on:
            if self._on is None:
                self._on = now
            return
        self._off = now
        if self._done and self._first_text is not None:
            self._finish(COMPLETED, False)

    def barge_in(self, now: float | None = None) -> None:
        """Twilio's ``interrupt``: the open turn ends, its speech counted up to now."""
        if self._open:
            self._finish(INTERRUPTED, True, cut=self._now(now))

    def close(self, now: float | None = None) -> None:
        """The socket closed: a turn still open ends ``closed`` (or ``completed``, if over)."""
        if not self._open:
            return
        if self._done and not self._cancelled and not self._speaking:
            self._finish(COMPLETED, False)
        else:
            self._finish(CLOSED, False, cut=self._now(now) if self._speaking else None)

    # ------------------------------------------------------------------------ emit
    def stages(self, cut: float | None = None) -> dict[str, float | None]:
        """The open turn's stages in ms (``cut``: the agent's speech stopped there)."""
        start, text, token = self._start, self._first_text, self._first_token
        request = self._request
        if request is not None:
            before, after = _ms(start, request), _ms(token, text)
            relay = None if before is None or after is None else tenths(before + after)
        else:  # no LLM (echo, a custom agent): all of it is the relay's
            relay = _ms(start, text)
        on = self._on
        end = cut if cut is not None else self._off
        return {
            "transcription_ms": _ms(self._stopped, start),
            "relay_ms": relay,
            "llm_first_token_ms": _ms(request, token),
            "speech_start_ms": _ms(text, on),
            "speaking_ms": _ms(on, end),
            "caller_wait_ms": _ms(self._stopped, on),
        }

    def _finish(self, end: str, barge_in: bool, cut: float | None = None) -> None:
        stages = self.stages(cut)
        self._open = False
        self._emit(
            ev.TurnTimeline(
                call_sid=self._call_sid,
                turn=self._turns,
                end=end,
                barge_in=barge_in,
                transcription_ms=stages["transcription_ms"],
                relay_ms=stages["relay_ms"],
                llm_first_token_ms=stages["llm_first_token_ms"],
                speech_start_ms=stages["speech_start_ms"],
                speaking_ms=stages["speaking_ms"],
                caller_wait_ms=stages["caller_wait_ms"],
            )
        )
