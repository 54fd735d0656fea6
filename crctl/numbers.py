"""``crctl whoami``, ``crctl provision-number``, ``crctl numbers …`` and ``crctl app …``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl import up_sessions
from crctl.console import runnable
from crctl.credentials import Credentials, redact, resolve
from crctl.errors import CrctlError, UsageError
from crctl.provisioning import DEFAULT_APP_NAME, NUMBER_TYPES, Twilio, check_public_url

if TYPE_CHECKING:
    from relay_server.routing import Route

out = Console(highlight=False, soft_wrap=True)

numbers_app = typer.Typer(
    help="The account's phone numbers and where they point.", no_args_is_help=True
)
apps_app = typer.Typer(help="TwiML Applications.", no_args_is_help=True)

ACCOUNT = typer.Option(
    None, "--account-sid", metavar="AC…", help="Twilio account SID. (env TWILIO_ACCOUNT_SID)"
)
TOKEN = typer.Option(
    None, "--auth-token", metavar="TOKEN", help="Its auth token. (env TWILIO_AUTH_TOKEN)"
)
KEY = typer.Option(
    None, "--api-key", metavar="SK…", help="An API key, instead of the token. (env TWILIO_API_KEY)"
)
SECRET = typer.Option(
    None, "--api-secret", metavar="SECRET", help="The API key's secret. (env TWILIO_API_SECRET)"
)
PROFILE = typer.Option(
    None, "--profile", metavar="NAME", help="twilio-cli profile (~/.twilio-cli/config.json)."
)
YES = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")
ROUTE = typer.Option(
    None,
    "--route",
    metavar="NAME",
    help="A route of the routes file: the number must be one of its numbers (the relay's "
    "/twiml picks the route by the number called).",
)
ROUTES = typer.Option(
    None,
    "--routes",
    metavar="FILE",
    help="The routes file the relay serves (env CRCTL_ROUTES).",
    show_default=False,
)


def _table(*columns: tuple[str, int]) -> Table:
    """A table whose SIDs and numbers are never cut, whatever the terminal width.

    Min widths keep them whole; long values fold onto more lines instead of ending in "…".
    """
    table = Table(box=None)
    for name, width in columns:
        table.add_column(name, min_width=width or None, overflow="fold", no_wrap=bool(width))
    return table


_CREDENTIALS = {
    "account_sid": ACCOUNT,
    "auth_token": TOKEN,
    "api_key": KEY,
    "api_secret": SECRET,
    "profile": PROFILE,
}


def with_twilio(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the credential options and call it with a connected ``twilio`` client.

    The options are ``--account-sid`` … ``--profile``; a credentials problem is a
    CredentialsError, one error line from the CLI's handler.
    """
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "twilio"]
    params += [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[str]
        )
        for name, option in _CREDENTIALS.items()
    ]

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        credentials = {name: kwargs.pop(name) for name in _CREDENTIALS}
        command(*args, twilio=Twilio(resolve(**credentials)), **kwargs)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    return run


def _webhook(number: Any, apps: dict[str, Any]) -> tuple[str, str]:
    sid = number.voice_application_sid
    if sid:
        app = apps.get(sid)
        name = f"{sid} ({app.friendly_name})" if app is not None else f"{sid} (missing!)"
        return (app.voice_url if app is not None else "-"), name
    return number.voice_url or "[red]nothing: calls are not answered[/]", "-"


@with_twilio
def whoami(
    twilio: Any = None,
) -> None:
    """The Twilio account crctl uses and where the credentials came from (secrets redacted)."""
    account = twilio.account()
    creds: Credentials = twilio.credentials
    out.print(f"account   {creds.account_sid}  {escape(account.friendly_name or '')}")
    out.print(f"type      {account.type}, {account.status}")
    out.print(f"auth      {creds.kind}, secret {redact(creds.password)}")
    out.print(f"from      {creds.source}")
    if creds.auth_token is None:
        out.print(
            "[yellow]note:[/] "
            + runnable(
                "only an API key is configured; `crctl serve` checks Twilio's "
                "signatures with the account's auth token: set TWILIO_AUTH_TOKEN for that"
            )
        )


