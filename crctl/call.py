"""``crctl call``: call the relay as Twilio would, without a phone.

Interactive (type what the caller says and watch the reply stream in), scripted
(``--script conversation.yaml``: a pass/fail report, for CI) or driven by another program
(``--json``: JSON commands on stdin, JSON events on stdout). The protocol lives in
:mod:`crctl.caller` (:class:`~crctl.caller.SimulatedCaller`), the scripts in
:mod:`crctl.call_script` (their fault steps in :mod:`crctl.call_faults`), the driver in
:mod:`crctl.driver`; this module is the command and its printing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from crctl.caller import (
    DEFAULT_FROM,
    DEFAULT_TO,
    DEFAULT_URL,
    CallError,
    Reply,
    SimulatedCaller,
    Unreachable,
)
from crctl.caller.outcome import CallEvent, Closed
from crctl.caller.speaker import (
    DEFAULT_AGENT_SPEAKING_DELAY_MS,
    DEFAULT_SPEAKING_RATE,
    DEFAULT_TIME_SCALE,
    Timing,
)
from crctl.console import crctl_command, err
from crctl.hosts import is_this_machine
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

if TYPE_CHECKING:
    from prompt_toolkit.history import History

out = Console(highlight=False, soft_wrap=True)
_HELP = "Type what the caller says; /dtmf 1 presses keys, /interrupt barges in, /hangup ends."


class LivePrinter:
    """Prints a call as it happens: the reply streamed token by token, then its timing.

    With ``live=True`` (the interactive prompt) a reply being streamed is not printed piece by
    piece: it is kept in :attr:`live`, which the prompt shows above its input line, and printed
    whole once it ends, so every line printed is complete and lands above the prompt.
    """

    def __init__(self, console: Console, *, live: bool = False) -> None:
        self.out = console
        self.live_mode = live
        #: The reply being streamed (live mode), shown by the prompt until it is printed.
        self.live = ""
        #: Called when :attr:`live` changes (the prompt redraws).
        self.changed: Callable[[], None] = lambda: None
        self._open: Reply | None = None

    def _break(self) -> None:
        if self._open is not None:
            if self.live_mode:
                self.out.print(f"[bold cyan]agent:[/] {escape(self.live)}")
                self._set_live("")
            else:
                self.out.print()
            self._open = None

    def _set_live(self, text: str) -> None:
        self.live = text
        self.changed()

    def __call__(self, event: CallEvent) -> None:
        """Show one step of the call: a token joins its reply's line; other steps print a line."""
        match event:
            case TokenHeard(reply=reply, token=token):
                if self._open is not reply:
                    self._break()
                    if not self.live_mode:
                        self.out.print("[bold cyan]agent:[/] ", end="")
                    self._open = reply
                if self.live_mode:
                    self._set_live(self.live + token)
                else:
                    self.out.print(escape(token), end="")
            case ReplyDone(reply=reply):
                self._reply_done(reply)
            case _:
                self._break()
                self._print(event)

    def _reply_done(self, reply: Reply) -> None:
        ms = reply.first_token_ms
        timing = f"  [dim]{first_token(ms)}[/]" if ms is not None and reply.solicited else ""
        if self._open is reply:  # its text is on the line (or in live): close it
            line = f"[bold cyan]agent:[/] {escape(self.live)}" if self.live_mode else ""
        else:  # nothing said, or its text was printed before another event
            self._break()
            line = "" if reply.tokens else "[bold cyan]agent:[/] [dim](said nothing)[/]"
        self.out.print(f"{line}{timing}")
        self._open = None
        self._set_live("")

    def _print(self, event: CallEvent) -> None:
        match event:
            case Greeting(text=text):
                self.out.print(f"[bold cyan]agent:[/] {escape(text)} [dim](welcome greeting)[/]")
            case Interrupted(heard=heard):
                shown = escape(repr(heard))
                self.out.print(f"[yellow]  ↳ barged in; the caller heard: {shown}[/]")
            case Played(source=source):
                self.out.print(f"[cyan]agent plays[/] {escape(source)}")
            case DigitsSent(digits=digits):
                self.out.print(f"[cyan]agent sends digits[/] {escape(digits)}")
            case LanguageSwitched(tts_language=tts, transcription_language=stt):
                names = (("ttsLanguage", tts), ("transcriptionLanguage", stt))
                pairs = ", ".join(f"{k}={v}" for k, v in names if v is not None)
                self.out.print(f"[cyan]agent switches language[/] {escape(pairs)}")
            case Ended(handoff_data=data):
                extra = f": handoffData {data}" if data else ""
                self.out.print(f"[bold cyan]agent ended the call[/]{escape(extra)}")
            case Invalid(reason=reason, frame=frame):
                self.out.print(
                    f"[red]Twilio would reject this frame (64107): {escape(reason)}:[/] "
                    f"{escape(frame[:200])}"
                )
            case Dropped(reason=reason):
                self.out.print(f"[yellow]not sent: {escape(reason)}[/]")
            case Closed(outcome=outcome):
                self.out.print(f"[dim]call over: {escape(outcome.describe())}[/]")


