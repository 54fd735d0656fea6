"""Stateful fake of Twilio's REST API 2010-04-01 over real HTTP (aiohttp).

Serves, on 127.0.0.1 from a background thread with its own event loop, the paths the
twilio SDK uses under ``https://api.twilio.com`` (point the SDK at :attr:`FakeTwilio.base_url`
instead, as crctl does with ``CRCTL_TWILIO_API_URL``)::

    GET               /2010-04-01/Accounts/{AC}.json
    GET               .../Accounts/{AC}/AvailablePhoneNumbers/{CC}/{Local|TollFree|Mobile}.json
    GET, POST         .../Accounts/{AC}/IncomingPhoneNumbers.json
    GET, POST, DELETE .../Accounts/{AC}/IncomingPhoneNumbers/{PN}.json
    GET, POST         .../Accounts/{AC}/Applications.json
    GET, POST, DELETE .../Accounts/{AC}/Applications/{AP}.json
    GET, POST         .../Accounts/{AC}/Calls.json
    GET, POST         .../Accounts/{AC}/Calls/{CA}.json

and, under ``https://insights.twilio.com`` (Voice Insights; the same fake answers both hosts, so
a client redirects both to :attr:`FakeTwilio.base_url`)::

    GET               /v1/Voice/{CA}/Events     (the call's Insights events, paged by ``meta``)

Resources carry the fields of the OpenAPI schemas in Twilio's twilio-oai contract (defaults as in
the spec's examples: e.g. a new number's ``voice_url`` is null, its ``sms_url`` ""). Lists page
like Twilio (``PageSize``/``Page``, ``first_page_uri``/``next_page_uri``/... ; the SDK follows
``next_page_uri``). Errors always have Twilio's body ``{"code", "message", "more_info",
"status"}``:

=====  =====  ==============================================================================
HTTP   code   when
=====  =====  ==============================================================================
401    20003  no/bad HTTP Basic credentials (AccountSid+AuthToken or ApiKey+ApiSecret), or
              credentials of another account than the one in the path ("Authenticate")
404    20404  unknown path, sid or country ("The requested resource /2010-04-01/... was not
              found")
405    20004  method not served on a known path
400    21402  a ``*Url``/``*Callback`` value that is not an absolute http(s) URL, or points at
              localhost/a private address (Twilio cannot reach it); "" is accepted (clears)
400    21403  a ``*Method`` other than GET/POST
400    21404  trial account buying a second number: "Trial accounts are allowed only one
              Twilio number. To purchase additional numbers, please upgrade your account."
              (the code and text Twilio returns, as quoted in public bug reports; Twilio's
              dictionary also lists 10002 for trial restrictions in general)
400    21452  buying a number not in the available pool ("Number +1... is not available"), or
              by ``AreaCode`` with none left. Twilio's dictionary names this case 21422
              ("PhoneNumber is not available"); 21452 is what crctl's issue #4 specifies, kept
              in one place: :data:`NUMBER_UNAVAILABLE`.
400    21420  creating a number with a ``VoiceApplicationSid``/``SmsApplicationSid`` not owned
400    22108  updating a number with such an application sid
400    21421  buying with neither ``PhoneNumber`` nor ``AreaCode``
400    21211  creating a call to a ``To`` that is not E.164 (nor ``client:``/``sip:``)
400    21210  creating a call ``From`` a number the account neither owns nor has verified
              (:attr:`FakeTwilio.verified_caller_ids`)
400    21215  creating a call to a country not in :attr:`FakeTwilio.geo_permissions` (calling
              code prefixes; ``{"+1"}`` by default, as a new account allows the US and Canada)
400    21219  a trial account calling a ``To`` that is not a verified caller ID
400    21205  creating a call with neither ``Url`` nor ``Twiml`` nor ``ApplicationSid``
=====  =====  ==============================================================================

Calls are stateful: a created call is ``queued``, direction ``outbound-api``; it keeps the
parameters it was created with (:attr:`FakeTwilio.calls`; :meth:`call_request` gives them back)
and a test moves it on with :meth:`set_call_status` (the fake never calls the webhooks: the
test does, as Twilio would). ``POST .../Calls/{CA}.json`` with ``Status=completed`` or
``canceled`` ends it. The 212xx texts are Twilio's own as reported by its API and docs.

Behaviour worth knowing: buying a number the account already owns answers 201 and applies
the given fields (Twilio does that); ``VoiceApplicationSid=""`` detaches the application;
deleting an application detaches it from the numbers that used it; a released number does
not return to the available pool; unknown form parameters are ignored, as Twilio does
(the OpenAPI contract check in :mod:`fakes.prism` reports them); ``*Method`` values are
taken in any case and stored upper-case (the contract wants GET/POST); ``VoiceEnabled`` &co
filter only when "true". Codes are Twilio's; the wording of the 21402/21403/21420/21421/22108
messages is the fake's own. Credentials valid for the fake's account used on another
account's path get 20003 (a choice: Twilio does not document it).

Voice Insights events are seeded per CallSid with :meth:`add_insights_events`; a call never
seeded answers 404 20404, as Twilio does when Voice Insights Advanced Features are off or the
call is unknown; a call seeded with no events answers an empty list (the ~90 s before Twilio
has processed a call). Events are served in the order seeded (Twilio's order is not
documented: crctl sorts them).

Test controls (thread-safe): :meth:`add_number`, :meth:`add_application`,
:meth:`add_available`, :meth:`add_insights_events`, :attr:`available`, :attr:`numbers`,
:attr:`applications`, :attr:`insights_events`,
:attr:`trial`, :attr:`requests` (every request, as :class:`RecordedRequest`),
:meth:`fail_next` (inject a Twilio error) and :meth:`down`/:meth:`up` (connections refused).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import ipaddress
import re
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from aiohttp import web

from fakes.background import BackgroundServer

API_VERSION = "2010-04-01"
TWILIO_API_BASE = "https://api.twilio.com"
INSIGHTS_API_BASE = "https://insights.twilio.com"
ERROR_DOCS = "https://www.twilio.com/docs/errors/{code}"

AUTHENTICATE = 20003
METHOD_NOT_ALLOWED = 20004
NOT_FOUND = 20404
INVALID_URL = 21402
INVALID_METHOD = 21403
TRIAL_NUMBER_LIMIT = 21404
APP_NOT_ACCESSIBLE = 21420
INVALID_PHONE_NUMBER = 21421
NUMBER_UNAVAILABLE = 21452
INVALID_APP_SID = 22108
CALL_INVALID_TO = 21211
CALL_CALLER_ID = 21210
CALL_GEO_PERMISSION = 21215
CALL_TRIAL_UNVERIFIED = 21219
CALL_NO_URL = 21205

#: Form parameters Twilio takes on Calls create (a subset of the spec's: the ones crctl may send
#: and a few common others).
CALL_PARAMS = frozenset(
    {
        "To",
        "From",
        "Url",
        "Method",
        "Twiml",
        "ApplicationSid",
        "StatusCallback",
        "StatusCallbackMethod",
        "StatusCallbackEvent",
        "MachineDetection",
        "AsyncAmd",
        "AsyncAmdStatusCallback",
        "AsyncAmdStatusCallbackMethod",
        "Timeout",
    }
)
_E164 = re.compile(r"\+[1-9]\d{6,14}")

TRIAL_LIMIT_MESSAGE = (
    "Trial accounts are allowed only one Twilio number. "
    "To purchase additional numbers, please upgrade your account."
)

#: Available-number types served, and the ``type`` an IncomingPhoneNumber bought from each gets.
KINDS = {"Local": "local", "TollFree": "toll-free", "Mobile": "mobile"}

#: Form parameters Twilio takes on IncomingPhoneNumbers create/update (from the spec).
NUMBER_PARAMS = frozenset(
    {
        "AccountSid",
        "AddressSid",
        "ApiVersion",
        "BundleSid",
        "EmergencyAddressSid",
        "EmergencyStatus",
        "FriendlyName",
        "IdentitySid",
        "SmsApplicationSid",
        "SmsFallbackMethod",
        "SmsFallbackUrl",
        "SmsMethod",
        "SmsUrl",
        "StatusCallback",
        "StatusCallbackMethod",
        "TrunkSid",
        "VoiceApplicationSid",
        "VoiceCallerIdLookup",
        "VoiceFallbackMethod",
        "VoiceFallbackUrl",
        "VoiceMethod",
        "VoiceReceiveMode",
        "VoiceUrl",
    }
)
#: Form parameters Twilio takes on Applications create/update (from the spec).
APPLICATION_PARAMS = frozenset(
    {
        "ApiVersion",
        "FriendlyName",
        "MessageStatusCallback",
        "PublicApplicationConnectEnabled",
        "SmsFallbackMethod",
        "SmsFallbackUrl",
        "SmsMethod",
        "SmsStatusCallback",
        "SmsUrl",
        "StatusCallback",
        "StatusCallbackMethod",
        "VoiceCallerIdLookup",
        "VoiceFallbackMethod",
        "VoiceFallbackUrl",
        "VoiceMethod",
        "VoiceUrl",
    }
)
_BOOL_PARAMS = frozenset({"VoiceCallerIdLookup", "PublicApplicationConnectEnabled"})
_APP_SID_PARAMS = frozenset({"VoiceApplicationSid", "SmsApplicationSid"})
_KEYPAD = {
    letter: digit
    for digit, letters in {
        "2": "ABC",
        "3": "DEF",
        "4": "GHI",
        "5": "JKL",
        "6": "MNO",
        "7": "PQRS",
        "8": "TUV",
        "9": "WXYZ",
    }.items()
    for letter in letters
}

FormValue = str | list[str]


@dataclass
class RecordedRequest:
    """One request as the fake received it (``status``: what it answered)."""

    method: str
    path: str
    #: Query parameters; a parameter given more than once maps to a list of its values.
    query: dict[str, FormValue]
    #: Form body parameters (x-www-form-urlencoded only), multi-valued ones as lists.
    form: dict[str, FormValue]
    headers: dict[str, str]
    status: int = 0
    #: The query string and body exactly as sent (for replaying against Prism).
    raw_query: str = ""
    body: bytes = b""

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class TwilioError(Exception):
    """An error answer in Twilio's format."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, Any]:
        more_info = ERROR_DOCS.format(code=self.code)
        return {
            "code": self.code,
            "message": self.message,
            "more_info": more_info,
            "status": self.status,
        }


