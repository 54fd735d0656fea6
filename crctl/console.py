"""Rich rendering of call events (the relay publishes them; only the CLI renders, DESIGN.md).

:class:`CallLog` takes events as ``/events`` serves them (dicts with ``kind``, ``call_sid``,
``ts``, ``data``) and prints each as it comes: a coloured rule when a call starts, then one
line per event with a bar in the call's colour, so interleaved calls stay apart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

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
    """``text`` with every quoted `` `crctl …` `` hint spelt the way this crctl was run
    (:func:`crctl_command`), so a hint runs as printed; messages say `` `crctl …` `` and the
    printing edge calls this."""
    command = crctl_command()
    return text if command == "crctl" else text.replace("`crctl ", f"`{command} ")


def crctl_command() -> str:
    """How to run crctl again, as the user did: ``crctl`` when that name on PATH is this very
    install, ``./scripts/dev.sh`` (relative to the working folder) when running from a
    checkout's ``.venv``, else ``python -m crctl``. Hints that name a command use it, so they
    run as printed."""
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
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
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


class CallLog:
    """Renders call events on ``console`` as a live transcript, a colour per call.

    ``partials=True`` also shows the caller's partial transcripts (dimmed).
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

    def add_all(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Render several events in order."""
        for event in events:
            self.add(event)

    def add(self, event: Mapping[str, Any]) -> None:
        """Render one event."""
        kind = str(event.get("kind", "?"))
        sid = str(event.get("call_sid") or "")
        data = event.get("data") or {}
        if not isinstance(data, Mapping):
            data = {"value": data}
        new_call = sid and sid not in self._colours
        if kind == "call.started" or new_call:
            self._header(sid, event.get("ts"), data if kind == "call.started" else None)
            if kind == "call.started":
                return
        render = getattr(self, "_" + kind.replace(".", "_"), None)
        if render is None:
            self._line(event, kind, Text(shorten(dict(data), 100), style="dim"))
        else:
            render(event, data)

    # ------------------------------------------------------------------------ layout
    def _header(self, sid: str, ts: Any, data: Mapping[str, Any] | None) -> None:
        colour = self.colour(sid) if sid else "white"
        title = Text()
        title.append(f" {sid or 'no call'} ", style=f"bold {colour}")
        if data is not None:
            title.append(f"{data.get('from') or '?'} → {data.get('to') or '?'}", style=colour)
            params = data.get("custom_parameters") or {}
            if params:
                pairs = " ".join(f"{k}={v}" for k, v in dict(params).items())
                title.append(f"  {shorten(pairs, 60)}", style="dim")
            if data.get("resumed"):
                title.append("  (reconnected)", style="yellow")
            title.append(f"  {_clock(ts)} ", style="dim")
        self.console.print(Rule(title, style=colour, align="left"))

    def _line(
        self, event: Mapping[str, Any], role: str, body: Text, role_style: str = "bold"
    ) -> None:
        sid = str(event.get("call_sid") or "")
        colour = self.colour(sid) if sid else "white"
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True)
        grid.add_column(no_wrap=True, width=9)
        grid.add_column(overflow="fold")
        prefix = Text("┃ ", style=colour)
        prefix.append(_clock(event.get("ts")), style="dim")
        prefix.append(" " + short_sid(sid) if sid else "", style=colour)
        grid.add_row(prefix, Text(role, style=role_style), body)
        self.console.print(grid)

    def _fix(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        if data.get("fix"):
            self._line(event, "", Text(f"fix: {data['fix']}", style="bold yellow"))

    # ----------------------------------------------------------------------- kinds
    def _caller_speech(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        if data.get("last", True):
            self._line(event, "caller", Text(str(data.get("text", ""))), "bold green")
        elif self.partials:
            self._line(event, "caller…", Text(str(data.get("text", "")), style="dim italic"))

    def _agent_reply(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        text = str(data.get("text") or "")
        body = Text(text) if text else Text("(nothing said)", style="dim")
        # "first token": end of the caller's turn -> the reply's first token sent. Rows
        # stored before the name was settled carry it as ``ttft_ms``.
        first = data.get("first_token_ms", data.get("ttft_ms"))
        timing = [f"first token {_ms(first)}"] if first is not None else []
        if data.get("duration_ms") is not None:
            timing.append(f"took {_ms(data['duration_ms'])}")
        if timing:
            body.append("  " + " · ".join(timing), style="dim cyan")
        if data.get("cancelled"):
            body.append("  (cut off)", style="yellow")
        self._line(event, "agent", body, "bold blue")

    def _agent_pushed(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text(f"{data.get('type') or '?'}: ", style="dim")
        body.append(shorten(data.get("text") or "", 100))
        self._line(event, "pushed", body, "bold blue")

    def _barge_in(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text("caller cut in; heard ")
        body.append(f"“{data.get('heard', '')}”", style="italic")
        if data.get("duration_ms"):
            body.append(f" after {_ms(data['duration_ms'])}", style="dim")
        self._line(event, "barge-in", body, "bold yellow")

    def _dtmf(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        self._line(event, "keypad", Text(f"pressed {data.get('digit', '?')}"), "bold magenta")

    def _tool_call(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text()
        body.append(str(data.get("name", "?")), style="bold")
        body.append(f"({shorten(data.get('arguments') or '', 50)})", style="dim")
        body.append(" → " + shorten(data.get("result", ""), 80))
        self._line(event, "tool", body, "bold cyan")

    def _language(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        parts = [f"{k} {data[k]}" for k in ("tts", "transcription") if data.get(k)]
        self._line(event, "language", Text("switched: " + ", ".join(parts)), "bold cyan")

    def _error(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text()
        if data.get("code"):
            body.append(f"{data['code']} {data.get('title', '')}".strip() + ": ", style="bold")
        body.append(str(data.get("explanation") or data.get("message") or "error"))
        if data.get("explanation") and data.get("message"):
            body.append(f"  [{shorten(data['message'], 80)}]", style="dim")
        self._line(event, "ERROR", body, "bold white on red")
        self._fix(event, data)

    def _llm_fault(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        kind = str(data.get("kind", "?"))
        # A connection that never happened is said as that ("cannot resolve host …",
        # "connection refused to …"), not as the kind's code word.
        what = "LLM unreachable" if kind == "connection" else kind
        body = Text(f"{what}: {data.get('detail', '')}", style="red")
        self._line(event, "LLM FAULT", body, "bold white on red")
        self._fix(event, data)

    def _frame_bad(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        reason = shorten(data.get("reason", ""), 100)
        self._line(event, "bad frame", Text(f"dropped: {reason}", style="yellow"), "bold yellow")

    def _socket_closed(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        code = data.get("code")
        what = "hung up" if code in (1000, None) else "socket closed"
        self._line(event, "socket", Text(what if code is None else f"{what} ({code})"), "dim")

    def _session_end(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text()
        body.append(f"session {data.get('status') or '?'}", style="bold")
        if data.get("duration"):
            body.append(f" after {data['duration']} s", style="dim")
        if data.get("handoff_data"):
            body.append("  hand-off: ", style="bold magenta")
            body.append(shorten(data["handoff_data"], 100))
        self._line(event, "end", body, "bold")
        if data.get("error_code"):
            error = Text()
            error.append(f"{data['error_code']} {data.get('title', '')}".strip() + ": ", "bold")
            error.append(str(data.get("explanation") or data.get("error_message") or ""))
            self._line(event, "ERROR", error, "bold white on red")
            self._fix(event, data)

    def _call_lost(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text("call lost", style="bold")
        if data.get("last_seen"):
            body.append(f": relay last seen {_clock(data['last_seen'])}")
        if data.get("reason"):
            body.append(f" ({data['reason']})", style="dim")
        self._line(event, "lost", body, "bold yellow")

    def _call_status(self, event: Mapping[str, Any], data: Mapping[str, Any]) -> None:
        body = Text(f"call {data.get('status') or '?'}")
        if data.get("duration"):
            body.append(f" ({data['duration']} s)", style="dim")
        self._line(event, "status", body, "dim")


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


def print_call(console: Console, call: Mapping[str, Any]) -> None:
    """``crctl calls show``: a stored call's whole transcript."""
    log = CallLog(console)
    events = list(call.get("events") or [])
    if not events or events[0].get("kind") != "call.started":
        log.add(
            {
                "kind": "call.started",
                "call_sid": _sid(call),
                "ts": call.get("started"),
                "data": {"from": call.get("from"), "to": call.get("to")},
            }
        )
    log.add_all(events)
    status = Text(f"status {call.get('status')}, {call.get('turns', 0)} turns", style="dim")
    console.print(status)
