"""``crctl call --json``: a call driven turn by turn by another program.

One JSON command a line on stdin, one JSON event a line on stdout (nothing else is written
there), so a script or a coding agent can hold a conversation with the agent::

    {"say": "What are your opening hours?"}    speak (a final transcript)
    {"dtmf": "12"}                              press keys, one frame each
    {"interrupt": true}                         barge in on the reply being spoken
    {"wait": 1.5}                               stay silent that many seconds
    {"hangup": true}                            hang up (so does the end of stdin)

Commands run in order, each once the reply to the one before is over (spoken to its end with
speaker timing; the first after the greeting). ``interrupt`` is the exception: next in line
while a reply is awaited, it barges in on that reply as soon as the agent speaks (one piped
after a later ``say`` waits for that say's reply). A bad line is an ``error`` event and the
call goes on.

Events (``"event"`` names each): ``connected``, ``greeting``, ``speaking`` (a reply's first
text), ``reply`` (its text, ``first_token_ms``, ``caller_wait_ms``, ``interrupted``, an
``error`` when the call ended under it…),
``interrupted``, ``play``, ``dtmf`` (digits the agent sent), ``language``, ``handoff``,
``end``, ``reconnected``, ``closed`` (how the session ended), and ``error`` with a
``message``. The program exits once the call is over: 0, or 1 when the session failed.

The JSON here is the driver's own lines, never ConversationRelay frames (those go through
:mod:`relay_server.protocol`, inside :mod:`crctl.caller`): so this is not a ``crctl.call_*``
module, which tests/test_layering.py keeps free of JSON codecs.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from crctl.caller import CallError, Reply, SimulatedCaller
from crctl.caller.outcome import CallEvent, Closed, Reconnected
from relay_server.protocol.handoff import HandoffDataError, parse_handoff
from relay_server.protocol.replies import (
    DigitsSent,
    Dropped,
    Ended,
    Greeting,
    Interrupted,
    Invalid,
    LanguageSwitched,
    Played,
    ReplyDone,
    TokenHeard,
)

#: The commands, and what each takes (the ``expected`` of an error event).
COMMANDS = {
    "say": "non-empty text",
    "dtmf": "keys 0-9, * and # as text",
    "interrupt": "true",
    "hangup": "true",
    "wait": "a number of seconds, 0 or more",
}
_USAGE = (
    'one JSON object a line: {"say": "…"}, {"dtmf": "12"}, {"interrupt": true}, '
    '{"wait": seconds} or {"hangup": true}'
)


@dataclass(frozen=True)
class Command:
    """One command line, checked: its name and value."""

    name: str
    value: Any


class CommandError(ValueError):
    """A command line that is not one: the ``error`` event's message."""


