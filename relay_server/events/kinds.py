"""The call events, one msgspec Struct per kind, tagged by ``kind`` (the wire's name for it).

Every event has ``call_sid`` and ``ts`` (Unix time); the other fields are its *data*, the
object stored in SQLite and served as ``data`` on ``/events``. Fields typed with
``msgspec.UNSET`` are extras that appear on the wire only when set (the words for an error
code, the length of a cut partial); every other field is always there. Defaults keep events
from older relays (and hand-published ones) readable.

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
                        from the same moment to the reply's end. ``llm`` (only when the
                        reply came from an LLM): the data of the chat request whose stream
                        ended the reply, as an ``llm.request`` would carry it (see there)
``agent.pushed``        ``type`` (the outbound frame's type) and ``text`` (what it says:
                        the token, the play source, the digits…): a frame pushed into the
                        call through ``POST /calls/{callSid}/messages``
``barge_in``            ``heard`` (the agent's words the caller heard), ``duration_ms``
``dtmf``                ``digit``
``tool.call``           ``name``, ``arguments`` (JSON text), ``result``, ``duration_ms`` (the
                        tool's run)
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
``call.answered``       ``answered_by`` (``human``, ``machine_start``, ``machine_end_beep``,
                        ``machine_end_silence``, ``machine_end_other``, ``fax``, ``unknown``)
                        and ``detection_ms``: Twilio's asynchronous answering machine
                        detection of an outbound call (``/amd``)
``call.lost``           ``last_seen`` (Unix time), ``reason``: written by a relay at start for
                        a call left open by a relay that is gone (crashed, killed, stopped
                        with the call still open); the call's status becomes ``lost``
``call.drained``        ``action`` (``reconnect``: the socket was closed with ``code`` for
                        Twilio's applicationReconnect to reopen it on another replica;
                        ``end``: the call was ended politely), ``code``, ``replica``: a call
                        still open when a stopping relay's drain timeout ran out
``turn.timeline``       ``turn`` (1-based on the socket), ``end`` (``completed``,
                        ``interrupted`` or ``closed``), ``barge_in``, and each stage in ms,
                        ``None`` when a frame it needs never came (unknown, never guessed):
                        ``transcription_ms`` (caller stopped speaking, ``clientSpeaking off``,
                        to the final prompt), ``relay_ms`` (the relay's own time: final prompt
                        to LLM request, plus LLM first token to first ``text`` sent),
                        ``llm_first_token_ms`` (LLM request to its first token),
                        ``speech_start_ms`` (first ``text`` sent to ``agentSpeaking on``),
                        ``speaking_ms`` (``agentSpeaking on`` to ``off``) and the headline
                        ``caller_wait_ms`` (caller stopped speaking to the agent audible)
``llm.request``         one chat request of a reply with tool calls, published when its
                        stream ends with them (the request that ends a reply rides in the
                        reply's ``agent.reply`` as ``llm``: one stored row per turn fewer;
                        :func:`requests_in` gives both as ``llm.request``): ``model``,
                        ``round`` (0, then 1… after tool calls), ``started`` (Unix time it was
                        sent), ``duration_ms`` (to the stream's end or cut), ``first_token_ms``
                        (to its first content token; ``None``: none), ``input_tokens`` and
                        ``output_tokens`` (the stream's usage report; ``None``: not reported,
                        or the stream was cut), ``outcome`` (``completed``, ``tool_calls``,
                        ``cancelled`` or ``fault``)
======================  =============================================================

A kind this code does not know (from a newer relay) is an :class:`Other`, never an error.
"""

from __future__ import annotations

import time
import typing
from typing import Any, ClassVar, Union

import msgspec
from msgspec import UNSET, UnsetType

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
CALL_STATUS = "call.status"
CALL_ANSWERED = "call.answered"
CALL_LOST = "call.lost"
CALL_DRAINED = "call.drained"
TURN_TIMELINE = "turn.timeline"
LLM_REQUEST = "llm.request"
LLM_FAULT = "llm.fault"
BAD_FRAME = "frame.bad"
SOCKET_CLOSED = "socket.closed"
#: Twilio call statuses after which a call is over (status callbacks).
CALL_OVER = frozenset({"completed", "failed", "busy", "no-answer", "canceled"})


