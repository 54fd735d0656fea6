"""One call: the base class every agent derives from.

Handlers (``on_setup`` … ``on_close``) run in the socket's receive loop, one at a time and in the
order Twilio sent the frames, so they must return quickly. Anything slow (an LLM reply, a tool)
runs as the *turn*: ``await self.start_turn(coro)``. A session has at most one turn; starting a
new one cancels the old one, a barge-in cancels it (the default ``on_interrupt``), and so does
the socket closing. A turn that sent tokens is always closed with ``last: true``, also when it
was cancelled or failed (Twilio docs: WebSocket messages, "Talk cycle").

A session never sees Quart: it writes encoded frames through :class:`SessionLink.send`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay_server import events as ev
from relay_server.config import RelayConfig
from relay_server.events import EventBus
from relay_server.protocol import (
    Dtmf,
    End,
    Error,
    Inbound,
    Info,
    Interrupt,
    Language,
    Outbound,
    Play,
    Prompt,
    SendDigits,
    Setup,
    Text,
    encode,
    text_frame,
)
from relay_server.protocol.handoff import encode_handoff

if TYPE_CHECKING:
    from relay_server.services import Services

log = logging.getLogger("relay_server.session")

#: What a send on a socket that went away raises (the call is then over).
SEND_ERRORS = (ConnectionError, RuntimeError, OSError)


@dataclass(slots=True)
class SessionLink:
    """What a session gets from the relay: a way to send, the events bus and shared services."""

    send: Callable[[str], Awaitable[None]]
    events: EventBus
    config: RelayConfig
    #: Shared services (the chat model, tools, the timers' clock); agents pick what they need.
    services: Services


#: Answering machine results after which a message can be left: the greeting is over (Twilio
#: docs: Answering Machine Detection, ``MachineDetection=DetectMessageEnd``).
MACHINE_ENDS = frozenset({"machine_end_beep", "machine_end_silence", "machine_end_other"})
#: Results that are no person to talk to (``machine_start``: a machine still greeting, with
#: ``MachineDetection=Enable``; a message would be spoken over its greeting and lost).
NOBODY = frozenset({"machine_start", "fax"})


class CallSession:
    """Base class of an agent: one instance per call (per ConversationRelay socket)."""

    #: Who answered an outbound call with machine detection (``human``, ``machine_end_beep``…,
    #: Twilio's ``AnsweredBy``); ``None``: not known (an inbound call, or no result yet).
    answered_by: str | None = None

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        self.link = link
        self.setup = setup
        self.call_sid = setup.call_sid
        self.closed = False
        self._ended = False
        self._turn_task: asyncio.Task[None] | None = None
        self._turn_coro: Coroutine[Any, Any, None] | None = None
        # Made when first needed: most idle calls never use them (memory per idle call, bench/).
        self._turn_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[None]] | None = None
        #: A talk cycle is open: tokens went out without ``last: true`` yet.
        self._cycle_open = False

    @functools.cached_property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """This call's logger: its records carry ``call_sid`` (made at first use)."""
        return logging.LoggerAdapter(log, {"call_sid": self.call_sid})

    # ------------------------------------------------------------------ handlers to override
    async def on_setup(self, setup: Setup) -> None:
        """The call is connected (first frame)."""

    async def on_prompt(self, prompt: Prompt) -> None:
        """Caller speech; ``prompt.last`` is False for cumulative partials."""

    async def on_dtmf(self, dtmf: Dtmf) -> None:
        """One key press."""

    async def on_interrupt(self, interrupt: Interrupt) -> None:
        """The caller barged in; Twilio already stopped the audio. Default: cancel the turn."""
        await self.cancel_turn()

    async def on_error(self, error: Error) -> None:
        """Twilio reported an error (usually 64107: it rejected one of our frames)."""
        # Said by the ``error`` event too: ``call_event`` lets `crctl up` show it once.
        # (The LoggerAdapter would replace ``extra``: log on its logger.)
        self.log.logger.warning(
            "Twilio error on %s: %s",
            self.call_sid,
            error.description,
            extra=ev.said_by(ev.ERROR, self.call_sid),
        )

    async def on_info(self, info: Info) -> None:
        """Opt-in speaker / tokens-played events."""

    async def on_close(self) -> None:
        """The socket closed; the session is about to be dropped."""

    async def on_answered_by(self, answered_by: str) -> None:
        """Twilio's answering machine detection decided (an outbound call, ``/amd``).

        Default: a person (``human``, ``unknown``) goes on with the conversation; a machine
        whose greeting is over (``machine_end_*``) gets the configured ``machine_message``
        (``--machine-message``), then the call ends; a machine still greeting
        (``machine_start``), a fax, or a machine with no message configured: the call ends.
        """
        if answered_by in MACHINE_ENDS or answered_by in NOBODY:
            message = self.link.config.agent_config.machine_message
            words = message if message and answered_by in MACHINE_ENDS else None
            await self.start_turn(self._leave_message(words))

    async def _leave_message(self, message: str | None) -> None:
        if message:
            await self.send_text(message, last=True)
        await self.end()

    # ----------------------------------------------------------------------------- helpers
    async def send_text(
        self,
        token: str,
        last: bool = False,
        *,
        lang: str | None = None,
        interruptible: bool | None = None,
        preemptible: bool | None = None,
    ) -> None:
        """Send one token of the current talk cycle; ``last=True`` closes the cycle."""
        if token:
            turn = self._turn_task
            # The cheap test first: on CPython 3.11 current_task() costs a getpid() system
            # call (the running loop's fork check), once per token.
            if turn is not None and turn.cancelling() and turn is asyncio.current_task():
                return  # a cancelled turn may close its cycle, never add words to it
        if lang is None and interruptible is None and preemptible is None:
            frame = text_frame(token, last)
        else:
            frame = encode(
                Text(
                    token=token,
                    last=last,
                    lang=lang,
                    interruptible=interruptible,
                    preemptible=preemptible,
                )
            )
        self._cycle_open = not last
        # _write's body, inline: this is the per-token path, and a coroutine fewer per token
        # is measurable at 200 calls (bench/together.py).
        if self.closed:
            return
        try:
            await self.link.send(frame)
        except SEND_ERRORS:
            self.closed = True  # the socket went away: the receive loop closes the session

    async def play(
        self,
        source: str,
        loop: int = 1,
        *,
        preemptible: bool | None = None,
        interruptible: bool | None = None,
    ) -> None:
        """Play a media file reachable by Twilio (``loop=0``: 1000 times)."""
        await self.send(
            Play(source=source, loop=loop, preemptible=preemptible, interruptible=interruptible)
        )

    async def send_digits(self, digits: str) -> None:
        """Send DTMF tones (``0-9 w # *``) to the far end, queued behind speech."""
        await self.send(SendDigits(digits=digits))

    async def set_language(self, tts: str | None = None, transcription: str | None = None) -> None:
        """Switch the TTS and/or transcription language for what follows."""
        await self.send(Language(tts_language=tts, transcription_language=transcription))
        self.link.events.emit(
            ev.LanguageSwitched(call_sid=self.call_sid, tts=tts, transcription=transcription)
        )

    async def end(self, handoff_data: str | dict[str, Any] | None = None) -> None:
        """End the session after queued speech; ``handoff_data`` reaches ``/action`` verbatim.

        A dict is JSON-encoded (``handoffData`` is a string on the wire; Twilio docs: WebSocket
        messages).
        """
        if self._turn_task is not asyncio.current_task():
            await self.cancel_turn()  # called from outside the turn: nothing may follow end
        if self._cycle_open:
            await self.send_text("", last=True)
        data = encode_handoff(handoff_data) if isinstance(handoff_data, dict) else handoff_data
        await self.send(End(handoff_data=data))
        self._ended = True

    async def push(self, message: Outbound) -> None:
        """Deliver a message from outside the call (the relay's messages API).

        It cuts the agent's running turn, like a barge-in, so it never lands in the middle of
        a reply.
        """
        if isinstance(message, End):
            await self.end(message.handoff_data)
            return
        await self.cancel_turn()
        await self.send(message)

    async def send(self, message: Outbound) -> None:
        """Send any outbound message (validated on construction)."""
        if isinstance(message, Text):
            self._cycle_open = not message.last
        await self._write(encode(message))

    async def _write(self, frame: str) -> None:
        if self.closed:
            return
        try:
            await self.link.send(frame)
        except (ConnectionError, RuntimeError, OSError):
            # The socket went away under us: the receive loop will close the session.
            self.closed = True

    # ------------------------------------------------------------------------------- turns
    @property
    def turn_running(self) -> bool:
        """Whether a turn task is in progress."""
        return self._turn_task is not None and not self._turn_task.done()

    async def start_turn(
        self, coro: Coroutine[Any, Any, None], before: Callable[[], None] | None = None
    ) -> asyncio.Task[None] | None:
        """Cancel the running turn (if any) and run ``coro`` as the new one.

        ``before`` runs once the old turn has finished cleaning up and before the new one
        starts (e.g. to record the caller's words after the old reply's last messages).
        Calls are serialised: of two turns started at once, both run in order (the second
        cancels the first). After the call has closed nothing starts (returns ``None``).
        """
        async with self._lock():
            await self._cancel_turn()
            if self.closed or self._ended:
                coro.close()
                return None
            if before is not None:
                before()
            self._turn_coro = coro
            self._turn_task = asyncio.create_task(self._run_turn(coro))
            return self._turn_task

    async def cancel_turn(self) -> bool:
        """Cancel the running turn and wait until it has cleaned up.

        True if one was running. From inside the turn itself this does nothing (a task cannot
        wait for itself).
        """
        if self._turn_task is asyncio.current_task():
            return False
        async with self._lock():
            return await self._cancel_turn()

    def _lock(self) -> asyncio.Lock:
        lock = self._turn_lock
        if lock is None:
            lock = self._turn_lock = asyncio.Lock()
        return lock

    async def _cancel_turn(self) -> bool:
        turn, coro = self._turn_task, self._turn_coro
        if turn is None or turn.done():
            return False
        turn.cancel()
        await asyncio.wait([turn])
        if coro is not None:
            coro.close()  # a turn cancelled before it ever ran never awaited its coroutine
        return True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task owned by this call (a timer's work).

        It is kept referenced, and cancelled when the call closes.
        """
        if self.closed:
            coro.close()
            return
        task = asyncio.create_task(coro)
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_turn(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The event names the exception and where it was raised, so the live log of
            # `crctl up` says it in one line; the relay's log keeps the whole traceback.
            self.log.logger.error(
                "turn failed on %s",
                self.call_sid,
                exc_info=True,
                extra=ev.said_by(ev.ERROR, self.call_sid),
            )
            self.link.events.emit(
                ev.Error(
                    call_sid=self.call_sid, source="agent", message=f"turn failed: {_raised(exc)}"
                )
            )
        finally:
            if self._cycle_open and not self.closed:
                # Close the talk cycle even when cancelled: Twilio needs last:true (Twilio docs:
                # WebSocket messages).
                await self.send_text("", last=True)

    # ------------------------------------------------------------------ called by the relay
    async def answered(self, answered_by: str) -> None:
        """Record who answered and run :meth:`on_answered_by` (a failure is logged, not raised)."""
        self.answered_by = answered_by
        try:
            await self.on_answered_by(answered_by)
        except Exception:
            self.log.exception("on_answered_by failed on %s", self.call_sid)

    async def dispatch(self, message: Inbound) -> None:
        """Route one decoded frame to its handler."""
        if isinstance(message, Prompt):
            await self.on_prompt(message)
        elif isinstance(message, Interrupt):
            await self.on_interrupt(message)
        elif isinstance(message, Dtmf):
            await self.on_dtmf(message)
        elif isinstance(message, Info):
            await self.on_info(message)
        elif isinstance(message, Error):
            self.link.events.emit(
                ev.Error(
                    call_sid=self.call_sid,
                    source="twilio",
                    message=message.description,
                    code=message.code,
                )
            )
            await self.on_error(message)
        elif isinstance(message, Setup):
            self.log.warning("second setup frame on %s ignored", self.call_sid)

    async def close(self) -> None:
        """Cancel the turn and run ``on_close``; called once when the socket is gone."""
        self.closed = True
        for task in list(self._tasks or ()):
            task.cancel()
        await self.cancel_turn()
        try:
            await self.on_close()
        except Exception:
            self.log.exception("on_close failed on %s", self.call_sid)

    def resume_state(self) -> Any:
        """State to carry over to a reconnected socket of the same call (``None``: nothing)."""
        return None

    def restore(self, state: Any) -> None:
        """Adopt state saved by :meth:`resume_state` of this call's previous socket."""


def _raised(exc: BaseException) -> str:
    """``ValueError: bad value (my_agent.py:12)``: the exception and the innermost frame."""
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        code = tb.tb_frame.f_code
        where = f" ({code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name})"
    text = str(exc)
    return f"{type(exc).__name__}{': ' + text if text else ''}{where}"
