"""What each ConversationRelay attribute accepts (Twilio docs: <ConversationRelay>).

Every check turns a value (typed, from TOML, or a string, from XML) into its wire form, or
raises :class:`ValueError` whose message says what is allowed. Names are camelCase, as Twilio
documents them and as they go on the wire.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

Check = Callable[[object], str]

_BCP47 = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected text")
    return str(value)


def boolean(value: object) -> str:
    """``true``/``false`` (a TOML boolean, or the strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower()
    raise ValueError("allowed: true, false")


def enum(*allowed: str, booleans: tuple[str, str] | None = None) -> Check:
    """One of ``allowed``; with ``booleans`` also true/false, mapped to those two values."""

    def check(value: object) -> str:
        if booleans is not None and (
            isinstance(value, bool)
            or (isinstance(value, str) and value.lower() in ("true", "false"))
        ):
            truthy = value is True or (isinstance(value, str) and value.lower() == "true")
            return booleans[0] if truthy else booleans[1]
        if isinstance(value, str) and value in allowed:
            return value
        extra = ", true, false" if booleans else ""
        raise ValueError(f"allowed: {', '.join(allowed)}{extra}")

    return check


def words(*allowed: str) -> Check:
    """Space-separated words, each one of ``allowed``."""

    def check(value: object) -> str:
        parts = _text(value).split()
        bad = [p for p in parts if p not in allowed]
        if not parts or bad:
            raise ValueError(f"allowed: space-separated {', '.join(allowed)}")
        return " ".join(parts)

    return check


def number(low: float, high: float, *, integer: bool = False, auto: bool = False) -> Check:
    """A number in ``[low, high]`` (an integer if asked); with ``auto`` also the word auto."""

    def check(value: object) -> str:
        if auto and value == "auto":
            return "auto"
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value) if isinstance(value, (str, int, float)) else float("nan")
        except ValueError:
            number = float("nan")
        if not (low <= number <= high) or (integer and not number.is_integer()):
            kind = "a whole number" if integer else "a number"
            prefix = "auto or " if auto else ""
            raise ValueError(f"allowed: {prefix}{kind} from {_n(low)} to {_n(high)}")
        return str(int(number)) if integer else _n(number)

    return check


