"""Rich rendering of call events: the relay publishes them, only the CLI renders them.

So the relay never imports rich: the same events feed ``crctl up``, ``crctl tail`` and any client.

:class:`CallLog` takes events as ``/events`` serves them (dicts with ``kind``, ``call_sid``,
``ts``, ``data``) and prints each as it comes: a coloured rule when a call starts, then one
line per event with a bar in the call's colour, so interleaved calls stay apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from crctl.turns import Price, call_usage, summary, timelines
from relay_server import events as ev

#: Where every crctl command writes its one-line errors and warnings.
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(exc: BaseException | str, code: int | None = None) -> typer.Exit:
    """Print ``error: …`` (one line, markup-safe) and return the Exit to raise.

    The CLI's root group calls it for every known failure (``crctl.cli.LazyGroup.invoke``), so
    a command raises its error rather than calling this. ``code``: the exit code; by default the
    rule's for ``exc`` (:func:`crctl.errors.exit_code`), 1 for a plain message.
    """
    from crctl.errors import exit_code

    err.print(f"[bold red]error:[/] {escape(runnable(str(exc)))}")
    if code is None:
        code = (exit_code(exc) if isinstance(exc, BaseException) else None) or 1
    return typer.Exit(code)


def runnable(text: str) -> str:
    """``text`` with every quoted `` `crctl …` `` hint spelt the way this crctl was run.

    The spelling is :func:`crctl_command`'s, so a hint runs as printed; messages say
    `` `crctl …` `` and the printing edge calls this.
    """
    command = crctl_command()
    return text if command == "crctl" else text.replace("`crctl ", f"`{command} ")


def crctl_command() -> str:
    """How to run crctl again, as the user did.

    ``crctl`` when that name on PATH is this very install, ``./scripts/dev.sh`` (relative to
    the working folder) when running from a checkout's ``.venv``, else ``python -m crctl``.
    Hints that name a command use it, so they run as printed.
    """
    import os
    import shlex
    import shutil
    import sys
    from pathlib import Path

    def same(a: str | os.PathLike[str] | None, b: str | os.PathLike[str]) -> bool:
        try:
            return a is not None and os.path.samefile(a, b)
        except OSError:
            return False

    on_path = shutil.which("crctl")
    mine = Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin") / "crctl"
    if on_path and (same(on_path, sys.argv[0]) or same(on_path, mine)):
        return "crctl"
    dev = Path(sys.prefix).parent / "scripts" / "dev.sh"
    if Path(sys.prefix).name == ".venv" and dev.is_file():
        relative = os.path.relpath(dev)
        relative = relative if relative.startswith(".") else "./" + relative
        # from far away (a temp folder) the absolute path is the shorter one to type
        return shlex.quote(min(relative, str(dev), key=len))
    # not samefile: a venv's python is a symlink to the base interpreter, which lacks crctl
    found = shutil.which("python")
    python = "python" if found and os.path.abspath(found) == sys.executable else sys.executable
    return f"{shlex.quote(python)} -m crctl"


#: One colour per call, in order of appearance.
PALETTE = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_magenta",
    "bright_cyan",
    "bright_green",
)


def short_sid(sid: str) -> str:
    """``CA1234…cdef``: enough to tell calls apart on one screen."""
    return sid if len(sid) <= 12 else f"{sid[:6]}…{sid[-4:]}"


def shorten(value: Any, width: int = 80) -> str:
    """One line of at most ``width`` characters (JSON for structures)."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _clock(ts: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "--:--:--"


def _ms(value: Any) -> str:
    try:
        ms = float(value)
    except (TypeError, ValueError):
        return "?"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _set(value: Any) -> Any:
    """``None`` for an extra the event does not carry (``msgspec.UNSET``)."""
    return None if value is msgspec.UNSET else value


