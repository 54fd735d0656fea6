"""Phone numbers and TwiML Apps over Twilio's REST API: the one module that uses twilio.rest.

Every change of a voice setting is recorded first (:mod:`crctl.state`), so it can be undone;
``provision`` is a plan of steps that a second run finds empty. Twilio's errors become
:class:`ProvisioningError` with one line saying what to do next.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from crctl.credentials import Credentials
from crctl.environment import current
from crctl.errors import ProvisioningError as ProvisioningError  # raised here, caught by callers
from crctl.errors import UsageError
from crctl.hosts import is_local
from crctl.state import VOICE_FIELDS, State

TWILIO_API = "https://api.twilio.com"
DEFAULT_APP_NAME = "crctl relay"
NUMBER_TYPES = {"local": "local", "toll-free": "toll_free", "mobile": "mobile"}

#: What to do next, by Twilio error code.
_NEXT_STEP = {
    20003: "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or the API key and secret): "
    "`crctl whoami` shows which credentials are used",
    20404: "check the number or SID: `crctl numbers list` shows what the account owns",
    21452: "the number was taken meanwhile: search again and pick another",
    21404: "trial accounts have limits: upgrade the account in the Console, or use the number "
    "you already have with --number",
    21421: "give the number in E.164 form, such as +15551234567",
    20429: "Twilio is rate-limiting this account: wait a minute and run the command again",
}


class _RedirectingClient(TwilioHttpClient):  # type: ignore[misc]
    """Sends every REST call to ``base`` instead of api.twilio.com.

    ``base`` is the ``twilio_api_url`` setting, CRCTL_TWILIO_API_URL.
    """

    def __init__(self, base: str) -> None:
        super().__init__(timeout=20)
        self.base = base.rstrip("/")

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(TWILIO_API):
            url = self.base + url[len(TWILIO_API) :]
        return super().request(method, url, *args, **kwargs)


def api_base() -> str:
    """Where Twilio's REST API is: api.twilio.com, or the ``twilio_api_url`` setting."""
    return current().twilio_api_url or TWILIO_API


def make_client(credentials: Credentials, api_url: str | None = None) -> Client:
    """A twilio Client for these credentials, sending its calls to ``api_url``.

    The default is :func:`api_base`; another one is a testing aid: a mock such as Prism.
    """
    api_url = api_url or api_base()
    api_url = None if api_url == TWILIO_API else api_url
    http = _RedirectingClient(api_url) if api_url else TwilioHttpClient(timeout=20)
    return Client(
        credentials.username,
        credentials.password,
        account_sid=credentials.account_sid,
        http_client=http,
    )


@contextlib.contextmanager
def twilio_errors(action: str) -> Iterator[None]:
    """Turn Twilio and network failures into one readable :class:`ProvisioningError`."""
    try:
        yield
    except TwilioRestException as exc:
        step = _NEXT_STEP.get(exc.code or 0)
        if step is None and "trial" in (exc.msg or "").lower():
            step = _NEXT_STEP[21404]
        code = f" {exc.code}" if exc.code else ""
        message = " ".join(str(exc.msg or "").split()) or f"HTTP {exc.status}"
        for prefix in (
            "Unable to fetch record: ",
            "Unable to create record: ",
            "Unable to update record: ",
            "Unable to delete record: ",
        ):
            message = message.removeprefix(prefix)
        raise ProvisioningError(
            f"{action} failed: Twilio error{code}: {message}" + (f"; {step}" if step else ""),
            code=exc.code,
            status=exc.status,
            action=action,
        ) from None
    except TwilioException as exc:
        # List calls raise a bare TwilioException("Unable to fetch page", response) that carries
        # Twilio's error JSON; give it the same treatment as TwilioRestException.
        response = exc.args[1] if len(exc.args) > 1 else None
        body = _error_body(response)
        if body is not None:
            with twilio_errors(action):
                raise TwilioRestException(
                    getattr(response, "status_code", 0),
                    "",
                    body.get("message", ""),
                    body.get("code"),
                ) from None
        target = api_base()
        raise ProvisioningError(
            f"{action} failed: cannot reach Twilio at {target} ({type(exc).__name__}); check the "
            "network connection and try again",
            action=action,
        ) from None
    except requests.exceptions.RequestException as exc:
        target = api_base()
        raise ProvisioningError(
            f"{action} failed: cannot reach Twilio at {target} ({type(exc).__name__}); check the "
            "network connection and try again",
            action=action,
        ) from None


def _error_body(response: Any) -> dict[str, Any] | None:
    text = getattr(response, "text", None)
    if not text:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "code" in body else None