class CallEvent(msgspec.Struct, tag_field="kind", kw_only=True, frozen=True):
    """What happened on which call, and when; one subclass per kind."""

    call_sid: str
    ts: float = msgspec.field(default_factory=time.time)
    #: Data keys that differ from the field's name, where msgspec cannot rename: ``kind`` is
    #: the tag, yet ``llm.fault`` has a ``kind`` of its own in its data.
    wire_names: ClassVar[dict[str, str]] = {}

    @property
    def kind(self) -> str:
        """The event's kind (``dtmf``, ``agent.reply``…): its tag."""
        return str(type(self).__struct_config__.tag)

    @property
    def data(self) -> dict[str, Any]:
        """The event's data as stored and served: every field but ``call_sid`` and ``ts``."""
        from relay_server.events.codec import data_of

        return data_of(self)


class CallStarted(CallEvent, tag=CALL_STARTED, frozen=True):
    """The call's socket opened (``resumed``: again, after a drop)."""

    from_: str | None = msgspec.field(default="", name="from")
    to: str | None = ""
    direction: str | None = ""
    custom_parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    session_id: str | None = ""
    resumed: bool = False


class CallerSpeech(CallEvent, tag=CALLER_SPEECH, frozen=True):
    """What the caller said; ``last=False`` is a cumulative partial transcript."""

    text: str = ""
    last: bool = True
    #: How long a partial was before the store kept only its end.
    chars: int | UnsetType = UNSET


class AgentReply(CallEvent, tag=AGENT_REPLY, frozen=True):
    """One reply of the agent, with its latency (module docstring)."""

    text: str = ""
    first_token_ms: int | float | None = None
    duration_ms: int | float | None = None
    cancelled: bool = False
    #: The name of ``first_token_ms`` in rows stored before it was settled.
    ttft_ms: int | float | UnsetType | None = UNSET
    #: The chat request that ended this reply: an ``llm.request``'s data (module docstring).
    llm: dict[str, Any] | UnsetType = UNSET


class AgentPushed(CallEvent, tag=AGENT_PUSHED, frozen=True):
    """A frame pushed into the call through ``POST /calls/{callSid}/messages``."""

    frame_type: str = msgspec.field(default="", name="type")
    text: str = ""
    last: bool | UnsetType = UNSET


class BargeIn(CallEvent, tag=BARGE_IN, frozen=True):
    """The caller cut in; ``heard`` is what they heard of the agent."""

    heard: str = ""
    duration_ms: int | float | str | None = 0


class Dtmf(CallEvent, tag=DTMF, frozen=True):
    """A key the caller pressed."""

    digit: str = ""


class ToolCall(CallEvent, tag=TOOL_CALL, frozen=True):
    """A tool the agent called, with its JSON arguments and its result."""

    name: str = ""
    arguments: str | None = ""
    result: Any = None
    #: How long the tool ran, in ms (events from older relays have none).
    duration_ms: float | UnsetType = UNSET


class LanguageSwitched(CallEvent, tag=LANGUAGE, frozen=True):
    """The agent switched the speech and/or transcription language."""

    tts: str | None = None
    transcription: str | None = None


class Error(CallEvent, tag=ERROR, frozen=True):
    """An error Twilio reported (``source`` ``twilio``) or a turn that failed (``agent``)."""

    source: str = ""
    message: str | None = ""
    #: Twilio's error code; a failed turn (``source`` ``agent``) has none.
    code: int | str | UnsetType | None = UNSET
    title: str | UnsetType = UNSET
    explanation: str | UnsetType = UNSET
    fix: str | UnsetType = UNSET


class LlmFault(CallEvent, tag=LLM_FAULT, frozen=True):
    """The LLM did not answer (``fault``, ``kind`` in the data: connection, timeout…)."""

    fault: str = ""
    detail: str = ""
    explanation: str | UnsetType = UNSET
    fix: str | UnsetType = UNSET
    wire_names: ClassVar[dict[str, str]] = {"fault": "kind"}


