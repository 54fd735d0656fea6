"""Call events: what happened on which call, published to subscribers.

The relay reports through these (the httpx habit: the library calls back, the CLI renders).
Subscribers are plain callables; a failing subscriber is logged and never breaks a call.

Kinds and their ``data`` (every value JSON-serialisable):

======================  =============================================================
``call.started``        ``from``, ``to``, ``direction``, ``custom_parameters``, ``session_id``,
                        ``resumed`` (a reconnected socket of the same call)
``caller.speech``       ``text``, ``last`` (False: a cumulative partial transcript)
``agent.reply``         ``text``, ``first_token_ms``, ``duration_ms``, ``cancelled`` (cut by a
                        barge-in or a newer turn). *First token* is the latency of a turn:
                        from the end of the caller's turn (the final prompt, the DTMF key, or
                        the end of a buffered key entry, as received by the relay) to the
                        reply's first ``text`` token sent; ``None`` for what the agent says
                        on its own (silence reminders) or a reply that said nothing. Rows
                        stored before this name have ``ttft_ms`` instead. ``duration_ms`` counts
                        from the same moment to the reply's end.
``agent.pushed``        ``type`` (the outbound frame's type) and ``text`` (what it says:
                        the token, the play source, the digits…): a frame pushed into the
                        call through ``POST /calls/{callSid}/messages``
``barge_in``            ``heard`` (the agent's words the caller heard), ``duration_ms``
``dtmf``                ``digit``
``tool.call``           ``name``, ``arguments`` (JSON text), ``result``
``language``            ``tts``, ``transcription``
``error``               ``source`` (``twilio`` or ``agent``), ``message``, ``code``, and for a
                        64xxx code ``title``, ``explanation`` and ``fix`` (:func:`explain`)
``llm.fault``           ``kind``, ``detail``, ``explanation``, ``fix`` (``kind`` ``connection``
                        with ``detail`` "cannot resolve host …" or "connection refused to
                        host:port" when the LLM cannot be reached at all)
``frame.bad``           ``reason`` (a frame from Twilio the relay dropped)
``socket.closed``       ``code`` (WebSocket close code; 1000 is a normal hang-up)
``session.end``         ``status``, ``handoff_data``, ``error_code``, ``error_message``,
                        ``duration`` (and ``title``/``explanation``/``fix`` for an error code)
``call.status``         ``status``, ``duration`` (Twilio's status callback)
``call.lost``           ``last_seen`` (Unix time), ``reason``: written by a relay at start for
                        a call left open by a relay that is gone (crashed, killed, stopped
                        with the call still open); the call's status becomes ``lost``
======================  =============================================================
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("relay_server.events")


@dataclass(frozen=True)
class CallEvent:
    """One event. ``kind`` is one of the names below; ``data`` is JSON-serialisable."""

    kind: str
    call_sid: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)


# Kinds published by the relay.
CALL_STARTED = "call.started"
CALLER_SPEECH = "caller.speech"
AGENT_REPLY = "agent.reply"
AGENT_PUSHED = "agent.pushed"
BARGE_IN = "barge_in"
DTMF = "dtmf"
TOOL_CALL = "tool.call"
LANGUAGE = "language"
ERROR = "error"
SESSION_END = "session.end"
#: Twilio call statuses after which a call is over (status callbacks).
CALL_OVER = frozenset({"completed", "failed", "busy", "no-answer", "canceled"})
CALL_STATUS = "call.status"
CALL_LOST = "call.lost"
LLM_FAULT = "llm.fault"
BAD_FRAME = "frame.bad"
SOCKET_CLOSED = "socket.closed"

Subscriber = Callable[[CallEvent], None]

# ------------------------------------------------------------------ 64xxx codes in words
#: The attribute that marks a log record an event also says (:func:`said_by`).
SAID_BY_EVENT = "call_event"


def said_by(kind: str, call_sid: str) -> dict[str, str]:
    """``extra`` for a log line that the event ``kind`` says too: a call log that shows the
    events (`crctl up`) leaves such lines out, so each fault is said once."""
    return {SAID_BY_EVENT: kind, "call_sid": call_sid}


#: ConversationRelay error codes (Twilio docs: error codes): title, what happened, how to fix it.
TWILIO_ERRORS: dict[int, tuple[str, str, str]] = {
    64101: (
        "Invalid parameter",
        "Twilio rejected a <ConversationRelay> attribute value (a bad value, a voice that does "
        "not match its ttsProvider, or ElevenLabs not enabled on the account).",
        "check the TwiML with `crctl twiml lint` and the voice/ttsProvider pair in your template",
    ),
    64102: (
        "Unable to connect to WebSocket URL",
        "Twilio could not open the relay's WebSocket: the URL is wrong or not wss://, the relay "
        "or tunnel is down, or the relay refused the handshake (signature check failed). "
        "The caller heard a busy tone.",
        "make sure the relay runs and --public-url is the tunnel's https:// URL, and that "
        "TWILIO_AUTH_TOKEN is the account's primary auth token",
    ),
    64104: (
        "Max call duration reached",
        "The session reached ConversationRelay's maximum duration and Twilio ended it.",
        "keep calls shorter (Twilio does not publish the limit); hand long calls off",
    ),
    64105: (
        "WebSocket ended",
        "The relay's WebSocket closed in the middle of the call (the relay stopped or crashed, "
        "the tunnel dropped, or 10 malformed frames in a row).",
        "end calls with an `end` message, never by closing the socket; check the relay's log "
        "for a crash or for 64107 errors just before",
    ),
    64106: (
        "Invalid argument",
        "A setting is not supported by the chosen provider (a language and voice combination "
        "it does not offer).",
        "pick a voice and language the ttsProvider supports (the template's <Language> entries)",
    ),
    64107: (
        "Invalid message received",
        "Twilio rejected a frame the relay sent (invalid message); it dropped that frame and "
        "the call goes on. Ten in a row end the call (64105).",
        "check what the agent sends against the protocol: text needs a string token, "
        "sendDigits only 0-9 w # *, language needs a language, handoffData must be a string",
    ),
    64108: (
        "RTP timeout",
        "Audio stopped flowing between Twilio and the caller.",
        "usually the caller's network; nothing to fix in the relay",
    ),
    64109: (
        "Concurrency limit reached",
        "Twilio rejected the call: the account runs as many ConversationRelay sessions as it may.",
        "end idle calls, or ask Twilio support to raise the limit",
    ),
    64111: (
        "Text-to-speech provider error",
        "The text-to-speech provider failed on part of a reply (the session goes on).",
        "check the voice and ttsProvider, or try another provider",
    ),
    64112: (
        "Text-to-speech conversion error",
        "The text-to-speech provider could not convert part of a reply (the session goes on).",
        "look for SSML or characters the provider does not accept in the agent's replies",
    ),
    64114: (
        "Speech recognition provider connection error",
        "Twilio could not reach the speech-recognition provider, so the caller was not heard.",
        "try another transcriptionProvider or speechModel; check status.twilio.com",
    ),
}

_LLM_FIXES = {
    "connection": "check OPENAI_BASE_URL and that the model server is reachable",
    "timeout": "the model was slower than --llm-timeout: raise it or use a faster model",
    "rate_limit": "the provider rate-limited the key (429): slow down or raise the quota",
    "server": "the provider failed (5xx): retry later or switch model",
    "status": "the provider refused the request: check OPENAI_API_KEY and --model",
    "stream_cut": "the stream broke off: check the model server or proxy in between",
    "bad_chunk": "the endpoint is not OpenAI-compatible streaming: check OPENAI_BASE_URL",
}


def explain(code: int | str | None) -> dict[str, str]:
    """``title``, ``explanation`` and ``fix`` for a ConversationRelay 64xxx error code
    (Twilio docs: error codes); an empty dict for no code. Unknown codes point at Twilio's error
    page."""
    try:
        number = int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        return {}
    if number is None:
        return {}
    known = TWILIO_ERRORS.get(number)
    if known is None:
        return {
            "title": f"Twilio error {number}",
            "explanation": f"Twilio reported error {number}.",
            "fix": f"see https://www.twilio.com/docs/api/errors/{number}",
        }
    title, explanation, fix = known
    return {"title": title, "explanation": explanation, "fix": fix}


def pushed(message: Any) -> dict[str, Any]:
    """The data of an ``agent.pushed`` event for an outbound frame pushed into a call:
    ``type`` and ``text`` (what it says), plus ``last`` for a text frame."""
    frame_type = str(type(message).__struct_config__.tag)
    if frame_type == "language":
        parts = [("tts", message.tts_language), ("transcription", message.transcription_language)]
        text = ", ".join(f"{name} {value}" for name, value in parts if value)
    else:
        field_name = {"text": "token", "play": "source", "sendDigits": "digits"}.get(
            frame_type, "handoff_data"
        )
        text = getattr(message, field_name, None) or ""
    data: dict[str, Any] = {"type": frame_type, "text": text}
    if frame_type == "text":
        data["last"] = message.last
    return data


def _enrich(kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """Words for the codes of error-bearing events, whoever published them."""
    if kind == ERROR:
        return {**data, **explain(data.get("code"))} if data.get("code") else data
    if kind == SESSION_END:
        return {**data, **explain(data.get("error_code"))} if data.get("error_code") else data
    if kind == LLM_FAULT and "explanation" not in data:
        fix = data.get("fix") or _LLM_FIXES.get(
            str(data.get("kind")), "see the relay's log for the cause"
        )
        return {
            **data,
            "explanation": "The LLM did not answer; the caller heard the apology and the call "
            "goes on.",
            "fix": fix,
        }
    return data


_ENRICHED = frozenset({ERROR, SESSION_END, LLM_FAULT})


class EventBus:
    """Fan-out of :class:`CallEvent` to subscribers, synchronously and in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def publish(self, kind: str, call_sid: str, /, **data: Any) -> None:
        """Publish one event to every subscriber."""
        if not self._subscribers:
            return
        if kind in _ENRICHED:
            data = _enrich(kind, data)
        event = CallEvent(kind, call_sid, data)
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:  # a subscriber bug must not end a call
                log.exception("event subscriber failed on %s", kind)
