"""The simulated Twilio caller behind ``crctl call``, one idea a module.

- :mod:`~crctl.caller.twiml`: reading the relay's TwiML (:class:`CallPlan`, :func:`parse_twiml`,
  :func:`route`, :func:`summarize_twiml`);
- :mod:`~crctl.caller.webhook`: the signed webhooks (voice URL, ``<Connect action>``) over httpx;
- :mod:`~crctl.caller.simulated`: the I/O loop (:class:`SimulatedCaller`) over the I/O-free
  :class:`~relay_server.protocol.twilio_side.TwilioSide`;
- :mod:`~crctl.caller.socket`: the socket's handshake, as Twilio opens it;
- :mod:`~crctl.caller.outcome`: how a call ends (:class:`Outcome`, :class:`Closed`) and
  :class:`CallError`.
"""

from crctl.caller.outcome import CallError, CallEvent, Closed, Outcome, Reconnected, Unreachable
from crctl.caller.simulated import (
    DEFAULT_FROM,
    DEFAULT_TO,
    DEFAULT_URL,
    EventHandler,
    SimulatedCaller,
)
from crctl.caller.twiml import CallPlan, parse_twiml, route, summarize_twiml
from crctl.caller.webhook import new_sid, sign
from relay_server.protocol.replies import Reply, complete_words, first_words

__all__ = [
    "DEFAULT_FROM",
    "DEFAULT_TO",
    "DEFAULT_URL",
    "CallError",
    "CallEvent",
    "CallPlan",
    "Closed",
    "EventHandler",
    "Outcome",
    "Reconnected",
    "Reply",
    "SimulatedCaller",
    "Unreachable",
    "complete_words",
    "first_words",
    "new_sid",
    "parse_twiml",
    "route",
    "sign",
    "summarize_twiml",
]
