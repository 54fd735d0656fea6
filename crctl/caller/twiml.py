"""Reading the TwiML a relay answers with, as Twilio reads it when a call rings.

Twilio docs: TwiML ``<Connect>`` and ``<ConversationRelay>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from crctl.caller.outcome import CallError
from relay_server.protocol.twilio_side import CallerModes


def _modes(value: str | None, default: str) -> frozenset[str]:
    """``none|dtmf|speech|any`` (``true``=any, ``false``=none) as the set of input kinds."""
    value = (value or default).strip().lower()
    value = {"true": "any", "false": "none"}.get(value, value)
    return frozenset(
        {"any": ("speech", "dtmf"), "speech": ("speech",), "dtmf": ("dtmf",)}.get(value, ())
    )


@dataclass(frozen=True)
class CallPlan:
    """What the TwiML says, and where this caller really connects."""

    #: The ``url=`` of ``<ConversationRelay>`` as written: what Twilio signs.
    ws_url: str
    #: Where the socket connects (the local address for a relay behind a tunnel).
    connect_url: str
    attributes: dict[str, str] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)
    #: ``<Connect action>`` resolved as Twilio requests it (signed), and where it is posted.
    action_url: str | None = None
    action_connect_url: str | None = None
    action_method: str = "POST"

    @property
    def welcome_greeting(self) -> str | None:
        """The ``welcomeGreeting`` Twilio speaks first, if any."""
        return self.attributes.get("welcomeGreeting") or None

    @property
    def dtmf_detection(self) -> bool:
        """Whether Twilio sends key presses (``dtmfDetection="true"``)."""
        return self.attributes.get("dtmfDetection", "false").lower() == "true"

    @property
    def interruptible(self) -> frozenset[str]:
        """Input kinds that interrupt the agent (default ``any``)."""
        return _modes(self.attributes.get("interruptible"), "any")

    @property
    def report_input(self) -> frozenset[str]:
        """Input reported while the agent speaks (default ``none`` since May 2025)."""
        return _modes(self.attributes.get("reportInputDuringAgentSpeech"), "none")

    @property
    def events(self) -> frozenset[str]:
        """The opt-in ``info`` events (``events`` and ``debug``)."""
        words = f"{self.attributes.get('events', '')} {self.attributes.get('debug', '')}"
        return frozenset(words.split())

    @property
    def partial_prompts(self) -> bool:
        """Whether Twilio sends cumulative partial transcripts."""
        return self.attributes.get("partialPrompts", "false").lower() == "true"

    @property
    def language(self) -> str:
        """The transcription language prompts are tagged with."""
        attrs = self.attributes
        return attrs.get("transcriptionLanguage") or attrs.get("language") or "en-US"

    def modes(self) -> CallerModes:
        """What the Twilio side may do on this call."""
        return CallerModes(
            interruptible=self.interruptible,
            report_input=self.report_input,
            events=self.events,
            dtmf_detection=self.dtmf_detection,
            lang=self.language,
            report_input_text=self.attributes.get("reportInputDuringAgentSpeech", "none"),
        )


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def route(target: str, fetched: str) -> str:
    """Where to send a request Twilio would send to ``target``, for a relay fetched over http.

    One whose TwiML names another host (its public URL) is reached where it was fetched, with
    the path and query of ``target``; one whose TwiML names ``wss://`` (or ``https://``) on the
    very host and port that just answered plain HTTP is reached without TLS, which that port
    does not speak. Signatures stay over ``target``, as Twilio signs.
    """
    t, f = urlsplit(target), urlsplit(fetched)
    if f.scheme != "http":
        return target
    plain = "ws" if t.scheme in ("ws", "wss") else "http"
    if t.netloc == f.netloc and t.scheme == plain:
        return target
    same_port = (t.port or _DEFAULT_PORTS.get(t.scheme)) == (f.port or 80)
    if t.hostname == f.hostname and not same_port:
        return target  # another service on that host (e.g. TLS on 443): as Twilio would
    return urlunsplit((plain, f.netloc, t.path, t.query, ""))


def parse_twiml(document: str, *, fetched: str, signed: str) -> CallPlan:
    """The :class:`CallPlan` of a TwiML document fetched from ``fetched``.

    ``signed`` is the URL Twilio requested it as. Raises :class:`CallError` when there is no
    ConversationRelay to connect.
    """
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise CallError(f"the TwiML from {fetched} is not XML: {exc}") from None
    relay = root.find("Connect/ConversationRelay")
    if relay is None:
        verbs = ", ".join(f"<{child.tag}>" for child in root) or "nothing"
        raise CallError(
            f"the TwiML from {fetched} has no <Connect><ConversationRelay> (it has {verbs}): "
            "Twilio would not open a ConversationRelay session"
        )
    ws_url = relay.get("url", "")
    if urlsplit(ws_url).scheme not in ("ws", "wss") or not urlsplit(ws_url).netloc:
        raise CallError(
            f"the TwiML from {fetched} has <ConversationRelay url={ws_url!r}>: Twilio needs an "
            "absolute wss:// URL (error 64102)"
        )
    parameters = {
        p.get("name", ""): p.get("value", "") for p in relay.findall("Parameter") if p.get("name")
    }
    connect_el = root.find("Connect")
    action = connect_el.get("action") if connect_el is not None else None
    action_url = urljoin(signed, action) if action else None
    return CallPlan(
        ws_url=ws_url,
        connect_url=route(ws_url, fetched),
        attributes=dict(relay.attrib),
        parameters=parameters,
        action_url=action_url,
        action_connect_url=route(action_url, fetched) if action_url else None,
        action_method=(connect_el.get("method") or "POST").upper()
        if connect_el is not None
        else "POST",
    )


def summarize_twiml(document: str, *, followed: bool = False) -> str:
    """What a TwiML answer makes Twilio do next, in words ("dials +1555…; hangs up").

    ``followed``: the caller went on to a ``<Connect><ConversationRelay>`` it names.
    """
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        return "an answer that is not TwiML"
    steps = []
    for verb in root:
        text = " ".join("".join(verb.itertext()).split())
        relay = verb.find("ConversationRelay")
        if verb.tag == "Dial":
            steps.append(f"dials {text or verb.get('number', '?')}")
        elif verb.tag == "Say":
            steps.append(f'says "{text}"')
        elif verb.tag == "Hangup":
            steps.append("hangs up")
        elif verb.tag == "Connect" and relay is not None:
            url = relay.get("url")
            followed_here = "followed" if followed else "not followed here"
            steps.append(f"reconnects the call to {url} (a new session; {followed_here})")
        else:
            steps.append(f"<{verb.tag}>")
    return "; ".join(steps) or "nothing (the call ends)"