@with_twilio
def provision_number(
    public_url: str = typer.Option(
        ..., metavar="URL", help="The relay's public https:// base URL."
    ),
    number: Optional[str] = typer.Option(
        None, metavar="NUMBER", help="Use a number you own: +E164 or PN…"
    ),
    country: str = typer.Option("US", metavar="CC", help="Country to search in (ISO code)."),
    type_: str = typer.Option(
        "local", "--type", metavar="TYPE", help="local, toll-free or mobile."
    ),
    area_code: Optional[int] = typer.Option(None, metavar="CODE", help="Area code to search in."),
    contains: Optional[str] = typer.Option(
        None, metavar="DIGITS", help="Digits (or letters) the number contains."
    ),
    app_name: str = typer.Option(
        DEFAULT_APP_NAME, metavar="NAME", help="TwiML App to create or reuse."
    ),
    route: Optional[str] = ROUTE,
    routes: Optional[Path] = ROUTES,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
    yes: bool = YES,
    twilio: Any = None,
) -> None:
    """Get a number ringing the relay: buy one (or use --number), create or reuse a TwiML App
    whose voice URL is the relay's /twiml, and point the number at it. A second run changes
    nothing.
    """  # noqa: D205 (the first paragraph is the command's line in `crctl --help`: cli.COMMANDS)
    check_public_url(public_url, path="")
    chosen = routed(route, routes) if route is not None else None
    plan = twilio.plan(public_url, number=number, app_name=app_name)
    if chosen is not None and number is not None and plan.phone_number is not None:
        check_in_route(plan.phone_number, chosen)  # before anything changes
    if plan.phone_number is None:
        choice = _choose(twilio, country, type_, area_code, contains, yes or dry_run)
        plan = twilio.plan(public_url, buy=choice, app_name=app_name)
    _provision(twilio, plan, app_name, yes=yes, dry_run=dry_run)
    if chosen is not None and plan.phone_number not in chosen.spec.numbers:
        # a number just bought cannot be in the file yet: the relay needs it there
        out.print(
            f"[yellow]next:[/] add {plan.phone_number} to numbers of route {chosen.name!r} in "
            f"{escape(str(chosen.file))}: until then the relay answers it with its default agent"
        )


def _provision(twilio: Twilio, plan: Any, app_name: str, *, yes: bool, dry_run: bool) -> None:
    if not plan.steps:
        out.print(
            f"nothing to change: {plan.phone_number} already rings the relay through "
            f"TwiML App {app_name!r} → {plan.voice_url}"
        )
        return
    out.print("plan:")
    for step in plan.steps:
        out.print(f"  - {escape(step.text)}")
    if dry_run:
        out.print("dry run: nothing was changed")
        return
    buys = any(s.kind == "buy" for s in plan.steps)
    if buys and not yes and not typer.confirm("Buy the number (it costs money)?"):
        raise typer.Exit(1)
    twilio.apply(plan)
    out.print(
        f"[green]done:[/] {plan.phone_number} → TwiML App {app_name!r} ({plan.app_sid}) → "
        f"{plan.voice_url}"
    )


@dataclass(frozen=True)
class RouteChoice:
    """A route picked by ``--route``, and the routes file it is in."""

    route: Route
    file: Path

    @property
    def name(self) -> str:
        """The route's name."""
        return self.route.name

    @property
    def spec(self) -> Any:
        """The route as written in the file."""
        return self.route.spec


def routed(name: str, routes: Path | None) -> RouteChoice:
    """The route ``--route NAME`` names in the routes file (``--routes`` / ``CRCTL_ROUTES``).

    Raises:
        UsageError: no routes file was given, or it has no such route.
        RoutesError: the file is not valid (one line, exit 2).
    """
    from crctl.settings import load_settings
    from relay_server.routing import load_routes, no_such_route

    if routes is None:
        routes = load_settings().routes  # CRCTL_ROUTES: environment, .env.local, .env
    if routes is None:
        raise UsageError(
            f"--route {name}: which routes file? pass --routes FILE or set CRCTL_ROUTES (the "
            "file crctl serve --routes reads)"
        )
    found = {route.name: route for route in load_routes(routes)}
    if name not in found:
        raise UsageError(f"--route {name}: {routes} has {no_such_route(name, found)}")
    return RouteChoice(found[name], routes)


