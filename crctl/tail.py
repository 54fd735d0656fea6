"""``crctl tail`` (the live call log) and ``crctl calls`` (stored calls and their transcripts).

``tail`` follows the relay's ``/events`` stream (Server-Sent Events) with the standard library's
``http.client``: no extra dependency, and proxies in the environment never get between a
developer and a local relay. It says when it is connected; when the relay goes away it says so
once, retries every ≤ 2 s, says when it is back and resumes with ``after=<last event id>``, so
nothing stored meanwhile is missed.

``calls`` reads the events database directly (``--db``, default ``~/.crctl/events.sqlite3``),
so it works whether the relay runs or not; ``--url`` asks a running relay instead.

The token: ``--token`` or ``CRCTL_API_TOKEN``, else the file ``crctl serve`` writes on this
machine (``~/.crctl/api-token``), read again at every reconnect.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlencode, urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from crctl.console import CallLog, calls_table, err, fail, print_call, runnable
from crctl.errors import CrctlError
from crctl.paths import api_token_path, default_events_db, read_api_token

DEFAULT_URL = "http://127.0.0.1:8080"
#: The relay sends a comment every 15 s; this long without a byte means it is gone.
READ_TIMEOUT = 45.0
MAX_BACKOFF = 2.0


class TailError(CrctlError):
    """The relay refused the request (bad token, bad ``--since``…): retrying will not help."""


# ---------------------------------------------------------------------------- HTTP
def _token(explicit: str | None, url: str = "http://127.0.0.1") -> str | None:
    """The token to send: the one given, else this machine's token file, but only to a relay
    on this machine (it is never sent to a remote --url)."""
    if explicit:
        return explicit
    host = urlsplit(url).hostname or ""
    return read_api_token() if host in ("127.0.0.1", "localhost", "::1") else None


def _refusal(url: str, status: int, body: bytes, token: str | None) -> TailError:
    try:
        reason = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        reason = body.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
    if status == 401 and token is None:
        reason += (
            f"; no token found: pass --token, set CRCTL_API_TOKEN, or run where `crctl serve` "
            f"wrote {api_token_path()}"
        )
    return TailError(f"{url}: {reason}")


def _connect(
    url: str, path: str, token: str | None, *, accept: str, timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET ``path`` on the relay at ``url``; a non-200 answer raises :class:`TailError`
    (4xx) or ``ConnectionError`` (5xx, worth retrying). Network errors are ``OSError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TailError(f"--url must be the relay's http(s):// address, got {url!r}")
    factory = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = factory(parts.hostname, parts.port, timeout=5)
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("GET", parts.path.rstrip("/") + path, headers=headers)
        response = conn.getresponse()
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
    except BaseException:
        conn.close()
        raise
    if response.status != 200:
        body = response.read()
        conn.close()
        if 400 <= response.status < 500:
            raise _refusal(url, response.status, body, token)
        raise ConnectionError(f"HTTP {response.status}")
    return conn, response


def _get_json(url: str, path: str, token: str | None) -> Any:
    try:
        conn, response = _connect(url, path, token, accept="application/json", timeout=10)
    except OSError as exc:
        raise TailError(f"cannot reach the relay at {url}: {exc}") from None
    try:
        return json.loads(response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------------------- SSE
def read_sse(lines: Iterable[bytes]) -> Iterator[tuple[str | None, str]]:
    """Server-Sent Events from raw lines: ``(id, data)`` per message (``data`` is ``""`` for a
    message that only moves the last event id). Comments and ``retry:`` are skipped."""
    event_id: str | None = None
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data or event_id is not None:
                yield event_id, "\n".join(data)
            event_id, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


class Follower:
    """Follows ``/events`` for ever: reconnects with backoff and resumes after the last id."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        call: str | None = None,
        since: str | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.call = call
        self.since = since
        self.read_timeout = read_timeout
        self.last_id: int | None = None

    def _path(self) -> str:
        query: dict[str, str] = {}
        if self.call:
            query["call"] = self.call
        if self.last_id is not None:
            query["after"] = str(self.last_id)
        elif self.since:
            query["since"] = self.since
        return "/events" + ("?" + urlencode(query) if query else "")

    def run(self, on_event: Callable[[str], None], notice: Callable[[str], None]) -> None:
        """Call ``on_event(json_text)`` per event and ``notice(text)`` when the connection
        comes and goes; returns only by an exception (:class:`TailError`, Ctrl-C)."""
        delay = 0.1
        connected_once = False
        away = False
        while True:
            try:
                conn, response = _connect(
                    self.url,
                    self._path(),
                    _token(self.token, self.url),
                    accept="text/event-stream",
                    timeout=self.read_timeout,
                )
            except (OSError, http.client.HTTPException):
                if not away:
                    notice(
                        "relay went away, reconnecting…"
                        if connected_once
                        else f"waiting for the relay at {self.url}…"
                    )
                    away = True
                time.sleep(delay)
                delay = min(MAX_BACKOFF, delay * 2)
                continue
            if not connected_once:
                notice(f"connected to {self.url}, following its calls (Ctrl-C stops)")
            else:  # after a drop, whether or not the first retry failed
                notice(f"reconnected to {self.url}")
            away, connected_once, delay = False, True, 0.1
            try:
                for event_id, data in read_sse(iter(response.readline, b"")):
                    if event_id:
                        self.last_id = int(event_id)
                    if data:
                        on_event(data)
            except (OSError, http.client.HTTPException, ValueError):
                pass  # the relay stopped or the line went quiet: reconnect
            finally:
                conn.close()


