"""``crctl calls show CA… --insights``: Twilio's Voice Insights events beside the relay's view.

With Voice Insights Advanced Features on, Twilio records what ConversationRelay saw of a call
(``start_of_customer_speech``, ``end_of_customer_speech``, ``prompt_sent``,
``first_token_received``, ``start_of_agent_speech``, ``stt_latency``/``tts_latency`` with
``latency_ms``, ``interrupt``…; https://www.twilio.com/docs/voice/voice-insights/api/call/details-conversation-relay-events)
and serves them at ``GET https://insights.twilio.com/v1/Voice/{CallSid}/Events``
(https://www.twilio.com/docs/voice/voice-insights/api/call/call-events-resource), "typically
within 90 seconds". The events are read with the twilio SDK's client (the one
:func:`crctl.provisioning.make_client` builds), whose requests to insights.twilio.com go, like
those to api.twilio.com, to ``CRCTL_TWILIO_API_URL`` when that is set (a fake, Prism).

They are shown in time order, each at its offset from the call's start as the relay recorded
it (the first event's time when the relay has none), with its name and the fields worth
reading: the ConversationRelay payload (``conversation_relay_data``, a property of the event
beside its edges, as Twilio's own SDK reads it: ``twilio.rest.insights.v1.call.event``, an
object or its JSON text; the docs name the payload's properties but show no whole event, so
crctl also reads them at the event's top level and in its edge objects), and the level when it
is a warning or an error.

Nothing here stops the relay's part from printing: a 404 (Advanced Features off, or a call
Twilio does not know) and "no events yet" for a call that ended under two minutes ago are one
line saying what to do; missing credentials are crctl's usual credentials error, and any other
Twilio failure one readable error line, both after the relay's part.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from crctl.errors import CrctlError, CredentialsError

INSIGHTS_API = "https://insights.twilio.com"
#: Twilio makes events available "typically within 90 seconds" of the call; a margin on top.
TOO_RECENT_S = 120.0
#: The event fields that are the event itself, not what it says.
_BASE_FIELDS = frozenset(
    {"timestamp", "call_sid", "account_sid", "edge", "group", "level", "name", "url"}
)
_EDGES = ("carrier_edge", "sip_edge", "sdk_edge", "client_edge")
_PAYLOAD = "conversation_relay_data"
#: Payload fields every ConversationRelay event carries, not worth a column.
_QUIET = frozenset({"session_id", "sequence_number", "metadata"})
ADVANCED_FEATURES_HINT = (
    "turn on Voice Insights Advanced Features in the Twilio Console (Voice > Settings > "
    "Voice Insights) for calls from then on"
)


class InsightsError(CrctlError):
    """Twilio's Voice Insights could not be read (exit 1); the relay's part was printed."""


@dataclass
class Insights:
    """What Twilio's Voice Insights said of one call, ready to print or to put in ``--json``."""

    call_sid: str
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Why there are no events, and what to do (404, not yet): printed, exit 0.
    note: str | None = None
    #: A failure: printed as the error line after the relay's part.
    error: CrctlError | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``insights`` key of ``crctl calls show --json``."""
        return {
            "events": self.events,
            "note": self.note,
            "error": str(self.error) if self.error is not None else None,
        }

    def finish(self, json_out: bool) -> None:
        """After the relay's part: print the events (text mode), then fail if reading failed."""
        if not json_out:
            _print(self)
        elif self.note:
            from crctl.console import err

            err.print(self.note, markup=False, highlight=False)
        if self.error is not None:
            raise self.error