def check_in_route(number: str, chosen: RouteChoice) -> None:
    """Refuse to point ``number`` for a route whose numbers do not hold it.

    The relay picks a call's route by the number called: pointed but not in the route, the
    number would get the default agent.
    """
    if number not in chosen.spec.numbers:
        held = ", ".join(chosen.spec.numbers) or "none"
        raise UsageError(
            f"--route {chosen.name}: {number} is not one of its numbers in {chosen.file} "
            f"({held}); add it there first, or the relay answers it with its default agent"
        )


def _choose(
    twilio: Twilio,
    country: str,
    kind: str,
    area_code: int | None,
    contains: str | None,
    first: bool,
) -> str:
    found = twilio.available(country, kind, area_code, contains)
    if not found:
        raise CrctlError(
            f"no voice-capable {kind} numbers for sale in {country}"
            + (f" with area code {area_code}" if area_code else "")
            + (f" containing {contains}" if contains else "")
            + ": try another --area-code or --contains, or drop them"
        )
    table = _table(("#", 2), ("number", 13), ("locality", 0), ("region", 0))
    for i, candidate in enumerate(found, 1):
        table.add_row(
            str(i), candidate.phone_number, candidate.locality or "-", candidate.region or "-"
        )
    out.print(table)
    if first:
        return str(found[0].phone_number)
    index = typer.prompt("Which one", default=1, type=int)
    if not 1 <= index <= len(found):
        raise CrctlError(f"pick a number from 1 to {len(found)}")
    return str(found[index - 1].phone_number)


@numbers_app.command("list")
@with_twilio
def numbers_list(
    twilio: Any = None,
) -> None:
    """Numbers, friendly names, where their voice webhook points, and the application."""
    owned = twilio.numbers()
    apps = {a.sid: a for a in twilio.applications()}
    table = _table(
        ("number", 13),
        ("friendly name", 0),
        ("voice webhook", 0),
        ("application", 0),
        ("recorded", 17),
    )
    for number in owned:
        url, app = _webhook(number, apps)
        saved = twilio.state.get(twilio.account_sid, "numbers", number.sid)
        table.add_row(
            number.phone_number,
            escape(number.friendly_name or ""),
            url,
            app,
            "restore available" if saved else "",
        )
    out.print(
        table if owned else runnable("this account owns no numbers: `crctl provision-number`")
    )


@numbers_app.command("point")
@with_twilio
def numbers_point(
    number: str = typer.Argument(..., metavar="NUMBER", help="+E164 or PN…"),
    url: Optional[str] = typer.Option(
        None,
        metavar="URL",
        help="Voice webhook URL (https, public); with --route, the relay's base URL or its "
        "/twiml (default: CRCTL_PUBLIC_URL).",
    ),
    app: Optional[str] = typer.Option(None, metavar="AP…", help="TwiML App SID (AP…)."),
    route: Optional[str] = ROUTE,
    routes: Optional[Path] = ROUTES,
    twilio: Any = None,
) -> None:
    """Send a number's calls to a URL or an application (the old setting is recorded)."""
    chosen = None
    if route is not None:
        if app is not None:
            raise UsageError("--route points the number at the relay's /twiml: drop --app")
        chosen = routed(route, routes)
        url = _relay_twiml(url)
    elif (url is None) == (app is None):
        raise UsageError("give exactly one of --url URL or --app AP…")
    checked = check_public_url(url) if url is not None else None
    owned = twilio.number(number)
    if chosen is not None:
        check_in_route(owned.phone_number, chosen)
    app_sid = twilio.application(app).sid if app is not None else None
    twilio.point(owned, url=checked, app_sid=app_sid, why="crctl numbers point")
    on_route = f" (route {chosen.name})" if chosen is not None else ""
    out.print(
        runnable(
            f"{owned.phone_number} → {checked or app_sid}{on_route}  (`crctl numbers restore "
            f"{owned.phone_number}` puts the old setting back)"
        )
    )


