"""``crctl dial``: call someone and connect them to the relay, then show the call live.

The call is created on Twilio's REST API with the twilio SDK (``calls.create``, through
:func:`crctl.provisioning.make_client`: the credentials of ``whoami``, ``CRCTL_TWILIO_API_URL``
honoured); the request is :func:`relay_server.dialing.call_request`'s, the same one the relay's
``POST /calls`` sends: ``Url`` = the relay's ``/twiml`` with ``route=NAME`` and each ``--param
k=v`` as ``param_k=v`` in its query (a ``<Parameter>`` of the call), status callbacks to
``/status``, and with ``--machine-detection`` asynchronous answering machine detection reported
to ``/amd``.

Without ``--detach`` it follows the relay's ``/events`` for that call (as ``crctl tail
--call``) and prints it as ``crctl up``'s live log does, until Twilio's status callback says
the call is over (or, when the relay hears nothing of the call, Twilio's own status does);
``--detach`` prints the call SID and returns; ``--dry-run`` prints the request.

There is no ``--agent`` nor ``--twiml-template``: a relay never imports code, nor reads a
template, that a URL names (whoever can place a call could otherwise choose them). The agent and
template of an outbound call are its route's (``--route NAME``, the relay's ``--routes`` file).
A route the routes file (``--routes`` / ``CRCTL_ROUTES``) does not have is refused before the
call is placed, with "did you mean" and the routes there are.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from twilio.base.exceptions import TwilioRestException

from crctl import up_sessions
from crctl.credentials import CredentialsError, resolve
from crctl.errors import CrctlError, ProvisioningError, UsageError
from crctl.numbers import ACCOUNT, KEY, PROFILE, ROUTES, SECRET, TOKEN
from crctl.provisioning import api_base, check_public_url, make_client, twilio_errors
from crctl.state import State
from relay_server import events as ev
from relay_server.dialing import CallRequest, call_request, refusal

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

#: The twilio SDK's prefix on a refused create (removed: the line says what was done).
_SDK_PREFIX = "Unable to create record: "


def running_up_url(state: State | None = None) -> str | None:
    """The public URL of a ``crctl up`` running on this machine, if exactly one is known.

    A running ``up`` records the URL it pointed its number at (``…/twiml``) in the state file
    (:mod:`crctl.up_sessions`).
    """
    entries = (state or State()).reload().get(up_sessions.SESSIONS, {}).values()
    urls = {
        str(e["pointed_at"]).removesuffix("/twiml")
        for e in entries
        if e.get("pointed_at") and up_sessions.alive(e)
    }
    return urls.pop() if len(urls) == 1 else None


def _public_url(given: str | None) -> str:
    if given is None:
        from crctl.settings import load_settings

        given = load_settings().public_url or running_up_url()
    if not given:
        raise UsageError(
            "crctl dial needs the relay's public URL, for Twilio to connect the call to: pass "
            "--public-url https://your-host (or set CRCTL_PUBLIC_URL), or run `crctl up` with "
            "a --number first (its tunnel is used)"
        )
    return check_public_url(given, path="")


def _params(pairs: list[str]) -> list[tuple[str, str]]:
    found = []
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--param {pair!r}: give it as NAME=VALUE, e.g. --param order=42")
        found.append((name.strip(), value))
    return found


def _route_numbers(name: str, routes: Path | None) -> tuple[str, ...] | None:
    """The numbers of route ``name`` in the routes file (``--routes`` / ``CRCTL_ROUTES``).

    A route the file does not have is a :class:`UsageError`: the relay would answer the call
    with its default agent, so the call is not placed. Without a routes file here (a relay
    elsewhere) the name cannot be checked (``None``); that relay's ``POST /calls`` can.
    """
    from crctl.numbers import routed
    from crctl.settings import load_settings

    routes = routes or load_settings().routes
    return routed(name, routes).spec.numbers if routes is not None else None


def build_request(
    to: str,
    from_: str | None,
    public_url: str | None,
    *,
    route: str | None = None,
    routes: Path | None = None,
    params: list[str] | None = None,
    machine_detection: str | None = None,
) -> CallRequest:
    """The Call ``crctl dial`` creates, from its options; bad ones are a :class:`UsageError`.

    The caller ID is ``--from``, else the route's first number (a route's numbers are the ones
    it calls from), else ``CRCTL_NUMBER``.
    """
    from crctl.environment import current

    numbers = _route_numbers(route, routes) if route else None
    caller_id = from_ or (numbers[0] if numbers else None) or current().number
    if not caller_id:
        raise UsageError(
            "--from NUMBER: the number to call from, one of this account's (`crctl numbers "
            "list`) or a verified caller ID (env CRCTL_NUMBER)"
        )
    base = _public_url(public_url)
    try:
        return call_request(
            base,
            to,
            caller_id,
            route=route,
            params=_params(params or []),
            machine_detection=machine_detection,
        )
    except ValueError as exc:
        said = str(exc).replace("machine detection", "--machine-detection")
        raise UsageError("--" + said if said.startswith("route ") else said) from None


def create(request: CallRequest, credentials: Any) -> Any:
    """Create the call; Twilio's refusal is one :class:`ProvisioningError` line with the fix."""
    action = f"calling {request.to}"
    client = make_client(credentials)
    with twilio_errors(action):
        try:
            return client.api.v2010.accounts(credentials.account_sid).calls.create(
                **request.sdk_arguments()
            )
        except TwilioRestException as exc:
            message = str(exc.msg or "").removeprefix(_SDK_PREFIX)
            failed = refusal(action, exc.code, message, exc.status)
            if failed.fix is None:
                raise  # twilio_errors says it, with its own next steps (20003…)
            raise ProvisioningError(
                str(failed), code=exc.code, status=exc.status, action=action
            ) from None