def load_insights(call: dict[str, Any]) -> Insights:
    """Read Twilio's events for a stored call (as ``/calls/{sid}`` serves it).

    Puts them under ``call["insights"]`` (the ``--json`` key) and returns them for
    :meth:`Insights.finish`. Never raises for Twilio's or the credentials' sake: the relay's
    part prints first.
    """
    sid = str(call.get("call_sid") or call.get("sid") or "")
    result = Insights(sid)
    try:
        raw = fetch_events(sid)
    except CredentialsError as exc:
        result.error = exc
    except _NotFound:
        result.note = f"Twilio has no Voice Insights for {sid}: {ADVANCED_FEATURES_HINT}"
        if _ended_recently(call):
            result.note += "; if the call just ended, try again in a minute"
        else:
            result.note += ", and check that the call belongs to this account"
    except InsightsError as exc:
        result.error = exc
    else:
        result.events = arrange(raw, call.get("started"))
        if not result.events:
            result.note = (
                f"no Voice Insights events for {sid} yet: Twilio publishes them about 90 s "
                "after the call ends; try again in a minute"
                if _ended_recently(call)
                else f"Twilio has no Voice Insights events for {sid}: {ADVANCED_FEATURES_HINT}"
            )
    call["insights"] = result.to_json()
    return result


def _ended_recently(call: dict[str, Any], now: float | None = None) -> bool:
    """The call is live, or ended less than :data:`TOO_RECENT_S` ago (by the relay's clock)."""
    ended = call.get("ended")
    if not isinstance(ended, (int, float)):
        return True  # still live, or the relay never saw it end: too early to tell
    return (now if now is not None else time.time()) - float(ended) < TOO_RECENT_S


# ---------------------------------------------------------------------------- Twilio
class _NotFound(Exception):
    """Twilio answered 404 for the call's events."""


def fetch_events(
    call_sid: str, *, api_url: str | None = None, page_size: int = 1000
) -> list[dict[str, Any]]:
    """Every Voice Insights event of ``call_sid``, as Twilio's JSON objects.

    ``api_url``: where the requests go instead of insights.twilio.com (default: the
    ``CRCTL_TWILIO_API_URL`` setting); ``page_size``: events per request (Twilio's most is 1000;
    the SDK follows ``meta.next_page_url``). Raises :class:`CredentialsError`, :class:`_NotFound` or
    :class:`InsightsError`.
    """
    import requests
    from twilio.base.exceptions import TwilioException, TwilioRestException

    from crctl.credentials import resolve
    from crctl.errors import ProvisioningError
    from crctl.provisioning import api_base, make_client, twilio_errors

    credentials = resolve()  # flags > environment > .env > twilio-cli: a CredentialsError
    base = api_url or api_base()
    client = make_client(credentials, base)
    redirected = base.rstrip("/") not in ("https://api.twilio.com", INSIGHTS_API)
    if redirected:
        client.http_client = _redirecting_client(base)
    host = base if redirected else INSIGHTS_API
    action = f"reading Voice Insights events for {call_sid}"
    try:
        with twilio_errors(action):
            try:
                records = client.insights.v1.calls(call_sid).events.list(page_size=page_size)
            except TwilioException as exc:
                response = exc.args[1] if len(exc.args) > 1 else None
                status = getattr(response, "status_code", None)
                if isinstance(exc, TwilioRestException):
                    status = exc.status
                if status == 404:
                    raise _NotFound from None
                twilio_said = isinstance(exc, TwilioRestException) or _twilio_error_body(response)
                if status is not None and not twilio_said:
                    raise InsightsError(f"{action} failed: Twilio answered HTTP {status}") from None
                raise
            except requests.exceptions.RequestException as exc:
                raise InsightsError(
                    f"{action} failed: cannot reach Twilio at {host} ({type(exc).__name__}); "
                    "check the network connection and try again"
                ) from None
    except ProvisioningError as exc:
        if exc.status == 404:
            raise _NotFound from None
        raise InsightsError(str(exc)) from None
    return [_as_dict(record) for record in records]


def _twilio_error_body(response: Any) -> bool:
    try:
        body = json.loads(getattr(response, "text", "") or "")
    except ValueError:
        return False
    return isinstance(body, dict) and "code" in body


def _as_dict(record: Any) -> dict[str, Any]:
    """An SDK EventInstance back as Twilio's JSON object (its known fields)."""
    names = ("timestamp", "call_sid", "account_sid", "edge", "group", "level", "name")
    out = {name: getattr(record, name, None) for name in names}
    for name in (*_EDGES, _PAYLOAD):
        value = getattr(record, name, None)
        if value is not None:
            out[name] = value
    return out