def _n(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def language(*, multi: bool = False) -> Check:
    """A BCP-47 tag such as en-US (and ``multi`` where allowed)."""

    def check(value: object) -> str:
        text = _text(value)
        if (multi and text == "multi") or _BCP47.match(text):
            return text
        raise ValueError(
            "allowed: a BCP-47 language code such as en-US" + (" or multi" if multi else "")
        )

    return check


def text(value: object) -> str:
    """Any non-empty text."""
    result = _text(value)
    if not result.strip():
        raise ValueError("allowed: non-empty text")
    return result


def wss_url(value: object) -> str:
    """The relay's WebSocket URL: ``wss://`` and no explicit ``:443``.

    Twilio docs: webhook security.
    """
    return _ws_url(value, insecure=False)


def ws_url_local(value: object) -> str:
    """Like :func:`wss_url`, but ``ws://`` too: only for a relay serving itself locally."""
    return _ws_url(value, insecure=True)


def _ws_url(value: object, *, insecure: bool) -> str:
    url = _text(value)
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        raise ValueError("allowed: a wss:// URL without spaces or control characters")
    parts = urlsplit(url)
    schemes = ("wss", "ws") if insecure else ("wss",)
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(
            "allowed: a wss:// URL with a host (ws:// and http(s):// give error 64102)"
        )
    if parts.fragment:
        raise ValueError("allowed: a wss:// URL without a #fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("allowed: a wss:// URL with a numeric port") from None
    if port == 443:
        raise ValueError(
            "allowed: a wss:// URL without :443 (Twilio's signature check fails with it)"
        )
    return url


@dataclass(frozen=True)
class Attr:
    """One attribute: its check and a note shown by ``crctl twiml show``."""

    check: Check
    note: str = ""


_TTS = enum("Google", "Amazon", "ElevenLabs")
_STT = enum("Google", "Deepgram")
_MODES = ("none", "dtmf", "speech", "any")

#: ``<ConversationRelay>`` attributes (Twilio docs: <ConversationRelay>), camelCase.
RELAY: dict[str, Attr] = {
    "url": Attr(wss_url, "wss:// URL of the relay's /ws (required)"),
    "welcomeGreeting": Attr(text, "spoken once the socket is up"),
    "welcomeGreetingInterruptible": Attr(enum(*_MODES, booleans=("any", "none"))),
    "language": Attr(language(), "sets both TTS and STT"),
    "ttsLanguage": Attr(language()),
    "transcriptionLanguage": Attr(language(multi=True)),
    "ttsProvider": Attr(_TTS),
    "voice": Attr(text),
    "transcriptionProvider": Attr(_STT),
    "speechModel": Attr(text),
    "interruptible": Attr(enum(*_MODES, booleans=("any", "none"))),
    "interruptSensitivity": Attr(enum("low", "medium", "high")),
    "dtmfDetection": Attr(boolean),
    "reportInputDuringAgentSpeech": Attr(enum(*_MODES), "Twilio's default is none since 2025"),
    "preemptible": Attr(boolean),
    "hints": Attr(text, "comma-separated phrases"),
    "debug": Attr(words("debugging", "speaker-events", "tokens-played")),
    "elevenlabsTextNormalization": Attr(enum("on", "auto", "off")),
    "intelligenceService": Attr(text),
    "deepgramSmartFormat": Attr(boolean),
    "profanityFilter": Attr(boolean),
    "partialPrompts": Attr(boolean),
    "speechTimeout": Attr(number(600, 5000, integer=True, auto=True), "ms"),
    "ignoreBackchannel": Attr(boolean),
    "backgroundNoiseReduction": Attr(text),
    "events": Attr(words("speaker-events", "tokens-played", "config-updated")),
    "eotThreshold": Attr(number(0.5, 0.9), "Deepgram flux only"),
    "conversationConfiguration": Attr(text),
    "partialPromptOnHangup": Attr(boolean),
    "eagerEotThreshold": Attr(number(0.3, 0.9)),
    "asrSmartFormat": Attr(boolean),
    "ttsTextNormalization": Attr(enum("auto", "on", "off")),
    "ttsLanguageTextNormalization": Attr(text),
    "elevenlabsLanguageTextNormalization": Attr(text),
    "includeInPrompt": Attr(words("turn-state", "prompt-segments")),
    "customerName": Attr(text),
    "applicationReconnect": Attr(boolean),
    "echoPromptFiltering": Attr(boolean),
    "turnDetection": Attr(boolean),
}

#: ``<Language>`` attributes (Twilio docs: <ConversationRelay>).
LANGUAGE: dict[str, Attr] = {
    "code": Attr(language(multi=True), "required"),
    "ttsProvider": Attr(_TTS),
    "voice": Attr(text),
    "transcriptionProvider": Attr(_STT),
    "speechModel": Attr(text),
    "hints": Attr(text),
    "asrSmartFormat": Attr(boolean),
    "ttsTextNormalization": Attr(enum("auto", "on", "off")),
    "ttsLanguageTextNormalization": Attr(text),
}


#: ``<Connect>`` attributes.
def action_url(value: object) -> str:
    """``<Connect action>``: an https:// URL, or a relative URL.

    A ``/path`` is taken on the relay's host.
    """
    url = _text(value).strip()
    if not url or any(ch.isspace() for ch in url):
        raise ValueError("allowed: an https:// URL or a path such as /action")
    if "://" in url and not url.startswith("https://"):
        raise ValueError("allowed: an https:// URL or a path such as /action")
    return url


CONNECT: dict[str, Attr] = {
    "action": Attr(action_url, "https:// URL, or a path on the relay's host"),
    "method": Attr(enum("GET", "POST")),
}

#: Attributes that existed and were removed, with what replaced them.
REMOVED = {
    "interruptByDtmf": 'removed by Twilio (gone since twilio 9.6.1); use interruptible = "dtmf" '
    'or "any" instead',
}

#: Names from tutorials and other products that never existed here.
NEVER_EXISTED = {
    "voiceName": "voice",
    "sttProvider": "transcriptionProvider",
    "ttsVoice": "voice",
    "sttLanguage": "transcriptionLanguage",
    "isFinal": None,
    "backgroundAudioType": None,
    "backgroundAudioValue": None,
    "midSentenceCutSilenceTimeout": None,
}

#: Speech models of Deepgram that understand ``multi`` (Twilio docs: <ConversationRelay>).
MULTI_MODELS = ("nova-2-general", "nova-3-general")
FLUX_MODELS = ("flux", "flux-general-en")


def _folded(name: str) -> str:
    return name.replace("_", "").replace("-", "").lower()


def unknown_key(name: str, known: Iterable[str]) -> str:
    """Why ``name`` is not accepted, with the nearest valid name when there is one.

    Names are compared case- and underscore-blind first (``interrupt_by_dtmf``,
    ``stt_provider``).
    """
    folded = _folded(name)
    removed = {_folded(k): v for k, v in REMOVED.items()}
    if folded in removed:
        return removed[folded]
    invented = {_folded(k): k for k in NEVER_EXISTED}
    if folded in invented:
        better = NEVER_EXISTED[invented[folded]]
        hint = f"; use {better}" if better else ""
        return (
            f"not a ConversationRelay attribute (it comes from tutorials or other products){hint}"
        )
    known = list(known)
    exact = [k for k in known if _folded(k) == folded]
    if exact:
        return f"unknown attribute; did you mean {exact[0]}? (names are camelCase)"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6) or difflib.get_close_matches(
        name.lower(), [k.lower() for k in known], n=1, cutoff=0.6
    )
    if close:
        match = next((k for k in known if k.lower() == close[0].lower()), close[0])
        return f"unknown attribute; did you mean {match}?"
    return "unknown attribute"
