"""``crctl serve``: run the relay (uvicorn serving the Quart app) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from crctl import options as opts
from crctl.console import crctl_command, err
from crctl.settings import (
    Settings,
    SettingsError,
    api_token_path,
    ensure_api_token,
    load_settings,
)
from crctl.workers import is_worker, run_workers
from relay_server.config import RelayConfig
from relay_server.events import SAID_BY_EVENT, EventBus

if TYPE_CHECKING:
    # The server's libraries are imported when the relay is built, not with this module, so
    # a bad setting is reported without loading them (and `crctl serve --help` is quick).
    import uvicorn
    from quart import Quart

    from relay_server.llm import LLMCheck
    from relay_server.metrics import MetricsServer
    from relay_server.routing import Route


def serve(
    host: opts.Host = None,
    port: opts.Port = None,
    public_url: opts.PublicUrl = None,
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
    verify_signatures: opts.VerifySignatures = None,
    llm_timeout: opts.LlmTimeout = None,
    llm_usage: opts.LlmUsage = None,
    apology: opts.Apology = None,
    machine_message: opts.MachineMessage = None,
    filler_after_ms: opts.FillerAfterMs = None,
    silence_timeout: opts.SilenceTimeout = None,
    dtmf_buffer: opts.DtmfBuffer = None,
    log_level: opts.LogLevel = None,
    events_db: opts.EventsDb = None,
    events_keep_days: opts.EventsKeepDays = None,
    events_max_rows: opts.EventsMaxRows = None,
    redis_url: opts.RedisUrl = None,
    drain_timeout: opts.DrainTimeout = None,
    workers: opts.Workers = None,
    metrics_port: opts.MetricsPort = None,
) -> None:
    """Run the relay: /twiml, /ws, /action, /status, /healthz, /readyz."""
    flags = opts.settings_flags(locals())  # every parameter is the setting of its name
    # a SettingsError or the relay's ConfigError ends here: the CLI prints it, exit code 2
    settings = load_settings(**flags)
    problems, warnings = settings.startup_problems()
    if problems:
        raise SettingsError(problems[0])
    if settings.workers > 1 and not is_worker():
        # The supervisor: N `crctl serve` children of these same arguments share the port.
        raise typer.Exit(run_workers(settings))
    relay = build_relay(settings)
    config, app = relay.config, relay.app
    sock = bind(settings)
    _setup_logging(settings.log_level)
    for warning in [*warnings, *relay.warnings]:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}")
    local = f"http://{_url_host(settings.host)}:{settings.port}"
    base = settings.public_url or local
    err.print(f"[bold green]crctl relay[/] listening on {local}")
    err.print(f"  TwiML (voice webhook): {base}/twiml   WebSocket: {config.websocket_url(local)}")
    err.print(f"  agent: {escape(relay.agent_text)}")
    if relay.routes:
        err.print(
            f"  routes: {escape(relay.routes_text)} from {escape(str(config.routes_file))}; "
            "other calls get the agent above"
        )
    if relay.llm is not None:
        err.print(f"  LLM: {escape(relay.llm_text)}   model: {escape(relay.model_text)}")
    stored = config.events_db or "memory only"
    err.print(
        f"  call log: {crctl_command()} tail --url {local}   (events in {escape(stored)}; "
        f"API token from {escape(relay.token_from)})"
    )
    if relay.metrics_server is not None:
        err.print(f"  metrics: {metrics_url(settings)} (no token: keep this port private)")
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run_relay(app, settings, sock=sock))
    finally:
        relay.close()


def metrics_url(settings: Settings) -> str:
    """Where ``--metrics-port`` serves the metrics."""
    return f"http://{_url_host(settings.host)}:{settings.metrics_port}/metrics"


def open_metrics_port(settings: Settings, registry: Any) -> MetricsServer:
    """Serve ``registry`` on ``--metrics-port`` (plain HTTP, no token), in a thread.

    Raises:
        SettingsError: the port cannot be listened on (one line).
    """
    from relay_server.metrics import serve_metrics

    assert settings.metrics_port is not None
    try:
        return serve_metrics(settings.host, settings.metrics_port, registry)
    except OSError as exc:
        raise SettingsError(
            f"setting metrics_port (CRCTL_METRICS_PORT): cannot listen on "
            f"{settings.host}:{settings.metrics_port}: {exc.strerror or exc}; pick another with "
            "--metrics-port"
        ) from None


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop of uvloop where it is installed, else ``None`` (asyncio's own).

    uvloop takes 5-10 % off the relay's CPU per token at 200 calls (bench/); it is
    a dependency except on Windows and PyPy, where the relay runs on asyncio's loop.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


@dataclass
class Relay:
    """The relay built from settings, and how to describe it."""

    app: Quart
    config: RelayConfig
    agent_cls: type
    #: Where the API token came from (the variable, or the token file crctl made).
    token_from: str
    #: What the start-up check of the LLM found (``None``: the agent uses no LLM).
    llm: LLMCheck | None = None
    #: The ``--metrics-port`` server of this process, if it has one.
    metrics_server: MetricsServer | None = None
    #: The routes of ``--routes`` (none: every call gets the settings above).
    routes: tuple[Route, ...] = ()

    @property
    def routes_text(self) -> str:
        """The routes in words: each name with its numbers."""
        return ", ".join(
            f"{route.name} ({' '.join(route.spec.numbers) or 'by name only'})"
            for route in self.routes
        )

    def close(self) -> None:
        """Stop what the relay opened besides the app (the ``--metrics-port`` server)."""
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    @property
    def llm_text(self) -> str:
        """The LLM's base URL, or "OpenAI" for the official API."""
        return self.config.llm.base_url or "OpenAI"

    @property
    def model_text(self) -> str:
        """The model, and how it was chosen when it was not given."""
        model = self.config.agent_config.model
        if self.llm is None or self.llm.source == "given":
            return model
        return f"{model} ({self.llm.source})"

    @property
    def warnings(self) -> list[str]:
        """One-line warnings about the LLM (not reachable, key refused…), not fatal."""
        return [self.llm.warning] if self.llm is not None and self.llm.warning else []

    @property
    def agent_text(self) -> str:
        """The agent in words, saying why when it is the offline echo agent."""
        from relay_server.agents import EchoAgent, LLMAgent

        if self.agent_cls is EchoAgent and self.config.agent is None:
            return (
                "echo — no OPENAI_API_KEY is set, so the relay repeats what the caller says "
                "(set OPENAI_API_KEY, or OPENAI_BASE_URL for a local model)"
            )
        if issubclass(self.agent_cls, LLMAgent) and self.llm is None:
            return f"{self.agent_cls.__name__}, model {self.config.agent_config.model}"
        return self.agent_cls.__name__  # the LLM and model have lines of their own