class CallLog:
    """Renders call events on ``console`` as a live transcript, a colour per call.

    Events come typed (:mod:`relay_server.events`), or as ``/events`` serves them (dicts
    with ``kind``, ``call_sid``, ``ts``, ``data``), decoded here once. ``partials=True`` also
    shows the caller's partial transcripts (dimmed).
    """

    def __init__(self, console: Console, *, partials: bool = False) -> None:
        self.console = console
        self.partials = partials
        self._colours: dict[str, str] = {}

    def colour(self, call_sid: str) -> str:
        """The colour of a call (assigned on first sight)."""
        colour = self._colours.get(call_sid)
        if colour is None:
            colour = PALETTE[len(self._colours) % len(PALETTE)]
            self._colours[call_sid] = colour
        return colour

    def add_all(self, events: Iterable[ev.CallEvent | Mapping[str, Any]]) -> None:
        """Render several events in order."""
        for event in events:
            self.add(event)

    def add(self, event: ev.CallEvent | Mapping[str, Any]) -> None:
        """Render one event."""
        if not isinstance(event, ev.CallEvent):
            event = ev.from_wire(event)
        sid = event.call_sid
        started = isinstance(event, ev.CallStarted)
        if started or (sid and sid not in self._colours):
            self._header(sid, event.ts, event if isinstance(event, ev.CallStarted) else None)
            if started:
                return
        self._render(event)

    def _render(self, event: ev.CallEvent) -> None:
        line = self._line
        match event:
            case ev.CallerSpeech(text=text, last=True):
                line(event, "caller", Text(text), "bold green")
            case ev.CallerSpeech(text=text) if self.partials:
                line(event, "caller…", Text(text, style="dim italic"))
            case ev.CallerSpeech():
                pass
            case ev.AgentReply():
                for request in ev.requests_in(event):  # the request that ended the reply
                    line(event, "LLM", Text(request_line(request), style="dim"), "dim")
                line(event, "agent", _reply(event), "bold blue")
            case ev.TurnTimeline():
                line(event, "timing", Text(timeline_line(event), style="cyan"), "dim cyan")
            case ev.LlmRequest():
                line(event, "LLM", Text(request_line(event), style="dim"), "dim")
            case ev.AgentPushed(frame_type=frame_type, text=text):
                body = Text(f"{frame_type or '?'}: ", style="dim")
                body.append(shorten(text or "", 100))
                line(event, "pushed", body, "bold blue")
            case ev.BargeIn(heard=heard, duration_ms=duration):
                body = Text("caller cut in; heard ")
                body.append(f"“{heard}”", style="italic")
                if duration:
                    body.append(f" after {_ms(duration)}", style="dim")
                line(event, "barge-in", body, "bold yellow")
            case ev.Dtmf(digit=digit):
                line(event, "keypad", Text(f"pressed {digit or '?'}"), "bold magenta")
            case ev.ToolCall(name=name, arguments=arguments, result=result):
                body = Text()
                body.append(name or "?", style="bold")
                body.append(f"({shorten(arguments or '', 50)})", style="dim")
                body.append(" → " + shorten("" if result is None else result, 80))
                line(event, "tool", body, "bold cyan")
            case ev.LanguageSwitched(tts=tts, transcription=transcription):
                pairs = (("tts", tts), ("transcription", transcription))
                shown = ", ".join(f"{name} {value}" for name, value in pairs if value)
                line(event, "language", Text("switched: " + shown), "bold cyan")
            case ev.Error(code=code, message=message):
                self._error(event, _set(code), _set(event.title), _set(event.explanation), message)
                self._fix(event, _set(event.fix))
            case ev.LlmFault(fault=fault, detail=detail):
                # A connection that never happened is said as that ("cannot resolve host …",
                # "connection refused to …"), not as the kind's code word.
                what = "LLM unreachable" if fault == "connection" else fault or "?"
                line(
                    event, "LLM FAULT", Text(f"{what}: {detail}", style="red"), "bold white on red"
                )
                self._fix(event, _set(event.fix))
            case ev.BadFrame(reason=reason):
                body = Text(f"dropped: {shorten(reason, 100)}", style="yellow")
                line(event, "bad frame", body, "bold yellow")
            case ev.SocketClosed(code=code):
                what = "hung up" if code in (1000, None) else "socket closed"
                line(event, "socket", Text(what if code is None else f"{what} ({code})"), "dim")
            case ev.SessionEnd():
                self._session_end(event)
            case ev.CallLost(last_seen=last_seen, reason=reason):
                body = Text("call lost", style="bold")
                if last_seen:
                    body.append(f": relay last seen {_clock(last_seen)}")
                if reason:
                    body.append(f" ({reason})", style="dim")
                line(event, "lost", body, "bold yellow")
            case ev.CallStatus(status=status, duration=duration):
                body = Text(f"call {status or '?'}")
                if duration:
                    body.append(f" ({duration} s)", style="dim")
                line(event, "status", body, "dim")
            case ev.CallAnswered(answered_by=answered_by, detection_ms=detection_ms):
                who = "a person" if answered_by == "human" else answered_by or "?"
                body = Text(f"answered by {who}")
                if detection_ms:
                    body.append(f" (detected in {detection_ms} ms)", style="dim")
                line(event, "answered", body, "bold cyan")
            case _:  # a kind this crctl does not know (a newer relay)
                line(event, event.kind, Text(shorten(event.data, 100), style="dim"))

    # ------------------------------------------------------------------------ layout
    def _header(self, sid: str, ts: float, started: ev.CallStarted | None) -> None:
        colour = self.colour(sid) if sid else "white"
        title = Text()
        title.append(f" {sid or 'no call'} ", style=f"bold {colour}")
        if started is not None:
            title.append(f"{started.from_ or '?'} → {started.to or '?'}", style=colour)
            params = started.custom_parameters or {}
            if params:
                pairs = " ".join(f"{k}={v}" for k, v in dict(params).items())
                title.append(f"  {shorten(pairs, 60)}", style="dim")
            if started.resumed:
                title.append("  (reconnected)", style="yellow")
            title.append(f"  {_clock(ts)} ", style="dim")
        self.console.print(Rule(title, style=colour, align="left"))

    def _line(self, event: ev.CallEvent, role: str, body: Text, role_style: str = "bold") -> None:
        sid = event.call_sid
        colour = self.colour(sid) if sid else "white"
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, width=9)
        grid.add_column(overflow="fold")
        prefix = Text("┃ ", style=colour)
        prefix.append(_clock(event.ts), style="dim")
        prefix.append(" " + short_sid(sid) if sid else "", style=colour)
        grid.add_row(prefix, Text(role, style=role_style), body)
        self.console.print(grid)

    def _fix(self, event: ev.CallEvent, fix: str | None) -> None:
        if fix:
            self._line(event, "", Text(f"fix: {fix}", style="bold yellow"))

    def _error(
        self,
        event: ev.CallEvent,
        code: Any,
        title: str | None,
        explanation: str | None,
        message: str | None,
    ) -> None:
        body = Text()
        if code:
            body.append(f"{code} {title or ''}".strip() + ": ", style="bold")
        body.append(str(explanation or message or "error"))
        if explanation and message:
            body.append(f"  [{shorten(message, 80)}]", style="dim")
        self._line(event, "ERROR", body, "bold white on red")

    def _session_end(self, event: ev.SessionEnd) -> None:
        body = Text()
        body.append(f"session {event.status or '?'}", style="bold")
        if event.duration:
            body.append(f" after {event.duration} s", style="dim")
        if event.handoff_data:
            body.append("  hand-off: ", style="bold magenta")
            body.append(shorten(event.handoff_data, 100))
        self._line(event, "end", body, "bold")
        if event.error_code:
            error = Text()
            title = _set(event.title) or ""
            error.append(f"{event.error_code} {title}".strip() + ": ", "bold")
            error.append(str(_set(event.explanation) or event.error_message or ""))
            self._line(event, "ERROR", error, "bold white on red")
            self._fix(event, _set(event.fix))


