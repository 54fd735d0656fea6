"""``crctl tail`` (the live call log) and ``crctl calls`` (stored calls and their transcripts).

``tail`` follows the relay's ``/events`` stream (Server-Sent Events, read by httpx-sse over an
httpx client that ignores proxies in the environment: none must get between a developer and a
local relay). It says when it is connected; when the relay goes away it says so once, retries
every ≤ 2 s, says when it is back and resumes with ``after=<last event id>``, so nothing stored
meanwhile is missed. Each message is decoded once into a typed call event for the console.

``calls`` reads the events database directly (``--db``, default ``~/.crctl/events.sqlite3``),
so it works whether the relay runs or not; ``--url`` asks a running relay instead.

The token: ``--token`` or ``CRCTL_API_TOKEN``, else the file ``crctl serve`` writes on this
machine (``~/.crctl/api-token``), read again at every reconnect.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import quote, urlencode, urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from crctl.console import CallLog, calls_table, err, print_call, print_usage
from crctl.errors import ConfigurationError, CrctlError, UsageError
from crctl.hosts import is_this_machine
from crctl.paths import api_token_path, default_events_db, read_api_token
from crctl.turns import USAGE_KINDS, Price, Usage, load_prices
from relay_server import events as ev

if TYPE_CHECKING:  # httpx is imported when a command talks to a relay: `--help` stays fast
    import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
#: ``--url`` of the commands that only talk to a relay (tail, calls stats).
_RELAY_URL_OPTION = typer.Option(
    None,
    "--url",
    metavar="URL",
    help=f"The relay's address. (env CRCTL_URL; default {DEFAULT_URL})",
    show_default=False,
)
#: The relay sends a comment every 15 s; this long without a byte means it is gone.
READ_TIMEOUT = 45.0
MAX_BACKOFF = 2.0


class TailError(CrctlError):
    """The call log could not be read: no database, no such call, the relay is unreachable."""


class TailRefused(TailError, ConfigurationError):
    """The relay refused the request (a wrong token, a bad ``--since``): fix it, then retry."""


class _Unavailable(Exception):
    """The relay answered 5xx: worth retrying."""


# ---------------------------------------------------------------------------- HTTP
def _token(explicit: str | None, url: str = "http://127.0.0.1") -> str | None:
    """The token to send: the one given, else this machine's token file for a local relay.

    The token file is only sent to a relay on this machine, never to a remote --url.
    """
    if explicit:
        return explicit
    from crctl.environment import current  # flags > environment > .env.local > .env

    if (configured := current().api_token_value()) is not None:
        return configured
    host = urlsplit(url).hostname or ""
    return read_api_token() if is_this_machine(host) else None


def _client(timeout: float, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """A client for the relay; ``trust_env=False``: no proxy from the environment."""
    import httpx

    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=5.0), trust_env=False, transport=transport
    )


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url must be the relay's http(s):// address, got {url!r}")
    return url.rstrip("/")


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _check(url: str, response: httpx.Response, token: str | None) -> None:
    """A non-200 answer raises :class:`TailError` (4xx) or :class:`_Unavailable` (5xx)."""
    if response.status_code == 200:
        return
    body = response.read()
    if 400 <= response.status_code < 500:
        raise _refusal(url, response.status_code, body, token)
    raise _Unavailable(f"HTTP {response.status_code}")


def _refusal(url: str, status: int, body: bytes, token: str | None) -> TailRefused:
    try:
        reason = str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        reason = body.decode("utf-8", "replace").strip()[:200] or f"HTTP {status}"
    if status == 401 and token is None:
        reason += (
            f"; no token found: pass --token, set CRCTL_API_TOKEN, or run where `crctl serve` "
            f"wrote {api_token_path()}"
        )
    return TailRefused(f"{url}: {reason}")


def _get_json(url: str, path: str, token: str | None) -> Any:
    import httpx

    url = _checked_url(url)
    try:
        with _client(10.0) as client:
            response = client.get(
                url + path, headers={"Accept": "application/json", **_headers(token)}
            )
            _check(url, response, token)
            return response.json()
    except (httpx.HTTPError, _Unavailable) as exc:
        raise TailError(f"cannot reach the relay at {url}: {exc}") from None


# ---------------------------------------------------------------------------- SSE
class Follower:
    """Follows ``/events`` for ever: reconnects with backoff and resumes after the last id.

    ``transport`` is httpx's seam (``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        call: str | None = None,
        since: str | None = None,
        read_timeout: float = READ_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.call = call
        self.since = since
        self.read_timeout = read_timeout
        self.transport = transport
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
        """Call ``on_event(json_text)`` per event and ``notice(text)`` as the link comes and goes.

        Returns only by an exception (:class:`TailError`, Ctrl-C).
        """
        import httpx
        from httpx_sse import SSEError, connect_sse

        url = _checked_url(self.url)
        delay = 0.1
        connected_once = False
        away = False
        with _client(self.read_timeout, self.transport) as client:
            while True:
                token = _token(self.token, url)
                try:
                    with connect_sse(
                        client, "GET", url + self._path(), headers=_headers(token)
                    ) as source:
                        _check(url, source.response, token)
                        if not connected_once:
                            notice(f"connected to {url}, following its calls (Ctrl-C stops)")
                        else:  # after a drop, whether or not the first retry failed
                            notice(f"reconnected to {url}")
                        away, connected_once, delay = False, True, 0.1
                        try:
                            for message in source.iter_sse():
                                if message.id:
                                    self.last_id = int(message.id)
                                if message.data:
                                    on_event(message.data)
                        except (httpx.HTTPError, SSEError, ValueError):
                            pass  # the relay stopped or the line went quiet: reconnect
                        continue
                except (httpx.HTTPError, _Unavailable):
                    pass
                if not away:
                    notice(
                        "relay went away, reconnecting…"
                        if connected_once
                        else f"waiting for the relay at {url}…"
                    )
                    away = True
                time.sleep(delay)
                delay = min(MAX_BACKOFF, delay * 2)


