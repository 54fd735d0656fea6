"""A simulated Twilio caller that speaks ConversationRelay as Twilio does (``crctl call``).

What it mirrors (Twilio's ConversationRelay docs, and frames seen on real calls):

- The voice webhook first: ``POST /twiml`` with Twilio's voice parameters, signed with
  ``X-Twilio-Signature`` over the URL Twilio would request (the public URL behind a tunnel).
- The socket named by ``<Connect><ConversationRelay url=…>``: a local relay whose TwiML
  names its public ``wss://`` URL is reached at the local address, and the handshake is signed
  over the public URL, as Twilio does through a tunnel. Handshake headers as captured
  (``user-agent: Jetty/11.0.24``, ``x-twilio-signature`` and its duplicate, ``accept-encoding:
  gzip``), no subprotocol, no permessage-deflate, no pings.
- ``setup`` shaped like the captured frame, ``customParameters`` from the ``<Parameter>``s
 ; ``prompt`` with ``voicePrompt``/``lang``/``last``, optionally cumulative partials
  every ~250 ms with the final repeating the last partial; one ``dtmf`` frame per key,
  only with ``dtmfDetection="true"``.
- Barge-in in Twilio's order: ``info clientSpeaking on`` → ``info tokensPlayed`` → ``interrupt``
  (``utteranceUntilInterrupt`` = the words of the reply received so far, an int
  ``durationUntilInterruptMs``) → ``info agentSpeaking off``; only when the TwiML's
  ``interruptible`` allows it; speech over the agent is dropped under
  ``reportInputDuringAgentSpeech="none"``. Info events only when the TwiML's
  ``events``/``debug`` asks for them.
- The relay's frames validated as Twilio does: a bad one is answered with an ``error``
  64107, ten in a row close the socket with 1007. A talk cycle ends at ``last: true``; a cycle
  made only of ``preemptible`` text (a filler) does not end the reply.
- The end: hang-up closes with 1000 "Closing websocket session"; after ``end`` the
  socket closes the same way; then the ``<Connect action>`` callback is posted (signed) with
  ``SessionStatus`` completed / ended (+ ``HandoffData``) / failed (64105).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import secrets
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.error import HTTPError, URLError
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit
from urllib.request import ProxyHandler, Request, build_opener

from twilio.request_validator import RequestValidator
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from crctl.errors import CrctlError

USER_AGENT = "Jetty/11.0.24"
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
CLOSE_REASON = "Closing websocket session"
MALFORMED_REASON = "Too many consecutive malformed messages."
API_VERSION = "2010-04-01"
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_FROM = "+15550100001"
DEFAULT_TO = "+15550100002"
#: After a barge-in, frames of the cut cycle still in flight are absorbed this long at most.
STALE_WINDOW = 1.0
_DIGITS = re.compile(r"[0-9w#*]+")
_KEYS = frozenset("0123456789*#")


class CallError(CrctlError):
    """The call could not be placed or went wrong: one line saying why and what to do."""


class Unreachable(CallError):
    """Nothing answers at the relay's address (refused, unknown host, timed out)."""


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


def sign(token: str, url: str, params: dict[str, str]) -> str:
    """``X-Twilio-Signature`` for ``url`` and form ``params``, computed as Twilio does."""
    return str(RequestValidator(token).compute_signature(url, params))


def _modes(value: str | None, default: str) -> frozenset[str]:
    """``none|dtmf|speech|any`` (``true``=any, ``false``=none) as the set of input kinds."""
    value = (value or default).strip().lower()
    value = {"true": "any", "false": "none"}.get(value, value)
    return frozenset(
        {"any": ("speech", "dtmf"), "speech": ("speech",), "dtmf": ("dtmf",)}.get(value, ())
    )