def _redirecting_client(base: str) -> Any:
    """The SDK's HTTP client, sending insights.twilio.com and api.twilio.com to ``base``."""
    from twilio.http.http_client import TwilioHttpClient

    class Redirecting(TwilioHttpClient):  # type: ignore[misc]
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            for origin in (INSIGHTS_API, "https://api.twilio.com"):
                if url.startswith(origin):
                    url = base.rstrip("/") + url[len(origin) :]
                    break
            return super().request(method, url, *args, **kwargs)

    return Redirecting(timeout=20)


# ---------------------------------------------------------------------------- shaping
def _when(timestamp: Any) -> float | None:
    """Unix time of Twilio's ISO 8601 ``timestamp`` (``2025-06-01T10:00:01.250Z``)."""
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def fields_of(event: dict[str, Any]) -> dict[str, Any]:
    """The fields worth reading: ConversationRelay's payload, wherever the event carries it."""
    found: dict[str, Any] = {}
    payload = event.get(_PAYLOAD)
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            payload = {"data": payload}
    sources = [payload] + [event.get(edge) for edge in _EDGES]
    sources.append({k: v for k, v in event.items() if k not in _BASE_FIELDS})
    for source in sources:
        if not isinstance(source, dict):
            continue
        for key, value in source.items():
            if key in _QUIET or key in _EDGES or key == _PAYLOAD or value in (None, "", {}, []):
                continue
            found.setdefault(key, value)
    if event.get("level") in ("WARNING", "ERROR"):
        found.setdefault("level", event["level"])
    return found


def _sequence(event: dict[str, Any]) -> int:
    payload = event.get(_PAYLOAD)
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            payload = None
    for source in (payload, event):
        if isinstance(source, dict) and isinstance(source.get("sequence_number"), int):
            return int(source["sequence_number"])
    return 0


def arrange(events: list[dict[str, Any]], started: Any = None) -> list[dict[str, Any]]:
    """Twilio's events in time order (then by sequence number), each with its offset.

    ``offset_ms``: from ``started`` (the relay's Unix time for the call's start), else from the
    first event; None for an event without a readable time (those come last).
    """
    timed = [(_when(e.get("timestamp")), _sequence(e), i, e) for i, e in enumerate(events)]
    timed.sort(key=lambda t: (t[0] is None, t[0] or 0.0, t[1], t[2]))
    times = [t for t, *_ in timed if t is not None]
    zero = float(started) if isinstance(started, (int, float)) else (times[0] if times else 0.0)
    return [
        {
            "offset_ms": round((when - zero) * 1000, 1) if when is not None else None,
            "timestamp": event.get("timestamp"),
            "name": event.get("name"),
            "group": event.get("group"),
            "edge": event.get("edge"),
            "level": event.get("level"),
            "fields": fields_of(event),
        }
        for when, _, _, event in timed
    ]


def _offset(ms: float | None) -> str:
    return "      ?" if ms is None else f"{ms / 1000:+8.3f}s"


def _value(value: Any) -> str:
    """A field's value: a number or a plain word as it is, anything else as JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value and not any(c.isspace() or c in '="' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False)


def _print(insights: Insights) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(highlight=False)
    if insights.events:
        console.print(  # times are from the call's start (the relay's), as in the relay's part
            f"[bold]Twilio Voice Insights[/] for {insights.call_sid}, "
            f"{len(insights.events)} events:",
            soft_wrap=True,
        )
        width = max(len(str(e["name"] or "")) for e in insights.events)
        for event in insights.events:
            shown = " ".join(f"{key}={_value(v)}" for key, v in event["fields"].items())
            name = str(event["name"] or "?").ljust(width)
            style = (
                "red"
                if event["level"] == "ERROR"
                else "yellow"
                if event["level"] == "WARNING"
                else ""
            )
            line = f"  {_offset(event['offset_ms'])}  {escape(name)}  {escape(shown)}".rstrip()
            console.print(f"[{style}]{line}[/]" if style else line, soft_wrap=True)
    if insights.note:
        console.print(f"[yellow]{escape(insights.note)}[/]", soft_wrap=True)
