"""``crctl up``: tunnel + relay + pointed number + live call log, in one command.

Everything is put back on exit.

The number's previous voice settings are saved in the state file (``up`` sessions, with this
process's pid) before it is pointed at the tunnel. Ctrl-C or SIGTERM puts them back; if the
process dies without that (SIGKILL, a crash, a closed laptop), the next ``crctl up`` finds the
session of a dead pid and puts them back first.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl import options as opts
from crctl import up_sessions
from crctl.call_script import load_script, play_script
from crctl.caller import SimulatedCaller
from crctl.caller.speaker import DEFAULT_TIME_SCALE, Timing
from crctl.console import crctl_command, runnable
from crctl.credentials import resolve
from crctl.environment import current
from crctl.errors import CrctlError
from crctl.hosts import is_this_machine
from crctl.provisioning import Twilio
from crctl.serve import Relay, _setup_logging, bind, build_relay, run_relay, until_listening
from crctl.settings import Settings, SettingsError, load_settings
from crctl.state import State
from crctl.tunnel import Tunnel, open_tunnel
from relay_server.events import CallEvent, EventBus

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Session:
    """What this ``crctl up`` changed, to undo on exit."""

    tunnel: Tunnel | None = None
    twilio: Twilio | None = None
    #: The numbers pointed at the tunnel: ``--number``'s, then the routes' (``--routes``).
    numbers: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def number(self) -> Any:
        """The first number pointed (``None``: none)."""
        return self.numbers[0] if self.numbers else None


def restore(session: Session, state: State) -> None:
    """Undo this session: the number's previous webhook, then the tunnel.

    Each step is guarded, so the tunnel closes even if Twilio cannot be reached.
    """
    twilio = session.twilio
    for number in session.numbers:
        if twilio is None:
            break
        try:
            result = up_sessions.put_back(twilio, state, number.sid, dead_only=False)
            if result is not None:
                console.print(f"[green]✓[/] restored: {escape(result)}")
        except CrctlError as exc:
            text = (
                f"{exc} — the next `crctl up` or `crctl numbers restore "
                f"{number.phone_number}` will put it back"
            )
            console.print(f"[bold red]error:[/] {escape(runnable(text))}")
    session.numbers.clear()
    if session.tunnel is not None:
        try:
            session.tunnel.close()
            console.print("[green]✓[/] tunnel closed")
        except Exception as exc:  # the tunnel library's own failure must not stop the exit
            console.print(f"[bold red]error:[/] closing the tunnel: {escape(str(exc))}")
        session.tunnel = None


@contextlib.contextmanager
def _interruptible_setup() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C while ``up`` is getting ready.

    So the ``finally`` that puts things back runs for both (the relay installs its own handlers
    once it serves).
    """

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_restore(session: Session, state: State) -> None:
    """Restore with SIGINT/SIGTERM ignored: a second Ctrl-C must not cut the restore short."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        restore(session, state)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def up(
    port: opts.Port = None,
    public_url: Annotated[
        Optional[str],
        opts.setting_option(
            "public_url", "URL", "Your own tunnel or host, instead of opening an ngrok tunnel."
        ),
    ] = None,
    no_tunnel: Annotated[
        bool, typer.Option("--no-tunnel", help="Local only: no tunnel, no number.")
    ] = False,
    number: Annotated[
        Optional[str],
        typer.Option(
            metavar="NUMBER",
            help="Number to point at this run, +E164 or PN…. (env CRCTL_NUMBER)",
        ),
    ] = None,
    profile: Annotated[
        Optional[str], typer.Option(metavar="NAME", help="twilio-cli profile for the credentials.")
    ] = None,
    call_script: Annotated[
        Optional[Path],
        typer.Option(
            "--call",
            metavar="SCRIPT",
            help="Once up, play this `crctl call` script against the relay (no phone needed), "
            "then stop; the exit code is the script's.",
        ),
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale",
            min=0,
            help="With --call: multiply the simulated caller's delays (speaking, agentSpeaking "
            "on, the greeting), as in `crctl call`; 0 waits for nothing.",
        ),
    ] = DEFAULT_TIME_SCALE,
    agent: opts.Agent = None,
    app_dir: opts.AppDir = None,
    model: opts.Model = None,
    openai_base_url: opts.OpenAIBaseUrl = None,
    system_prompt: opts.SystemPrompt = None,
    system_prompt_file: opts.SystemPromptFile = None,
    tools: opts.Tools = None,
    twiml_template: opts.TwimlTemplate = None,
    routes: opts.Routes = None,
    welcome_greeting: opts.WelcomeGreeting = None,
    handoff_number: opts.HandoffNumber = None,
    llm_timeout: opts.LlmTimeout = None,
    llm_usage: opts.LlmUsage = None,
    apology: opts.Apology = None,
    machine_message: opts.MachineMessage = None,
    filler_after_ms: opts.FillerAfterMs = None,
    silence_timeout: opts.SilenceTimeout = None,
    dtmf_buffer: opts.DtmfBuffer = None,
    events_db: opts.EventsDb = None,
    events_keep_days: opts.EventsKeepDays = None,
    events_max_rows: opts.EventsMaxRows = None,
    redis_url: opts.RedisUrl = None,
    metrics_port: opts.MetricsPort = None,
    log_level: Annotated[
        str,
        typer.Option(
            metavar="LEVEL",
            help="Relay log level: DEBUG, INFO, WARNING or ERROR (below the live call log).",
        ),
    ] = "WARNING",
) -> None:
    """Tunnel + relay + your number pointed at it + live call log; Ctrl-C puts it all back."""
    flags = opts.settings_flags(locals())  # the parameters named as a setting
    state = State()
    session = Session()
    try:
        # A known failure here propagates: the `finally` puts back what was changed, then the
        # CLI prints it as one line with its exit code (crctl.errors).
        with _interruptible_setup():
            relay, settings, sock, turns, warnings, bus = _prepare(
                state, session, no_tunnel, number or current().number, profile, call_script, flags
            )
        _setup_logging(settings.log_level or "WARNING", events_shown=True)
        _panel(settings, relay, session, warnings)
        bus.subscribe(_printer())
        # A signal between here and the relay's own handlers is a normal stop, not a crash.
        early = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: early.set())
        # the same event loop as `crctl serve` (uvloop where installed): one relay, one behaviour
        from crctl.serve import event_loop_factory

        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            timing = Timing(time_scale=time_scale)
            code = runner.run(_serve(relay.app, settings, sock, turns, early, timing))
    except KeyboardInterrupt:
        code = 130
    finally:
        console.print("stopping…")
        _quiet_restore(session, state)
    raise typer.Exit(code)


def _prepare(
    state: State,
    session: Session,
    no_tunnel: bool,
    number: str | None,
    profile: str | None,
    call_script: Path | None,
    flags: dict[str, Any],
) -> tuple[Any, ...]:
    """Everything before serving; a known failure that stops it is raised."""
    turns = load_script(call_script) if call_script is not None else None
    settings = load_settings(**flags)
    sock = bind(settings)
    # Local only needs no Twilio: without credentials there is nothing to say.
    twilio = _twilio(profile, session, state, quiet=no_tunnel)
    if twilio is not None:
        with console.status("checking for numbers left pointed by an earlier run…"):
            done, problems = up_sessions.repair(twilio, state)
        for line in done:
            console.print(f"[yellow]![/] {escape(line)}")
        session.notes.extend(problems)
    public = None if no_tunnel else settings.public_url
    if public is None and not no_tunnel:
        public = _tunnel(settings.port, session)
    update: dict[str, Any] = {"public_url": public}
    if public is None and is_this_machine(settings.host):
        # Local only: nothing but this machine reaches the relay, and there is no public
        # URL to check Twilio's signatures against.
        update["verify_signatures"] = False
    settings = settings.model_copy(update=update)
    problems, warnings = settings.startup_problems()
    if public is None:
        warnings = [w for w in warnings if "signature checks are OFF" not in w]
    if problems:
        raise SettingsError(problems[0])
    bus = EventBus()
    relay = build_relay(settings, events=bus)
    routed = [n for route in relay.routes for n in route.spec.numbers]
    if twilio is not None and public is not None:
        _point(twilio, state, number, public + "/twiml", session, required=not routed)
        for extra in routed:  # inbound calls are routed by the number called: same /twiml
            _point_routed(twilio, state, extra, public + "/twiml", session)
    elif (number or routed) and (twilio is not None or no_tunnel):
        for unpointed in [*([number] if number else []), *routed]:
            session.notes.append(f"{unpointed} was not pointed: local-only (no tunnel)")
    return relay, settings, sock, turns, warnings, bus


async def _serve(
    app: Any,
    settings: Settings,
    sock: Any,
    turns: list[Any] | None,
    early: threading.Event,
    timing: Timing | None = None,
) -> int:
    """Run the relay until a signal; with ``turns``, call it once it is up, then stop.

    The caller plays Twilio's timing (``timing``: speaker events, tokensPlayed at a speaking
    rate), so the call log shows each turn's caller wait as a phone call would.
    """
    stop = asyncio.Event()
    relay = asyncio.create_task(run_relay(app, settings, stop=stop, sock=sock))

    async def watch_early() -> None:
        while not stop.is_set():
            if early.is_set():
                stop.set()
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch_early())
    relay.add_done_callback(lambda _: watcher.cancel())
    if turns is None:
        await relay
        return 0
    try:
        await until_listening(settings.port)
        token = settings.twilio_auth_token
        caller = SimulatedCaller(
            f"http://127.0.0.1:{settings.port}",
            auth_token=token.get_secret_value() if token is not None else None,
            public_url=settings.public_url,
            timeout=15.0,
            timing=timing,
        )
        await caller.connect(await caller.fetch())
        return await play_script(caller, turns, console)
    finally:
        # a CallError goes on to the CLI's handler once the relay has stopped
        stop.set()
        await relay


def _twilio(
    profile: str | None, session: Session, state: State, quiet: bool = False
) -> Twilio | None:
    try:
        twilio = Twilio(resolve(profile=profile), state)
    except CrctlError as exc:
        if not quiet:
            session.notes.append(
                f"Twilio not configured ({exc}); no number is pointed — test with `crctl call` "
                "instead"
            )
        return None
    session.twilio = twilio
    return twilio


def _tunnel(port: int, session: Session) -> str | None:
    try:
        with console.status("opening the tunnel…"):
            session.tunnel = open_tunnel(port)
    except CrctlError as exc:
        session.notes.append(f"no tunnel: {exc}; running local-only")
        return None
    console.print(f"[green]✓[/] tunnel {session.tunnel.public_url} → 127.0.0.1:{port}")
    return session.tunnel.public_url


def _point(
    twilio: Twilio,
    state: State,
    number: str | None,
    url: str,
    session: Session,
    *,
    required: bool = True,
) -> None:
    if not number:
        if required:
            session.notes.append(
                "no number given (--number or CRCTL_NUMBER): none is pointed; "
                "`crctl provision-number` gets one"
            )
        return
    with console.status(f"pointing {number} at {url}…"):
        found = twilio.number(number)
        if any(pointed.sid == found.sid for pointed in session.numbers):
            return  # --number is also a route's
        # saved before the change: a crash right after it is still repairable
        up_sessions.claim(twilio, state, found, url)
        session.numbers.append(found)
        twilio.set_voice_url(found, url)
    console.print(f"[green]✓[/] {found.phone_number} → {url} (previous webhook saved)")


def _point_routed(twilio: Twilio, state: State, number: str, url: str, session: Session) -> None:
    """Point a number of the routes file; one that cannot be pointed is a note, not a stop."""
    try:
        _point(twilio, state, number, url, session)
    except CrctlError as exc:
        session.notes.append(f"route number {number} was not pointed: {exc}")


def _panel(settings: Settings, relay: Relay, session: Session, warnings: list[str]) -> None:
    local = f"http://127.0.0.1:{settings.port}"
    table = Table(show_header=False, box=None, title="crctl up", title_justify="left")
    table.add_row("relay", local)
    table.add_row("public URL", settings.public_url or "[yellow]none (local only)[/]")
    pointed = ", ".join(number.phone_number for number in session.numbers)
    table.add_row("numbers" if len(session.numbers) > 1 else "number", pointed or "-")
    if session.twilio is not None:
        table.add_row(
            "account", f"{session.twilio.account_sid} ({session.twilio.credentials.source})"
        )
    table.add_row("agent", escape(relay.agent_text))
    if relay.routes:
        table.add_row("routes", escape(relay.routes_text))
    if relay.llm is not None:
        table.add_row("LLM", escape(relay.llm_text))
        table.add_row("model", escape(relay.model_text))
    try_it = f"{crctl_command()} call {local}"
    if settings.public_url:
        # the relay checks signatures against its public URL: the caller must sign that one
        try_it += f" --public-url {settings.public_url}"
    console.print(table)
    # outside the table and never wrapped: a command broken over two lines does not paste
    console.print(f"try it: {escape(try_it)}", soft_wrap=True, highlight=False)
    for note in [*warnings, *relay.warnings, *session.notes]:
        console.print(f"[yellow]![/] {escape(runnable(note))}")
    console.print("[dim]calls appear below; Ctrl-C stops and puts everything back[/]")


def _printer() -> Any:
    """An event subscriber that never blocks the relay.

    Events go through a bounded queue to a printing thread (a paused terminal or an unread
    pipe must not stall calls).
    """
    from crctl.console import CallLog

    log = CallLog(console)
    pending: queue.Queue[CallEvent] = queue.Queue(maxsize=10_000)

    def printer() -> None:
        while True:
            log.add(pending.get())  # typed: rendered as it is, no round trip through a dict

    threading.Thread(target=printer, name="crctl-up-log", daemon=True).start()

    def show(event: CallEvent) -> None:
        with contextlib.suppress(queue.Full):  # drop rather than stall a call
            pending.put_nowait(event)

    return show