def _is_local(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_private


# ------------------------------------------------------------------------------------ TwiML


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
        return self.attributes.get("welcomeGreeting") or None

    @property
    def dtmf_detection(self) -> bool:
        return self.attributes.get("dtmfDetection", "false").lower() == "true"

    @property
    def interruptible(self) -> frozenset[str]:
        return _modes(self.attributes.get("interruptible"), "any")

    @property
    def report_input(self) -> frozenset[str]:
        """Input reported while the agent speaks (default ``none`` since May 2025)."""
        return _modes(self.attributes.get("reportInputDuringAgentSpeech"), "none")

    @property
    def events(self) -> frozenset[str]:
        words = f"{self.attributes.get('events', '')} {self.attributes.get('debug', '')}"
        return frozenset(words.split())

    @property
    def partial_prompts(self) -> bool:
        return self.attributes.get("partialPrompts", "false").lower() == "true"

    @property
    def language(self) -> str:
        attrs = self.attributes
        return attrs.get("transcriptionLanguage") or attrs.get("language") or "en-US"


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def route(target: str, fetched: str) -> str:
    """Where to send a request Twilio would send to ``target``, for a relay fetched over plain
    ``http://``: one whose TwiML names another host (its public URL) is reached where it was
    fetched, with the path and query of ``target``; one whose TwiML names ``wss://`` (or
    ``https://``) on the very host and port that just answered plain HTTP is reached without
    TLS, which that port does not speak. Signatures stay over ``target``, as Twilio signs."""
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
    """The :class:`CallPlan` of a TwiML document fetched from ``fetched`` (requested by Twilio
    as ``signed``). Raises :class:`CallError` when there is no ConversationRelay to connect."""
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


def summarize_twiml(document: str) -> str:
    """What a TwiML answer makes Twilio do next, in words ("dials +1555…; hangs up")."""
    try:
        root = ET.fromstring(document)
    except ET.ParseError:
        return "an answer that is not TwiML"
    steps = []
    for verb in root:
        text = " ".join("".join(verb.itertext()).split())
        if verb.tag == "Dial":
            steps.append(f"dials {text or verb.get('number', '?')}")
        elif verb.tag == "Say":
            steps.append(f'says "{text}"')
        elif verb.tag == "Hangup":
            steps.append("hangs up")
        elif verb.tag == "Connect" and verb.find("ConversationRelay") is not None:
            url = verb.find("ConversationRelay").get("url")  # type: ignore[union-attr]
            steps.append(f"reconnects the call to {url} (a new session; not followed here)")
        else:
            steps.append(f"<{verb.tag}>")
    return "; ".join(steps) or "nothing (the call ends)"


def _http(
    url: str, params: dict[str, str], headers: dict[str, str], method: str, timeout: float
) -> tuple[int, str]:
    """One webhook request (blocking: run it in a thread). Returns (status, body)."""
    data = None
    if method == "GET":
        url += ("&" if urlsplit(url).query else "?") + urlencode(params)
    else:
        data = urlencode(params).encode()
        headers = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
    handlers = [ProxyHandler({})] if _is_local(urlsplit(url).hostname) else []
    opener = build_opener(*handlers)
    request = Request(url, data=data, headers=headers, method=method)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        text = getattr(reason, "strerror", None) or str(reason)
        raise Unreachable(f"cannot reach {url.split('?')[0]}: {str(text).lower()}") from None


# ------------------------------------------------------------------------------- the caller


@dataclass(eq=False)
class Reply:
    """The agent's answer to one caller input: one talk cycle (plus any filler before it)."""

    input: str
    sent_at: float
    #: What the caller heard: the whole cycle, or what came before the barge-in.
    text: str = ""
    #: Everything received for this reply (``text`` before a barge-in cut it).
    received: str = ""
    first_token_at: float | None = None
    finished_at: float | None = None
    tokens: int = 0
    interrupted: bool = False
    #: Tokens that arrived after the barge-in (in flight, or sent by an agent that did not stop).
    late_tokens: int = 0
    superseded: bool = False
    solicited: bool = True
    plays: list[str] = field(default_factory=list)
    digits: list[str] = field(default_factory=list)
    languages: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None
    #: Barge in once this many words of the reply have arrived.
    barge_after: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    _played: int = 0
    _plain_cycle: bool = False
    _cut_at: float | None = None

    @property
    def first_token_ms(self) -> float | None:
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.sent_at) * 1000

    @property
    def speaking(self) -> bool:
        """Tokens are arriving and the cycle is not closed: the agent is talking."""
        return self.tokens > 0 and not self.done.is_set()

    def finish(self, now: float, error: str | None = None) -> None:
        if not self.done.is_set():
            self.finished_at = now
            self.error = self.error or error
            self.done.set()