def build_relay(settings: Settings, events: EventBus | None = None) -> Relay:
    """The app for ``settings`` (``crctl serve`` and ``crctl up`` alike).

    Without ``CRCTL_API_TOKEN`` the relay is still authenticated: it uses the token file crctl
    makes once, where ``crctl tail`` finds it. With ``--metrics-port`` (and not a worker of
    ``--workers``, whose supervisor serves that port) the metrics port is opened here; close it
    with :meth:`Relay.close`.
    """
    from relay_server.agents import LLMAgent
    from relay_server.app import create_app, resolve_agent

    config = settings.relay_config()
    token_from = "CRCTL_API_TOKEN"
    if config.api_token is None:
        config = replace(config, api_token=ensure_api_token())
        token_from = str(api_token_path())
    if config.redis_url:
        from relay_server.cluster import check_redis

        check_redis(config.redis_url)  # one line and exit 2 when Redis does not answer
    routes: tuple[Route, ...] = ()
    if config.routes_file:
        from relay_server.routing import load_routes

        routes = load_routes(config.routes_file)  # one line and exit 2, before the LLM is asked
    agent_cls = resolve_agent(config)
    for route in routes:
        if route.spec.agent == "llm" and not (config.llm.api_key or config.llm.base_url):
            raise SettingsError(
                f"{config.routes_file}: route {route.name}: key agent: value 'llm' talks to an "
                "LLM and none is configured: set OPENAI_API_KEY, or OPENAI_BASE_URL for a "
                "local model"
            )
    llm = None
    if issubclass(agent_cls, LLMAgent):
        if not (config.llm.api_key or config.llm.base_url):
            # Caught here, not at the first call's 401: the default agent falls back to echo,
            # an agent chosen by name is taken at its word.
            raise SettingsError(
                f"agent {config.agent or 'llm'} ({agent_cls.__name__}) talks to an LLM and none "
                "is configured: set OPENAI_API_KEY, or OPENAI_BASE_URL for a local model"
            )
        from relay_server.llm import check_llm

        # GET /models once: picks the local server's only model when none was chosen, and
        # warns now, not at the first call, when the LLM cannot be reached.
        llm = check_llm(config.llm, settings.model, config.agent_config.model)
        config = replace(config, agent_config=replace(config.agent_config, model=llm.model))
    app = create_app(config, events=events, agent=agent_cls)
    relay = Relay(app, config, agent_cls, token_from, llm, routes=routes)
    if settings.metrics_port is not None and not is_worker():
        from relay_server.metrics import EXTENSION

        relay.metrics_server = open_metrics_port(settings, app.extensions[EXTENSION].registry)
    return relay


