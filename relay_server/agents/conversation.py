"""Turn-taking on top of :class:`CallSession`.

History, barge-in truncation, DTMF entry and silence reminders.

Composition, not a chain of overrides: a :class:`ConversationAgent` owns a
:class:`~relay_server.agents.history.Conversation` (what was said and what the caller heard) and
a :class:`Responder` (the LLM, or the echo) that streams the answer to each caller turn. Its
timers (silence, DTMF pause) run on the services' clock, so a test can drive them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any, Protocol

import msgspec

from relay_server import events as ev
from relay_server.agents.history import Conversation
from relay_server.protocol import Dtmf, Info, Interrupt, Prompt, Setup
from relay_server.protocol.codec import TEXT_HEAD, TEXT_MORE, json_bytes
from relay_server.services import Timer
from relay_server.session import SEND_ERRORS, CallSession, SessionLink
from relay_server.timeline import Timeline, tenths


class Responder(Protocol):
    """What answers a caller turn: streams tokens to speak.

    It may use the agent's helpers: record tool calls in its conversation, send digits, ask for
    the call to end.
    """

    def reply(self, agent: ConversationAgent, user_text: str) -> AsyncGenerator[str, None]:
        """The answer to ``user_text`` (already in the agent's history), token by token."""
        ...


class ConversationAgent(CallSession):
    """A session that answers each caller turn with a streamed :meth:`reply`.

    The reply is its :attr:`responder`'s, unless a subclass overrides :meth:`reply`.
    """

    #: The answerer of every caller turn; set by the ready-made agents.
    responder: Responder | None = None

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        super().__init__(link, setup)
        self.settings = link.config.agent_config
        self.conversation = Conversation(self.settings.system_prompt)
        self._clock = link.services.clock
        self._digits: list[str] = []
        self._dtmf_timer: Timer | None = None
        self._silence_timer: Timer | None = None
        self._reminders = 0
        self._resumed = False
        self._end_request: tuple[dict[str, Any] | None] | None = None
        #: Loop time the caller's turn ended (its final prompt or key reached the relay); the
        #: next reply's ``first_token_ms`` counts from it.
        self._turn_end: float | None = None
        self._timeline: Timeline | None = None
        #: The data of the chat request that ended the reply being spoken, for its
        #: ``agent.reply`` (:meth:`request_ended`).
        self._request: dict[str, Any] | None = None

    def request_ended(self, data: dict[str, Any], *, last: bool) -> None:
        """A chat request of this call ended: ``data`` is its ``llm.request`` data.

        The one that ended the reply (``last``) rides in the reply's ``agent.reply`` (one
        stored row per turn fewer); one that asked for tools is its own ``llm.request``, as is
        a ``last`` one that no ``agent.reply`` took (a reply read by something else).
        """
        if self._request is not None:
            self._emit_request(self._request)
            self._request = None
        if last:
            self._request = data
        else:
            self._emit_request(data)

    def _emit_request(self, data: dict[str, Any]) -> None:
        self.link.events.emit(ev.LlmRequest(call_sid=self.call_sid, **data))

    @property
    def timeline(self) -> Timeline:
        """This call's per-turn timeline (:mod:`relay_server.timeline`), made at first use.

        Marks go in only from code that runs once per turn or per speaker event, never per
        token.
        """
        timeline = self._timeline
        if timeline is None:
            timeline = self._timeline = Timeline(
                self.call_sid, self.link.events.emit, asyncio.get_running_loop().time
            )
        return timeline

    @property
    def history(self) -> list[dict[str, Any]]:
        """The messages sent to the model: the system prompt, then what was said and heard."""
        return self.conversation.messages

    # ------------------------------------------------------------------------- to override
    def reply(self, user_text: str) -> AsyncGenerator[str, None]:
        """Stream the agent's answer to ``user_text`` (already appended to history) as tokens.

        Anything beyond the spoken text (tool messages) goes to :attr:`conversation`.
        """
        if self.responder is None:
            raise NotImplementedError("set responder or override reply()")
        return self.responder.reply(self, user_text)

    def request_end(self, handoff: dict[str, Any] | None, reason: str = "") -> None:
        """Ask for ``end`` once the current reply has been spoken to its last token."""
        self._end_request = (handoff,)
        self.log.info("agent asked to %s: %s", "hand off" if handoff else "end the call", reason)

    @property
    def end_requested(self) -> bool:
        """Whether the current reply asked for the call to end after it."""
        return self._end_request is not None

    # --------------------------------------------------------------------------- handlers
    async def on_setup(self, setup: Setup) -> None:
        """Record the greeting Twilio speaks from the TwiML and publish the call's start."""
        config = self.link.config
        greeting = config.reconnect_greeting if self._resumed else config.welcome_greeting
        self.conversation.add_greeting(greeting)
        self.link.events.emit(
            ev.CallStarted(
                call_sid=self.call_sid,
                from_=setup.from_,
                to=setup.to,
                direction=setup.direction,
                custom_parameters=setup.custom_parameters,
                session_id=setup.session_id,
                resumed=self._resumed,
            )
        )

    async def on_prompt(self, prompt: Prompt) -> None:
        """Publish the caller's speech; a final, non-empty transcript starts a turn."""
        self._caller_active()
        self.link.events.emit(
            ev.CallerSpeech(call_sid=self.call_sid, text=prompt.voice_prompt, last=prompt.last)
        )
        if not prompt.last or not prompt.voice_prompt.strip():
            return  # cumulative partials: wait for the final transcript
        await self.user_turn(prompt.voice_prompt)

    async def on_dtmf(self, dtmf: Dtmf) -> None:
        """A key: a turn of its own, or buffered until ``#`` or a pause (``dtmf_buffer``)."""
        self._caller_active()
        self.timeline.key()  # a keyed turn's caller "stops" at the last key
        self.link.events.emit(ev.Dtmf(call_sid=self.call_sid, digit=dtmf.digit))
        if not self.settings.dtmf_buffer:
            await self.user_turn(f"[The caller pressed {dtmf.digit} on the keypad]")
            return
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if dtmf.digit == "#":
            await self._flush_digits()
            return
        self._digits.append(dtmf.digit)
        self._dtmf_timer = self._clock.call_later(
            self.settings.dtmf_pause, lambda: self.spawn(self._flush_digits())
        )

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        """Barge-in: cancel the turn and keep only what the caller heard of the reply."""
        cut = asyncio.get_running_loop().time()
        await self.cancel_turn()
        self._caller_active()
        heard = interrupt.utterance_until_interrupt
        self.conversation.keep_heard(heard)
        self.link.events.emit(
            ev.BargeIn(
                call_sid=self.call_sid,
                heard=heard,
                duration_ms=interrupt.duration_until_interrupt_ms,
            )
        )
        self.timeline.barge_in(cut)  # after the barge-in it ends, in the call log too

    async def on_info(self, info: Info) -> None:
        """Speaker events drive the silence reminder and mark the turn's timeline.

        The reminder is armed when the agent stops talking and cancelled as it talks.
        """
        if info.name == "clientSpeaking":
            if info.value == "on":
                self._caller_active()
            self.timeline.caller_speaking(info.value == "on")
        elif info.name == "agentSpeaking":
            self.timeline.agent_speaking(info.value == "on")
            if info.value == "on":
                self._cancel_silence()
            else:
                self._arm_silence()

    async def on_close(self) -> None:
        """Stop the silence reminder and the DTMF timer; a turn still open ends ``closed``."""
        self._cancel_silence()
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if self._timeline is not None:
            self._timeline.close()
        if self._request is not None:  # a request no reply took: reported on its own
            self._emit_request(self._request)
            self._request = None

    def resume_state(self) -> Any:
        """The conversation's messages, for a reconnecting socket of the same call."""
        self.conversation.flush()
        return self.conversation.messages

    def restore(self, state: Any) -> None:
        """Continue the conversation of :meth:`resume_state` (greeting with the reconnect one)."""
        if isinstance(state, list) and state:
            self.conversation.messages = state
            self._resumed = True

    # ------------------------------------------------------------------------------ turns
    async def user_turn(self, user_text: str) -> None:
        """The caller said (or keyed) ``user_text``: record it and start the reply.

        The input goes into history as soon as the previous turn has cleaned up, so it is kept
        even if another turn supersedes this one before it runs. A reply cut by this new turn
        keeps what was sent: without an ``interrupt`` Twilio plays everything queued (Twilio docs:
        WebSocket messages).
        """
        turn_end = asyncio.get_running_loop().time()

        def record() -> None:
            self.conversation.add_user(user_text, self.settings.max_history_turns)
            self._turn_end = turn_end
            # Here, once the old turn has cleaned up: its last marks are its own.
            self.timeline.start(turn_end)

        await self.start_turn(self._respond(user_text), before=record)

    async def _respond(self, user_text: str) -> None:
        self._end_request = None
        await self.speak(self.reply(user_text))
        if self._end_request is not None:
            await self.end(self._end_request[0])

    async def speak(self, tokens: AsyncGenerator[str, None], *, record: bool = True) -> str:
        """Stream ``tokens`` to the caller as one talk cycle; returns the spoken text.

        The text is recorded as an assistant message. Runs inside the turn; cancellation keeps
        what was sent.

        The one consumer of the token path: ``tokens`` is the responder's generator, which
        reads the model's stream itself (two generators from the LLM's socket to this loop).
        Each token is appended once (to the history's reply, :meth:`Conversation.begin_reply`)
        and sent as its frame, with no call of its own.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        # First token: from the end of the caller's turn, not from here (cancelling the last
        # reply and starting this one is part of what the caller waits for).
        turn_end, self._turn_end = self._turn_end, None
        first: float | None = None
        conversation = self.conversation
        if record:  # the tokens go straight into the history's list: one append per token
            spoken = conversation.begin_reply()
        else:
            conversation.close_message()
            spoken = []
        send = self.link.send
        # send_text's rule: a cancelled turn may close its cycle, never add words to it.
        task = asyncio.current_task()
        turn = task if task is self._turn_task else None
        try:
            # aclosing: a cancelled turn closes the LLM stream at once, not at garbage collection
            async with aclosing(tokens):
                async for token in tokens:
                    spoken.append(token)
                    # send_text's work for one token, inline: no call and no coroutine of its
                    # own per token (bench/together.py). An empty token opens the cycle too.
                    if not self.closed and not (token and turn is not None and turn.cancelling()):
                        self._cycle_open = True
                        try:
                            await send(TEXT_HEAD + json_bytes(token).decode() + TEXT_MORE)
                        except SEND_ERRORS:
                            self.closed = True  # the receive loop closes the session
                    if first is None:
                        first = loop.time()  # the first token is sent
                        if turn_end is not None:  # a caller's turn (not a reminder)
                            self.timeline.first_text(first)
        finally:
            conversation.end_reply()
            cancelled = task is not None and task.cancelling() > 0
            if not self.closed and (self._cycle_open or not (spoken or cancelled)):
                # Every turn ends with last:true, also an empty or cut one (Twilio docs: WebSocket
                # messages); a cancelled turn that said nothing has no cycle to close.
                await self.send_text("", last=True)
            text = "".join(spoken)
            if turn_end is not None:
                self.timeline.reply_done(cancelled)
            request, self._request = self._request, None
            self.link.events.emit(
                ev.AgentReply(
                    call_sid=self.call_sid,
                    text=text,
                    first_token_ms=None
                    if first is None or turn_end is None
                    else tenths((first - turn_end) * 1000),
                    duration_ms=tenths((loop.time() - (turn_end or started)) * 1000),
                    cancelled=cancelled,
                    llm=msgspec.UNSET if request is None else request,
                )
            )
            self._arm_silence()
        return text

    async def _flush_digits(self) -> None:
        self._dtmf_timer = None
        if not self._digits:
            return
        digits, self._digits = "".join(self._digits), []
        await self.user_turn(f"[The caller entered {digits} on the keypad]")

    # ---------------------------------------------------------------------------- silence
    def _caller_active(self) -> None:
        self._reminders = 0
        self._resumed = False
        self._cancel_silence()

    def _cancel_silence(self) -> None:
        if self._silence_timer is not None:
            self._silence_timer.cancel()
            self._silence_timer = None

    def _arm_silence(self) -> None:
        self._cancel_silence()
        if self.settings.silence_timeout <= 0 or self.closed or self._ended:
            return
        self._silence_timer = self._clock.call_later(
            self.settings.silence_timeout, lambda: self.spawn(self._on_silence())
        )

    async def _on_silence(self) -> None:
        self._silence_timer = None
        if self.closed or self.turn_running or self._ended:
            return
        if self._reminders >= self.settings.silence_max_reminders:
            await self.start_turn(self._goodbye())
            return
        self._reminders += 1
        await self.start_turn(self._say(self.settings.silence_reminder))

    async def _say(self, text: str) -> None:
        await self.speak(_one(text))

    async def _goodbye(self) -> None:
        await self.speak(_one(self.settings.silence_goodbye))
        await self.end()


async def _one(text: str) -> AsyncGenerator[str, None]:
    yield text
