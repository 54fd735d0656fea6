"""``crctl call``: call the relay as Twilio would, without a phone.

Interactive (type what the caller says and watch the reply stream in) or scripted
(``--script conversation.yaml``: a pass/fail report, for CI). The protocol lives in
:mod:`crctl.caller` (:class:`~crctl.caller.SimulatedCaller`), the scripts in
:mod:`crctl.call_script`; this module is the command and its printing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from crctl.caller import DEFAULT_FROM, DEFAULT_TO, DEFAULT_URL, CallError, Reply, SimulatedCaller
from crctl.console import err, fail

out = Console(highlight=False, soft_wrap=True)
_HELP = "Type what the caller says; /dtmf 1 presses keys, /interrupt barges in, /hangup ends."


class LivePrinter:
    """Prints a call as it happens: the reply streamed token by token, then its timing."""

    def __init__(self, console: Console) -> None:
        self.out = console
        self._open: Reply | None = None

    def _break(self) -> None:
        if self._open is not None:
            self.out.print()
            self._open = None

    def __call__(self, kind: str, reply: Reply | None, data: dict[str, Any]) -> None:
        if kind == "token" and reply is not None:
            if self._open is not reply:
                self._break()
                self.out.print("[bold cyan]agent:[/] ", end="")
                self._open = reply
            self.out.print(escape(data["token"]), end="")
            return
        if kind == "reply" and reply is not None:
            if self._open is not reply and not reply.tokens:
                self._break()
                self.out.print("[bold cyan]agent:[/] [dim](said nothing)[/]", end="")
                self._open = reply
            ms = reply.first_token_ms
            timing = "" if ms is None or not reply.solicited else f"first token {ms:.0f} ms"
            self.out.print(f"  [dim]{timing}[/]" if timing else "")
            self._open = None
            return
        self._break()
        if kind == "greeting":
            self.out.print(
                f"[bold cyan]agent:[/] {escape(data['text'])} [dim](welcome greeting)[/]"
            )
        elif kind == "interrupted":
            heard = escape(repr(data["heard"]))
            self.out.print(f"[yellow]  ↳ barged in; the caller heard: {heard}[/]")
        elif kind == "play":
            self.out.print(f"[cyan]agent plays[/] {escape(data['source'])}")
        elif kind == "digits":
            self.out.print(f"[cyan]agent sends digits[/] {escape(data['digits'])}")
        elif kind == "language":
            pairs = ", ".join(f"{k}={v}" for k, v in data.items())
            self.out.print(f"[cyan]agent switches language[/] {escape(pairs)}")
        elif kind == "end":
            extra = f": handoffData {data['handoff_data']}" if data["handoff_data"] else ""
            self.out.print(f"[bold cyan]agent ended the call[/]{escape(extra)}")
        elif kind == "invalid":
            self.out.print(
                f"[red]Twilio would reject this frame (64107): {escape(data['reason'])}:[/] "
                f"{escape(str(data['frame'])[:200])}"
            )
        elif kind == "dropped":
            self.out.print(f"[yellow]not sent: {escape(data['reason'])}[/]")
        elif kind == "closed":
            self.out.print(f"[dim]call over: {escape(data['outcome'].describe())}[/]")


async def _interactive(caller: SimulatedCaller, tty: bool) -> int:
    """Read what the caller says from stdin; a pipe waits for each reply before the next line,
    a terminal lets the user talk over the agent (a barge-in, as on a phone)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def put(line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the call is over
            loop.call_soon_threadsafe(lines.put_nowait, line)

    def read() -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in sys.stdin:
                put(line.rstrip("\r\n"))
        put(None)

    threading.Thread(target=read, name="crctl-call-stdin", daemon=True).start()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, lambda: lines.put_nowait(None))
    if tty:
        out.print(f"[dim]{_HELP}[/]")
    try:
        while not caller.closed.is_set():
            line = await _next_line(lines, caller.closed)
            if line is None or line.strip() == "/hangup":
                break
            command, _, arg = line.strip().partition(" ")
            reply: Reply | None = None
            try:
                if not line.strip():
                    continue
                if command == "/dtmf":
                    reply = await caller.dtmf(arg.replace(" ", ""))
                elif command == "/interrupt":
                    if not await caller.interrupt():
                        out.print("[yellow]nothing to interrupt: the agent is not speaking[/]")
                elif command.startswith("/"):
                    out.print(f"[dim]{_HELP}[/]")
                else:
                    reply = await caller.say(line.strip())
            except ValueError as exc:
                out.print(f"[yellow]{escape(str(exc))}[/]")
            except CallError:
                break  # the call ended while sending
            if reply is not None and not tty:
                await _until(reply.done, caller.timeout)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    await caller.hangup()
    return 0