def bind(settings: Settings) -> socket.socket:
    """Bind the listening socket before anything says "listening".

    So a busy port is one clear error instead of a server that starts and dies.
    """
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the
    # listening socket says so, and Nagle would hold a call's first token ~20 ms (bench/).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if is_worker():  # --workers: every worker listens on the port (see crctl.workers)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise SettingsError(
            f"setting port (CRCTL_PORT): cannot listen on {settings.host}:{settings.port}: "
            f"{exc.strerror}; pick another with --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _setup_logging(level: str, events_shown: bool = False) -> None:
    """Log lines to stderr.

    ``events_shown``: the call log renders the call events (``crctl up``), so a log line that
    says the same as an event (marked with ``relay_server.events.said_by``) is left out.
    """
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if events_shown:
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda record: not hasattr(record, SAID_BY_EVENT))
    # One line per LLM request is noise next to the relay's own call log.
    for name in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(name).setLevel(max(logging.WARNING, getattr(logging, level)))


#: Seconds a client has to send a request's headers, from its first byte (or from the connection
#: when it sends nothing): uvicorn's h11 server has no such timeout (its ``timeout_keep_alive``
#: only runs between requests), so a client dribbling headers held a connection for ever.
HEADER_TIMEOUT = 10.0

log = logging.getLogger("crctl.serve")


def server_config(
    app: Quart, settings: Settings, *, header_timeout: float = HEADER_TIMEOUT
) -> uvicorn.Config:
    """Uvicorn settings for the relay.

    Uvicorn's sans-I/O websockets protocol is the leanest ASGI WebSocket server measured here
    (bench/). Per-message deflate is off: ConversationRelay frames are tiny JSON, and zlib's
    contexts cost about 45 KiB per idle call and CPU on every token. HTTP is uvicorn's h11
    server with a deadline for the headers (:data:`HEADER_TIMEOUT`); its other limits stay
    uvicorn's: 5 s keep-alive between requests, 16 KiB of headers (larger: 400).
    """
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=_h11_with_header_timeout(header_timeout),
        ws=_lean_websockets_sansio(),
        ws_per_message_deflate=False,
        # Larger than the relay's own limit, so an oversized frame is logged and dropped by the
        # relay (the call goes on) instead of the server closing the socket.
        ws_max_size=max(256 * settings.max_frame_bytes, 16 << 20),
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=3,
    )