def complete_words(text: str) -> int:
    """Words of ``text`` known to be complete (the last one may still grow)."""
    count = len(re.findall(r"\S+", text))
    if count and not text[-1].isspace() and text[-1] not in ".,!?;:":
        count -= 1
    return count


def first_words(text: str, n: int) -> str:
    """``text`` up to the end of its ``n``-th word (an exact prefix)."""
    matches = list(re.finditer(r"\S+", text))
    return text[: matches[n - 1].end()] if 0 < n <= len(matches) else text.rstrip()


@dataclass
class Outcome:
    """How the session ended and what Twilio would do next."""

    #: ``completed`` (the caller hung up), ``ended`` (the agent sent ``end``) or ``failed``.
    status: str
    close_code: int | None = None
    close_reason: str = ""
    handoff_data: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    duration: float = 0.0
    #: The action callback's answer in words, or why it failed.
    action: str | None = None
    action_error: str | None = None

    def describe(self) -> str:
        close = f"close {self.close_code}" + (
            f' "{self.close_reason}"' if self.close_reason else ""
        )
        if self.status == "completed":
            text = f"the caller hung up ({close})"
        elif self.status == "ended":
            text = "the agent ended the call (end)"
            if self.handoff_data is not None:
                text += f", handoffData {self.handoff_data}"
        else:
            text = (
                f"the socket ended without `end` ({close}): Twilio reports failed/"
                f"{self.error_code} {self.error_message}"
            )
        if self.action:
            text += f"; /action → {self.action}"
        if self.action_error:
            text += f"; action callback: {self.action_error}"
        return text


EventHandler = Callable[[str, Optional[Reply], dict[str, Any]], None]