def _relay_twiml(url: str | None) -> str:
    """The relay's ``/twiml`` from ``--url`` (a base URL or the endpoint) or CRCTL_PUBLIC_URL."""
    if url is None:
        from crctl.settings import load_settings

        url = load_settings().public_url
        if url is None:
            raise UsageError(
                "--route: where is the relay? pass --url https://host (its public URL) or set "
                "CRCTL_PUBLIC_URL"
            )
    return check_public_url(url, path="/twiml")


@numbers_app.command("restore")
@with_twilio
def numbers_restore(
    number: str = typer.Argument(..., metavar="NUMBER", help="+E164 or PN…"),
    twilio: Any = None,
) -> None:
    """Put back the voice settings the number had before crctl changed them."""
    owned = twilio.number(number)
    entry = twilio.restore(owned)
    if entry is None:
        # pointed by a `crctl up` that is no longer running (killed, crashed)?
        done = up_sessions.put_back(twilio, twilio.state, owned.sid, dead_only=True)
        if done is not None:
            out.print(f"restored after a crctl up that did not: {escape(done)}")
            return
    if entry is None:
        out.print(f"nothing recorded for {owned.phone_number}: crctl never changed it")
        return
    previous = entry["previous"]
    where = previous.get("voice_application_sid") or previous.get("voice_url") or "nothing"
    out.print(f"{owned.phone_number} restored → {where} (as recorded {entry['recorded_at']})")


@numbers_app.command("release")
@with_twilio
def numbers_release(
    number: str = typer.Argument(..., metavar="NUMBER", help="+E164 or PN…"),
    yes: bool = YES,
    twilio: Any = None,
) -> None:
    """Give a number back to Twilio (after a confirmation)."""
    owned = twilio.number(number)
    if not yes and not typer.confirm(
        f"Release {owned.phone_number}? It cannot be bought back for sure"
    ):
        raise typer.Exit(1)
    twilio.release(owned)
    out.print(f"released {owned.phone_number}")


@apps_app.command("show")
@with_twilio
def app_show(
    app: Optional[str] = typer.Argument(
        None, metavar="APP", help="AP… or friendly name; all when omitted."
    ),
    twilio: Any = None,
) -> None:
    """TwiML Applications: voice URL, status callback and the numbers using them."""
    apps = [twilio.application(app)] if app else twilio.applications()
    owned = twilio.numbers()
    table = _table(
        ("sid", 34), ("friendly name", 0), ("voice url", 0), ("status callback", 0), ("numbers", 13)
    )
    for item in apps:
        using = ", ".join(n.phone_number for n in owned if n.voice_application_sid == item.sid)
        table.add_row(
            item.sid,
            escape(item.friendly_name or ""),
            item.voice_url or "-",
            item.status_callback or "-",
            using or "-",
        )
    out.print(table if apps else "no TwiML Applications")


@apps_app.command("delete")
@with_twilio
def app_delete(
    app: str = typer.Argument(..., metavar="APP", help="AP… or friendly name."),
    yes: bool = YES,
    force: bool = typer.Option(False, help="Delete even if numbers still use it."),
    twilio: Any = None,
) -> None:
    """Delete a TwiML Application (refused while numbers use it, unless --force)."""
    found = twilio.application(app)
    using = [n.phone_number for n in twilio.numbers() if n.voice_application_sid == found.sid]
    if using and not force:
        raise CrctlError(
            f"{', '.join(using)} still use {found.sid}: deleting it would leave them ringing "
            "nowhere; `crctl numbers restore` or `point` them first, or pass --force"
        )
    if not yes and not typer.confirm(f"Delete {found.sid} ({found.friendly_name})?"):
        raise typer.Exit(1)
    twilio.delete_application(found)
    out.print(f"deleted {found.sid}")


__all__ = ["NUMBER_TYPES", "apps_app", "numbers_app", "provision_number", "whoami"]