def _reply(event: ev.AgentReply) -> Text:
    """An agent's reply with its latency.

    "first token" is the end of the caller's turn -> the reply's first token sent (rows stored
    before the name was settled say ``ttft_ms``).
    """
    body = Text(event.text) if event.text else Text("(nothing said)", style="dim")
    first = event.first_token_ms if event.first_token_ms is not None else _set(event.ttft_ms)
    timing = [f"first token {_ms(first)}"] if first is not None else []
    if event.duration_ms is not None:
        timing.append(f"took {_ms(event.duration_ms)}")
    if timing:
        body.append("  " + " · ".join(timing), style="dim cyan")
    if event.cancelled:
        body.append("  (cut off)", style="yellow")
    return body


def request_line(event: ev.LlmRequest) -> str:
    """One chat request as ``tail`` shows it.

    ``gpt-4o-mini #0 completed · first token 412 ms · took 1.20 s · 412 in + 57 out tokens``.
    """
    parts = [f"{event.model or '?'} #{event.round} {event.outcome.replace('_', ' ')}"]
    if event.first_token_ms is not None:
        parts.append(f"first token {_ms(event.first_token_ms)}")
    if event.duration_ms is not None:
        parts.append(f"took {_ms(event.duration_ms)}")
    if event.input_tokens is not None or event.output_tokens is not None:
        parts.append(f"{event.input_tokens or 0} in + {event.output_tokens or 0} out tokens")
    return " · ".join(parts)