@dataclass
class _Failure:
    method: str
    pattern: re.Pattern[str]
    error: TwilioError


def _now() -> str:
    """RFC 2822 date as Twilio writes it: ``Thu, 30 Jul 2015 23:19:04 +0000``."""
    return email.utils.format_datetime(datetime.now(UTC).replace(microsecond=0))


def _snake(param: str) -> str:
    """``VoiceApplicationSid`` -> ``voice_application_sid``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", param).lower()


def _multi(pairs: Iterable[tuple[str, str]]) -> dict[str, FormValue]:
    out: dict[str, FormValue] = {}
    for key, value in pairs:
        if key not in out:
            out[key] = value
        else:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
    return out


def _one(params: dict[str, FormValue], name: str) -> str | None:
    """The (last) value of ``name``, or None."""
    value = params.get(name)
    return value[-1] if isinstance(value, list) else value


def _int(value: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return max(lo, min(hi, int(value))) if value is not None else default
    except ValueError:
        return default


def pretty_number(phone_number: str) -> str:
    """Twilio's friendly name for a number: ``+14155550101`` -> ``(415) 555-0101``."""
    m = re.fullmatch(r"\+1(\d{3})(\d{3})(\d{4})", phone_number)
    return f"({m[1]}) {m[2]}-{m[3]}" if m else phone_number