def _lean_websockets_sansio() -> type[asyncio.Protocol]:
    """Uvicorn's sans-I/O websockets protocol, without the handshake kept for the socket's life.

    Uvicorn keeps the upgrade request and the 101 response (their header objects) on every
    connection, and reads neither once the socket is accepted: dropping them then takes about
    4 KiB off each idle call, 1.2 KiB more with the headers emptied (bench/, tracemalloc).
    """
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class LeanWebSocketsSansIO(WebSocketsSansIOProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The same calls, without the five deques of an asyncio.Queue and Event. Only where
            # this uvicorn has them as the locked one does (a newer one may not): else as is.
            if type(getattr(self, "queue", None)) is asyncio.Queue:
                self.queue = _Inbox()  # type: ignore[assignment]
            if type(getattr(self, "writable", None)) is asyncio.Event:
                self.writable = _Flag()  # type: ignore[assignment]

        def start_keepalive(self) -> None:
            # Called once, right after the 101 response went out.
            if hasattr(self, "request") and hasattr(self, "response"):
                # The parser generator of websockets keeps the request in its frame as well:
                # its headers are emptied in place, so no holder keeps them.
                headers = getattr(self.request, "headers", None)
                if headers is not None and hasattr(headers, "clear"):
                    headers.clear()
                self.request = self.response = None  # type: ignore[assignment]
            super().start_keepalive()

    return LeanWebSocketsSansIO


class _Inbox:
    """What uvicorn's WebSocket protocol uses of :class:`asyncio.Queue`, in a list.

    ``put_nowait``, ``get`` and ``empty``, in order; an empty queue costs two small slots
    instead of four deques (about 2.5 KiB per idle call, bench/).
    """

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._getters: list[asyncio.Future[None]] | None = None

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def _wake(self) -> None:
        for getter in self._getters or ():
            if not getter.done():
                getter.set_result(None)
                return

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                if self._items and getter.done() and not getter.cancelled():
                    self._wake()  # it was woken for an item it will not take: pass it on
                raise
            finally:
                self._getters.remove(getter)
                if not self._getters:
                    self._getters = None
        return self._items.pop(0)


class _Flag:
    """What uvicorn's WebSocket protocol uses of :class:`asyncio.Event` (set at the start)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            waiters, self._waiters = self._waiters, None
            for waiter in waiters or ():
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
        return True


def _h11_with_header_timeout(timeout: float) -> type[asyncio.Protocol]:
    """Uvicorn's h11 protocol, closing a connection whose request headers are late.

    Headers not complete ``timeout`` seconds after the connection (for a kept-alive
    connection's next request, after that request's first byte) close it: a partial request
    gets ``408``, a silent connection is just closed; one log line each.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class H11HeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # IDLE: the request line and headers are not complete yet (h11's state machine).
            if self.conn.their_state is not h11.IDLE:
                self._stop_header_timer()
            elif self._header_timer is None:  # the first byte of a next keep-alive request
                self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            partial = bool(self.conn.trailing_data[0])
            peer = self.client[0] if self.client else "?"
            log.warning(
                "closed HTTP connection from %s: %s within %g s",
                peer,
                "request headers not complete" if partial else "no request",
                timeout,
            )
            if partial:
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                    b"content-length: 24\r\nconnection: close\r\n\r\nrequest header timeout\r\n"
                )
            self.transport.close()

    return H11HeaderTimeout


def _one_line_invalid_utf8(record: logging.LogRecord) -> bool:
    """One warning line, not a traceback, for a text frame that is not UTF-8.

    Uvicorn logs such a frame with a traceback (then closes the socket with 1007, which is
    right); it is the client's fault, not the relay's.
    """
    if record.msg == "Invalid UTF-8 sequence received from client.":
        record.msg = "closed a WebSocket with 1007: a text frame was not valid UTF-8"
        record.args = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