def _print_dry_run(request: CallRequest, credentials: Any) -> None:
    account = credentials.account_sid if credentials is not None else "{AccountSid}"
    out.print(f"POST {api_base()}/2010-04-01/Accounts/{account}/Calls.json")
    for name, value in request.form():
        out.print(f"  {name}={escape(value)}")
    out.print("dry run: nothing was sent")


#: How often a followed call's status is asked of Twilio while the relay says nothing of it.
POLL_SECONDS = 5.0


def _relay_url(url: str | None) -> str:
    """The relay to follow the call on (``--url``, ``CRCTL_URL``), checked before calling."""
    from crctl.environment import current
    from crctl.tail import DEFAULT_URL, _checked_url

    return _checked_url(url or current().url or DEFAULT_URL)


def _follow(
    request: CallRequest,
    sid: str,
    relay: str,
    token: str | None,
    twilio_status: Callable[[], str | None],
) -> int:
    """Print the call's events from the relay until it is over; the exit code.

    The relay hears the end through Twilio's status callback. If it never does (the public URL
    is not this relay), Twilio's own word on the call (``twilio_status``, asked every
    :data:`POLL_SECONDS` the relay is quiet) ends the wait with what to check.
    """
    from crctl.console import CallLog
    from crctl.environment import current
    from crctl.tail import Follower

    token = token or current().api_token_value()
    follower = Follower(relay, token=token, call=sid, since="10m")
    log = CallLog(out)
    found: queue.Queue[Any] = queue.Queue()

    def follow() -> None:
        try:
            follower.run(found.put, lambda text: found.put(_Notice(text)))
        except BaseException as exc:  # handed to the main thread, which raises it
            found.put(exc)

    threading.Thread(target=follow, name="crctl-dial-follow", daemon=True).start()
    over: ev.CallStatus | None = None
    ended_at_twilio: str | None = None
    try:
        while over is None:
            try:
                item = found.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if ended_at_twilio is not None:  # a whole quiet period after Twilio's end
                    break
                status = twilio_status()
                ended_at_twilio = status if status in ev.CALL_OVER else None
                continue
            if isinstance(item, CrctlError):  # the relay cannot be followed; the call is placed
                raise CrctlError(
                    f"{item}; the call {sid} goes on: `crctl tail --call {sid}` follows it"
                ) from None
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Notice):
                err.print(f"[dim]{escape(item.text)}[/]")
                continue
            event = ev.decode(item)
            if event is None:
                continue
            log.add(event)
            if isinstance(event, ev.CallStatus) and (event.status or "") in ev.CALL_OVER:
                over = event
    except KeyboardInterrupt:
        err.print(f"stopped following; the call goes on: `crctl tail --call {sid}`")
        return 130
    if over is None:
        raise CrctlError(
            f"Twilio says the call to {request.to} ended {ended_at_twilio}, but no status "
            f"callback said so to the relay at {relay}: Twilio sends the call to "
            f"{request.url.split('?')[0]}; "
            "is that this relay (--public-url, and --url for the relay followed)? `crctl calls "
            f"show {sid}` and the Console's call log say what Twilio saw"
        )
    if over.status == "completed":
        took = f" after {over.duration} s" if over.duration else ""
        err.print(f"call {sid} completed{took}")
        return 0
    raise CrctlError(
        f"the call to {request.to} ended {over.status}: "
        + {
            "busy": "the line was busy; try again later",
            "no-answer": "nobody answered",
            "canceled": "it was cancelled before it was answered",
        }.get(
            over.status or "",
            f"Twilio could not connect it; `crctl calls show {sid}` and the Console's call log "
            "say why",
        )
    )


