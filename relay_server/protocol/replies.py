"""What the Twilio side knows of one agent reply: a talk cycle as the caller hears it.

Plain values, no I/O: :class:`~relay_server.protocol.twilio_side.TwilioSide` fills them in as
``text`` frames arrive (Twilio docs: WebSocket messages, text: ``last: true`` ends a talk cycle).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True)
class CallerEvent:
    """One step the Twilio side observed, for a caller's display: ``greeting``, ``token``,
    ``reply``, ``interrupted``, ``play``, ``digits``, ``language``, ``end``, ``invalid``,
    ``dropped`` (and ``closed``, which the I/O layer adds)."""

    kind: str
    reply: Reply | None = None
    data: dict[str, Any] = field(default_factory=dict)


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
