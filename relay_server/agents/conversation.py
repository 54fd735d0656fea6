"""Turn-taking on top of :class:`CallSession`: history, barge-in truncation, DTMF entry and
silence reminders. The echo and LLM agents differ in :meth:`ConversationAgent.reply` (the LLM
agent also ends or hands off the call after its reply).

History holds only what the caller heard: a reply cut by a barge-in is shortened to Twilio's
``utteranceUntilInterrupt`` (Twilio docs: WebSocket messages).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from relay_server import events as ev
from relay_server.protocol import Dtmf, Info, Interrupt, Prompt, Setup
from relay_server.session import CallSession, SessionLink


class ConversationAgent(CallSession):
    """A session that answers each caller turn with a streamed :meth:`reply`."""

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        super().__init__(link, setup)
        self.settings = link.config.agent_config
        self.history: list[dict[str, Any]] = [
            {"role": "system", "content": self.settings.system_prompt}
        ]
        #: Index in ``history`` where the current (or last) reply's messages start.
        self._reply_start = len(self.history)
        #: The assistant message spoken tokens go to; ``None`` starts a new one. Its tokens
        #: collect in ``_parts`` and become its ``content`` in one join when the reply (or a
        #: tool round) ends: ``content += token`` re-copied the whole reply per token
        #: (quadratic: 140 µs per token at 60,000 tokens).
        self._message: dict[str, Any] | None = None
        self._parts: list[str] = []
        self._digits: list[str] = []
        self._dtmf_timer: asyncio.TimerHandle | None = None
        self._silence_timer: asyncio.TimerHandle | None = None
        self._reminders = 0
        self._resumed = False
        #: Loop time the caller's turn ended (its final prompt or key reached the relay); the
        #: next reply's ``first_token_ms`` counts from it.
        self._turn_end: float | None = None

    # ------------------------------------------------------------------------- to override
    def reply(self, user_text: str) -> AsyncGenerator[str, None]:
        """Stream the agent's answer to ``user_text`` (already appended to history) as tokens.
        Subclasses append anything beyond the spoken text (tool messages) to ``history``."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- handlers
    async def on_setup(self, setup: Setup) -> None:
        # The greeting Twilio speaks from the TwiML is part of what the caller heard; as the
        # latest "reply", a barge-in on it shortens it and nothing said before (a resumed call).
        config = self.link.config
        greeting = config.reconnect_greeting if self._resumed else config.welcome_greeting
        self._reply_start = len(self.history)
        if greeting:
            self.history.append({"role": "assistant", "content": greeting})
        self.link.events.publish(
            ev.CALL_STARTED,
            self.call_sid,
            **{"from": setup.from_},
            to=setup.to,
            direction=setup.direction,
            custom_parameters=setup.custom_parameters,
            session_id=setup.session_id,
            resumed=self._resumed,
        )

    async def on_prompt(self, prompt: Prompt) -> None:
        self._caller_active()
        self.link.events.publish(
            ev.CALLER_SPEECH, self.call_sid, text=prompt.voice_prompt, last=prompt.last
        )
        if not prompt.last or not prompt.voice_prompt.strip():
            return  # cumulative partials: wait for the final transcript
        await self.user_turn(prompt.voice_prompt)

    async def on_dtmf(self, dtmf: Dtmf) -> None:
        self._caller_active()
        self.link.events.publish(ev.DTMF, self.call_sid, digit=dtmf.digit)
        if not self.settings.dtmf_buffer:
            await self.user_turn(f"[The caller pressed {dtmf.digit} on the keypad]")
            return
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()
        if dtmf.digit == "#":
            await self._flush_digits()
            return
        self._digits.append(dtmf.digit)
        loop = asyncio.get_running_loop()
        self._dtmf_timer = loop.call_later(
            self.settings.dtmf_pause, lambda: self.spawn(self._flush_digits())
        )

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        await self.cancel_turn()
        self._caller_active()
        heard = interrupt.utterance_until_interrupt
        self._keep_heard(heard)
        self.link.events.publish(
            ev.BARGE_IN,
            self.call_sid,
            heard=heard,
            duration_ms=interrupt.duration_until_interrupt_ms,
        )

    async def on_info(self, info: Info) -> None:
        if info.name == "clientSpeaking" and info.value == "on":
            self._caller_active()
        elif info.name == "agentSpeaking":
            if info.value == "on":
                self._cancel_silence()
            else:
                self._arm_silence()

    async def on_close(self) -> None:
        self._cancel_silence()
        if self._dtmf_timer is not None:
            self._dtmf_timer.cancel()

    def resume_state(self) -> Any:
        self._flush_message()
        return self.history

    def restore(self, state: Any) -> None:
        if isinstance(state, list) and state:
            self.history = state
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
            self.history.append({"role": "user", "content": user_text})
            self._trim_history()
            self._turn_end = turn_end

        await self.start_turn(self._respond(user_text), before=record)

    async def _respond(self, user_text: str) -> None:
        await self.speak(self.reply(user_text))

    async def speak(self, tokens: AsyncGenerator[str, None], *, record: bool = True) -> str:
        """Stream ``tokens`` to the caller as one talk cycle, record it as an assistant message
        and return the spoken text. Runs inside the turn; cancellation keeps what was sent."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        # First token: from the end of the caller's turn, not from here (cancelling the last
        # reply and starting this one is part of what the caller waits for).
        turn_end, self._turn_end = self._turn_end, None
        first: float | None = None
        spoken: list[str] = []
        self._close_message()
        if record:
            self._reply_start = len(self.history)
        try:
            # aclosing: a cancelled turn closes the LLM stream at once, not at garbage collection
            async with aclosing(tokens):
                async for token in tokens:
                    spoken.append(token)
                    if record:
                        if self._message is None:
                            self._message = {"role": "assistant", "content": ""}
                            self._parts = []
                            self.history.append(self._message)
                        self._parts.append(token)
                    await self.send_text(token)
                    if first is None:
                        first = loop.time()  # the first token is sent
        finally:
            self._close_message()
            cancelled = asyncio.current_task().cancelling() > 0  # type: ignore[union-attr]
            if not self.closed and (self._cycle_open or not (spoken or cancelled)):
                # Every turn ends with last:true, also an empty or cut one (Twilio docs: WebSocket
                # messages); a
                # cancelled turn that said nothing has no cycle to close.
                await self.send_text("", last=True)
            text = "".join(spoken)
            self.link.events.publish(
                ev.AGENT_REPLY,
                self.call_sid,
                text=text,
                first_token_ms=None
                if first is None or turn_end is None
                else round((first - turn_end) * 1000, 1),
                duration_ms=round((loop.time() - (turn_end or started)) * 1000, 1),
                cancelled=cancelled,
            )
            self._arm_silence()
        return text

    def _flush_message(self) -> None:
        """Write the tokens spoken so far into the open assistant message's ``content``."""
        if self._message is not None and self._parts:
            self._message["content"] = "".join(self._parts)

    def _close_message(self) -> None:
        """Flush the open assistant message; the next token starts a new one."""
        self._flush_message()
        self._message = None
        self._parts = []

    def _keep_heard(self, heard: str) -> None:
        """Shorten the last reply's assistant text in history to what the caller heard."""
        self._flush_message()
        remaining = heard
        for message in self.history[self._reply_start :]:
            if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
                continue
            content = message["content"]
            kept, remaining = remaining[: len(content)], remaining[len(content) :]
            message["content"] = kept
        self.history[self._reply_start :] = [
            m
            for m in self.history[self._reply_start :]
            if not (
                m.get("role") == "assistant" and not m.get("content") and not m.get("tool_calls")
            )
        ]

    def _trim_history(self) -> None:
        limit = self.settings.max_history_turns * 2
        body = self.history[1:]
        if len(body) > limit:
            cut = len(body) - limit
            while cut < len(body) and body[cut].get("role") != "user":
                cut += 1  # never start with a tool result orphaned from its call
            self.history[1:] = body[cut:]

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
        loop = asyncio.get_running_loop()
        self._silence_timer = loop.call_later(
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