class SimulatedCaller:
    """One simulated phone call: :meth:`dial` (TwiML, then the socket), then :meth:`say`,
    :meth:`dtmf`, :meth:`interrupt` and :meth:`hangup`. A background task receives the relay's
    frames into :class:`Reply` objects and reports each step to ``on_event(kind, reply, data)``:
    ``greeting``, ``token``, ``reply``, ``interrupted``, ``play``, ``digits``, ``language``,
    ``end``, ``invalid``, ``dropped``, ``closed``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        auth_token: str | None = None,
        public_url: str | None = None,
        from_: str = DEFAULT_FROM,
        to: str = DEFAULT_TO,
        partials: bool = False,
        timeout: float = 15.0,
        on_event: EventHandler | None = None,
        partial_gap: float = 0.25,
        key_gap: float = 0.15,
    ) -> None:
        self.url = url
        self.auth_token = auth_token
        self.public_url = public_url.rstrip("/") if public_url else None
        self.from_, self.to = from_, to
        self.partials = partials
        self.timeout = timeout
        self.on_event = on_event
        self.partial_gap, self.key_gap = partial_gap, key_gap
        self.call_sid, self.account_sid = new_sid("CA"), new_sid("AC")
        self.session_id = new_sid("VX")
        self.plan: CallPlan | None = None
        self.lang = "en-US"
        self.end_frame: dict[str, Any] | None = None
        #: Why the last :meth:`say` / :meth:`dtmf` sent nothing (Twilio would not have).
        self.last_drop: str | None = None
        self.outcome: Outcome | None = None
        self.closed = asyncio.Event()
        self.replies: list[Reply] = []
        self._pending: deque[Reply] = deque()
        self._ws: ClientConnection | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._started = 0.0
        self._hanging_up = False
        self._malformed = 0
        self._client_speaking = False
        self._agent_speaking = False

    # --------------------------------------------------------------------------- placing
    def voice_params(self, call_status: str) -> dict[str, str]:
        """The standard parameters of Twilio's voice webhooks for this call."""
        return {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": self.call_sid,
            "CallStatus": call_status,
            "Called": self.to,
            "Caller": self.from_,
            "Direction": "inbound",
            "From": self.from_,
            "To": self.to,
        }

    def _headers(self, url: str, params: dict[str, str]) -> dict[str, str]:
        headers = {"User-Agent": WEBHOOK_USER_AGENT, "Accept": "*/*"}
        if self.auth_token:
            headers["X-Twilio-Signature"] = sign(self.auth_token, url, params)
        return headers

    async def dial(self) -> CallPlan:
        """Fetch the TwiML as Twilio does when the call rings, then open the socket it names."""
        plan = await self.fetch()
        await self.connect(plan)
        return plan

    async def fetch(self) -> CallPlan:
        """The call rings: ``POST /twiml`` as Twilio does, signed, and read the TwiML."""
        base = self.url.rstrip("/")
        if "://" not in base:  # "127.0.0.1:8080"
            base = "http://" + base
        fetched = base if base.endswith("/twiml") else base + "/twiml"
        # Twilio requests the public URL; a tunnel forwards it here.
        signed = self.public_url + "/twiml" if self.public_url else fetched
        params = self.voice_params("ringing")
        status, body = await asyncio.to_thread(
            _http, fetched, params, self._headers(signed, params), "POST", self.timeout
        )
        if status == 403:
            raise CallError(f"the relay refused POST {fetched} (HTTP 403): {self._why_403(signed)}")
        if status != 200:
            raise CallError(f"POST {fetched} answered HTTP {status}: {body.strip()[:120]}")
        return parse_twiml(body, fetched=fetched, signed=signed)

    def _why_403(self, signed: str) -> str:
        if not self.auth_token:
            return (
                "it checks X-Twilio-Signature and no auth token was given; set TWILIO_AUTH_TOKEN "
                "or pass --auth-token"
            )
        hint = "check that the auth token is the relay's TWILIO_AUTH_TOKEN"
        if not self.public_url and _is_local(urlsplit(signed).hostname):
            hint += ", and pass the relay's public URL with --public-url (Twilio signs it)"
        return f"the X-Twilio-Signature over {signed} did not match; {hint}"

    async def connect(self, plan: CallPlan) -> None:
        """Open the ConversationRelay socket, send ``setup`` and play the welcome greeting."""
        self.plan = plan
        self.lang = plan.language
        headers = {"Accept-Encoding": "gzip"}
        if self.auth_token:
            parts = urlsplit(plan.ws_url)
            base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            signature = sign(self.auth_token, base, dict(parse_qsl(parts.query)))
            headers["X-Twilio-Signature"] = signature
            headers["x-amzn-bedrock-agentcore-runtime-custom-twilio-signature"] = signature
        target = plan.connect_url
        try:
            self._ws = await connect(
                target,
                additional_headers=headers,
                user_agent_header=USER_AGENT,
                compression=None,
                subprotocols=None,
                ping_interval=None,
                open_timeout=self.timeout,
                proxy=None if _is_local(urlsplit(target).hostname) else True,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            said = (exc.response.body or b"").decode("utf-8", "replace").strip()
            if status == 403 and said.startswith("forbidden: "):  # the relay says why
                why = said.removeprefix("forbidden: ")
            elif status == 403:
                why = self._why_403(plan.ws_url)
            else:
                why = "Twilio would report 64102"
            raise CallError(
                f"the relay refused the WebSocket at {target} (HTTP {status}): {why}"
            ) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise CallError(f"cannot open the WebSocket at {target}: {text}") from None
        self._started = time.monotonic()
        await self._send(
            {
                "type": "setup",
                "sessionId": self.session_id,
                "callSid": self.call_sid,
                "parentCallSid": "",
                "from": self.from_,
                "to": self.to,
                "forwardedFrom": self.to,
                "callerName": "",
                "direction": "inbound",
                "callType": _call_type(self.from_),
                "callStatus": "RINGING",
                "accountSid": self.account_sid,
                "customParameters": plan.parameters,
            }
        )
        self._receiver = asyncio.create_task(self._receive())
        greeting = plan.welcome_greeting
        if greeting:
            await self._info("agentSpeaking", "on", "speaker-events")
            await self._info("tokensPlayed", greeting, "tokens-played")
            await self._info("agentSpeaking", "off", "speaker-events")
            self._emit("greeting", None, text=greeting)

    # ------------------------------------------------------------------------- the caller
    async def say(self, text: str, *, interrupt_after_words: int | None = None) -> Reply | None:
        """Speak ``text`` (partials first when enabled); returns the reply to wait on, or
        ``None`` when Twilio would not report the speech (see the ``dropped`` event)."""
        plan = self._live()
        head = self._speaking()
        barged = False
        if head is not None:
            if "speech" in plan.interruptible:
                # with partials, agentSpeaking off follows the first one
                barged = self.partials or plan.partial_prompts
                await self._barge_in(
                    head, head.received.rstrip(), speech=True, defer_agent_off=barged
                )
            elif "speech" not in plan.report_input:
                self._drop(
                    "the agent is speaking, and with reportInputDuringAgentSpeech="
                    f"{plan.attributes.get('reportInputDuringAgentSpeech', 'none')!r} Twilio "
                    "does not report the caller's speech"
                )
                return None
        self._supersede_silent()
        await self._client("on")
        if self.partials or plan.partial_prompts:
            words = text.split()
            for i in range(1, len(words) + 1):
                await self._prompt(" ".join(words[:i]), last=False)
                if barged and i == 1:
                    await self._agent("off")  # observed after the first partial
                await asyncio.sleep(self.partial_gap)
            text = " ".join(words)
        await self._client("off")
        reply = self._expect(text, interrupt_after_words)
        await self._prompt(text, last=True)
        return reply

    async def dtmf(self, digits: str, *, interrupt_after_words: int | None = None) -> Reply | None:
        """Press ``digits`` one key at a time; returns the reply to the last key, or ``None``
        when the TwiML has no ``dtmfDetection="true"`` (Twilio would not send them)."""
        plan = self._live()
        bad = set(digits) - _KEYS
        if bad or not digits:
            raise ValueError(f"DTMF keys are 0-9, * and #, got {digits!r}")
        if not plan.dtmf_detection:
            self._drop('the TwiML has no dtmfDetection="true": Twilio does not send key presses')
            return None
        await self._client("off")
        reply: Reply | None = None
        for i, digit in enumerate(digits):
            if i:
                await asyncio.sleep(self.key_gap)
            head = self._speaking()
            if head is not None:
                if "dtmf" in plan.interruptible:
                    await self._barge_in(head, head.received.rstrip(), speech=False)
                elif "dtmf" not in plan.report_input:
                    # as for speech: keys over the agent are not reported under "none"
                    self._drop(
                        "the agent is speaking, and with reportInputDuringAgentSpeech="
                        f"{plan.attributes.get('reportInputDuringAgentSpeech', 'none')!r} Twilio "
                        f"does not report key {digit}"
                    )
                    return reply
            self._supersede_silent()
            last = i == len(digits) - 1
            reply = self._expect(f"dtmf {digit}", interrupt_after_words if last else None)
            await self._send({"type": "dtmf", "digit": digit})
        assert reply is not None
        return reply

    async def interrupt(self) -> bool:
        """Barge in on the reply being spoken; False when nothing is being said or the TwiML
        does not let speech interrupt."""
        head = self._speaking()
        if head is None or "speech" not in self._live().interruptible:
            return False
        await self._barge_in(head, head.received.rstrip(), speech=True)
        return True

    async def hangup(self) -> Outcome:
        """Hang up (close 1000 "Closing websocket session") and post the action callback."""
        if self._ws is not None and not self.closed.is_set():
            self._hanging_up = True
            with contextlib.suppress(ConnectionClosed):
                await self._client("off")
            await self._ws.close(1000, CLOSE_REASON)
        return await self.wait_closed()

    async def wait_closed(self, timeout: float | None = None) -> Outcome:
        """The outcome once the session is over (after ``end``, a hang-up or a drop)."""
        if self._receiver is not None:
            await asyncio.wait_for(asyncio.shield(self._receiver), timeout)
        assert self.outcome is not None
        return self.outcome

    # ------------------------------------------------------------------------- internals
    def _live(self) -> CallPlan:
        if self.plan is None or self._ws is None:
            raise CallError("the call is not connected")
        if self.closed.is_set() or self.end_frame is not None:
            raise CallError("the call is over")
        return self.plan

    def _drop(self, reason: str) -> None:
        self.last_drop = reason
        self._emit("dropped", None, reason=reason)

    def _emit(self, kind: str, reply: Reply | None, **data: Any) -> None:
        if self.on_event is not None:
            self.on_event(kind, reply, data)

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(frame, separators=(",", ":"), ensure_ascii=False))

    async def _prompt(self, text: str, *, last: bool) -> None:
        await self._send({"type": "prompt", "voicePrompt": text, "lang": self.lang, "last": last})

    async def _info(self, name: str, value: str, needs: str) -> None:
        assert self.plan is not None
        if needs in self.plan.events:
            await self._send({"type": "info", "name": name, "value": value})

    async def _client(self, state: str) -> None:
        if self._client_speaking != (state == "on"):
            self._client_speaking = state == "on"
            await self._info("clientSpeaking", state, "speaker-events")

    async def _agent(self, state: str) -> None:
        if self._agent_speaking != (state == "on"):
            self._agent_speaking = state == "on"
            await self._info("agentSpeaking", state, "speaker-events")

    def _expect(self, text: str, barge_after: int | None) -> Reply:
        reply = Reply(input=text, sent_at=time.monotonic(), barge_after=barge_after)
        self._pending.append(reply)
        self.replies.append(reply)
        return reply

    def _speaking(self) -> Reply | None:
        return next((r for r in self._pending if r.speaking), None)

    def _supersede_silent(self) -> None:
        """Replies still waiting for their first token are replaced by the new input (the
        relay cancels that turn before it said anything)."""
        now = time.monotonic()
        for reply in [r for r in self._pending if r.tokens == 0 and not r.done.is_set()]:
            reply.superseded = True
            reply.finish(now, "superseded by the caller's next input")
            self._pending.remove(reply)

    async def _barge_in(
        self, reply: Reply, heard: str, *, speech: bool, defer_agent_off: bool = False
    ) -> None:
        """Twilio's barge-in order: clientSpeaking on, tokensPlayed, interrupt, then
        (for speech, after the first partial prompt: :meth:`say` sends it) agentSpeaking off.
        Twilio flushes the rest of the cycle: ``heard`` is all it spoke."""
        now = time.monotonic()
        if speech:
            await self._client("on")
        unplayed = heard[reply._played :]
        if unplayed.strip():
            await self._info("tokensPlayed", unplayed, "tokens-played")
        reply._played = len(heard)
        first = reply.first_token_at or now
        await self._send(
            {
                "type": "interrupt",
                "utteranceUntilInterrupt": heard,
                "durationUntilInterruptMs": int((now - first) * 1000),
            }
        )
        if not defer_agent_off:
            await self._agent("off")
        reply.interrupted, reply.text, reply._cut_at = True, heard, now
        reply.finish(now)
        self._emit("interrupted", reply, heard=heard)

    def _target(self) -> Reply:
        """The reply the next ``text`` frame belongs to (a new unsolicited one if none)."""
        now = time.monotonic()
        while self._pending:
            head = self._pending[0]
            if head.interrupted and now - (head._cut_at or now) > STALE_WINDOW:
                self._pending.popleft()  # the agent never closed its cut cycle
                continue
            return head
        reply = Reply(input="", sent_at=now, solicited=False)
        self._pending.append(reply)
        self.replies.append(reply)
        return reply

    async def _receive(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                frame = await self._validate(raw)
                if frame is not None:
                    await self._handle(frame)
        except ConnectionClosed:
            pass
        finally:
            await self._finish()

    async def _validate(self, raw: str | bytes) -> dict[str, Any] | None:
        """Check one frame as Twilio does (Twilio docs: WebSocket messages); answer a bad one
        with ``error`` 64107."""
        problem, frame = _check_frame(raw)
        if problem is None:
            self._malformed = 0
            return frame
        self._malformed += 1
        shown = raw if isinstance(raw, str) else f"<{len(raw)} bytes of binary data>"
        self._emit("invalid", None, reason=problem, frame=shown)
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):
            await self._send(
                {"type": "error", "description": f"Invalid message received, code: 64107, {shown}"}
            )
            if self._malformed >= 10:
                await self._ws.close(1007, MALFORMED_REASON)
        return None

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "text":
            await self._on_text(frame)
        elif kind == "play":
            reply = self._target()
            reply.plays.append(frame["source"])
            self._emit("play", reply, source=frame["source"])
        elif kind == "sendDigits":
            reply = self._target()
            reply.digits.append(frame["digits"])
            await self._info("tokensPlayed", frame["digits"], "tokens-played")
            self._emit("digits", reply, digits=frame["digits"])
        elif kind == "language":
            reply = self._target()
            names: tuple[str, ...] = ("ttsLanguage", "transcriptionLanguage")
            switch = {k: str(frame[k]) for k in names if k in frame}
            reply.languages.append(switch)
            self.lang = switch.get("transcriptionLanguage", self.lang)
            self._emit("language", reply, **switch)
        elif kind == "end":
            self.end_frame = frame
            self._emit("end", None, handoff_data=frame.get("handoffData"))
            # Twilio drains queued speech, then closes (nothing plays on in a simulation).
            await self._ws.close(1000, CLOSE_REASON)  # type: ignore[union-attr]

    async def _on_text(self, frame: dict[str, Any]) -> None:
        reply = self._target()
        token, last = frame["token"], bool(frame.get("last", False))
        if reply.interrupted:  # Twilio flushed this cycle: late frames are never spoken
            reply.late_tokens += 1 if token else 0
            if last:
                self._pending.popleft()
            return
        if not frame.get("preemptible"):
            reply._plain_cycle = True
        if token:
            now = time.monotonic()
            if reply.first_token_at is None:
                reply.first_token_at = now
            reply.text += token
            reply.received += token
            reply.tokens += 1
            await self._agent("on")
            self._emit("token", reply, token=token)
            if re.search(r"[.!?]\s*$", reply.text[reply._played :]):
                await self._info("tokensPlayed", reply.text[reply._played :], "tokens-played")
                reply._played = len(reply.text)
            if reply.barge_after and complete_words(reply.text) >= reply.barge_after:
                await self._barge_in(reply, first_words(reply.text, reply.barge_after), speech=True)
                return
        if not last:
            return
        if not reply._plain_cycle and reply.tokens:
            return  # only a preemptible filler so far: the answer is still to come
        reply._plain_cycle = False
        if reply.text[reply._played :].strip():
            await self._info("tokensPlayed", reply.text[reply._played :], "tokens-played")
            reply._played = len(reply.text)
        await self._agent("off")
        self._pending.popleft()
        reply.finish(time.monotonic())
        self._emit("reply", reply)

    async def _finish(self) -> None:
        """The socket is closed: work out the session status, post ``<Connect action>``."""
        ws = self._ws
        assert ws is not None
        ours = self._hanging_up or self.end_frame is not None or self._malformed >= 10
        close = ws.protocol.close_sent if ours else ws.protocol.close_rcvd
        outcome = Outcome(
            "failed",
            close_code=close.code if close else 1006,
            close_reason=close.reason if close else "",
        )
        outcome.duration = time.monotonic() - self._started
        if self.end_frame is not None:
            outcome.status = "ended"
            outcome.handoff_data = self.end_frame.get("handoffData")
        elif self._hanging_up:
            outcome.status = "completed"
        else:
            outcome.error_code, outcome.error_message = "64105", "Websocket ended"
        now = time.monotonic()
        for reply in list(self._pending):
            reply.finish(now, "the call ended before the reply finished")
        self._pending.clear()
        try:
            await self._post_action(outcome)
        finally:
            self.outcome = outcome
            self.closed.set()
            self._emit("closed", None, outcome=outcome)

    async def _post_action(self, outcome: Outcome) -> None:
        plan = self.plan
        if plan is None or not plan.action_url or not plan.action_connect_url:
            return
        params = self.voice_params("completed" if outcome.status == "completed" else "in-progress")
        params.update(
            SessionId=self.session_id,
            SessionStatus=outcome.status,
            SessionDuration=str(round(outcome.duration)),
        )
        if outcome.handoff_data is not None:
            params["HandoffData"] = outcome.handoff_data
        if outcome.error_code:
            params.update(ErrorCode=outcome.error_code, ErrorMessage=outcome.error_message or "")
        method = plan.action_method
        signed = plan.action_url
        if method == "GET":  # the parameters travel in the signed URL
            signed += ("&" if urlsplit(signed).query else "?") + urlencode(params)
        headers = self._headers(signed, {} if method == "GET" else params)
        try:
            status, body = await asyncio.to_thread(
                _http, plan.action_connect_url, params, headers, method, self.timeout
            )
        except CallError as exc:
            outcome.action_error = str(exc)
            return
        if status == 200:
            outcome.action = summarize_twiml(body)
        else:
            outcome.action_error = f"{method} {plan.action_url} answered HTTP {status}"