@dataclass(frozen=True)
class _Notice:
    """A line about the link to the relay (connected, reconnecting…)."""

    text: str


def _twilio_status(credentials: Any, sid: str) -> Callable[[], str | None]:
    """Ask Twilio the call's status; ``None`` when it cannot say (the relay is waited for)."""
    client = make_client(credentials)

    def status() -> str | None:
        try:
            return str(client.api.v2010.accounts(credentials.account_sid).calls(sid).fetch().status)
        except Exception:  # a fallback only: the relay's word is the real one
            return None

    return status


def dial(
    to: str = typer.Argument(..., metavar="TO", help="The number to call, +E164."),
    from_: Optional[str] = typer.Option(
        None,
        "--from",
        metavar="NUMBER",
        help="The caller ID: a number of the account or a verified one. (default: the "
        "route's first number; env CRCTL_NUMBER)",
    ),
    public_url: Optional[str] = typer.Option(
        None,
        "--public-url",
        metavar="URL",
        help="The relay's public https:// base URL. (env CRCTL_PUBLIC_URL; default the "
        "running crctl up's)",
    ),
    route: Optional[str] = typer.Option(
        None,
        "--route",
        metavar="NAME",
        help="The relay's route for this call, which names its agent and template (/twiml?route=); "
        "checked against --routes when given.",
    ),
    routes: Optional[Path] = ROUTES,
    param: list[str] = typer.Option(
        [],
        "--param",
        metavar="K=V",
        help="A <Parameter> of the call, sent as param_K=V on /twiml's query (repeatable).",
    ),
    machine_detection: Optional[str] = typer.Option(
        None,
        "--machine-detection",
        metavar="MODE",
        help="Answering machine detection: Enable, or DetectMessageEnd to leave a message "
        "after the beep (the relay's --machine-message).",
    ),
    detach: bool = typer.Option(False, "--detach", help="Print the call SID and return."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the request; send nothing."),
    url: Optional[str] = typer.Option(
        None,
        "--url",
        metavar="URL",
        help="The relay to follow the call on. (env CRCTL_URL; default http://127.0.0.1:8080)",
    ),
    token: Optional[str] = typer.Option(
        None,
        "--token",
        metavar="TOKEN",
        help="The relay's API token. (env CRCTL_API_TOKEN; default ~/.crctl/api-token)",
    ),
    account_sid: Optional[str] = ACCOUNT,
    auth_token: Optional[str] = TOKEN,
    api_key: Optional[str] = KEY,
    api_secret: Optional[str] = SECRET,
    profile: Optional[str] = PROFILE,
) -> None:
    """Call a number and connect it to the relay; show the call live until it ends."""
    request = build_request(
        to,
        from_,
        public_url,
        route=route,
        routes=routes,
        params=param,
        machine_detection=machine_detection,
    )
    given: dict[str, Any] = {
        "account_sid": account_sid,
        "auth_token": auth_token,
        "api_key": api_key,
        "api_secret": api_secret,
        "profile": profile,
    }
    if dry_run:
        try:
            credentials = resolve(**given)
        except CredentialsError:
            credentials = None  # the request can be shown without them
        _print_dry_run(request, credentials)
        return
    relay = None if detach else _relay_url(url)
    credentials = resolve(**given)
    call = create(request, credentials)
    if detach:
        sys.stdout.write(f"{call.sid}\n")
        return
    err.print(
        f"calling {request.to} from {request.from_}: {call.sid} ({call.status}); "
        "following it live (Ctrl-C stops following, not the call)"
    )
    assert relay is not None  # not --detach
    code = _follow(request, call.sid, relay, token, _twilio_status(credentials, call.sid))
    if code:
        raise typer.Exit(code)
