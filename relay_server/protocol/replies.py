"""What the Twilio side knows of one agent reply: a talk cycle as the caller hears it.

Plain values, no I/O: :class:`~relay_server.protocol.twilio_side.TwilioSide` fills them in as
``text`` frames arrive (Twilio docs: WebSocket messages, text: ``last: true`` ends a talk cycle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Union


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
    #: Characters of :attr:`text` already reported as ``tokensPlayed``.
    played: int = 0
    #: The cycle so far has a plain (not ``preemptible``) text frame: it is the answer.
    plain_cycle: bool = False
    cut_at: float | None = None

    @property
    def done(self) -> bool:
        """The reply is over: its cycle closed, a barge-in cut it, or the call ended."""
        return self.finished_at is not None

    @property
    def first_token_ms(self) -> float | None:
        """Milliseconds from the input to the first token, once one arrived."""
        if self.first_token_at is None:
            return None
        return (self.first_token_at - self.sent_at) * 1000

    @property
    def speaking(self) -> bool:
        """Tokens are arriving and the cycle is not closed: the agent is talking."""
        return self.tokens > 0 and not self.done

    def finish(self, now: float, error: str | None = None) -> None:
        """Mark the reply over at ``now`` (the first call wins), with ``error`` if it failed."""
        if not self.done:
            self.finished_at = now
            self.error = self.error or error


# ------------------------------------------------------------------ what the caller observes
# One value per step, for a caller's display (rendered with ``match``). Frozen dataclasses, not
# msgspec Structs: they carry a live :class:`Reply`, never go on a wire.


@dataclass(frozen=True)
class Greeting:
    """The welcome greeting played."""

    text: str


@dataclass(frozen=True)
class TokenHeard:
    """One token of a reply reached the caller."""

    reply: Reply
    token: str


@dataclass(frozen=True)
class ReplyDone:
    """A talk cycle closed (``last: true``): the reply is complete."""

    reply: Reply


@dataclass(frozen=True)
class Interrupted:
    """The caller barged in; ``heard`` is all Twilio spoke of the reply."""

    reply: Reply
    heard: str


@dataclass(frozen=True)
class Played:
    """The agent played a media URL."""

    reply: Reply
    source: str


@dataclass(frozen=True)
class DigitsSent:
    """The agent sent DTMF to the far end."""

    reply: Reply
    digits: str


@dataclass(frozen=True)
class LanguageSwitched:
    """The agent switched TTS and/or STT language."""

    reply: Reply
    tts_language: str | None
    transcription_language: str | None


@dataclass(frozen=True)
class Ended:
    """The agent sent ``end``."""

    handoff_data: str | None


@dataclass(frozen=True)
class Invalid:
    """Twilio would reject an app frame (64107): why, and the frame as shown."""

    reason: str
    frame: str


@dataclass(frozen=True)
class Dropped:
    """Caller input Twilio would not have reported (the TwiML says so): why."""

    reason: str


CallerEvent = Union[
    Greeting,
    TokenHeard,
    ReplyDone,
    Interrupted,
    Played,
    DigitsSent,
    LanguageSwitched,
    Ended,
    Invalid,
    Dropped,
]


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
