"""The Twilio end of a ConversationRelay socket, without I/O.

After python-websockets' sans-I/O ``Protocol``: ``receive_data`` / ``events_received`` in,
``send_*`` / ``data_to_send`` out.

It keeps what Twilio keeps (Twilio docs: ConversationRelay, WebSocket messages): which talk cycle
is being spoken (``last: true`` ends it; a cycle of ``preemptible`` text only, a filler, does not
end the answer), what the caller heard when it barges in (the ``interrupt`` frame's
``utteranceUntilInterrupt``), Twilio's barge-in order (``clientSpeaking on`` → ``tokensPlayed`` →
``interrupt`` → ``agentSpeaking off``), the opt-in ``info`` events, and the check of every app
frame (a bad one answered with ``error`` 64107, ten in a row close the socket with 1007).
The simulated caller, the tests' client and the load generator drive it over their own sockets.
"""

from __future__ import annotations

from typing import Union

from relay_server.protocol.codec import decode_received, invalid_message
from relay_server.protocol.errors import ProtocolError
from relay_server.protocol.messages import End, Language, Outbound, Play, SendDigits, Text
from relay_server.protocol.replies import (
    DigitsSent,
    Dropped,
    Ended,
    Greeting,
    Interrupted,
    Invalid,
    LanguageSwitched,
    Played,
    Reply,
    ReplyDone,
    TokenHeard,
    complete_words,
    first_words,
)
from relay_server.protocol.twilio_frames import (
    CLOSE_REASON,
    MALFORMED_REASON,
    MAX_MALFORMED,
    STALE_WINDOW,
    CallerModes,
    TwilioFrames,
)

__all__ = [
    "CLOSE_REASON",
    "MALFORMED_REASON",
    "MAX_MALFORMED",
    "STALE_WINDOW",
    "CallerModes",
    "TwilioSide",
]