def _call_type(number: str) -> str:
    if number.startswith("client:"):
        return "CLIENT"
    return "SIP" if number.startswith("sip:") else "PSTN"


_BOOL_FIELDS = {
    "text": ("last", "interruptible", "preemptible"),
    "play": ("interruptible", "preemptible"),
}


def _check_frame(raw: str | bytes) -> tuple[str | None, dict[str, Any]]:
    """(problem, frame): the problem Twilio would reject an app frame for, or None."""
    if not isinstance(raw, str):
        return "a binary frame (ConversationRelay takes JSON text)", {}
    try:
        frame = json.loads(raw)
    except ValueError:
        return "not JSON", {}
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        return "not a JSON object with a string type", {}
    kind = frame["type"]
    for name in _BOOL_FIELDS.get(kind, ()):
        if name in frame and not isinstance(frame[name], bool):
            return f"{kind}.{name} must be a boolean", frame
    if kind == "text":
        if not isinstance(frame.get("token"), str):
            return "text.token is required and must be a string", frame
        if "lang" in frame and not isinstance(frame["lang"], str):
            return "text.lang must be a string", frame
    elif kind == "play":
        if not isinstance(frame.get("source"), str) or not frame["source"]:
            return "play.source is required", frame
        loop = frame.get("loop", 1)
        if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
            return "play.loop must be an integer >= 0", frame
    elif kind == "sendDigits":
        digits = frame.get("digits")
        if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
            return "sendDigits.digits must be non-empty 0-9, w, #, *", frame
    elif kind == "language":
        if not any(isinstance(frame.get(k), str) for k in ("ttsLanguage", "transcriptionLanguage")):
            return "language needs ttsLanguage or transcriptionLanguage", frame
    elif kind == "end":
        if "handoffData" in frame and not isinstance(frame["handoffData"], str):
            return "end.handoffData must be a string (JSON-encode objects)", frame
    else:
        return f"unknown message type {kind!r}", frame
    return None, frame