def _s(ms: float | None, digits: int = 2) -> str:
    """Milliseconds as seconds (``0.21``), ``?`` when unknown."""
    return "?" if ms is None else f"{ms / 1000:.{digits}f}"


def timeline_line(event: ev.TurnTimeline) -> str:
    """One turn's timeline as the caller heard it, ``?`` for a stage never known.

    ``turn 2  caller wait 1.42 s = transcription 0.21 + relay 0.01 + LLM 0.83 + speech start
    0.37 · spoke 3.1 s``. An agent with no LLM (a relay stage known, no LLM stage) has no
    ``LLM`` term.
    """
    parts = [f"transcription {_s(event.transcription_ms)}", f"relay {_s(event.relay_ms)}"]
    if not (event.llm_first_token_ms is None and event.relay_ms is not None):
        parts.append(f"LLM {_s(event.llm_first_token_ms)}")
    parts.append(f"speech start {_s(event.speech_start_ms)}")
    text = f"turn {event.turn}  caller wait {_s(event.caller_wait_ms)} s = " + " + ".join(parts)
    text += f" · spoke {_s(event.speaking_ms, 1)} s"
    if event.barge_in:
        text += " · caller cut in"
    elif event.end == "interrupted":
        text += " · cut by the next turn"
    elif event.end == "closed":
        text += " · call closed"
    return text


# ------------------------------------------------------------------------ stored calls
def calls_table(calls: Iterable[Mapping[str, Any]]) -> Table:
    """``crctl calls list``: one row per stored call, newest first."""
    table = Table(
        title="calls",
        title_justify="left",
        header_style="bold",
        box=None,
        pad_edge=False,
    )
    rows = list(calls)
    for column in ("call", "from", "to", "started", "length", "status", "turns", "errors"):
        if column == "call":
            # whole SIDs, never cut: they are what `crctl calls show` and `tail --call` take
            widest = max((len(_sid(call)) for call in rows), default=4)
            table.add_column(column, no_wrap=True, min_width=widest)
            continue
        justify: Literal["left", "right"] = "right" if column in ("turns", "errors") else "left"
        table.add_column(column, justify=justify)
    for call in rows:
        started, ended = call.get("started"), call.get("ended")
        length = f"{float(ended) - float(started):.0f} s" if started and ended else "-"
        day = time.strftime("%Y-%m-%d ", time.localtime(float(started))) if started else ""
        status = str(call.get("status") or "?")
        style = "red" if "failed" in status or call.get("errors") else None
        shown = {"live": "green", "lost": "yellow"}.get(status, style or "")
        table.add_row(
            _sid(call),
            str(call.get("from") or "-"),
            str(call.get("to") or "-"),
            day + _clock(started),
            length,
            Text(status, style=shown),
            str(call.get("turns", 0)),
            Text(str(call.get("errors", 0)), style=style or ""),
        )
    return table