def check_public_url(url: str, *, path: str | None = None) -> str:
    """A URL Twilio can call: https, a public host, no query.

    With ``path`` the result ends in it (a base URL gets it appended); without, the URL must
    name an endpoint path.
    """
    parts = urlsplit(url.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise UsageError(f"{url!r} is not an https:// URL: Twilio calls webhooks over https")
    host = parts.hostname
    if is_local(host):
        raise UsageError(
            f"{url!r}: {host} is not reachable from Twilio; use the public URL of your tunnel "
            "or host (crctl up opens one)"
        )
    if parts.query or parts.fragment:
        raise UsageError(f"{url!r}: no query or fragment, please")
    clean = url.strip().rstrip("/")
    if path is not None:
        return clean if clean.endswith(path) else clean + path
    if parts.path in ("", "/"):
        raise UsageError(f"{url!r}: add the TwiML endpoint's path, e.g. {clean}/twiml")
    return clean


@dataclass
class Step:
    """One change of a plan, said in words before it is made."""

    kind: str  # create_app | update_app | buy | point
    text: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What ``provision`` will do; empty when everything is already in place."""

    voice_url: str
    status_url: str
    app_name: str
    app_sid: str | None = None
    phone_number: str | None = None
    steps: list[Step] = field(default_factory=list)


class Twilio:
    """An account, reached with one set of credentials."""

    def __init__(self, credentials: Credentials, state: State | None = None) -> None:
        self.credentials = credentials
        self.account_sid = credentials.account_sid
        self.client = make_client(credentials)
        self.api = self.client.api.v2010.accounts(self.account_sid)
        self.state = state or State()

    # ----------------------------------------------------------------------------- reading
    def account(self) -> Any:
        """The account's resource (friendly_name, type, status)."""
        with twilio_errors("reading the account"):
            return self.client.api.v2010.accounts(self.account_sid).fetch()

    def available(
        self,
        country: str = "US",
        kind: str = "local",
        area_code: int | None = None,
        contains: str | None = None,
        limit: int = 10,
    ) -> list[Any]:
        """Voice-capable numbers for sale."""
        if kind not in NUMBER_TYPES:
            raise UsageError(f"--type {kind!r}: use one of {', '.join(NUMBER_TYPES)}")
        listing = getattr(self.api.available_phone_numbers(country.upper()), NUMBER_TYPES[kind])
        query: dict[str, Any] = {"voice_enabled": True, "limit": limit}
        if area_code is not None:
            query["area_code"] = area_code
        if contains:
            query["contains"] = contains
        with twilio_errors(f"searching {country.upper()} {kind} numbers"):
            found = listing.list(**query)
        return [n for n in found if (n.capabilities or {}).get("voice", True)]

    def numbers(self) -> list[Any]:
        """The numbers the account owns."""
        with twilio_errors("listing the account's numbers"):
            return list(self.api.incoming_phone_numbers.list(limit=1000))

    def number(self, ref: str) -> Any:
        """An owned number, by E.164 (+15551234567) or PN sid."""
        with twilio_errors(f"looking up {ref}"):
            if ref.startswith("PN"):
                return self.api.incoming_phone_numbers(ref).fetch()
            found = self.api.incoming_phone_numbers.list(phone_number=ref, limit=20)
        match = [n for n in found if n.phone_number == ref]
        if not match:
            raise ProvisioningError(
                f"this account does not own {ref}: `crctl numbers list` shows the numbers it has "
                "(give them as +E.164 or PN…)"
            )
        return match[0]

    def applications(self, friendly_name: str | None = None) -> list[Any]:
        """TwiML Applications, optionally by friendly name."""
        query: dict[str, Any] = {"limit": 1000}
        if friendly_name:
            query["friendly_name"] = friendly_name
        with twilio_errors("listing applications"):
            return list(self.api.applications.list(**query))

    def application(self, ref: str) -> Any:
        """An application by AP sid or friendly name."""
        if ref.startswith("AP"):
            with twilio_errors(f"looking up application {ref}"):
                return self.api.applications(ref).fetch()
        apps = [a for a in self.applications(ref) if a.friendly_name == ref]
        if not apps:
            raise ProvisioningError(f"no application named {ref!r}: `crctl app show` lists them")
        return apps[0]

    # ---------------------------------------------------------------------------- planning
    def plan(
        self,
        public_url: str,
        *,
        number: str | None = None,
        buy: str | None = None,
        app_name: str = DEFAULT_APP_NAME,
    ) -> Plan:
        """What it takes for the app ``app_name`` to send calls to the relay at ``public_url``.

        Also which number uses the app: ``number`` (owned), ``buy`` (one to purchase), or the
        number already using the app.
        """
        base = check_public_url(public_url, path="")
        plan = Plan(base + "/twiml", base + "/status", app_name)
        apps = [a for a in self.applications(app_name) if a.friendly_name == app_name]
        app = apps[0] if apps else None
        if app is None:
            plan.steps.append(
                Step("create_app", f"create TwiML App {app_name!r} → {plan.voice_url}")
            )
        else:
            plan.app_sid = app.sid
            wanted = {
                "voice_url": plan.voice_url,
                "voice_method": "POST",
                "status_callback": plan.status_url,
                "status_callback_method": "POST",
            }
            changes = {k: v for k, v in wanted.items() if getattr(app, k) != v}
            if changes:
                plan.steps.append(
                    Step(
                        "update_app",
                        f"point TwiML App {app_name!r} ({app.sid}) at {plan.voice_url}",
                        {"app": app, "changes": wanted},
                    )
                )
        if number is not None:
            owned = self.number(number)
            plan.phone_number = owned.phone_number
            if app is None or owned.voice_application_sid != app.sid:
                plan.steps.append(
                    Step(
                        "point",
                        f"point {owned.phone_number} at TwiML App {app_name!r}",
                        {"number": owned},
                    )
                )
        elif app is not None and (using := self._numbers_using(app.sid)):
            plan.phone_number = using[0].phone_number  # already wired: nothing to buy
        elif buy is not None:
            plan.phone_number = buy
            plan.steps.append(
                Step(
                    "buy",
                    f"buy {buy} and point it at TwiML App {app_name!r}",
                    {"phone_number": buy},
                )
            )
        return plan

    def _numbers_using(self, app_sid: str) -> list[Any]:
        return [n for n in self.numbers() if n.voice_application_sid == app_sid]

    def apply(self, plan: Plan, why: str = "crctl provision-number") -> Plan:
        """Make the plan's changes in order, recording every previous value first."""
        for step in plan.steps:
            if step.kind == "create_app":
                with twilio_errors(f"creating TwiML App {plan.app_name!r}"):
                    app = self.api.applications.create(
                        friendly_name=plan.app_name,
                        voice_url=plan.voice_url,
                        voice_method="POST",
                        status_callback=plan.status_url,
                        status_callback_method="POST",
                    )
                plan.app_sid = app.sid
            elif step.kind == "update_app":
                app = step.args["app"]
                self.state.record(
                    self.account_sid, "applications", app.sid, app.friendly_name, _voice(app), why
                )
                with twilio_errors(f"updating TwiML App {app.sid}"):
                    app.update(**step.args["changes"])
            elif step.kind == "buy":
                with twilio_errors(f"buying {step.args['phone_number']}"):
                    bought = self.api.incoming_phone_numbers.create(
                        phone_number=step.args["phone_number"], voice_application_sid=plan.app_sid
                    )
                plan.phone_number = bought.phone_number
            elif step.kind == "point":
                self.point(step.args["number"], app_sid=plan.app_sid, why=why)
        return plan

    # ----------------------------------------------------------------------------- changes
    def point(
        self, number: Any, *, url: str | None = None, app_sid: str | None = None, why: str
    ) -> Any:
        """Send a number's calls to a webhook URL or an application, recording what it had."""
        self.state.record(
            self.account_sid, "numbers", number.sid, number.phone_number, _voice(number), why
        )
        if app_sid is not None:
            changes: dict[str, Any] = {"voice_application_sid": app_sid}
        else:
            assert url is not None
            changes = {"voice_url": url, "voice_method": "POST", "voice_application_sid": ""}
        with twilio_errors(f"updating {number.phone_number}"):
            return number.update(**changes)

    def restore(self, number: Any) -> dict[str, Any] | None:
        """Put back the voice settings recorded before crctl changed the number.

        Returns the record, or ``None`` when there is nothing recorded.
        """
        entry = self.state.get(self.account_sid, "numbers", number.sid)
        if entry is None:
            return None
        self.put_back(number, entry["previous"])
        self.state.forget(self.account_sid, "numbers", number.sid)
        return entry

    def set_voice_url(self, number: Any, url: str) -> Any:
        """Point a number straight at a webhook URL (no record: the caller keeps its own)."""
        with twilio_errors(f"updating {number.phone_number}"):
            return number.update(voice_url=url, voice_method="POST", voice_application_sid="")

    def put_back(self, number: Any, previous: dict[str, Any]) -> Any:
        """Set a number's voice settings to ``previous`` (as recorded by :func:`voice_of`)."""
        current = _voice(number)
        # Only what differs: a field crctl never touched is not re-sent (and "" is how Twilio
        # clears a URL or an application).
        values = {
            k: (v if v is not None else "")
            for k, v in previous.items()
            if (v or None) != (current.get(k) or None)
        }
        for method in ("voice_method", "status_callback_method", "voice_fallback_method"):
            if values.get(method) == "":
                values.pop(method)  # Twilio refuses an empty method
        if not values:
            return number
        with twilio_errors(f"restoring {number.phone_number}"):
            return number.update(**values)

    def release(self, number: Any) -> None:
        """Give the number back to Twilio (it stops ringing for good)."""
        with twilio_errors(f"releasing {number.phone_number}"):
            number.delete()
        self.state.forget(self.account_sid, "numbers", number.sid)

    def delete_application(self, app: Any) -> None:
        """Delete an application."""
        with twilio_errors(f"deleting application {app.sid}"):
            app.delete()
        self.state.forget(self.account_sid, "applications", app.sid)


def voice_of(resource: Any) -> dict[str, Any]:
    """The voice settings of a number or application, as crctl records them."""
    return _voice(resource)


def _voice(resource: Any) -> dict[str, Any]:
    return {name: getattr(resource, name, None) for name in VOICE_FIELDS}