class TwilioSide(TwilioFrames):
    """One ConversationRelay session seen from Twilio's end.

    Every ``send_*``, caller action and :meth:`receive_data` queues frames for
    :meth:`data_to_send` and steps for :meth:`events_received`; :attr:`close_to_send` says when
    Twilio would close the socket.
    """

    def receive_data(self, frame: Union[str, bytes]) -> None:
        """One frame from the app: check it as Twilio does, then act on it."""
        try:
            message = decode_received(frame)
        except ProtocolError as exc:
            self._invalid(frame, str(exc))
            return
        self.malformed = 0
        self._received.append(message)
        self._handle(message)

    # ------------------------------------------------------------------- the caller acts
    def greet(self, greeting: str) -> None:
        """The welcome greeting plays (reported through the opt-in speaker events)."""
        self._info("agentSpeaking", "on", "speaker-events")
        self._info("tokensPlayed", greeting, "tokens-played")
        self._info("agentSpeaking", "off", "speaker-events")
        self._emit(Greeting(greeting))

    def speaking(self) -> Reply | None:
        """The reply the agent is speaking now, if any."""
        return next((r for r in self._pending if r.speaking), None)

    def begin_speech(self, *, partials: bool) -> bool | None:
        """The caller starts to talk: barge in if the agent speaks and the TwiML allows it.

        Returns whether it barged in (then :meth:`partial` sends ``agentSpeaking off`` after
        the first partial), or ``None`` when Twilio would not report the speech.
        """
        head = self.speaking()
        barged = False
        if head is not None:
            if "speech" in self.modes.interruptible:
                barged = partials  # with partials, agentSpeaking off follows the first one
                self.barge_in(head, head.received.rstrip(), speech=True, defer_agent_off=barged)
            elif "speech" not in self.modes.report_input:
                self._drop("does not report the caller's speech")
                return None
        self.supersede_silent()
        self._client("on")
        return barged

    def partial(self, text: str, *, first_after_barge_in: bool = False) -> None:
        """One cumulative partial transcript."""
        self.send_prompt(text, last=False)
        if first_after_barge_in:
            self._agent("off")  # observed after the first partial

    def end_speech(self, text: str, barge_after: int | None = None) -> Reply:
        """The final transcript: returns the reply to wait on."""
        self._client("off")
        reply = self._expect(text, barge_after)
        self.send_prompt(text, last=True)
        return reply

    def begin_keys(self) -> bool:
        """The caller starts to press keys; False when Twilio would not send them."""
        if not self.modes.dtmf_detection:
            self._drop_text(
                'the TwiML has no dtmfDetection="true": Twilio does not send key presses'
            )
            return False
        self._client("off")
        return True

    def press(self, digit: str, barge_after: int | None = None) -> Reply | None:
        """One key: barge in first if the TwiML lets keys interrupt.

        Returns the reply to the key, or ``None`` when Twilio would not report it.
        """
        head = self.speaking()
        if head is not None:
            if "dtmf" in self.modes.interruptible:
                self.barge_in(head, head.received.rstrip(), speech=False)
            elif "dtmf" not in self.modes.report_input:
                # as for speech: keys over the agent are not reported under "none"
                self._drop(f"does not report key {digit}")
                return None
        self.supersede_silent()
        reply = self._expect(f"dtmf {digit}", barge_after)
        self.send_dtmf(digit)
        return reply

    def interrupt(self) -> bool:
        """Barge in on the reply being spoken.

        False when nothing is being said or the TwiML does not let speech interrupt.
        """
        head = self.speaking()
        if head is None or "speech" not in self.modes.interruptible:
            return False
        self.barge_in(head, head.received.rstrip(), speech=True)
        return True

    def hang_up(self) -> None:
        """The caller hangs up: Twilio closes with 1000 (Twilio docs: WebSocket messages)."""
        self._client("off")
        self.close_to_send = (1000, CLOSE_REASON)

    def barge_in(
        self, reply: Reply, heard: str, *, speech: bool, defer_agent_off: bool = False
    ) -> None:
        """Twilio's barge-in order, and the end of the talk cycle.

        The order: clientSpeaking on, tokensPlayed, interrupt, then (unless deferred past the
        first partial) agentSpeaking off. Twilio flushes the rest of the cycle: ``heard`` is
        all it spoke.
        """
        now = self.clock()
        if speech:
            self._client("on")
        unplayed = heard[reply.played :]
        if unplayed.strip():
            self._info("tokensPlayed", unplayed, "tokens-played")
        reply.played = len(heard)
        first = reply.first_token_at or now
        self.send_interrupt(heard, int((now - first) * 1000))
        if not defer_agent_off:
            self._agent("off")
        reply.interrupted, reply.text, reply.cut_at = True, heard, now
        reply.finish(now)
        self._emit(Interrupted(reply, heard))

    def supersede_silent(self) -> None:
        """Replies still waiting for their first token are replaced by the new input.

        The relay cancels that turn before it said anything.
        """
        now = self.clock()
        for reply in [r for r in self._pending if r.tokens == 0 and not r.done]:
            reply.superseded = True
            reply.finish(now, "superseded by the caller's next input")
            self._pending.remove(reply)

    def connection_closed(self) -> None:
        """The socket is gone: every reply still open ends with an error."""
        now = self.clock()
        for reply in self._pending:
            reply.finish(now, "the call ended before the reply finished")
        self._pending.clear()

    # ------------------------------------------------------------------------ internals
    def _invalid(self, frame: Union[str, bytes], reason: str) -> None:
        self.malformed += 1
        shown = frame if isinstance(frame, str) else f"<{len(frame)} bytes of binary data>"
        self._emit(Invalid(reason, shown))
        self.send(invalid_message(frame))
        if self.malformed >= MAX_MALFORMED and self.close_to_send is None:
            self.close_to_send = (1007, MALFORMED_REASON)

    def _handle(self, message: Outbound) -> None:
        if isinstance(message, Text):
            self._on_text(message)
        elif isinstance(message, Play):
            reply = self._target()
            reply.plays.append(message.source)
            self._emit(Played(reply, message.source))
        elif isinstance(message, SendDigits):
            reply = self._target()
            reply.digits.append(message.digits)
            self._info("tokensPlayed", message.digits, "tokens-played")
            self._emit(DigitsSent(reply, message.digits))
        elif isinstance(message, Language):
            reply = self._target()
            switch = {}
            if message.tts_language is not None:
                switch["ttsLanguage"] = message.tts_language
            if message.transcription_language is not None:
                switch["transcriptionLanguage"] = message.transcription_language
            reply.languages.append(switch)
            self.lang = switch.get("transcriptionLanguage", self.lang)
            self._emit(
                LanguageSwitched(reply, message.tts_language, message.transcription_language)
            )
        elif isinstance(message, End):
            self.end = message
            self._emit(Ended(message.handoff_data))
            # Twilio drains queued speech, then closes (nothing plays on in a simulation).
            self.close_to_send = (1000, CLOSE_REASON)

    def _target(self) -> Reply:
        """The reply the next app frame belongs to (a new unsolicited one if none)."""
        now = self.clock()
        while self._pending:
            head = self._pending[0]
            if head.interrupted and now - (head.cut_at or now) > STALE_WINDOW:
                self._pending.popleft()  # the agent never closed its cut cycle
                continue
            return head
        reply = Reply(input="", sent_at=now, solicited=False)
        self._pending.append(reply)
        self.replies.append(reply)
        return reply

    def _on_text(self, message: Text) -> None:
        reply = self._target()
        token, last = message.token, message.last
        if reply.interrupted:  # Twilio flushed this cycle: late frames are never spoken
            reply.late_tokens += 1 if token else 0
            if last:
                self._pending.popleft()
            return
        if not message.preemptible:
            reply.plain_cycle = True
        if token:
            now = self.clock()
            if reply.first_token_at is None:
                reply.first_token_at = now
            _grow(reply, token)
            reply.tokens += 1
            self._agent("on")
            self._emit(TokenHeard(reply, token))
            if _ends_sentence(reply.text, reply.played):
                self._info("tokensPlayed", reply.text[reply.played :], "tokens-played")
                reply.played = len(reply.text)
            if reply.barge_after and complete_words(reply.text) >= reply.barge_after:
                self.barge_in(reply, first_words(reply.text, reply.barge_after), speech=True)
                return
        if not last:
            return
        if not reply.plain_cycle and reply.tokens:
            return  # only a preemptible filler so far: the answer is still to come
        reply.plain_cycle = False
        if reply.text[reply.played :].strip():
            self._info("tokensPlayed", reply.text[reply.played :], "tokens-played")
            reply.played = len(reply.text)
        self._agent("off")
        self._pending.popleft()
        reply.finish(self.clock())
        self._emit(ReplyDone(reply))

    def _expect(self, text: str, barge_after: int | None) -> Reply:
        reply = Reply(input=text, sent_at=self.clock(), barge_after=barge_after)
        self._pending.append(reply)
        self.replies.append(reply)
        return reply

    def _drop(self, what: str) -> None:
        self._drop_text(
            "the agent is speaking, and with reportInputDuringAgentSpeech="
            f"{self.modes.report_input_text!r} Twilio {what}"
        )

    def _drop_text(self, reason: str) -> None:
        self._emit(Dropped(reason))


def _grow(reply: Reply, token: str) -> None:
    """Append ``token`` to what the reply said, in amortised O(1).

    CPython grows a string in place only when nothing else holds it, so the attribute lets go
    of it first (a 6,000-token reply of 3 MB would otherwise be copied once per token).
    """
    text, reply.text = reply.text, ""
    text += token
    reply.text = text
    received, reply.received = reply.received, ""
    received += token
    reply.received = received


def _ends_sentence(text: str, start: int) -> bool:
    """Whether ``text[start:]`` ends a sentence (``.``, ``!`` or ``?`` then only spaces).

    Twilio reports ``tokensPlayed`` per synthesized sentence. Reads back from the end, never
    copies.
    """
    end = len(text)
    while end > start and text[end - 1].isspace():
        end -= 1
    return end > start and text[end - 1] in ".!?"
