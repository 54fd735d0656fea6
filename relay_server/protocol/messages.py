"""Typed ConversationRelay messages (Twilio docs: WebSocket messages).

Every message is a msgspec Struct tagged by its wire ``type`` and renamed to camelCase.
Inbound structs are lenient the way Twilio needs (optional fields default, unknown fields are
ignored by msgspec); outbound structs validate on construction so that nothing Twilio would
reject (error 64107) ever leaves the relay.

Outbound structs use ``omit_defaults``: optional overrides (``lang``, ``interruptible``…) default
to ``None`` and vanish from the wire, while required fields (``token``, ``last``) have no default
and are therefore always encoded.
"""

from __future__ import annotations

import re
from typing import Any, Union

import msgspec

from relay_server.protocol.errors import ProtocolError

# --------------------------------------------------------------------------- inbound


class Setup(msgspec.Struct, tag="setup", tag_field="type", rename="camel", kw_only=True):
    """First frame of every socket (Twilio docs: WebSocket messages)."""

    # Fields in the order of the captured frame, so that the Twilio side encodes it as Twilio
    # does (Twilio docs: WebSocket messages, setup); decoding does not depend on the order.
    session_id: str = ""
    call_sid: str
    parent_call_sid: str = ""
    from_: str = ""
    to: str = ""
    forwarded_from: str = ""
    caller_name: str = ""
    direction: str = ""
    call_type: str = ""
    #: Upper-snake on the wire: ``RINGING`` or ``IN_PROGRESS`` (Twilio docs: WebSocket messages).
    call_status: str = ""
    account_sid: str = ""
    custom_parameters: dict[str, str] = msgspec.field(default_factory=dict)
    #: ``null`` in 2024-25 captures, absent in 2026 ones (Twilio docs: WebSocket messages).
    application_sid: str | None = None


class Prompt(msgspec.Struct, tag="prompt", tag_field="type", rename="camel", kw_only=True):
    """Caller speech (Twilio docs: ConversationRelay WebSocket messages).

    ``last=False`` frames are cumulative partials.
    """

    voice_prompt: str
    lang: str = ""
    last: bool = True


class Dtmf(msgspec.Struct, tag="dtmf", tag_field="type", kw_only=True):
    """One key press (Twilio docs: WebSocket messages): ``0-9``, ``*`` or ``#``."""

    digit: str

    def __post_init__(self) -> None:
        if len(self.digit) != 1 or self.digit not in "0123456789*#":
            raise ProtocolError(f"dtmf.digit must be one of 0-9 * #, got {self.digit!r}")


class Interrupt(msgspec.Struct, tag="interrupt", tag_field="type", rename="camel", kw_only=True):
    """Caller barged in (Twilio docs: ConversationRelay WebSocket messages).

    ``utterance_until_interrupt`` is the agent text the caller heard.
    """

    utterance_until_interrupt: str = ""
    #: An int in 2026 captures, a string in the early docs ("460"): both accepted (Twilio docs:
    #: WebSocket messages).
    duration_until_interrupt_ms: Union[int, float, str] = 0

    def __post_init__(self) -> None:
        raw = self.duration_until_interrupt_ms
        if isinstance(raw, int):
            return
        try:
            self.duration_until_interrupt_ms = int(float(raw or 0))
        except (ValueError, OverflowError) as exc:
            raise ProtocolError(f"durationUntilInterruptMs is not a number: {raw!r}") from exc


class Error(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    """Twilio rejected one of our frames or hit a problem (Twilio docs: WebSocket messages)."""

    description: str = ""

    @property
    def code(self) -> int | None:
        """The 64xxx code when the description carries one ("…, code: 64107, …")."""
        match = _CODE_RE.search(self.description)
        if match:
            return int(match.group(1))
        # The docs' form carries no code: "Invalid message received: { ... }" is 64107 (Twilio docs:
        # WebSocket messages).
        return 64107 if self.description.startswith("Invalid message received") else None


_CODE_RE = re.compile(r"\b(64\d{3})\b")


class Info(msgspec.Struct, tag="info", tag_field="type", kw_only=True):
    """Opt-in speaker / tokens-played / debugging events (Twilio docs: WebSocket messages).

    ``value`` is kept as a string.
    """

    name: str
    value: Union[str, int, float, bool, None] = ""

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool):
            self.value = "true" if value else "false"
        elif value is None:
            self.value = ""
        elif not isinstance(value, str):
            self.value = str(value)


class Unknown(msgspec.Struct, kw_only=True):
    """A well-formed frame whose ``type`` this relay does not know.

    Twilio adds message types over time, so an unknown one is skipped, never an error: a relay
    built before a new type must keep serving calls that send it.
    """

    type: str


Inbound = Union[Setup, Prompt, Dtmf, Interrupt, Error, Info]