def first_token(ms: float) -> str:
    """The latency of a turn, as crctl names it everywhere: ``first token 312 ms``."""
    return f"first token {ms:.0f} ms"


async def _command(caller: SimulatedCaller, line: str) -> tuple[bool, Reply | None]:
    """Act on one input line: (go on?, the reply to wait for, if any)."""
    text = line.strip()
    command, _, arg = text.partition(" ")
    if command == "/hangup":
        return False, None
    reply: Reply | None = None
    try:
        if not text:
            pass
        elif command == "/dtmf":
            reply = await caller.dtmf(arg.replace(" ", ""))
        elif command == "/interrupt":
            if not await caller.interrupt():
                out.print("[yellow]nothing to interrupt: the agent is not speaking[/]")
        elif command.startswith("/"):
            out.print(f"[dim]{_HELP}[/]")
        else:
            reply = await caller.say(text)
    except ValueError as exc:
        out.print(f"[yellow]{escape(str(exc))}[/]")
    except CallError:
        return False, None  # the call ended while sending
    return True, reply


def stdin_lines() -> asyncio.Queue[str | None]:
    """Stdin's lines as they come, read by a thread; ``None`` once it closes (or on ^C)."""
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
    return lines


async def _interactive(caller: SimulatedCaller, printer: LivePrinter | None) -> int:
    """Read what the caller says from stdin, a line at a time.

    Each reply is awaited before the next line is sent (a pipe or a file: the replies come in
    order).
    """
    loop = asyncio.get_running_loop()
    lines = stdin_lines()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, lambda: lines.put_nowait(None))
    try:
        while not caller.closed.is_set():
            line = await _next_line(lines, caller.closed)
            if line is None:
                break
            go_on, reply = await _command(caller, line)
            if not go_on:
                break
            if reply is not None and await caller.finished(reply, caller.timeout):
                wait = caller.caller_wait_ms(reply)
                if wait is not None:
                    out.print(f"[dim]  caller wait {wait:.0f} ms[/]")
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    await caller.hangup()
    return 0


def _history() -> History:
    """The prompt's history: ``call-history`` in crctl's state folder.

    In memory if that folder cannot be written.
    """
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    from crctl.paths import state_dir

    path = state_dir() / "call-history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))


