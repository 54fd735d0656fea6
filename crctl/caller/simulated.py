"""A simulated Twilio caller that speaks ConversationRelay as Twilio does (``crctl call``).

What it mirrors (Twilio's ConversationRelay docs, and frames seen on real calls):

- The voice webhook first: ``POST /twiml`` with Twilio's voice parameters, signed with
  ``X-Twilio-Signature`` over the URL Twilio would request (the public URL behind a tunnel).
- The socket named by ``<Connect><ConversationRelay url=…>``: a local relay whose TwiML
  names its public ``wss://`` URL is reached at the local address, and the handshake is signed
  over the public URL, as Twilio does through a tunnel. Handshake headers as captured
  (``user-agent: Jetty/11.0.24``, ``x-twilio-signature`` and its duplicate, ``accept-encoding:
  gzip``), no subprotocol, no permessage-deflate, no pings.
- Partial prompts every ~250 ms, one ``dtmf`` frame per key a little apart: the pacing is here;
  what goes on the wire and when Twilio would drop or interrupt is the I/O-free
  :class:`~relay_server.protocol.twilio_side.TwilioSide` this loop drives.
- Speaker timing (:mod:`~crctl.caller.speaker`), with a :class:`~crctl.caller.speaker.Timing`:
  ``clientSpeaking``/``agentSpeaking``/``tokensPlayed`` played on a clock as Twilio sends them
  when the TwiML's ``events`` asks, the welcome greeting included, and each turn's caller wait.
  Without one (``timing=None``) those frames go at once, as the Twilio side queues them.
- The end: hang-up closes with 1000 "Closing websocket session"; after ``end`` the
  socket closes the same way; then the ``<Connect action>`` callback is posted (signed) with
  ``SessionStatus`` completed / ended (+ ``HandoffData``) / failed (64105).
- Faults (``crctl call --script`` fault steps): :meth:`~SimulatedCaller.drop_socket` drops the
  socket as a network does (no close frame), posts the action callback with failed/64105 a
  moment later as Twilio does, and follows a ``<Connect><ConversationRelay>`` answer to a new
  session of the same call (Twilio docs: ``<Connect>`` action URL; the only way a dropped
  session comes back); :meth:`~SimulatedCaller.send_raw` puts a frame on the wire as given.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from crctl.caller.outcome import CallError, CallEvent, Closed, Outcome, Reconnected
from crctl.caller.socket import open_socket
from crctl.caller.speaker import SPEAKER_EVENTS, Speaker, Timing
from crctl.caller.twiml import CallPlan, parse_twiml, summarize_twiml
from crctl.caller.webhook import (
    API_VERSION,
    new_sid,
    post_action,
    send_webhook,
    signed_headers,
    why_403,
)
from relay_server.protocol import End, SentSetup
from relay_server.protocol.replies import Dropped, Reply, complete_words
from relay_server.protocol.twilio_side import CallerModes, TwilioSide

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_FROM = "+15550100001"
DEFAULT_TO = "+15550100002"
_KEYS = frozenset("0123456789*#")
#: From an abrupt drop to the ``<Connect action>`` callback (failed/64105), as seen on real calls
#: (about 1.2 s); scaled by the timing's ``time_scale``, never below :data:`_MIN_ACTION_DELAY`.
ACTION_DELAY_MS = 1200.0
#: Seconds the relay is given to see a drop before the callback, whatever the time scale.
_MIN_ACTION_DELAY = 0.1

EventHandler = Callable[[CallEvent], None]


class SimulatedCaller:
    """One simulated phone call.

    :meth:`fetch` the TwiML, :meth:`connect` the socket, then :meth:`say`, :meth:`dtmf`,
    :meth:`interrupt` and :meth:`hangup`. A background task feeds the relay's frames to the
    Twilio side and reports each step to ``on_event(event)``: a typed
    :data:`~crctl.caller.outcome.CallEvent` (the Twilio side's steps, then ``Closed``).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        auth_token: str | None = None,
        public_url: str | None = None,
        from_: str = DEFAULT_FROM,
        to: str = DEFAULT_TO,
        partials: bool = False,
        timeout: float = 15.0,
        on_event: EventHandler | None = None,
        partial_gap: float = 0.25,
        key_gap: float = 0.15,
        timing: Timing | None = None,
    ) -> None:
        self.url = url
        self.auth_token = auth_token
        self.public_url = public_url.rstrip("/") if public_url else None
        self.from_, self.to = from_, to
        self.partials = partials
        self.timeout = timeout
        self.on_event = on_event
        self.timing = timing
        scale = timing.time_scale if timing is not None else 1.0
        self.partial_gap, self.key_gap = partial_gap * scale, key_gap * scale
        #: Plays the agent's speech on a clock (with ``timing``; None: frames at once).
        self.speaker: Speaker | None = None
        self.call_sid, self.account_sid = new_sid("CA"), new_sid("AC")
        self.session_id = new_sid("VX")
        self.plan: CallPlan | None = None
        self.side = TwilioSide()
        #: Why the last :meth:`say` / :meth:`dtmf` sent nothing (Twilio would not have).
        self.last_drop: str | None = None
        self.outcome: Outcome | None = None
        self.closed = asyncio.Event()
        self._changed = asyncio.Condition()
        self._writing = asyncio.Lock()
        self._ws: ClientConnection | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._started = 0.0
        self._hanging_up = False
        #: Seconds to wait before the action callback (set by :meth:`drop_socket`).
        self._action_delay = 0.0
        #: The outcomes of earlier sessions of this call (dropped, then reconnected).
        self.earlier: list[Outcome] = []

    @property
    def replies(self) -> list[Reply]:
        """Every reply of the call so far, solicited or not."""
        return self.side.replies

    @property
    def end_frame(self) -> End | None:
        """The ``end`` the agent sent, once it did."""
        return self.side.end

    # --------------------------------------------------------------------------- placing
    def voice_params(self, call_status: str) -> dict[str, str]:
        """The standard parameters of Twilio's voice webhooks for this call."""
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.call_sid,
            "CallStatus": call_status,
            "Called": self.to,
            "Caller": self.from_,
            "Direction": "inbound",
            "From": self.from_,
            "To": self.to,
        }

    async def fetch(self) -> CallPlan:
        """The call rings: ``POST /twiml`` as Twilio does, signed, and read the TwiML."""
        base = self.url.rstrip("/")
        if "://" not in base:  # "127.0.0.1:8080"
            base = "http://" + base
        fetched = base if base.endswith("/twiml") else base + "/twiml"
        # Twilio requests the public URL; a tunnel forwards it here.
        signed = self.public_url + "/twiml" if self.public_url else fetched
        params = self.voice_params("ringing")
        headers = signed_headers(self.auth_token, signed, params)
        status, body = await send_webhook(fetched, params, headers, "POST", self.timeout)
        if status == 403:
            raise CallError(f"the relay refused POST {fetched} (HTTP 403): {self._why_403(signed)}")
        if status != 200:
            raise CallError(f"POST {fetched} answered HTTP {status}: {body.strip()[:120]}")
        return parse_twiml(body, fetched=fetched, signed=signed)

    def _why_403(self, signed: str) -> str:
        return why_403(signed, self.auth_token, self.public_url)

    async def connect(self, plan: CallPlan, *, resumed: bool = False) -> None:
        """Open the ConversationRelay socket, send ``setup`` and play the welcome greeting.

        ``resumed``: a new session of this call (after a drop): a new ``sessionId``, the call
        ``IN_PROGRESS``, and the replies so far kept.
        """
        self.plan = plan
        modes = plan.modes()
        replies, waits = self.side.replies, self.speaker.waits if self.speaker else {}
        if self.timing is not None:
            # the speaker sends the speaker frames on its clock: the Twilio side sends none
            side_modes = CallerModes(**{**vars(modes), "events": modes.events - SPEAKER_EVENTS})
            self.side = TwilioSide(side_modes)
            self.speaker = Speaker(
                self.side, modes.events, self.timing, self._speaker_pump, self._emit_step
            )
        else:
            self.side = TwilioSide(modes)
        if resumed:
            self.side.replies = replies
            if self.speaker is not None:
                self.speaker.waits = waits
        self._ws = await open_socket(plan, self.auth_token, self.timeout, self._why_403)
        self._started = time.monotonic()
        self.side.send_setup(
            SentSetup.inbound(
                self.call_sid,
                from_=self.from_,
                to=self.to,
                account_sid=self.account_sid,
                session_id=self.session_id,
                custom_parameters=plan.parameters,
                call_status="IN_PROGRESS" if resumed else "RINGING",
            )
        )
        await self._pump()
        self._receiver = asyncio.create_task(self._receive())
        if resumed:
            self._emit(Reconnected(self.session_id, plan.ws_url, plan.welcome_greeting))
        if plan.welcome_greeting:
            self.side.greet(plan.welcome_greeting)
            if self.speaker is not None:
                self.speaker.greet(plan.welcome_greeting)
            await self._pump()

    # ------------------------------------------------------------------------- the caller
    async def say(
        self,
        text: str,
        *,
        interrupt_after_words: int | None = None,
        partials: bool | None = None,
    ) -> Reply | None:
        """Speak ``text`` (partials first when enabled); returns the reply to wait on.

        ``partials=True`` sends them for this utterance whatever the call's setting.
        ``None`` when Twilio would not report the speech (see the ``dropped`` event).
        """
        plan = self._live()
        partials = bool(partials) or self.partials or plan.partial_prompts
        if self.speaker is not None:
            return await self._say_timed(plan, text, partials, interrupt_after_words)
        barged = self.side.begin_speech(partials=partials)
        await self._pump()
        if barged is None:
            return None
        if partials:
            words = text.split()
            for i in range(1, len(words) + 1):
                self.side.partial(" ".join(words[:i]), first_after_barge_in=barged and i == 1)
                await self._pump()
                await asyncio.sleep(self.partial_gap)
            text = " ".join(words)
        reply = self.side.end_speech(text, interrupt_after_words)
        await self._pump()
        return reply

    async def _say_timed(
        self, plan: CallPlan, text: str, partials: bool, barge_after: int | None
    ) -> Reply | None:
        """:meth:`say` with speaker timing: Twilio's barge-in order, the caller's wait."""
        speaker = self.speaker
        assert speaker is not None
        speech = speaker.speaking()
        if speech is not None:
            if "speech" in plan.interruptible:
                speaker.barge_in(speech, defer_off=partials)
            elif "speech" not in plan.report_input:
                self._emit(Dropped(self._not_reported("the caller's speech")))
                return None
        self.side.supersede_silent()
        speaker.wake()
        speaker.client("on")
        await self._pump()
        if partials:
            words = text.split()
            for i in range(1, len(words) + 1):
                self.side.partial(" ".join(words[:i]))
                if i == 1:
                    speaker.first_partial_sent()
                await self._pump()
                await asyncio.sleep(self.partial_gap)
            text = " ".join(words)
        speaker.first_partial_sent()  # none sent: agentSpeaking off may not wait for one
        speaker.client("off")
        reply = self.side.end_speech(text, None)
        speaker.expect(reply, time.monotonic(), barge_after)
        await self._pump()
        return reply

    def _not_reported(self, what: str) -> str:
        plan = self.plan
        said = plan.attributes.get("reportInputDuringAgentSpeech", "none") if plan else "none"
        return (
            f"the agent is speaking, and with reportInputDuringAgentSpeech={said!r} Twilio "
            f"does not report {what}"
        )

    async def dtmf(self, digits: str, *, interrupt_after_words: int | None = None) -> Reply | None:
        """Press ``digits`` one key at a time; returns the reply to the last key.

        ``None`` when the TwiML has no ``dtmfDetection="true"`` (Twilio would not send them).
        """
        self._live()
        bad = set(digits) - _KEYS
        if bad or not digits:
            raise ValueError(f"DTMF keys are 0-9, * and #, got {digits!r}")
        began = self.side.begin_keys()
        await self._pump()
        if not began:
            return None
        reply: Reply | None = None
        speaker = self.speaker
        for i, digit in enumerate(digits):
            if i:
                await asyncio.sleep(self.key_gap)
            last = i == len(digits) - 1
            barge = interrupt_after_words if last else None
            if speaker is not None:
                speech = speaker.speaking()
                if speech is not None and "dtmf" in self._live().interruptible:
                    speaker.barge_in(speech, keys=True)
                elif speech is not None and "dtmf" not in self._live().report_input:
                    self._emit(Dropped(self._not_reported(f"key {digit}")))
                    return reply
            pressed = self.side.press(digit, None if speaker is not None else barge)
            if speaker is not None and pressed is not None:
                speaker.wake()
                speaker.expect(pressed, time.monotonic(), barge)
            await self._pump()
            if pressed is None:
                return reply
            reply = pressed
        return reply

    async def interrupt(self) -> bool:
        """Barge in on the reply being spoken.

        False when nothing is being said or the TwiML does not let speech interrupt.
        """
        plan = self._live()
        if self.speaker is not None:
            speech = self.speaker.speaking()
            if speech is None or "speech" not in plan.interruptible:
                return False
            self.speaker.barge_in(speech)
            await self._pump()
            return True
        barged = self.side.interrupt()
        await self._pump()
        return barged

    # ``timeout`` in finished and wait_closed is the caller's API (scripts, tests, bench): "is it
    # over within t?" is an answer (False), not an error, and None waits for ever.
    async def finished(self, reply: Reply, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until ``reply`` is over (at most ``timeout`` s); False if it is not by then.

        With speaker timing, over means spoken to its end (``agentSpeaking off``) or cut.
        """
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: reply.done)
                if self.speaker is not None:
                    await self.speaker.played(reply)
        except TimeoutError:
            return False
        return True

    async def quiet(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the agent has nothing left to say (at most ``timeout`` s).

        A scripted caller waits for this before it speaks: talking over the agent is a
        barge-in, which only the script asks for. Without speaker timing: at once.
        """
        if self.speaker is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self.speaker.quiet()
        except TimeoutError:
            return False
        return True

    def caller_wait_ms(self, reply: Reply) -> float | None:
        """The caller's wait for ``reply`` in ms, on the caller's own clock.

        From its last word (``clientSpeaking off``, or its last key) to ``agentSpeaking on``;
        None without speaker timing or before the agent spoke.
        """
        return self.speaker.waits.get(reply) if self.speaker is not None else None

    async def started(self, reply: Reply, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until ``reply`` has its first text; False if it ended without (or time ran out)."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: reply.tokens > 0 or reply.done)
        except TimeoutError:
            return False
        return reply.tokens > 0

    async def words(self, reply: Reply, count: int, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until ``count`` whole words of ``reply`` have arrived; False if it ended first.

        Also False when ``timeout`` s pass first.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(
                    lambda: complete_words(reply.received) >= count or reply.done
                )
        except TimeoutError:
            return False
        return complete_words(reply.received) >= count

    async def send_raw(self, frame: str) -> None:
        """Put ``frame`` on the socket exactly as given (a fault: a frame Twilio never sends)."""
        self._live()
        assert self._ws is not None
        async with self._writing:
            await self._ws.send(frame)

    async def drop_socket(self) -> Outcome:
        """The network drops the socket: no close frame, the relay sees it cut (1006).

        Then, as Twilio does, the action callback reports failed/64105 a moment later; when it
        answers with a new ``<Connect><ConversationRelay>`` the call goes on in a new session
        (see :attr:`closed`, :attr:`outcome`). Returns the dropped session's outcome.
        """
        self._live()
        assert self._ws is not None
        scale = self.timing.time_scale if self.timing is not None else 1.0
        self._action_delay = max(ACTION_DELAY_MS / 1000 * scale, _MIN_ACTION_DELAY)
        if self.speaker is not None:
            self.speaker.close()
        self._ws.transport.abort()
        dropped = await self.wait_closed(self.timeout + self._action_delay)
        self._action_delay = 0.0
        self.earlier.append(dropped)
        plan = self.plan
        if dropped.action_twiml is None or plan is None or plan.action_connect_url is None:
            return dropped
        try:
            again = parse_twiml(
                dropped.action_twiml, fetched=plan.action_connect_url, signed=plan.action_url or ""
            )
        except CallError:
            return dropped  # hangs up, dials…: the call does not come back
        dropped.action = summarize_twiml(dropped.action_twiml, followed=True)
        self.session_id = new_sid("VX")
        self.closed, self.outcome, self._hanging_up = asyncio.Event(), None, False
        try:
            await self.connect(again, resumed=True)
        except CallError:  # the new socket would not open: the call stays over
            self.outcome = dropped
            self.closed.set()
            raise
        return dropped

    async def hangup(self) -> Outcome:
        """Hang up (close 1000 "Closing websocket session") and post the action callback."""
        if self.speaker is not None:
            self.speaker.close()
        if self._ws is not None and not self.closed.is_set():
            self._hanging_up = True
            self.side.hang_up()
            with contextlib.suppress(ConnectionClosed):
                await self._pump()
        return await self.wait_closed()

    async def wait_closed(self, timeout: float | None = None) -> Outcome:  # noqa: ASYNC109
        """The outcome once the session is over (after ``end``, a hang-up or a drop)."""
        if self._receiver is not None:
            await asyncio.wait_for(asyncio.shield(self._receiver), timeout)
        assert self.outcome is not None
        return self.outcome

    # ------------------------------------------------------------------------- internals
    def _live(self) -> CallPlan:
        if self.plan is None or self._ws is None:
            raise CallError("the call is not connected")
        if self.closed.is_set() or self.side.end is not None:
            raise CallError("the call is over")
        return self.plan

    def _emit_step(self, event: CallEvent) -> None:
        """A step the speaker took (a barge-in it played)."""
        self._emit(event)

    def _emit(self, event: CallEvent) -> None:
        if self.speaker is not None and not isinstance(event, (Closed, Reconnected)):
            self.speaker.observe(event)
        if isinstance(event, Dropped):
            self.last_drop = event.reason
        if self.on_event is not None:
            self.on_event(event)

    async def _pump(self) -> None:
        """Write what the Twilio side queued, report its steps, close when it says so."""
        assert self._ws is not None
        # The receiver task and the caller's steps both pump: one at a time, so the frames
        # leave in the order the Twilio side queued them.
        async with self._writing:
            for frame in self.side.data_to_send():
                await self._ws.send(frame)
            for event in self.side.events_received():
                self._emit(event)
            for frame in self.side.data_to_send():  # queued by a step (tokensPlayed of digits)
                await self._ws.send(frame)
        async with self._changed:
            self._changed.notify_all()
        if self.side.close_to_send is not None:
            code, reason = self.side.close_to_send
            await self._ws.close(code, reason)

    async def _speaker_pump(self) -> None:
        """:meth:`_pump` for the speaker's clock: it stops quietly on a closed socket.

        A hang-up under a reply being played leaves its frames nowhere to go.
        """
        with contextlib.suppress(ConnectionClosed):
            await self._pump()

    async def _receive(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                self.side.receive_data(raw)
                await self._pump()
        except ConnectionClosed:
            pass
        finally:
            await self._finish()

    async def _finish(self) -> None:
        """The socket is closed: work out the session status, post ``<Connect action>``."""
        ws = self._ws
        assert ws is not None
        end = self.side.end
        ours = self.side.close_to_send is not None
        close = ws.protocol.close_sent if ours else ws.protocol.close_rcvd
        outcome = Outcome(
            "failed",
            close_code=close.code if close else 1006,
            close_reason=close.reason if close else "",
        )
        outcome.duration = time.monotonic() - self._started
        if end is not None:
            outcome.status = "ended"
            outcome.handoff_data = end.handoff_data
        elif self._hanging_up:
            outcome.status = "completed"
        else:
            outcome.error_code, outcome.error_message = "64105", "Websocket ended"
        self.side.connection_closed()
        if self.speaker is not None:
            self.speaker.close()
        async with self._changed:
            self._changed.notify_all()
        try:
            if self._action_delay:
                await asyncio.sleep(self._action_delay)
            await self._post_action(outcome)
        finally:
            self.outcome = outcome
            self.closed.set()
            self._emit(Closed(outcome))

    async def _post_action(self, outcome: Outcome) -> None:
        plan = self.plan
        if plan is None or not plan.action_url or not plan.action_connect_url:
            return
        params = self.voice_params("completed" if outcome.status == "completed" else "in-progress")
        params.update(
            SessionId=self.session_id,
            SessionStatus=outcome.status,
            SessionDuration=str(round(outcome.duration)),
        )
        if outcome.handoff_data is not None:
            params["HandoffData"] = outcome.handoff_data
        if outcome.error_code:
            params.update(ErrorCode=outcome.error_code, ErrorMessage=outcome.error_message or "")
        await post_action(plan, outcome, params, self.auth_token, self.timeout)