class BadFrame(CallEvent, tag=BAD_FRAME, frozen=True):
    """A frame from Twilio the relay dropped, and why."""

    reason: str = ""


class SocketClosed(CallEvent, tag=SOCKET_CLOSED, frozen=True):
    """The call's WebSocket closed with ``code`` (1000: a normal hang-up)."""

    code: int | None = None


class SessionEnd(CallEvent, tag=SESSION_END, frozen=True):
    """Twilio's ``/action`` callback: the ConversationRelay session ended."""

    status: str | None = ""
    handoff_data: str | None = None
    error_code: int | str | None = None
    error_message: str | None = None
    duration: int | float | str | None = None
    title: str | UnsetType = UNSET
    explanation: str | UnsetType = UNSET
    fix: str | UnsetType = UNSET


class CallStatus(CallEvent, tag=CALL_STATUS, frozen=True):
    """Twilio's status callback for the call."""

    status: str | None = ""
    duration: int | float | str | None = None


class CallAnswered(CallEvent, tag=CALL_ANSWERED, frozen=True):
    """Who answered an outbound call: Twilio's answering machine detection (``/amd``)."""

    answered_by: str = ""
    detection_ms: int | float | str | None = None


class CallLost(CallEvent, tag=CALL_LOST, frozen=True):
    """A call left open by a relay that is gone (written by the next relay at its start)."""

    last_seen: float | None = None
    reason: str = ""


class CallDrained(CallEvent, tag=CALL_DRAINED, frozen=True):
    """A call a stopping relay closed when its drain timeout ran out (module docstring)."""

    action: str = ""
    code: int | None = None
    replica: str = ""


#: The stages of ``turn.timeline``, in the order the caller lives them, then the headline.
TIMELINE_STAGES = (
    "transcription_ms",
    "relay_ms",
    "llm_first_token_ms",
    "speech_start_ms",
    "speaking_ms",
    "caller_wait_ms",
)


class TurnTimeline(CallEvent, tag=TURN_TIMELINE, frozen=True):
    """One turn's timeline as the caller lived it (module docstring); ms, ``None``: unknown."""

    turn: int = 0
    end: str = "completed"
    barge_in: bool = False
    transcription_ms: float | None = None
    relay_ms: float | None = None
    llm_first_token_ms: float | None = None
    speech_start_ms: float | None = None
    speaking_ms: float | None = None
    caller_wait_ms: float | None = None


class LlmRequest(CallEvent, tag=LLM_REQUEST, frozen=True):
    """One chat request of a turn, when its stream ended (module docstring)."""

    model: str = ""
    round: int = 0
    started: float | None = None
    duration_ms: float | None = None
    first_token_ms: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    outcome: str = "completed"


class Other(CallEvent, tag="other", frozen=True):
    """An event of a kind this code does not know (``name``), its data as it came."""

    name: str = "?"
    fields: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The unknown kind's own name."""
        return self.name


def requests_in(event: CallEvent) -> list[LlmRequest]:
    """The chat requests an event reports, as ``llm.request`` events.

    An ``llm.request`` itself, or the one an ``agent.reply`` carries (its time is the
    reply's); none for any other event. Data that does not fit (a row from another version)
    reports none.
    """
    if isinstance(event, LlmRequest):
        return [event]
    if isinstance(event, AgentReply) and isinstance(event.llm, dict):
        try:
            return [
                msgspec.convert(
                    {**event.llm, "call_sid": event.call_sid, "ts": event.ts}, LlmRequest
                )
            ]
        except msgspec.ValidationError:
            return []
    return []


#: Every kind this relay publishes, as one tagged union.
AnyEvent = Union[
    CallStarted,
    CallerSpeech,
    AgentReply,
    AgentPushed,
    BargeIn,
    Dtmf,
    ToolCall,
    LanguageSwitched,
    Error,
    LlmFault,
    BadFrame,
    SocketClosed,
    SessionEnd,
    CallStatus,
    CallAnswered,
    CallLost,
    CallDrained,
    TurnTimeline,
    LlmRequest,
]

#: The Struct of each kind.
KINDS: dict[str, type[CallEvent]] = {
    str(cls.__struct_config__.tag): cls for cls in typing.get_args(AnyEvent)
}