def _sid(call: Mapping[str, Any]) -> str:
    """A stored call's SID (``sid`` from a relay older than the ``call_sid`` key)."""
    return str(call.get("call_sid") or call.get("sid") or "?")


def usage_line(used: Mapping[str, Any], *, priced: bool = False) -> str:
    """What calls used, in one line (``usage`` of :func:`crctl.turns.Usage.as_json`).

    ``usage  3 LLM requests · 412 in + 57 out tokens · 1 tool call · 32.0 s · cost 0.000096``;
    ``priced``: a price table was given (the cost is said, ``?`` when unknown).
    """
    n, tools = used.get("llm_requests", 0), used.get("tool_calls", 0)
    parts = [f"{n} LLM request{'' if n == 1 else 's'}"]
    tokens_in, tokens_out = used.get("input_tokens"), used.get("output_tokens")
    if tokens_in is None and tokens_out is None:
        parts.append("tokens ?")
    else:
        parts.append(f"{tokens_in or 0} in + {tokens_out or 0} out tokens")
    parts.append(f"{tools} tool call{'' if tools == 1 else 's'}")
    duration = used.get("duration_s")
    parts.append("? s" if duration is None else f"{float(duration):.1f} s")
    if priced:
        cost = used.get("cost")
        parts.append("cost ?" if cost is None else f"cost {_money(float(cost))}")
    return "usage  " + " · ".join(parts)


def _money(amount: float) -> str:
    """``0.000096``, ``1.25``: up to 6 decimals, no trailing zeros."""
    return f"{amount:.6f}".rstrip("0").rstrip(".") or "0"


def print_usage(
    console: Console, used: Mapping[str, Any], notes: Iterable[str], *, priced: bool
) -> None:
    """The usage line, then what it leaves out (each said once, dimmed)."""
    console.print(Text(usage_line(used, priced=priced), style="dim"))
    for note in notes:
        console.print(Text(f"  {note}", style="dim yellow"))


def print_call(
    console: Console,
    call: Mapping[str, Any],
    prices: Mapping[str, Price] | None = None,
    prices_file: Path | None = None,
) -> None:
    """``crctl calls show``: a stored call's whole transcript, then its usage."""
    log = CallLog(console)
    events = [ev.from_wire(event) for event in call.get("events") or []]
    if not events or not isinstance(events[0], ev.CallStarted):
        started = call.get("started")
        log.add(
            ev.CallStarted(
                call_sid=_sid(call),
                ts=float(started) if started else 0.0,
                from_=call.get("from"),
                to=call.get("to"),
            )
        )
    log.add_all(events)
    status = Text(f"status {call.get('status')}, {call.get('turns', 0)} turns", style="dim")
    timed = timelines(events)
    if timed:
        found = summary(timed)
        cut, wait = found["barge_ins"], found["caller_wait_ms"]
        status.append(f", {cut} barge-in{'' if cut == 1 else 's'}")
        if wait["p50"] is not None:
            status.append(f", caller wait p50 {_s(wait['p50'])} s, p95 {_s(wait['p95'])} s")
    console.print(status)
    usage, used = call_usage(call, prices)
    print_usage(console, used, usage.notes(prices_file), priced=prices is not None)