def contains_regex(pattern: str) -> re.Pattern[str]:
    """Twilio's ``Contains`` pattern: digits, letters (keypad digits), ``*`` = any digit."""
    parts = []
    for ch in pattern.upper():
        if ch.isdigit():
            parts.append(ch)
        elif ch == "*":
            parts.append(r"\d")
        else:
            parts.append(_KEYPAD.get(ch, re.escape(ch)))
    return re.compile("".join(parts))


def _is_local_host(host: str) -> bool:
    if host == "localhost" or host.endswith((".localhost", ".local")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def _available(
    country: str,
    phone_number: str,
    *,
    voice: bool = True,
    sms: bool = True,
    mms: bool = False,
    fax: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "friendly_name": pretty_number(phone_number),
        "phone_number": phone_number,
        "lata": None,
        "locality": None,
        "rate_center": None,
        "latitude": None,
        "longitude": None,
        "region": None,
        "postal_code": None,
        "iso_country": country,
        "address_requirements": "none",
        "beta": False,
        "capabilities": {"voice": voice, "sms": sms, "mms": mms, "fax": fax},
    }
    entry.update(fields)
    return entry


def default_available() -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The pre-seeded pool: US local numbers in several area codes, US toll-free, GB mobile.

    One of the local numbers is NOT voice-capable; one spells CALL.
    """
    us = [
        ("+14155550101", "San Francisco", "CA", "94105", True),
        ("+14155550102", "San Francisco", "CA", "94107", True),
        ("+12125550143", "New York", "NY", "10001", True),
        ("+13125550177", "Chicago", "IL", "60601", False),  # SMS only: not voice-capable
        ("+16465552255", "New York", "NY", "10013", True),  # ...2255 spells CALL
        ("+15125550188", "Austin", "TX", "78701", True),
    ]
    local = [
        _available(
            "US",
            pn,
            voice=voice,
            mms=True,
            locality=city,
            region=region,
            postal_code=zip_,
            rate_center=city.upper(),
            lata="722",
        )
        for pn, city, region, zip_, voice in us
    ]
    return {
        ("US", "Local"): local,
        ("US", "TollFree"): [
            _available("US", "+18005550199"),
            _available("US", "+18885550142", mms=True),
        ],
        ("GB", "Mobile"): [
            _available("GB", "+447700900123", region="London"),
            _available("GB", "+447700900456", sms=False, region="Manchester"),
        ],
    }


Handler = Callable[..., tuple[int, dict[str, Any] | None]]


class FakeTwilio(BackgroundServer):
    """Fake Twilio REST API (2010-04-01) on 127.0.0.1, run in a background thread."""

    def __init__(
        self,
        account_sid: str = "AC" + "0" * 32,
        auth_token: str = "fake-auth-token",
        api_key: str | None = None,
        api_secret: str | None = None,
        *,
        trial: bool = False,
        friendly_name: str = "crctl test account",
        port: int = 0,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_key = api_key
        self.api_secret = api_secret
        self.trial = trial
        self.friendly_name = friendly_name
        #: Account ``status``: "active", "suspended" or "closed".
        self.status = "active"
        #: Refuse URLs on localhost/private addresses (Twilio cannot reach them).
        self.reject_local_urls = True
        #: Numbers that can be bought, by (ISO country, "Local"|"TollFree"|"Mobile").
        self.available: dict[tuple[str, str], list[dict[str, Any]]] = default_available()
        self.numbers: dict[str, dict[str, Any]] = {}
        self.applications: dict[str, dict[str, Any]] = {}
        #: Calls created, by sid (the Call resource as served).
        self.calls: dict[str, dict[str, Any]] = {}
        #: What each call was created with (form parameters, multi-valued ones as lists).
        self.call_forms: dict[str, dict[str, FormValue]] = {}
        #: Numbers the account may call from besides its own, and a trial account may call.
        self.verified_caller_ids: set[str] = set()
        #: Calling-code prefixes the account may call (Voice geographic permissions).
        self.geo_permissions: set[str] = {"+1"}
        #: Voice Insights events by CallSid (:meth:`add_insights_events`).
        self.insights_events: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self.date_created = _now()
        self._port = port
        self._lock = threading.RLock()
        self._failures: list[_Failure] = []
        super().__init__()
        self._runner: web.AppRunner | None = None
        acc = r"/2010-04-01/Accounts/(?P<account>[^/]+)"
        self._routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (re.compile(acc + r"\.json"), {"GET": self._fetch_account}),
            (
                re.compile(
                    acc + r"/AvailablePhoneNumbers/(?P<country>[^/]+)/(?P<kind>[^/]+)\.json"
                ),
                {"GET": self._list_available},
            ),
            (
                re.compile(acc + r"/IncomingPhoneNumbers\.json"),
                {"GET": self._list_numbers, "POST": self._buy_number},
            ),
            (
                re.compile(acc + r"/IncomingPhoneNumbers/(?P<sid>[^/]+)\.json"),
                {
                    "GET": self._fetch_number,
                    "POST": self._update_number,
                    "DELETE": self._release_number,
                },
            ),
            (
                re.compile(acc + r"/Applications\.json"),
                {"GET": self._list_applications, "POST": self._create_application},
            ),
            (
                re.compile(acc + r"/Applications/(?P<sid>[^/]+)\.json"),
                {
                    "GET": self._fetch_application,
                    "POST": self._update_application,
                    "DELETE": self._delete_application,
                },
            ),
            (
                re.compile(acc + r"/Calls\.json"),
                {"GET": self._list_calls, "POST": self._create_call},
            ),
            (
                re.compile(acc + r"/Calls/(?P<sid>[^/]+)\.json"),
                {"GET": self._fetch_call, "POST": self._update_call},
            ),
            (re.compile(r"/v1/Voice/(?P<call_sid>[^/]+)/Events"), {"GET": self._list_events}),
        ]

    # ---- test controls -------------------------------------------------------
    @property
    def account_path(self) -> str:
        """The account's REST path, ``/2010-04-01/Accounts/AC...``."""
        return f"/{API_VERSION}/Accounts/{self.account_sid}"

    def add_number(self, phone_number: str, **fields: Any) -> dict[str, Any]:
        """Give the account a number; returns the stored resource.

        ``fields`` override resource fields by their JSON names (``voice_url=...``,
        ``voice_application_sid=...``, ``type="toll-free"``...). The resource is live: later
        requests change it.
        """
        with self._lock:
            resource = self._new_number(phone_number)
            self._override(resource, fields)
            self._take_available(phone_number)
            self.numbers[resource["sid"]] = resource
            return resource

    def add_application(self, friendly_name: str, **fields: Any) -> dict[str, Any]:
        """Create a TwiML Application; ``fields`` as in :meth:`add_number`."""
        with self._lock:
            resource = self._new_application()
            resource["friendly_name"] = friendly_name
            self._override(resource, fields)
            self.applications[resource["sid"]] = resource
            return resource

    def add_available(
        self, country: str, kind: str, phone_number: str, **fields: Any
    ) -> dict[str, Any]:
        """Put a number in the pool.

        ``fields``: ``voice=``/``sms=``/``mms=``/``fax=`` capabilities and any available-number
        field (``locality=``...).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}")
        entry = _available(country, phone_number, **fields)
        with self._lock:
            self.available.setdefault((country, kind), []).append(entry)
        return entry

    def add_insights_events(self, call_sid: str, *events: dict[str, Any]) -> list[dict[str, Any]]:
        """Make ``call_sid`` known to Voice Insights, with these events (none: not processed yet).

        Each event needs ``name`` and ``timestamp`` (ISO 8601, as Twilio writes it:
        ``2025-06-01T10:00:01.250Z``); any other field of the Call Insights Event resource
        (``group``, ``level``, ``edge``, ``carrier_edge``…, ``conversation_relay_data``)
        overrides the defaults. Adding to a call appends. Returns the call's stored events.
        """
        with self._lock:
            stored = self.insights_events.setdefault(call_sid, [])
            for fields in events:
                if "name" not in fields or "timestamp" not in fields:
                    raise ValueError("an Insights event needs a name and a timestamp")
                event: dict[str, Any] = {
                    "timestamp": None,
                    "call_sid": call_sid,
                    "account_sid": self.account_sid,
                    "edge": "unknown_edge",
                    "group": None,
                    "level": "INFO",
                    "name": None,
                    "carrier_edge": None,
                    "sip_edge": None,
                    "sdk_edge": None,
                    "client_edge": None,
                }
                event.update(fields)
                stored.append(event)
            return [dict(e) for e in stored]

    def set_call_status(self, sid: str, status: str, **fields: Any) -> dict[str, Any]:
        """Move a call on (``ringing``, ``in-progress``, ``completed``…); returns it."""
        with self._lock:
            call = self.calls[sid]
            call.update(status=status, date_updated=_now(), **fields)
            return dict(call)

    def call_request(self, sid: str) -> dict[str, FormValue]:
        """The form parameters call ``sid`` was created with."""
        with self._lock:
            return dict(self.call_forms[sid])

    def number_by_phone(self, phone_number: str) -> dict[str, Any] | None:
        with self._lock:
            return next(
                (n for n in self.numbers.values() if n["phone_number"] == phone_number), None
            )

    def applications_named(self, friendly_name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [a for a in self.applications.values() if a["friendly_name"] == friendly_name]

    def requests_to(self, method: str, path_regex: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method whose path matches ``path_regex`` (search)."""
        pattern = re.compile(path_regex)
        with self._lock:
            return [r for r in self.requests if r.method == method and pattern.search(r.path)]

    def fail_next(self, method: str, path_regex: str, status: int, code: int, message: str) -> None:
        """Answer the next matching request with this Twilio error, once.

        A request matches by ``method`` ("*": any) and by its path (``re.search`` of
        ``path_regex``). Checked after authentication.
        """
        failure = _Failure(
            method.upper(), re.compile(path_regex), TwilioError(status, code, message)
        )
        with self._lock:
            self._failures.append(failure)

    def down(self) -> None:
        """Simulate no network: close the listener and every open connection."""
        self._call(self._close_site())

    def up(self) -> None:
        """Listen again, on the same port."""
        self._call(self._open_site())

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    # ---- lifecycle ------------------------------------------------------------
    # ---- server thread ---------------------------------------------------------
    def _call(self, coro: Any) -> None:
        if self._loop is None:
            coro.close()
            raise RuntimeError("FakeTwilio is not started")
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _main(self, ready: threading.Event) -> None:
        await self._open_site()
        self.base_url = f"http://127.0.0.1:{self._port}"
        self._loop, self._stop_event = asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self._close_site()

    async def _open_site(self) -> None:
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner

    async def _close_site(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # stops listening and closes keep-alive connections

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        raw_query = request.rel_url.raw_query_string
        form: dict[str, FormValue] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = _multi(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=_multi(parse_qsl(raw_query, keep_blank_values=True)),
            form=form,
            headers=dict(request.headers),
            raw_query=raw_query,
            body=body,
        )
        try:
            status, payload = self._respond(rec)
        except TwilioError as err:
            status, payload = err.status, err.body()
        rec.status = status
        with self._lock:
            self.requests.append(rec)
        if payload is None:
            return web.Response(status=status)
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
        return web.json_response(payload, status=status, headers=headers)

    # ---- dispatch --------------------------------------------------------------
    def _respond(self, rec: RecordedRequest) -> tuple[int, dict[str, Any] | None]:
        with self._lock:
            account = self._authenticate(rec)
            for i, failure in enumerate(self._failures):
                if failure.method in ("*", rec.method) and failure.pattern.search(rec.path):
                    del self._failures[i]
                    raise failure.error
            for pattern, handlers in self._routes:
                m = pattern.fullmatch(rec.path)
                if m is None:
                    continue
                handler = handlers.get(rec.method)
                if handler is None:
                    raise TwilioError(405, METHOD_NOT_ALLOWED, "Method not allowed")
                params = m.groupdict()
                if params.pop("account", account) != account:  # Insights paths name no account
                    raise TwilioError(401, AUTHENTICATE, "Authenticate")
                return handler(rec, **params)
            raise self._not_found(rec)

    def _authenticate(self, rec: RecordedRequest) -> str:
        """The account the request's Basic credentials belong to, else 401 20003."""
        header = next((v for k, v in rec.headers.items() if k.lower() == "authorization"), "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = password = ""
            if (user, password) == (self.account_sid, self.auth_token):
                return self.account_sid
            if self.api_key and (user, password) == (self.api_key, self.api_secret):
                return self.account_sid
        raise TwilioError(401, AUTHENTICATE, "Authenticate")

    @staticmethod
    def _not_found(rec: RecordedRequest) -> TwilioError:
        return TwilioError(404, NOT_FOUND, f"The requested resource {rec.path} was not found")

    # ---- resources ---------------------------------------------------------------
    def _fetch_account(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        base = self.account_path
        subresources = ("AvailablePhoneNumbers", "IncomingPhoneNumbers", "Applications", "Calls")
        return 200, {
            "auth_token": self.auth_token,
            "date_created": self.date_created,
            "date_updated": self.date_created,
            "friendly_name": self.friendly_name,
            "owner_account_sid": self.account_sid,
            "sid": self.account_sid,
            "status": self.status,
            "subresource_uris": {_snake(name): f"{base}/{name}.json" for name in subresources},
            "type": "Trial" if self.trial else "Full",
            "uri": f"{base}.json",
        }

    def _list_available(
        self, rec: RecordedRequest, country: str, kind: str
    ) -> tuple[int, dict[str, Any]]:
        if kind not in KINDS or not any(c == country for c, _ in self.available):
            raise self._not_found(rec)
        q = rec.query
        found = list(self.available.get((country, kind), []))
        area_code = _one(q, "AreaCode")
        if area_code:
            found = [n for n in found if n["phone_number"].startswith(f"+1{area_code}")]
        contains = _one(q, "Contains")
        if contains:
            pattern = contains_regex(contains)
            found = [n for n in found if pattern.search(n["phone_number"][1:])]
        for param, capability in (
            ("VoiceEnabled", "voice"),
            ("SmsEnabled", "sms"),
            ("MmsEnabled", "mms"),
            ("FaxEnabled", "fax"),
        ):  # only "true" filters: Twilio treats false as "don't care"
            if (_one(q, param) or "").lower() == "true":
                found = [n for n in found if n["capabilities"].get(capability)]
        found = found[: _int(_one(q, "PageSize"), 50, 1, 1000)]
        uri = rec.path + (f"?{rec.raw_query}" if rec.raw_query else "")
        return 200, {"available_phone_numbers": [dict(n) for n in found], "uri": uri}

    def _page(self, rec: RecordedRequest, key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        page_size = _int(_one(rec.query, "PageSize"), 50, 1, 1000)
        page = _int(_one(rec.query, "Page"), 0, 0, 1 << 31)
        filters = [
            (k, v)
            for k, v in parse_qsl(rec.raw_query, keep_blank_values=True)
            if k not in ("PageSize", "Page", "PageToken")
        ]

        def uri(number: int, token: str | None = None) -> str:
            params = [*filters, ("PageSize", str(page_size)), ("Page", str(number))]
            if token:
                params.append(("PageToken", token))
            return f"{rec.path}?{urlencode(params)}"

        start = page * page_size
        chunk = items[start : start + page_size]
        more = start + page_size < len(items)
        return {
            key: chunk,
            "end": start + max(len(chunk) - 1, 0),
            "first_page_uri": uri(0),
            "next_page_uri": uri(page + 1, f"PA{chunk[-1]['sid']}") if more and chunk else None,
            "page": page,
            "page_size": page_size,
            "previous_page_uri": uri(page - 1) if page > 0 else None,
            "start": start,
            "uri": uri(page),
        }

    # Voice Insights
    def _list_events(self, rec: RecordedRequest, call_sid: str) -> tuple[int, dict[str, Any]]:
        events = self.insights_events.get(call_sid)
        if events is None:
            raise self._not_found(rec)
        edge = _one(rec.query, "Edge")
        items = [dict(e) for e in events if not edge or e.get("edge") == edge]
        page_size = _int(_one(rec.query, "PageSize"), 50, 1, 1000)
        page = _int(_one(rec.query, "Page"), 0, 0, 1 << 31)
        base = INSIGHTS_API_BASE + rec.path
        extra = [("Edge", edge)] if edge else []

        def url(number: int) -> str:
            params = [*extra, ("PageSize", str(page_size)), ("Page", str(number))]
            if number:
                params.append(("PageToken", f"PT{number}"))
            return f"{base}?{urlencode(params)}"

        start = page * page_size
        more = start + page_size < len(items)
        return 200, {
            "events": items[start : start + page_size],
            "meta": {
                "first_page_url": url(0),
                "key": "events",
                "next_page_url": url(page + 1) if more else None,
                "page": page,
                "page_size": page_size,
                "previous_page_url": url(page - 1) if page > 0 else None,
                "url": url(page),
            },
        }

    # IncomingPhoneNumbers
    def _new_number(self, phone_number: str, kind: str = "local") -> dict[str, Any]:
        sid = "PN" + uuid.uuid4().hex
        now = _now()
        return {
            "account_sid": self.account_sid,
            "address_requirements": "none",
            "address_sid": None,
            "api_version": API_VERSION,
            "beta": False,
            "capabilities": {"voice": True, "sms": True, "mms": False, "fax": False},
            "date_created": now,
            "date_updated": now,
            "emergency_status": "Inactive",
            "emergency_address_sid": None,
            "emergency_address_status": "unregistered",
            "friendly_name": pretty_number(phone_number),
            "identity_sid": None,
            "origin": "twilio",
            "phone_number": phone_number,
            "sid": sid,
            "sms_application_sid": "",
            "sms_fallback_method": "POST",
            "sms_fallback_url": "",
            "sms_method": "POST",
            "sms_url": "",
            "status_callback": "",
            "status_callback_method": "POST",
            "trunk_sid": None,
            "uri": f"{self.account_path}/IncomingPhoneNumbers/{sid}.json",
            "voice_application_sid": "",
            "voice_caller_id_lookup": False,
            "voice_fallback_method": "POST",
            "voice_fallback_url": None,
            "voice_method": "POST",
            "voice_url": None,
            "voice_receive_mode": "voice",
            "bundle_sid": None,
            "status": "in-use",
            "type": kind,
        }

    def _number(self, rec: RecordedRequest, sid: str) -> dict[str, Any]:
        number = self.numbers.get(sid)
        if number is None:
            raise self._not_found(rec)
        return number

    def _list_numbers(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        items = list(self.numbers.values())
        phone = _one(rec.query, "PhoneNumber")
        if phone:  # Twilio matches a whole or partial number, "*" = any digit
            pattern = contains_regex(phone.lstrip("+"))
            items = [n for n in items if pattern.search(n["phone_number"][1:])]
        name = _one(rec.query, "FriendlyName")
        if name:
            items = [n for n in items if n["friendly_name"] == name]
        return 200, self._page(rec, "incoming_phone_numbers", [dict(n) for n in items])

    def _buy_number(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        phone, area_code = _one(rec.form, "PhoneNumber"), _one(rec.form, "AreaCode")
        owned = self.number_by_phone(phone) if phone else None
        if owned is not None:  # Twilio answers 201 and applies the fields, like an update
            self._apply(owned, rec.form, NUMBER_PARAMS, INVALID_APP_SID)
            return 201, dict(owned)
        if self.trial and self.numbers:
            raise TwilioError(400, TRIAL_NUMBER_LIMIT, TRIAL_LIMIT_MESSAGE)
        if phone:
            found = self._find_available(lambda n: n["phone_number"] == phone)
            if found is None:
                raise TwilioError(400, NUMBER_UNAVAILABLE, f"Number {phone} is not available")
        elif area_code:
            found = self._find_available(
                lambda n: n["phone_number"].startswith(f"+1{area_code}"), kinds=("Local",)
            )
            if found is None:
                raise TwilioError(
                    400, NUMBER_UNAVAILABLE, f"No phone numbers found in area code {area_code}"
                )
        else:
            raise TwilioError(400, INVALID_PHONE_NUMBER, "A PhoneNumber or AreaCode is required")
        kind, entry = found
        number = self._new_number(entry["phone_number"], KINDS[kind])
        number["capabilities"] = dict(entry["capabilities"])
        self._apply(number, rec.form, NUMBER_PARAMS, APP_NOT_ACCESSIBLE)
        self._take_available(entry["phone_number"])
        self.numbers[number["sid"]] = number
        return 201, dict(number)

    def _find_available(
        self, match: Callable[[dict[str, Any]], bool], kinds: Iterable[str] = tuple(KINDS)
    ) -> tuple[str, dict[str, Any]] | None:
        for (_, kind), entries in self.available.items():
            if kind in kinds:
                for entry in entries:
                    if match(entry):
                        return kind, entry
        return None

    def _take_available(self, phone_number: str) -> None:
        for entries in self.available.values():
            entries[:] = [n for n in entries if n["phone_number"] != phone_number]

    def _fetch_number(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        return 200, dict(self._number(rec, sid))

    def _update_number(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        number = self._number(rec, sid)
        self._apply(number, rec.form, NUMBER_PARAMS, INVALID_APP_SID)
        return 200, dict(number)

    def _release_number(self, rec: RecordedRequest, sid: str) -> tuple[int, None]:
        self._number(rec, sid)
        del self.numbers[sid]
        return 204, None

    # Applications
    def _new_application(self) -> dict[str, Any]:
        sid = "AP" + uuid.uuid4().hex
        now = _now()
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "date_created": now,
            "date_updated": now,
            "friendly_name": None,
            "message_status_callback": None,
            "sid": sid,
            "sms_fallback_method": "POST",
            "sms_fallback_url": None,
            "sms_method": "POST",
            "sms_status_callback": None,
            "sms_url": None,
            "status_callback": None,
            "status_callback_method": "POST",
            "uri": f"{self.account_path}/Applications/{sid}.json",
            "voice_caller_id_lookup": False,
            "voice_fallback_method": "POST",
            "voice_fallback_url": None,
            "voice_method": "POST",
            "voice_url": None,
            "public_application_connect_enabled": False,
        }

    def _application(self, rec: RecordedRequest, sid: str) -> dict[str, Any]:
        app = self.applications.get(sid)
        if app is None:
            raise self._not_found(rec)
        return app

    def _list_applications(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        items = list(self.applications.values())
        name = _one(rec.query, "FriendlyName")
        if name:
            items = [a for a in items if a["friendly_name"] == name]
        return 200, self._page(rec, "applications", [dict(a) for a in items])

    def _create_application(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        app = self._new_application()
        self._apply(app, rec.form, APPLICATION_PARAMS, INVALID_APP_SID)
        self.applications[app["sid"]] = app
        return 201, dict(app)

    def _fetch_application(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        return 200, dict(self._application(rec, sid))

    def _update_application(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        app = self._application(rec, sid)
        self._apply(app, rec.form, APPLICATION_PARAMS, INVALID_APP_SID)
        return 200, dict(app)

    def _delete_application(self, rec: RecordedRequest, sid: str) -> tuple[int, None]:
        self._application(rec, sid)
        del self.applications[sid]
        for number in self.numbers.values():
            for key in ("voice_application_sid", "sms_application_sid"):
                if number[key] == sid:
                    number[key] = ""
        return 204, None

    # Calls
    def _create_call(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        form = rec.form
        to, from_ = _one(form, "To") or "", _one(form, "From") or ""
        if not (_E164.fullmatch(to) or to.startswith(("client:", "sip:"))):
            raise TwilioError(400, CALL_INVALID_TO, f"Invalid 'To' Phone Number: {to}")
        owned = self.number_by_phone(from_) is not None
        if not owned and from_ not in self.verified_caller_ids:
            raise TwilioError(
                400,
                CALL_CALLER_ID,
                f"The source phone number provided, {from_}, is not yet verified for your "
                "account. You may only make calls from phone numbers that you've verified or "
                "purchased from Twilio.",
            )
        if to.startswith("+") and not any(to.startswith(p) for p in self.geo_permissions):
            raise TwilioError(
                400,
                CALL_GEO_PERMISSION,
                f"Account not authorized to call {to}. Perhaps you need to enable some "
                "international permissions: "
                "https://www.twilio.com/console/voice/calls/geo-permissions/low-risk",
            )
        if self.trial and to not in self.verified_caller_ids:
            raise TwilioError(
                400,
                CALL_TRIAL_UNVERIFIED,
                f"The number {to} is unverified. Trial accounts cannot call unverified numbers; "
                "verify it at twilio.com/user/account/phone-numbers/verified, or purchase a "
                "Twilio number to call this number.",
            )
        if not any(_one(form, p) for p in ("Url", "Twiml", "ApplicationSid")):
            raise TwilioError(400, CALL_NO_URL, "Url parameter is required.")
        for param in form:
            value = _one(form, param) or ""
            if param.endswith("Method") and value.upper() not in ("GET", "POST"):
                raise TwilioError(400, INVALID_METHOD, f"{param} must be GET or POST")
            if param in ("Url", "StatusCallback", "AsyncAmdStatusCallback"):
                self._check_url(param, value)
        sid = "CA" + uuid.uuid4().hex
        now = _now()
        call: dict[str, Any] = {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": now,
            "date_updated": now,
            "direction": "outbound-api",
            "duration": None,
            "end_time": None,
            "forwarded_from": None,
            "from": from_,
            "from_formatted": pretty_number(from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": (self.number_by_phone(from_) or {}).get("sid"),
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": sid,
            "start_time": None,
            "status": "queued",
            "subresource_uris": {
                name: f"{self.account_path}/Calls/{sid}/{name.title().replace('_', '')}.json"
                for name in ("notifications", "recordings", "payments", "events")
            },
            "to": to,
            "to_formatted": pretty_number(to),
            "trunk_sid": None,
            "uri": f"{self.account_path}/Calls/{sid}.json",
        }
        self.calls[sid] = call
        self.call_forms[sid] = {k: v for k, v in form.items() if k in CALL_PARAMS}
        return 201, dict(call)

    def _call_resource(self, rec: RecordedRequest, sid: str) -> dict[str, Any]:
        call = self.calls.get(sid)
        if call is None:
            raise self._not_found(rec)
        return call

    def _list_calls(self, rec: RecordedRequest) -> tuple[int, dict[str, Any]]:
        items = [dict(c) for c in self.calls.values()]
        status = _one(rec.query, "Status")
        if status:
            items = [c for c in items if c["status"] == status]
        return 200, self._page(rec, "calls", items)

    def _fetch_call(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        return 200, dict(self._call_resource(rec, sid))

    def _update_call(self, rec: RecordedRequest, sid: str) -> tuple[int, dict[str, Any]]:
        call = self._call_resource(rec, sid)
        status = _one(rec.form, "Status")
        if status in ("completed", "canceled"):
            call.update(status=status, date_updated=_now())
        return 200, dict(call)

    # ---- field handling --------------------------------------------------------------
    @staticmethod
    def _override(resource: dict[str, Any], fields: dict[str, Any]) -> None:
        unknown = set(fields) - set(resource)
        if unknown:
            raise ValueError(f"unknown resource fields: {sorted(unknown)}")
        resource.update(fields)

    def _apply(
        self,
        resource: dict[str, Any],
        form: dict[str, FormValue],
        allowed: frozenset[str],
        bad_app_code: int,
    ) -> None:
        """Validate then apply the form's parameters (all or nothing).

        Unknown ones are ignored, as Twilio does.
        """
        changes: dict[str, Any] = {}
        for param in form:
            if param not in allowed or param == "AccountSid":
                continue
            value: Any = _one(form, param) or ""
            if param.endswith("Method"):
                value = value.upper()
                if value not in ("GET", "POST"):
                    raise TwilioError(400, INVALID_METHOD, f"{param} must be GET or POST")
            elif param.endswith(("Url", "Callback")):
                self._check_url(param, value)
            elif param in _BOOL_PARAMS:
                value = value.lower() == "true"
            elif param in _APP_SID_PARAMS and value and value not in self.applications:
                code = bad_app_code
                text = (
                    "ApplicationSid is not accessible"
                    if code == APP_NOT_ACCESSIBLE
                    else ("Invalid Application SID")
                )
                raise TwilioError(400, code, f"{text}: {param}={value}")
            changes[_snake(param)] = value
        if changes:
            resource.update(changes, date_updated=_now())

    def _check_url(self, param: str, value: str) -> None:
        if value == "":
            return
        try:
            parts = urlsplit(value)
            host = parts.hostname or ""
        except ValueError:
            parts, host = None, ""
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise TwilioError(400, INVALID_URL, f"{param} is not a valid URL: {value}")
        if self.reject_local_urls and _is_local_host(host):
            raise TwilioError(
                400, INVALID_URL, f"{param} is not a valid URL: {value} (not reachable by Twilio)"
            )