# -------------------------------------------------------------------------- outbound

_DIGITS_RE = re.compile(r"[0-9w#*]+")


class _Out(msgspec.Struct, tag_field="type", rename="camel", omit_defaults=True, kw_only=True):
    pass


class Text(_Out, tag="text"):
    """One token of a talk cycle. ``token`` is never null nor trimmed; ``last`` always sent."""

    token: str
    last: bool
    lang: str | None = None
    interruptible: bool | None = None
    preemptible: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str):
            raise ProtocolError(f"text.token must be a string, got {type(self.token).__name__}")


class Play(_Out, tag="play"):
    """Play a media URL (``loop=0`` means 1000 times)."""

    source: str
    loop: int = 1
    preemptible: bool | None = None
    interruptible: bool | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ProtocolError("play.source is required")
        if self.loop < 0:
            raise ProtocolError(f"play.loop must be 0 or more, got {self.loop}")


class SendDigits(_Out, tag="sendDigits"):
    """DTMF to the far end: only ``0-9 w # *`` (``w`` = 0.5 s pause)."""

    digits: str

    def __post_init__(self) -> None:
        if not isinstance(self.digits, str) or not _DIGITS_RE.fullmatch(self.digits):
            raise ProtocolError(
                f"sendDigits.digits must be non-empty and only 0-9, w, #, *: got {self.digits!r}"
            )


class Language(_Out, tag="language"):
    """Switch TTS and/or STT language for what follows."""

    tts_language: str | None = None
    transcription_language: str | None = None

    def __post_init__(self) -> None:
        if not self.tts_language and not self.transcription_language:
            raise ProtocolError("language needs ttsLanguage or transcriptionLanguage")


class End(_Out, tag="end"):
    """End the session; ``handoff_data`` reaches the action URL verbatim as ``HandoffData``."""

    handoff_data: str | None = None

    def __post_init__(self) -> None:
        if self.handoff_data is not None and not isinstance(self.handoff_data, str):
            raise ProtocolError("end.handoffData must be a string (JSON-encode objects first)")


Outbound = Union[Text, Play, SendDigits, Language, End]


# ------------------------------------------------------------------ the Twilio side's variants


class SentSetup(Setup, tag="setup"):
    """``setup`` as the Twilio side sends it: ``applicationSid`` absent, not ``null``.

    Absent as in 2026 captures (Twilio docs: ConversationRelay WebSocket messages).
    """

    application_sid: str | msgspec.UnsetType | None = msgspec.UNSET  # type: ignore[assignment]

    @classmethod
    def inbound(
        cls,
        call_sid: str,
        *,
        from_: str = "+15550100001",
        to: str = "+15550100002",
        account_sid: str = "AC" + "0" * 32,
        **fields: Any,
    ) -> SentSetup:
        """The ``setup`` of an inbound call as Twilio sends it, shaped like a captured one.

        The session id follows the call's, ``forwardedFrom`` is the number called, the call is
        ``RINGING``, and its type follows the caller's address (``client:`` is ``CLIENT``,
        ``sip:`` is ``SIP``, else ``PSTN``). ``fields`` set any other field by its Python name
        (``custom_parameters={...}``, ``call_status="IN_PROGRESS"``).
        """
        call_type = (
            "CLIENT"
            if from_.startswith("client:")
            else "SIP"
            if from_.startswith("sip:")
            else "PSTN"
        )
        values: dict[str, Any] = {
            "session_id": "VX" + call_sid[2:],
            "forwarded_from": to,
            "direction": "inbound",
            "call_type": call_type,
            "call_status": "RINGING",
            **fields,
        }
        return cls(call_sid=call_sid, from_=from_, to=to, account_sid=account_sid, **values)


class SentInterrupt(Interrupt, tag="interrupt"):
    """``interrupt`` as the Twilio side sends it: ``durationUntilInterruptMs`` as given.

    So a client can send the early docs' string (``"460"``) as well as the int of 2026
    captures (Twilio docs: ConversationRelay WebSocket messages, interrupt).
    """

    def __post_init__(self) -> None:
        raw = self.duration_until_interrupt_ms
        try:
            float(raw or 0)
        except (ValueError, OverflowError) as exc:
            raise ProtocolError(f"durationUntilInterruptMs is not a number: {raw!r}") from exc


class ReceivedText(Text, tag="text"):
    """``text`` as Twilio reads it: ``last`` defaults to false.

    Twilio docs: ConversationRelay WebSocket messages, text. The relay's own :class:`Text`
    keeps ``last`` required so that it is always sent.
    """

    last: bool = False


#: What Twilio accepts from an app, decoded leniently only where Twilio's docs give defaults.
Received = Union[ReceivedText, Play, SendDigits, Language, End]