def tail(
    url: str = typer.Option(
        DEFAULT_URL,
        "--url",
        envvar="CRCTL_URL",
        metavar="URL",
        help="The relay's address. (env CRCTL_URL)",
    ),
    call: Optional[str] = typer.Option(None, "--call", metavar="CA…", help="Only this call."),
    since: Optional[str] = typer.Option(
        None,
        "--since",
        metavar="AGO",
        help="First show stored events this far back: 30s, 10m, 2h, 1d or an ISO time "
        "(default: only new events).",
    ),
    json_out: bool = typer.Option(
        False, "--json", help="One JSON object per line (for other tools)."
    ),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        envvar="CRCTL_API_TOKEN",
        metavar="TOKEN",
        help="The relay's API token. (env CRCTL_API_TOKEN; default ~/.crctl/api-token)",
    ),
) -> None:
    """Follow the relay's calls live: a transcript per call, latency, errors with the fix."""
    follower = Follower(url, token=token, call=call, since=since)
    if json_out:

        def on_event(data: str) -> None:
            sys.stdout.write(data.replace("\n", " ") + "\n")
            sys.stdout.flush()

    else:
        log = CallLog(Console(highlight=False))

        def on_event(data: str) -> None:
            try:
                event = json.loads(data)
            except ValueError:
                return
            log.add(event)

    def notice(text: str) -> None:
        err.print(f"[dim]{escape(text)}[/]")

    try:
        follower.run(on_event, notice)
    except TailError as exc:
        err.print(f"[bold red]error:[/] {escape(runnable(str(exc)))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# ---------------------------------------------------------------------------- calls
calls_app = typer.Typer(
    help="Stored calls and their transcripts: from the events database (works while the relay "
    "is down), or from a running relay with --url.",
    no_args_is_help=True,
)

_DB_HELP = "The events database. (env CRCTL_EVENTS_DB; default ~/.crctl/events.sqlite3)"
_URL_HELP = "Ask the relay at this address instead of reading the database."
_TOKEN_OPTION = typer.Option(
    None,
    "--token",
    envvar="CRCTL_API_TOKEN",
    metavar="TOKEN",
    help="The relay's API token, with --url. (env CRCTL_API_TOKEN; default ~/.crctl/api-token)",
)


def _db_path(db: Path | None) -> Path:
    if db is not None:
        return db.expanduser()
    from crctl.environment import current  # read once per command, with the .env files

    env = current().events_db
    return Path(env).expanduser() if env else default_events_db()


def _open_db(db: Path | None) -> Any:
    from relay_server.errors import RelayError
    from relay_server.store import EventStore

    path = _db_path(db)
    try:
        return EventStore(path, readonly=True)
    except RelayError as exc:
        raise TailError(f"{exc} (`crctl serve` creates it; --url asks a running relay)") from None


def _with_call_sid(call: dict[str, Any]) -> dict[str, Any]:
    """Every --json output names the call's SID ``call_sid`` (a relay from before said
    ``sid`` in /calls)."""
    if "call_sid" not in call and "sid" in call:
        call = {"call_sid": call["sid"], **{k: v for k, v in call.items() if k != "sid"}}
    return call


@calls_app.command("list")
def calls_list(
    limit: int = typer.Option(
        20, "--limit", min=1, max=1000, metavar="N", help="How many, newest first."
    ),
    db: Optional[Path] = typer.Option(None, "--db", metavar="FILE", help=_DB_HELP),
    url: Optional[str] = typer.Option(None, "--url", metavar="URL", help=_URL_HELP),
    token: Optional[str] = _TOKEN_OPTION,
    json_out: bool = typer.Option(False, "--json", help="One JSON object per call."),
) -> None:
    """List stored calls, newest first."""
    try:
        if url:
            calls = _get_json(url.rstrip("/"), f"/calls?limit={limit}", _token(token, url))["calls"]
        else:
            store = _open_db(db)
            try:
                calls = store.calls(limit)
            finally:
                store.close()
    except TailError as exc:
        raise fail(exc) from None
    if json_out:
        for call in calls:
            typer.echo(json.dumps(_with_call_sid(call)))
        return
    console = Console(highlight=False)
    if not calls:
        console.print("no calls stored yet")
        return
    console.print(calls_table(calls))


@calls_app.command("show")
def calls_show(
    sid: str = typer.Argument(..., help="The call's CA… sid (or its first 6+ characters)."),
    db: Optional[Path] = typer.Option(None, "--db", metavar="FILE", help=_DB_HELP),
    url: Optional[str] = typer.Option(None, "--url", metavar="URL", help=_URL_HELP),
    token: Optional[str] = _TOKEN_OPTION,
    json_out: bool = typer.Option(False, "--json", help="The call and its events as JSON."),
) -> None:
    """Show one stored call's transcript and events."""
    try:
        if url:
            call = _get_json(url.rstrip("/"), f"/calls/{quote(sid, safe='')}", _token(token, url))
        else:
            store = _open_db(db)
            try:
                call = store.call(sid)
            finally:
                store.close()
            if call is None:
                raise TailError(f"no stored call {sid} in {_db_path(db)}")
    except TailError as exc:
        raise fail(exc) from None
    if json_out:
        typer.echo(json.dumps(_with_call_sid(call)))
        return
    print_call(Console(highlight=False), call)