async def _next_line(lines: asyncio.Queue[str | None], closed: asyncio.Event) -> str | None:
    getter = asyncio.ensure_future(lines.get())
    waiter = asyncio.ensure_future(closed.wait())
    done, pending = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return getter.result() if getter in done else None


async def _until(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


def _defaults(
    url: str, auth_token: str | None, public_url: str | None
) -> tuple[str | None, str | None]:
    """Fill the auth token and the public URL from the settings ``crctl serve`` uses (the
    environment, ``.env.local``, ``.env``). The public URL only applies to a direct
    ``http://`` address: a relay reached that way is signed for as Twilio reaches it."""
    from crctl.settings import load_settings

    direct = urlsplit(url).scheme == "http"
    if auth_token and (public_url or not direct):
        return auth_token, public_url
    settings = load_settings()
    if not auth_token and settings.twilio_auth_token is not None:
        auth_token = settings.twilio_auth_token.get_secret_value() or None
    if public_url is None and direct:
        public_url = settings.public_url
    return auth_token, public_url


async def _run(caller: SimulatedCaller, script: Any, tty: bool) -> int:
    from crctl.call_script import play_script

    plan = await caller.fetch()
    via = "" if plan.connect_url == plan.ws_url else f" via {plan.connect_url}"
    out.print(
        f"[dim]call {caller.call_sid} from {caller.from_} to {caller.to}: "
        f"{escape(plan.ws_url)}{escape(via)}[/]"
    )
    await caller.connect(plan)
    if script is None:
        return await _interactive(caller, tty)
    if plan.welcome_greeting:
        out.print(f"[dim]welcome greeting: {escape(plan.welcome_greeting)}[/]")
    return await play_script(caller, script, Console(highlight=False))


def call(
    url: str = typer.Argument(
        DEFAULT_URL, help="The relay's base URL; its /twiml is fetched first."
    ),
    script: Optional[Path] = typer.Option(
        None, "--script", "-s", help="YAML list of turns to play and check (else interactive)."
    ),
    auth_token: Optional[str] = typer.Option(
        None,
        "--auth-token",
        envvar="TWILIO_AUTH_TOKEN",
        help="Sign requests as Twilio does (the relay's TWILIO_AUTH_TOKEN; also read from .env).",
    ),
    public_url: Optional[str] = typer.Option(
        None,
        "--public-url",
        help="The relay's public URL (tunnel), which Twilio signs; for a local http:// URL it "
        "defaults to CRCTL_PUBLIC_URL (environment or .env).",
    ),
    partials: bool = typer.Option(
        False,
        "--partials",
        help="Send cumulative partial prompts (last:false) before each final, about every "
        "250 ms (always on when the TwiML sets partialPrompts).",
    ),
    from_: str = typer.Option(DEFAULT_FROM, "--from", help="The caller's number."),
    to: str = typer.Option(DEFAULT_TO, "--to", help="The number called."),
    timeout: float = typer.Option(
        15.0, "--timeout", min=0.1, help="Seconds to wait for the relay and for each reply."
    ),
) -> None:
    """Call the relay as Twilio would, without a phone: type what the caller says, or play
    and check a --script."""
    from crctl.call_script import ScriptError, load_script
    from crctl.settings import SettingsError

    try:
        turns = load_script(script) if script is not None else None
        auth_token, public_url = _defaults(url, auth_token, public_url)
    except (ScriptError, SettingsError) as exc:
        raise fail(exc, 2) from None
    tty = sys.stdin.isatty()
    caller = SimulatedCaller(
        url,
        auth_token=auth_token,
        public_url=public_url,
        from_=from_,
        to=to,
        partials=partials,
        timeout=timeout,
        on_event=LivePrinter(out) if turns is None else None,
    )
    try:
        code = asyncio.run(_run(caller, turns, tty))
    except CallError as exc:
        raise fail(exc, 1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: hung up[/]")
        raise typer.Exit(130) from None
    raise typer.Exit(code)