def _server(config: uvicorn.Config) -> uvicorn.Server:
    """Uvicorn, with SIGINT/SIGTERM handled by :func:`run_relay`.

    A signal gives exit code 0 after a clean stop rather than being re-raised after shutdown.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


#: Seconds between a worker's looks at its supervisor (where pidfds are not available).
ORPHAN_CHECK = 1.0


async def _drain_when_orphaned(drain: Callable[[], None]) -> None:
    """A worker of ``--workers`` whose supervisor died (even by SIGKILL) drains and stops.

    It would otherwise serve on, unmanaged, holding the port. Linux tells the worker through a
    pidfd of the supervisor, which turns readable when it exits; elsewhere the worker looks at
    its parent every :data:`ORPHAN_CHECK` seconds.
    """
    from crctl.workers import supervisor_pid

    supervisor = supervisor_pid()
    if supervisor is None:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        fd = os.pidfd_open(supervisor)
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone
        fd = None
    if fd is not None:
        loop.add_reader(fd, gone.set)
        try:
            await gone.wait()
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    else:
        while os.getppid() == supervisor:  # noqa: ASYNC110 (no event to wait on here)
            await asyncio.sleep(ORPHAN_CHECK)
    log.warning("the --workers supervisor (pid %s) is gone: draining and stopping", supervisor)
    drain()


#: Seconds an in-process relay (``up --call``, ``crctl test``) has to accept connections.
LISTEN_WAIT = 10.0


async def until_listening(port: int, timeout: float = LISTEN_WAIT) -> None:  # noqa: ASYNC109
    """Return once something accepts connections on 127.0.0.1:``port``.

    Raises:
        CrctlError: nothing did within ``timeout`` seconds.
    """
    from crctl.errors import CrctlError

    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                return
    except TimeoutError:
        raise CrctlError(f"the relay did not start listening on port {port}") from None


async def run_relay(
    app: Quart,
    settings: Settings,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
    *,
    header_timeout: float = HEADER_TIMEOUT,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM or until ``stop`` is set.

    SIGTERM drains first (:func:`relay_server.drain.run_drain`: new calls refused, live ones go
    on up to ``settings.drain_timeout``); SIGINT stops now. A second signal forces the exit
    without waiting for open calls. ``header_timeout``: see :data:`HEADER_TIMEOUT`.
    """
    from relay_server.app import end_streams
    from relay_server.drain import run_drain
    from relay_server.state import relay_state

    server = _server(server_config(app, settings, header_timeout=header_timeout))
    logging.getLogger("uvicorn.error").addFilter(_one_line_invalid_utf8)  # once: same object
    # Everything alive now (imports, the app) lives as long as the process: keep it out of the
    # collector's way, or full collections over ~230k objects stall every call (bench/).
    gc.collect()
    gc.freeze()
    # Full collections walk every live call's objects (~36 ms at 200 calls, bench/ --probe);
    # the relay's garbage is mostly acyclic, so run them 10x less often than the default.
    gen0, gen1, _ = gc.get_threshold()
    gc.set_threshold(gen0, gen1, 100)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    draining: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        try:
            await run_drain(relay_state(app), settings.drain_timeout)
        finally:
            stop.set()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set() or draining:  # the second signal: now
            log.info("%s again: stopping now, open calls are cut", sig.name)
            server.force_exit = True
            stop.set()
        elif sig == signal.SIGTERM:
            draining.append(asyncio.create_task(drain_then_stop()))
        else:
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)

    async def watch() -> None:
        await stop.wait()
        server.should_exit = True
        end_streams(app)  # open /events streams would hold the shutdown until its timeout

    watcher = asyncio.create_task(watch())
    orphan = asyncio.create_task(_drain_when_orphaned(lambda: on_signal(signal.SIGTERM)))
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        watcher.cancel()
        orphan.cancel()
        for task in draining:
            task.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
