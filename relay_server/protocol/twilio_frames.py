"""The frames and bookkeeping every Twilio-side client shares.

The opt-in ``info`` events, speaker state, and the I/O seam (after python-websockets' sans-I/O
``Protocol``: commands queue frames for :meth:`~TwilioFrames.data_to_send`, steps for
:meth:`~TwilioFrames.events_received`).

:class:`~relay_server.protocol.twilio_side.TwilioSide` adds the caller's behaviour on top.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from relay_server.protocol.codec import encode_inbound
from relay_server.protocol.messages import (
    Dtmf,
    End,
    Inbound,
    Info,
    Outbound,
    Prompt,
    SentInterrupt,
    Setup,
)
from relay_server.protocol.replies import CallerEvent, Reply

CLOSE_REASON = "Closing websocket session"
MALFORMED_REASON = "Too many consecutive malformed messages."
#: Twilio closes the socket after this many invalid frames in a row (Twilio docs: error 64105).
MAX_MALFORMED = 10
#: After a barge-in, frames of the cut cycle still in flight are absorbed this long at most.
STALE_WINDOW = 1.0


@dataclass(frozen=True)
class CallerModes:
    """What the TwiML lets the caller do, and which ``info`` events it asked for.

    The ``<ConversationRelay>`` attributes, as sets of the input kinds ``speech`` / ``dtmf``.
    """

    interruptible: frozenset[str] = frozenset({"speech", "dtmf"})
    report_input: frozenset[str] = frozenset()
    events: frozenset[str] = frozenset()
    dtmf_detection: bool = False
    lang: str = "en-US"
    #: The ``reportInputDuringAgentSpeech`` value as written, for the reason of a drop.
    report_input_text: str = "none"


class TwilioFrames:
    """Twilio's end of one socket: the frames it sends and what it has seen so far."""

    def __init__(
        self, modes: CallerModes | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.modes = modes or CallerModes()
        self.clock = clock
        self.lang = self.modes.lang
        self.replies: list[Reply] = []
        #: The ``end`` the app sent, once it did.
        self.end: End | None = None
        #: ``(code, reason)`` once Twilio would close the socket.
        self.close_to_send: tuple[int, str] | None = None
        #: Invalid frames in a row.
        self.malformed = 0
        self._pending: deque[Reply] = deque()
        self._out: list[str] = []
        self._events: list[CallerEvent] = []
        self._received: list[Outbound] = []
        self._client_speaking = False
        self._agent_speaking = False

    # ---------------------------------------------------------------------- the I/O seam
    def data_to_send(self) -> list[str]:
        """The frames to write to the socket, in order (and forget them)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list[CallerEvent]:
        """The steps observed since the last call (and forget them)."""
        events, self._events = self._events, []
        return events

    def messages_received(self) -> list[Outbound]:
        """The valid app frames received since the last call, decoded (and forget them)."""
        messages, self._received = self._received, []
        return messages

    # ----------------------------------------------------------------------- frames out
    def send(self, message: Inbound) -> None:
        """Queue one frame exactly as given (a test's raw step)."""
        self._out.append(encode_inbound(message))

    def send_setup(self, setup: Setup) -> None:
        """The first frame of the session (Twilio docs: WebSocket messages, setup)."""
        self.send(setup)

    def send_prompt(self, text: str, *, last: bool = True, lang: str | None = None) -> None:
        """Caller speech; ``last=False`` frames are cumulative partials."""
        self.send(Prompt(voice_prompt=text, lang=self.lang if lang is None else lang, last=last))

    def send_interrupt(self, heard: str, duration_ms: int | str) -> None:
        """An ``interrupt`` frame as given; ``duration_ms`` may be the early docs' string form.

        The caller-level barge-in is :meth:`barge_in`.
        """
        self.send(
            SentInterrupt(utterance_until_interrupt=heard, duration_until_interrupt_ms=duration_ms)
        )

    def send_info(self, name: str, value: str) -> None:
        """An ``info`` frame, whatever the TwiML asked for."""
        self.send(Info(name=name, value=value))

    def send_dtmf(self, digit: str) -> None:
        """One key press."""
        self.send(Dtmf(digit=digit))

    # ---------------------------------------------------------------------- bookkeeping
    def _emit(self, event: CallerEvent) -> None:
        self._events.append(event)

    def _info(self, name: str, value: str, needs: str) -> None:
        if needs in self.modes.events:
            self.send_info(name, value)

    def _client(self, state: str) -> None:
        if self._client_speaking != (state == "on"):
            self._client_speaking = state == "on"
            self._info("clientSpeaking", state, "speaker-events")

    def _agent(self, state: str) -> None:
        if self._agent_speaking != (state == "on"):
            self._agent_speaking = state == "on"
            self._info("agentSpeaking", state, "speaker-events")