def tail(
    url: Optional[str] = _RELAY_URL_OPTION,
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
        metavar="TOKEN",
        help="The relay's API token. (env CRCTL_API_TOKEN; default ~/.crctl/api-token)",
    ),
) -> None:
    """Follow the relay's calls live: a transcript per call, latency, errors with the fix."""
    from crctl.environment import current  # flags > environment > .env.local > .env

    environment = current()
    follower = Follower(
        url or environment.url or DEFAULT_URL,
        token=token or environment.api_token_value(),
        call=call,
        since=since,
    )
    if json_out:

        def on_event(data: str) -> None:
            sys.stdout.write(data.replace("\n", " ") + "\n")
            sys.stdout.flush()

    else:
        log = CallLog(Console(highlight=False))

        def on_event(data: str) -> None:
            event = ev.decode(data)  # once, at the edge; not an event: skipped
            if event is not None:
                log.add(event)

    def notice(text: str) -> None:
        err.print(f"[dim]{escape(text)}[/]")

    try:
        follower.run(on_event, notice)
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
    metavar="TOKEN",
    help="The relay's API token, with --url. (env CRCTL_API_TOKEN; default ~/.crctl/api-token)",
)


_PRICES_OPTION = typer.Option(
    None,
    "--prices",
    metavar="FILE",
    help='A price table (TOML: [models."gpt-4o-mini"] input_per_million = 0.15, '
    "output_per_million = 0.60) to cost the tokens with. (env CRCTL_PRICES)",
)


def _prices(given: Path | None) -> tuple[dict[str, Price] | None, Path | None]:
    """The price table of ``--prices`` or ``CRCTL_PRICES`` (``None``: none given), and its file."""
    path = given
    if path is None:
        from crctl.environment import current

        path = current().prices
    if path is None:
        return None, None
    return load_prices(path), path


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
    """Every --json output names the call's SID ``call_sid``.

    A relay from before said ``sid`` in /calls.
    """
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
    if url:
        calls = _get_json(url.rstrip("/"), f"/calls?limit={limit}", _token(token, url))["calls"]
    else:
        store = _open_db(db)
        try:
            calls = store.calls(limit)
        finally:
            store.close()
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
    insights: bool = typer.Option(
        False,
        "--insights",
        help="Also Twilio's Voice Insights events for the call (Twilio credentials; Advanced "
        "Features on; about 90 s after the call), under 'insights' with --json.",
    ),
    prices: Optional[Path] = _PRICES_OPTION,
) -> None:
    """Show one stored call's transcript and events, and what it used (tokens, tools, cost)."""
    price_table, prices_file = _prices(prices)  # a bad file stops here, before any request
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
    from crctl.insights import load_insights  # Twilio's view beside the relay's

    twilio_view = load_insights(call) if insights else None  # adds call["insights"]
    if json_out:
        from crctl.turns import with_turns

        typer.echo(json.dumps(with_turns(_with_call_sid(call), price_table)))
    else:
        print_call(Console(highlight=False), call, price_table, prices_file)
    if twilio_view is not None:
        twilio_view.finish(json_out)


