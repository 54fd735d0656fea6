"""Twilio's speaker timing, played by the simulated caller (``crctl call``).

With ``events="speaker-events tokens-played"`` in the TwiML, Twilio reports what the call
sounds like as ``info`` frames (Twilio docs: ConversationRelay, WebSocket messages, ``info``;
TwiML ``<ConversationRelay>`` ``events``): ``clientSpeaking on|off`` around what the caller
says, ``agentSpeaking on`` when the text-to-speech starts (about 300 ms after the first ``text``
on real calls), ``tokensPlayed`` with each clause once spoken (leading spaces kept; the welcome
greeting too), ``agentSpeaking off`` when everything queued has been spoken. A barge-in goes
``clientSpeaking on`` → ``tokensPlayed "<heard fragment>"`` → ``interrupt`` → ``prompt
last:false``… → ``agentSpeaking off``.

:class:`Speaker` plays that on a clock: each reply waits ``agent_speaking_delay_ms`` after its
first text, then its clauses play one after another at ``speaking_rate`` characters a second
(a clause plays once it is complete: Twilio synthesises per clause). :class:`Timing` holds the
knobs; ``time_scale`` multiplies every simulated delay (0: no waiting, the frames still in
Twilio's order). Work here is per clause and per reply, never per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay_server.protocol.replies import (
    CallerEvent,
    DigitsSent,
    Interrupted,
    Reply,
    ReplyDone,
    TokenHeard,
    complete_words,
    first_words,
)
from relay_server.protocol.twilio_side import TwilioSide

#: From the first ``text`` of a reply to ``agentSpeaking on``, as captured on real calls.
DEFAULT_AGENT_SPEAKING_DELAY_MS = 300.0
#: How fast the agent speaks, in characters a second: about 150 words a minute, a usual
#: text-to-speech pace (a word and its space are about 6 characters).
DEFAULT_SPEAKING_RATE = 15.0
#: From ``setup`` to the welcome greeting's ``agentSpeaking on``, as captured (~0.7 s).
DEFAULT_GREETING_DELAY_MS = 700.0
#: Real time.
DEFAULT_TIME_SCALE = 1.0
#: The ``events`` words that ask for the frames played here.
SPEAKER_EVENTS = frozenset({"speaker-events", "tokens-played"})

# A clause ends at . ! ? , ; or : followed by a space (the space starts the next clause).
_CLAUSE_END = re.compile(r"[.!?,;:]+(?=\s)")


@dataclass(frozen=True)
class Timing:
    """How the simulated call sounds: delays in ms, the speaking rate, and a scale for both."""

    agent_speaking_delay_ms: float = DEFAULT_AGENT_SPEAKING_DELAY_MS
    speaking_rate: float = DEFAULT_SPEAKING_RATE
    time_scale: float = DEFAULT_TIME_SCALE
    greeting_delay_ms: float = DEFAULT_GREETING_DELAY_MS

    def __post_init__(self) -> None:
        if self.agent_speaking_delay_ms < 0 or self.greeting_delay_ms < 0:
            raise ValueError("a delay cannot be negative")
        if self.speaking_rate <= 0:
            raise ValueError("the speaking rate must be above 0 characters a second")
        if self.time_scale < 0:
            raise ValueError("the time scale cannot be negative")

    def delay(self, ms: float) -> float:
        """Seconds to wait for a simulated delay of ``ms``."""
        return ms / 1000 * self.time_scale

    def speaking(self, chars: int) -> float:
        """Seconds it takes to speak ``chars`` characters."""
        return chars / self.speaking_rate * self.time_scale


def clause_end(text: str, start: int, *, complete: bool) -> int | None:
    """Where the clause of ``text`` starting at ``start`` ends, if it is complete yet.

    ``complete``: no more text will come, so the rest is a clause.
    """
    match = _CLAUSE_END.search(text, start)
    if match is not None:
        return match.end()
    if complete and text[start:].strip():
        return len(text)
    return None


@dataclass(eq=False)
class _Speech:
    """One reply (or the welcome greeting) as the caller hears it."""

    reply: Reply
    #: When the caller stopped talking (``clientSpeaking off``, or its last key).
    said_at: float | None = None
    barge_after: int | None = None
    #: Seconds after :attr:`first_at` when ``agentSpeaking on`` is due.
    delay: float | None = None
    first_at: float | None = None
    on_at: float | None = None
    #: Characters of the reply spoken and reported so far.
    cursor: int = 0
    #: The clause being spoken: (start, when it started).
    clause: tuple[int, float] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    over: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def audible(self) -> bool:
        """The agent has something to say (or says it) for this reply."""
        return self.reply.tokens > 0 and not self.over.is_set()


class Speaker:
    """Plays the agent's replies on a clock and sends Twilio's speaker ``info`` frames.

    ``pump`` writes what was queued on ``side``; ``emit`` reports a step (an
    :class:`~relay_server.protocol.replies.Interrupted`) as the Twilio side would.
    """

    def __init__(
        self,
        side: TwilioSide,
        events: frozenset[str],
        timing: Timing,
        pump: Callable[[], Awaitable[None]],
        emit: Callable[[CallerEvent], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.side, self.events, self.timing = side, events, timing
        self.pump, self.emit, self.clock = pump, emit, clock
        #: Each reply's caller wait in ms: from the caller's last word to ``agentSpeaking on``.
        self.waits: dict[Reply, float] = {}
        self.client_on = False
        self.agent_on = False
        self._queue: deque[_Speech] = deque()
        self._known: dict[Reply, _Speech] = {}
        self._runner: asyncio.Task[None] | None = None
        self._off_after_partial = False

    # --------------------------------------------------------------------- frames out
    def _info(self, name: str, value: str, needs: str) -> None:
        if needs in self.events:
            self.side.send_info(name, value)

    def client(self, state: str) -> None:
        """``clientSpeaking on|off``, when it changes."""
        if self.client_on != (state == "on"):
            self.client_on = state == "on"
            self._info("clientSpeaking", state, "speaker-events")

    def agent(self, state: str) -> None:
        """``agentSpeaking on|off``, when it changes."""
        if self.agent_on != (state == "on"):
            self.agent_on = state == "on"
            self._info("agentSpeaking", state, "speaker-events")

    def first_partial_sent(self) -> None:
        """After a barge-in, ``agentSpeaking off`` follows the first partial (as captured)."""
        if self._off_after_partial:
            self._off_after_partial = False
            self.agent("off")

    # ----------------------------------------------------------------- what is heard
    def greet(self, text: str) -> None:
        """The welcome greeting, spoken ``greeting_delay_ms`` after setup."""
        now = self.clock()
        reply = Reply(input="", sent_at=now, text=text, received=text, solicited=False)
        reply.tokens, reply.finished_at = 1, now
        delay = self.timing.delay(self.timing.greeting_delay_ms)
        speech = _Speech(reply, first_at=now, delay=delay)
        self._add(speech)

    def expect(self, reply: Reply, said_at: float, barge_after: int | None) -> None:
        """The reply to what the caller just said (at ``said_at``), to be spoken in turn."""
        self._add(_Speech(reply, said_at=said_at, barge_after=barge_after))

    def observe(self, event: CallerEvent) -> None:
        """A step of the Twilio side: text to speak, a reply complete, keys sent."""
        if isinstance(event, DigitsSent):
            self._info("tokensPlayed", event.digits, "tokens-played")
        if not isinstance(event, (TokenHeard, ReplyDone, Interrupted)):
            return
        speech = self._known.get(event.reply)
        if speech is None:
            if not isinstance(event, TokenHeard):
                return
            speech = _Speech(event.reply)  # the agent speaks on its own
            self._add(speech)
        if isinstance(event, TokenHeard) and speech.first_at is None:
            speech.first_at = self.clock()
        speech.changed.set()

    def wake(self) -> None:
        """Replies may have changed (superseded, closed): let the player look again."""
        for speech in list(self._queue):
            if speech.reply.done and speech.reply.tokens == 0:
                self._drop(speech)  # superseded before it said anything
            speech.changed.set()

    def speaking(self) -> _Speech | None:
        """What the agent is saying (or about to say) now, if anything."""
        return next((s for s in self._queue if s.audible), None)

    def covers(self, reply: Reply) -> bool:
        """Whether ``reply`` is still being (or to be) spoken."""
        speech = self._known.get(reply)
        return speech is not None and not speech.over.is_set()

    async def played(self, reply: Reply) -> None:
        """Return once ``reply`` has been spoken (or cut, or dropped)."""
        speech = self._known.get(reply)
        if speech is not None:
            await speech.over.wait()

    async def quiet(self) -> None:
        """Return once the agent says nothing (a reply still awaited is not speech)."""
        while (speech := self.speaking()) is not None:
            await speech.over.wait()

    def barge_in(self, speech: _Speech, *, keys: bool = False, defer_off: bool = False) -> None:
        """The caller talks (or presses a key) over ``speech``, in Twilio's order.

        ``clientSpeaking on`` → ``tokensPlayed`` (the fragment heard) → ``interrupt`` →
        ``agentSpeaking off`` (after the first partial with ``defer_off``).
        """
        # the player notices (its waits end on ``over``) and goes on with the next reply
        self._cut(speech, self._heard_upto(speech), keys=keys, defer_off=defer_off)
        self._drop(speech)

    def close(self) -> None:
        """The call is over: stop speaking."""
        while self._queue:  # the player's waits end on ``over``: it stops by itself
            self._drop(self._queue[0])

    # ------------------------------------------------------------------------ internals
    def _add(self, speech: _Speech) -> None:
        self._known[speech.reply] = speech
        self._queue.append(speech)
        self._play_next()

    def _drop(self, speech: _Speech) -> None:
        speech.over.set()
        speech.changed.set()
        with contextlib.suppress(ValueError):
            self._queue.remove(speech)

    def _play_next(self) -> None:
        if self._runner is None and self._queue:
            self._runner = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._queue:
                speech = self._queue[0]
                await self._play(speech)
                self._drop(speech)
        finally:
            if self._runner is asyncio.current_task():
                self._runner = None

    async def _changed(self, speech: _Speech) -> None:
        speech.changed.clear()
        await speech.changed.wait()

    async def _sleep(self, speech: _Speech, seconds: float) -> bool:
        """Wait ``seconds``; False when the speech was cut meanwhile (a barge-in)."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(speech.over.wait(), seconds)
        return not speech.over.is_set()

    async def _play(self, speech: _Speech) -> None:
        reply = speech.reply
        while reply.tokens == 0 and not reply.done and not speech.over.is_set():
            await self._changed(speech)
        if reply.tokens == 0 or reply.interrupted or speech.over.is_set():
            return  # nothing to say: superseded, or closed empty
        first = speech.first_at if speech.first_at is not None else self.clock()
        wait = first + (
            speech.delay
            if speech.delay is not None
            else self.timing.delay(self.timing.agent_speaking_delay_ms)
        )
        if not await self._sleep(speech, wait - self.clock()):
            return
        speech.on_at = self.clock()
        self.agent("on")
        if speech.said_at is not None and "speaker-events" in self.events:
            self.waits[reply] = (speech.on_at - speech.said_at) * 1000
        await self.pump()
        while True:
            text = reply.received
            complete = reply.done and not reply.interrupted and reply.error is None
            end = clause_end(text, speech.cursor, complete=complete)
            if end is None:
                if reply.done or speech.over.is_set():
                    break  # all spoken (or the call ended)
                await self._changed(speech)
                continue
            cut = self._barge_point(speech, text, complete)
            if cut is not None and cut <= end:
                if await self._sleep(speech, self.timing.speaking(cut - speech.cursor)):
                    self._cut(speech, cut, keys=False, defer_off=False)
                    await self.pump()
                return
            speech.clause = (speech.cursor, self.clock())
            if not await self._sleep(speech, self.timing.speaking(end - speech.cursor)):
                return
            self._info("tokensPlayed", text[speech.cursor : end], "tokens-played")
            speech.cursor, speech.clause = end, None
            await self.pump()
        self.agent("off")
        await self.pump()

    def _barge_point(self, speech: _Speech, text: str, complete: bool) -> int | None:
        """Where the script barges in (after ``barge_after`` words), once that is known."""
        n = speech.barge_after
        if n is None or (complete_words(text) < n and not complete):
            return None
        if len(re.findall(r"\S+", text)) < n:
            return None
        return len(first_words(text, n))

    def _heard_upto(self, speech: _Speech) -> int:
        """How much of the reply has been spoken by now (whole words of the current clause)."""
        if speech.clause is None:
            return speech.cursor
        start, began = speech.clause
        text = speech.reply.received
        if self.timing.time_scale == 0:
            spoken = len(text)
        else:
            rate = self.timing.speaking_rate / self.timing.time_scale
            spoken = int((self.clock() - began) * rate)
        upto = min(len(text), start + spoken)
        end = clause_end(text, start, complete=True) or len(text)
        if upto >= end:
            return end
        # the word being said when the caller cut in is not heard whole: stop before it
        space = text.rfind(" ", start + 1, upto + 1)
        return space if space > start else start

    def _cut(self, speech: _Speech, upto: int, *, keys: bool, defer_off: bool) -> None:
        reply = speech.reply
        now = self.clock()
        if not keys:
            self.client("on")
        fragment = reply.received[speech.cursor : upto]
        if fragment.strip():
            self._info("tokensPlayed", fragment, "tokens-played")
        heard = reply.received[:upto].rstrip()
        spoken = now - (speech.on_at if speech.on_at is not None else now)
        self.side.send_interrupt(heard, int(spoken * 1000))
        if defer_off and self.agent_on:
            self._off_after_partial = True
        else:
            self.agent("off")
        reply.interrupted, reply.text, reply.cut_at = True, heard, now
        reply.played = len(heard)
        reply.finish(now)
        speech.cursor = upto
        speech.over.set()
        self.emit(Interrupted(reply, heard))