async def _prompt(caller: SimulatedCaller, printer: LivePrinter) -> int:
    """The interactive caller on a terminal: a prompt with line editing and history (↑, ^R).

    Replies stream on a line of their own above it, and every other line prints above it too,
    so what the user is typing is never broken. Speaking while the agent talks barges in, as
    on a phone.
    """
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.patch_stdout import patch_stdout

    def message() -> FormattedText:
        parts = [("", "")]
        if printer.live:
            parts = [("bold ansicyan", "agent: "), ("", printer.live + "\n")]
        return FormattedText([*parts, ("bold ansigreen", "you> ")])

    session: PromptSession[str] = PromptSession(message, history=_history())
    printer.changed = session.app.invalidate
    out.print(f"[dim]{_HELP} ↑ and ^R search what you said; ^D hangs up.[/]")
    with patch_stdout(raw=True):
        while not caller.closed.is_set():
            asking = asyncio.ensure_future(session.prompt_async())
            closed = asyncio.ensure_future(caller.closed.wait())
            await asyncio.wait({asking, closed}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not asking.done():  # the agent ended the call: stop asking
                if session.app.is_running:
                    session.app.exit(exception=EOFError())
                with contextlib.suppress(EOFError, KeyboardInterrupt, asyncio.CancelledError):
                    await asking
                break
            try:
                line = asking.result()
            except (EOFError, KeyboardInterrupt):  # ^D, ^C
                break
            go_on, _ = await _command(caller, line)
            if not go_on:
                break
        await caller.hangup()
    return 0


async def _next_line(lines: asyncio.Queue[str | None], closed: asyncio.Event) -> str | None:
    getter = asyncio.ensure_future(lines.get())
    waiter = asyncio.ensure_future(closed.wait())
    done, pending = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return getter.result() if getter in done else None


def _defaults(
    url: str, auth_token: str | None, public_url: str | None
) -> tuple[str | None, str | None]:
    """Fill the auth token and the public URL from the settings ``crctl serve`` uses.

    Those are the environment, ``.env.local`` and ``.env``. The public URL only applies to a
    direct ``http://`` address: a relay reached that way is signed for as Twilio reaches it.
    """
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


async def _run(
    caller: SimulatedCaller,
    script: Any,
    printer: LivePrinter | None,
    max_caller_wait_ms: float | None = None,
) -> int:
    from crctl.call_script import play_script

    plan = await caller.fetch()
    via = "" if plan.connect_url == plan.ws_url else f" via {plan.connect_url}"
    out.print(
        f"[dim]call {caller.call_sid} from {caller.from_} to {caller.to}: "
        f"{escape(plan.ws_url)}{escape(via)}[/]"
    )
    await caller.connect(plan)
    if script is None and printer is not None and printer.live_mode:
        return await _prompt(caller, printer)
    if script is None:
        return await _interactive(caller, printer)
    if plan.welcome_greeting:
        out.print(f"[dim]welcome greeting: {escape(plan.welcome_greeting)}[/]")
    return await play_script(
        caller, script, Console(highlight=False), max_caller_wait_ms=max_caller_wait_ms
    )


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
        help="Sign requests as Twilio does. (default: TWILIO_AUTH_TOKEN from the environment, "
        ".env.local or .env, as the relay reads it)",
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
    agent_speaking_delay_ms: float = typer.Option(
        DEFAULT_AGENT_SPEAKING_DELAY_MS,
        "--agent-speaking-delay-ms",
        min=0,
        help="From a reply's first text to agentSpeaking on, as captured on real calls "
        '(with events="speaker-events" in the TwiML).',
    ),
    speaking_rate: float = typer.Option(
        DEFAULT_SPEAKING_RATE,
        "--speaking-rate",
        min=0.1,
        help="How fast the agent speaks, in characters a second (15: about 150 words a "
        "minute); tokensPlayed is sent per clause at that pace.",
    ),
    time_scale: float = typer.Option(
        DEFAULT_TIME_SCALE,
        "--time-scale",
        min=0,
        help="Multiply every simulated delay (speaking, agentSpeaking on, the greeting, "
        "partials, keys): 0 waits for nothing, the frames still in Twilio's order.",
    ),
    max_caller_wait_ms: Optional[float] = typer.Option(
        None,
        "--max-caller-wait-ms",
        min=0,
        help="With --script: fail any turn whose caller wait (clientSpeaking off to "
        "agentSpeaking on) is longer; a turn's expect: max_caller_wait_ms wins.",
    ),
    json_mode: bool = typer.Option(
        False,
        "--json",
        help="Drive the call from another program: one JSON command a line on stdin "
        '({"say": …}, {"dtmf": "12"}, {"interrupt": true}, {"wait": s}, {"hangup": true}), '
        "one JSON event a line on stdout.",
    ),
    example: bool = typer.Option(
        False,
        "--example",
        help="Print the example script (every key, explained) and exit: "
        "crctl call --example > my-agent.yaml. --script example plays it as it is.",
    ),
) -> None:
    """Call the relay as Twilio would, without a phone: type what the caller says, or play
    and check a --script.
    """  # noqa: D205 (the first paragraph is the command's line in `crctl --help`: cli.COMMANDS)
    from crctl.call_script import load_script

    if example:
        _print_example()
        raise typer.Exit(0)
    if json_mode and script is not None:
        raise CallError("--json drives the call from stdin; --script plays a file: pick one")
    # a bad script or setting is configuration (exit 2), said once by the root group
    turns = load_script(script) if script is not None else None
    auth_token, public_url = _defaults(url, auth_token, public_url)
    # a terminal gets the prompt; a pipe or a file is read a line per reply
    printer = None if turns is not None or json_mode else LivePrinter(out, live=_terminal())
    events = None
    if json_mode:
        from crctl.driver import JsonEvents

        events = JsonEvents()
    caller = SimulatedCaller(
        url,
        auth_token=auth_token,
        public_url=public_url,
        from_=from_,
        to=to,
        partials=partials,
        timeout=timeout,
        on_event=events or printer,
        timing=Timing(
            agent_speaking_delay_ms=agent_speaking_delay_ms,
            speaking_rate=speaking_rate,
            time_scale=time_scale,
        ),
    )
    try:
        if events is not None:
            from crctl.driver import drive

            code = asyncio.run(drive(caller, events, stdin_lines))
        else:
            code = asyncio.run(_run(caller, turns, printer, max_caller_wait_ms))
    except Unreachable as exc:  # the same error, with how to start a relay here
        raise Unreachable(f"{exc}{_start_hint(url)}") from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: hung up[/]")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


def _print_example() -> None:
    """The shipped example script on stdout, its comments naming crctl as it was run."""
    from crctl.call_script import example_path

    text = example_path().read_text(encoding="utf-8")
    crctl = crctl_command()
    if crctl != "crctl":
        text = "\n".join(
            line.replace("`crctl ", f"`{crctl} ") if line.startswith("#") else line
            for line in text.split("\n")
        )
    sys.stdout.write(text)


def _start_hint(url: str) -> str:
    """How to start a relay at ``url``, when it is on this machine."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not is_this_machine(parts.hostname):
        return ""
    port = parts.port or 80
    flag = "" if port == 8080 else f" --port {port}"
    return f"; is the relay running? `{crctl_command()} up --no-tunnel{flag}` starts one"