# ---------------------------------------------------------------------------- stats
#: ``calls stats``: this long without a byte from ``/events`` means its backlog was all sent.
QUIET = 1.5


#: The kinds ``calls stats`` reads: the turns' timelines and what the calls used.
STATS_KINDS = frozenset({ev.TURN_TIMELINE, *USAGE_KINDS})


def stored_events(
    url: str,
    token: str | None,
    since: str,
    *,
    kinds: frozenset[str] = STATS_KINDS,
    quiet: float = QUIET,
    transport: httpx.BaseTransport | None = None,
) -> list[ev.CallEvent]:
    """The events of ``kinds`` stored since ``since``, read from the relay's ``/events``.

    ``/events`` serves the stored backlog, then live events for ever, from SQLite and from the
    Redis cluster alike; the backlog is over at the first event newer than this request, at the
    id-only message a relay on SQLite sends after its backlog, or after ``quiet`` seconds
    without a byte.
    """
    import httpx
    from httpx_sse import SSEError, connect_sse

    url = _checked_url(url)
    asked = time.time()
    found: list[ev.CallEvent] = []
    seen_data = False
    try:
        with (
            _client(quiet, transport) as client,
            connect_sse(
                client,
                "GET",
                url + "/events?" + urlencode({"since": since}),
                headers=_headers(token),
            ) as source,
        ):
            _check(url, source.response, token)
            try:
                for message in source.iter_sse():
                    if not message.data:
                        if message.id and seen_data:
                            break  # SQLite: the backlog is over
                        continue
                    seen_data = True
                    event = ev.decode(message.data)
                    if event is None:
                        continue
                    if event.ts > asked:
                        break  # live now: the window is read
                    if event.kind in kinds:
                        found.append(event)
            except (httpx.ReadTimeout, SSEError):
                pass  # quiet: the backlog is over
    except (httpx.HTTPError, _Unavailable) as exc:
        raise TailError(f"cannot reach the relay at {url}: {exc}") from None
    return found


@calls_app.command("stats")
def calls_stats(
    since: str = typer.Option(
        "1h",
        "--since",
        metavar="AGO",
        help="The window: 30s, 10m, 2h, 1d or an ISO time.",
    ),
    url: Optional[str] = _RELAY_URL_OPTION,
    token: Optional[str] = _TOKEN_OPTION,
    json_out: bool = typer.Option(False, "--json", help="The counts and percentiles as JSON."),
    prices: Optional[Path] = _PRICES_OPTION,
) -> None:
    """Caller wait and its stages (p50/p95/p99), and what the calls used, over a window."""
    from crctl.environment import current  # flags > environment > .env.local > .env
    from crctl.turns import STAGES, stats
    from relay_server.store import parse_since

    try:
        parse_since(since)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None
    price_table, prices_file = _prices(prices)
    address = url or current().url or DEFAULT_URL
    events = stored_events(address, _token(token, address), since)
    found = stats([event for event in events if isinstance(event, ev.TurnTimeline)])
    used = Usage(price_table)
    for event in events:
        used.add(event)
    priced = price_table is not None
    if json_out:
        typer.echo(json.dumps({"since": since, **found, "usage": used.as_json()}))
        return
    console = Console(highlight=False)
    if not found["turns"]:
        console.print(f"no turn timelines in the last {since} (the relay records them per turn)")
        if used.llm_requests or used.tool_calls:
            print_usage(console, used.as_json(), used.notes(prices_file), priced=priced)
        return
    from rich.table import Table

    ends = ", ".join(f"{n} {end}" for end, n in sorted(found["ends"].items()))
    table = Table(
        title=f"{found['calls']} calls, {found['turns']} turns ({ends}), "
        f"{found['barge_ins']} barge-ins, since {since}",
        title_justify="left",
        header_style="bold",
        box=None,
        pad_edge=False,
    )
    for column in ("stage", "turns", "p50", "p95", "p99"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for stage in STAGES:
        row = found["stages"][stage]
        table.add_row(
            stage.removesuffix("_ms").replace("_", " "),
            str(row["count"]),
            *(_seconds(row[p]) for p in ("p50", "p95", "p99")),
        )
    console.print(table)
    print_usage(console, used.as_json(), used.notes(prices_file), priced=priced)


def _seconds(ms: float | None) -> str:
    return "?" if ms is None else f"{ms / 1000:.2f} s"