def parse_command(line: str) -> Command:
    """The command on ``line``; raises :class:`CommandError` saying what is wrong."""
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise CommandError(f"not JSON ({exc}); expected {_USAGE}") from None
    if not isinstance(data, dict) or len(data) != 1:
        raise CommandError(f"got {line.strip()[:80]}; expected {_USAGE}")
    ((name, value),) = data.items()
    if name not in COMMANDS:
        match = difflib.get_close_matches(name, list(COMMANDS), n=1, cutoff=0.6)
        hint = f", did you mean {match[0]!r}?" if match else ";"
        raise CommandError(f"unknown command {name!r}{hint} expected {_USAGE}")
    if isinstance(value, int) and not isinstance(value, bool) and name == "dtmf" and value >= 0:
        value = str(value)
    ok = {
        "say": isinstance(value, str) and bool(value.strip()),
        "dtmf": isinstance(value, str) and bool(value),
        "interrupt": value is True,
        "hangup": value is True,
        "wait": isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0,
    }[name]
    if not ok:
        raise CommandError(f"{name}: got {json.dumps(value)}; expected {COMMANDS[name]}")
    return Command(name, value)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class JsonEvents:
    """The call's steps as JSON lines on ``stream``: the caller's ``on_event`` handler.

    Events before :meth:`connected` are held, so ``connected`` comes first.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self.caller: SimulatedCaller | None = None
        self._held: list[dict[str, Any]] | None = []
        self._emitted: set[Reply] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def write(self, event: str, **fields: Any) -> None:
        """One event line (held until :meth:`connected`)."""
        record = {"event": event, **fields}
        if self._held is not None:
            self._held.append(record)
            return
        stream = self._stream or sys.stdout
        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        stream.flush()

    def error(self, message: str) -> None:
        """An ``error`` event."""
        self.write("error", message=message)

    def failed(self, message: str) -> None:
        """The call could not be placed: the ``error`` event, after what was held."""
        self._release()
        self.error(message)

    def connected(self, caller: SimulatedCaller) -> None:
        """The socket is open: ``connected``, then whatever happened meanwhile."""
        plan = caller.plan
        self._release(
            "connected",
            call_sid=caller.call_sid,
            session_id=caller.session_id,
            url=plan.ws_url if plan else None,
            **{"from": caller.from_, "to": caller.to},
        )

    def _release(self, first: str | None = None, **fields: Any) -> None:
        """Stop holding events: write ``first`` (with ``fields``), then the held ones."""
        held, self._held = self._held or [], None
        if first is not None:
            self.write(first, **fields)
        for record in held:
            self.write(record.pop("event"), **record)

    def reply(self, reply: Reply) -> None:
        """The ``reply`` event of ``reply``, once."""
        if reply in self._emitted or reply.superseded or not (reply.tokens or reply.plays):
            return
        self._emitted.add(reply)
        wait = self.caller.caller_wait_ms(reply) if self.caller is not None else None
        self.write(
            "reply",
            text=reply.text,
            input=reply.input,
            solicited=reply.solicited,
            interrupted=reply.interrupted,
            first_token_ms=_ms(reply.first_token_ms) if reply.solicited else None,
            caller_wait_ms=_ms(wait),
            plays=reply.plays,
            digits=reply.digits,
            error=reply.error,
        )

    def __call__(self, event: CallEvent) -> None:
        """One step of the call as an event line."""
        match event:
            case Greeting(text=text):
                self.write("greeting", text=text)
            case TokenHeard(reply=reply) if reply.tokens == 1:
                self.write("speaking", input=reply.input, solicited=reply.solicited)
            case ReplyDone(reply=reply):
                self._when_played(reply)
            case Interrupted(reply=reply, heard=heard):
                self.write("interrupted", input=reply.input, heard=heard)
                self._when_played(reply)
            case Played(source=source):
                self.write("play", source=source)
            case DigitsSent(digits=digits):
                self.write("dtmf", digits=digits)
            case LanguageSwitched(tts_language=tts, transcription_language=stt):
                self.write("language", tts_language=tts, transcription_language=stt)
            case Ended(handoff_data=data):
                if data:
                    try:
                        fields: Any = parse_handoff(data).fields
                    except HandoffDataError:
                        fields = None
                    self.write("handoff", data=data, fields=fields)
                self.write("end", handoff_data=data)
            case Invalid(reason=reason, frame=frame):
                self.error(f"Twilio would reject this frame (64107): {reason}: {frame[:200]}")
            case Dropped(reason=reason):
                self.error(f"not sent: {reason}")
            case Reconnected(session_id=session_id, ws_url=url):
                self.write("reconnected", session_id=session_id, url=url)
            case Closed(outcome=outcome):
                self.write(
                    "closed",
                    status=outcome.status,
                    close_code=outcome.close_code,
                    close_reason=outcome.close_reason,
                    error_code=outcome.error_code,
                    handoff_data=outcome.handoff_data,
                    action=outcome.action,
                    action_error=outcome.action_error,
                    description=outcome.describe(),
                )

    def _when_played(self, reply: Reply) -> None:
        """Write ``reply`` once the caller has heard it to its end (or cut it)."""
        caller = self.caller
        if caller is None:
            self.reply(reply)
            return

        async def later() -> None:
            await caller.finished(reply, caller.timeout)
            self.reply(reply)

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Let the replies being played be written (the call is over)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for task in set(self._tasks):
            task.cancel()


class Driver:
    """Reads commands from ``lines`` (``None``: stdin closed) and plays them on ``caller``."""

    def __init__(
        self,
        caller: SimulatedCaller,
        events: JsonEvents,
        lines: asyncio.Queue[str | None],
    ) -> None:
        self.caller, self.events, self.lines = caller, events, lines
        self._held: deque[str] = deque()
        self._eof = False
        self._number = 0

    async def run(self) -> int:
        """Play every command until ``hangup``, the end of stdin or of the call; exit code."""
        caller = self.caller
        while not caller.closed.is_set():
            line = await self._next()
            if line is None:
                break
            command = self._parse(line)
            if command is None:
                continue
            if command.name == "hangup":
                break
            try:
                await self._play(command)
            except CallError as exc:  # the call ended while the command was played
                if not caller.closed.is_set():
                    self.events.error(str(exc))
        outcome = await caller.hangup()
        await self.events.settle()
        return 1 if outcome.status == "failed" else 0

    async def _next(self) -> str | None:
        if self._held:
            return self._held.popleft()
        if self._eof:
            return None
        getter = asyncio.ensure_future(self.lines.get())
        closed = asyncio.ensure_future(self.caller.closed.wait())
        await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not getter.done():
            getter.cancel()
            return None
        line = getter.result()
        self._eof = line is None
        return line

    def _parse(self, line: str) -> Command | None:
        self._number += 1
        if not line.strip():
            return None
        try:
            return parse_command(line)
        except CommandError as exc:
            self.events.error(f"line {self._number}: {exc}")
            return None

    async def _play(self, command: Command) -> None:
        caller = self.caller
        reply: Reply | None = None
        if command.name != "interrupt":
            # the reply before (the greeting, something the agent said on its own) is
            # spoken to its end first: talking over it is a barge-in, which only
            # ``interrupt`` asks for
            await caller.quiet(caller.timeout)
            if caller.closed.is_set():
                return
        if command.name == "say":
            reply = await caller.say(command.value)
        elif command.name == "dtmf":
            try:
                reply = await caller.dtmf(command.value)
            except ValueError as exc:
                self.events.error(f"line {self._number}: dtmf: {exc}")
                return
        elif command.name == "interrupt":
            if not await caller.interrupt():
                self.events.error("nothing to interrupt: the agent is not speaking")
        elif command.name == "wait":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(float(command.value)):
                    await caller.closed.wait()
        if reply is not None:
            await self._await(reply)

    async def _await(self, reply: Reply) -> None:
        """Wait for ``reply``, reading on: an ``interrupt`` barges in, the rest waits its turn."""
        caller = self.caller
        finished = asyncio.ensure_future(caller.finished(reply, caller.timeout))
        getter: asyncio.Future[str | None] | None = None
        try:
            while not finished.done():
                # a command waiting its turn keeps the ones after it waiting too: an
                # ``interrupt`` piped after the next ``say`` is for that say's reply
                if getter is None and not self._eof and not self._held:
                    getter = asyncio.ensure_future(self.lines.get())
                waits: set[asyncio.Future[Any]] = {finished}
                if getter is not None:
                    waits.add(getter)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if getter is None or not getter.done():
                    continue
                line, getter = getter.result(), None
                if line is None:
                    self._eof = True
                elif _is_interrupt(line):
                    self._number += 1
                    await self._barge_in(reply)
                else:
                    self._held.append(line)
        finally:
            if getter is not None:
                getter.cancel()
        if not finished.result() and not caller.closed.is_set():
            got = f" (so far: {reply.received!r})" if reply.received else ""
            self.events.error(f"no complete reply within {caller.timeout:g} s{got}")
        elif finished.result():
            self.events.reply(reply)

    async def _barge_in(self, reply: Reply) -> None:
        caller = self.caller
        if not await caller.started(reply, caller.timeout) or not await caller.interrupt():
            self.events.error("nothing to interrupt: the reply was over before the agent spoke")


def _is_interrupt(line: str) -> bool:
    with contextlib.suppress(CommandError):
        return parse_command(line).name == "interrupt"
    return False


async def drive(
    caller: SimulatedCaller,
    events: JsonEvents,
    read_lines: Callable[[], asyncio.Queue[str | None]],
) -> int:
    """Place the call, report ``connected`` and play stdin's commands; the exit code."""
    events.caller = caller
    try:
        plan = await caller.fetch()
        await caller.connect(plan)
    except CallError as exc:  # on stdout as an event, and said once by the root group
        events.failed(str(exc))
        raise
    events.connected(caller)
    return await Driver(caller, events, read_lines()).run()
