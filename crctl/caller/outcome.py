"""How a simulated call ends, and the errors that stop one from being placed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from crctl.errors import CrctlError
from relay_server.protocol.replies import CallerEvent


class CallError(CrctlError):
    """The call could not be placed or went wrong: one line saying why and what to do."""


class Unreachable(CallError):
    """Nothing answers at the relay's address (refused, unknown host, timed out)."""


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
    #: The action callback's TwiML as answered (a reconnect is followed from it).
    action_twiml: str | None = None

    def describe(self) -> str:
        """The outcome in one line, as the report prints it."""
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


@dataclass(frozen=True)
class Closed:
    """The session is over: how it ended."""

    outcome: Outcome


@dataclass(frozen=True)
class Reconnected:
    """A dropped socket came back: the ``/action`` TwiML connected a new session of the call."""

    session_id: str
    ws_url: str
    welcome_greeting: str | None


#: What a simulated call reports to its ``on_event`` handler: the Twilio side's steps, then
#: :class:`Closed` (and :class:`Reconnected` when a dropped socket is followed back).
CallEvent = Union[CallerEvent, Closed, Reconnected]
