"""OpenTelemetry traces of calls, built from the relay's event bus (optional: ``crctl[otel]``).

Off unless the standard ``OTEL_*`` variables ask for it: tracing is on when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``); ``OTEL_SDK_DISABLED=true``
turns it off. The SDK reads the rest itself (``OTEL_SERVICE_NAME``, default ``crctl``; headers;
timeouts; the batch processor's ``OTEL_BSP_*``). Spans go over OTLP/HTTP (http/protobuf).

:class:`CallTracer` is an event-bus subscriber, like the store and the metrics: call events
are per turn or per call, so nothing here runs per LLM token, and it only *records* spans (the
SDK's :class:`BatchSpanProcessor` exports them from its own thread). Events are published at
the end of what they describe, so each span's start is computed from the durations they carry:

* ``call <CallSid>`` (``twilio.call_sid``): ``call.started`` to ``socket.closed`` (or the
  relay's stop: :meth:`CallTracer.end_calls`);
* ``invoke_agent <agent>`` per caller turn (OpenTelemetry GenAI agent conventions), child of the
  call, from ``turn.timeline``: from the caller's end of speech (or the final prompt) to the
  turn's end, with its stages (``crctl.caller_wait_ms``…) and ``crctl.turn.end``;
* ``chat <model>`` per LLM request (``llm.request``) and ``execute_tool <name>`` per tool call
  (``tool.call``), children of the turn whose time they fall in (else of the call: a silence
  reminder is no caller turn).

A turn's span is written when the next turn's timeline comes or the call ends: a request cut by
a barge-in reports its end after the turn's timeline. Message content (what the caller said,
the replies, tool arguments and results) is recorded only when ``CRCTL_OTEL_CONTENT=true`` or
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from relay_server import events as ev

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "EXTENSION",
    "CallTracer",
    "Tracing",
    "agent_name",
    "capture_content",
    "open_tracing",
    "tracing_requested",
]

log = logging.getLogger("relay_server.tracing")

#: Where the app keeps its :class:`Tracing` (``app.extensions``).
EXTENSION = "crctl.tracing"
#: The service name when ``OTEL_SERVICE_NAME`` (or ``service.name`` in
#: ``OTEL_RESOURCE_ATTRIBUTES``) does not give one.
SERVICE_NAME = "crctl"
#: The LLM provider crctl talks to (an OpenAI-compatible API).
PROVIDER = "openai"
#: Seconds an event's time may stray from its turn's edges and still belong to it (the
#: stages are rounded to 0.1 ms; Unix and monotonic clocks drift a little).
SLACK = 0.05
#: Calls held open at once; past it the oldest is ended (a relay that never saw their close).
MAX_CALLS = 10_000
#: Items (requests, tool calls, content) held per call before they are written as they are.
MAX_ITEMS = 1_000
#: Stages of ``turn.timeline``, recorded as ``crctl.<stage>`` when known.
STAGES = ev.TIMELINE_STAGES
_TRUE = frozenset({"true", "1", "yes", "on"})
_EXPORTERS = frozenset({"otlp", "console"})


def _env_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def tracing_requested(env: Mapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (module docstring)."""
    env = os.environ if env is None else env
    if _env_true(env, "OTEL_SDK_DISABLED"):
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    )


def capture_content(env: Mapping[str, str] | None = None) -> bool:
    """Whether message content goes into spans (off unless asked: module docstring)."""
    env = os.environ if env is None else env
    return _env_true(env, "CRCTL_OTEL_CONTENT") or _env_true(
        env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
    )


def agent_name(configured: str | None, factory: object) -> str:
    """The agent's name in spans: the ``--agent`` setting, else the session class's name."""
    if configured:
        return configured
    name = getattr(factory, "__name__", "") or type(factory).__name__
    return {"LLMAgent": "llm", "EchoAgent": "echo"}.get(name, name)


def _ns(t: float) -> int:
    return int(t * 1e9)


@dataclass
class _Item:
    """A request, tool call or piece of content of a call, waiting for its turn's span."""

    start: float
    end: float
    event: ev.CallEvent


@dataclass
class _Turn:
    start: float | None  # computed from the stages; None: unknown
    end: float
    after: float  # the previous turn's end (or the call's start)
    event: ev.TurnTimeline


@dataclass
class _Call:
    span: Span
    start: float
    #: Where the next turn's items start at the earliest (the previous turn's end).
    mark: float
    turns: list[_Turn] = field(default_factory=list)
    items: list[_Item] = field(default_factory=list)
    #: When caller turns' final prompts (or keys) reached the relay: turn-start anchors.
    prompts: list[float] = field(default_factory=list)


class CallTracer:
    """Call events in, spans out: subscribe it to the relay's bus (module docstring).

    Args:
        tracer: the OpenTelemetry tracer spans are recorded with.
        agent: the agent's name (``gen_ai.agent.name``).
        content: record message content (prompts, replies, tool arguments and results).
    """

    def __init__(self, tracer: Tracer, agent: str = "llm", *, content: bool = False) -> None:
        self._tracer = tracer
        self.agent = agent
        self.content = content
        self._calls: dict[str, _Call] = {}
        self._closed = False

    # ----------------------------------------------------------------- the subscriber
    def __call__(self, event: ev.CallEvent) -> None:
        """Record one event (the bus calls this; per turn or per call, never per token)."""
        if self._closed:
            return
        match event:
            case ev.CallStarted():
                self._start_call(event)
            case ev.SocketClosed():
                call = self._calls.get(event.call_sid)
                if call is not None:
                    if event.code is not None:
                        call.span.set_attribute("crctl.close_code", event.code)
                    self._end_call(event.call_sid, event.ts)
            case ev.SessionEnd():
                call = self._calls.get(event.call_sid)
                if call is not None and event.status:
                    call.span.set_attribute("crctl.session.status", event.status)
            case ev.TurnTimeline():
                self._turn(event)
            case ev.AgentReply() if isinstance(event.llm, dict):
                for request in ev.requests_in(event):  # the request that ended the reply
                    self(request)
                self(msgspec.structs.replace(event, llm=msgspec.UNSET))
            case ev.LlmRequest():
                start = event.started
                if start is None:
                    start = event.ts - (event.duration_ms or 0) / 1000
                end = (
                    start + event.duration_ms / 1000 if event.duration_ms is not None else event.ts
                )
                self._item(_Item(start, max(start, end), event))
            case ev.ToolCall():
                duration = getattr(event, "duration_ms", None)  # newer relays say how long
                ms = duration if isinstance(duration, (int, float)) and duration >= 0 else 0
                self._item(_Item(event.ts - ms / 1000, event.ts, event))
            case ev.CallerSpeech() if event.last:
                call = self._calls.get(event.call_sid)
                if call is not None:
                    call.prompts.append(event.ts)
                    if self.content:
                        self._item(_Item(event.ts, event.ts, event))
            case ev.Dtmf():
                call = self._calls.get(event.call_sid)
                if call is not None:
                    call.prompts.append(event.ts)
            case ev.AgentReply() if self.content:
                ms = event.duration_ms if event.duration_ms is not None else 0
                self._item(_Item(event.ts - ms / 1000, event.ts, event))
            case _:
                pass

    def end_calls(self, now: float | None = None) -> None:
        """End every open call's span (the relay stops) and record nothing more."""
        now = time.time() if now is None else now
        for sid in list(self._calls):
            self._end_call(sid, now)
        self._closed = True

    # ------------------------------------------------------------------------ calls
    def _start_call(self, event: ev.CallStarted) -> None:
        if event.call_sid in self._calls:  # a second call.started of an open socket
            return
        self._open_call(event.call_sid, event.ts, resumed=event.resumed)

    def _open_call(self, sid: str, start: float, *, resumed: bool = False) -> _Call:
        from opentelemetry.trace import SpanKind

        while len(self._calls) >= MAX_CALLS:
            self._end_call(next(iter(self._calls)), start)
        attributes: dict[str, Any] = {"twilio.call_sid": sid}
        if resumed:
            attributes["crctl.call.resumed"] = True
        span = self._tracer.start_span(
            f"call {sid}", kind=SpanKind.SERVER, attributes=attributes, start_time=_ns(start)
        )
        call = self._calls[sid] = _Call(span=span, start=start, mark=start)
        return call

    def _call_for(self, sid: str, start: float) -> _Call:
        """The open call ``sid`` (one whose ``call.started`` this relay missed: opened here)."""
        call = self._calls.get(sid)
        return call if call is not None else self._open_call(sid, start)

    def _end_call(self, sid: str, end: float) -> None:
        call = self._calls.pop(sid, None)
        if call is None:
            return
        for turn in call.turns:
            self._write_turn(call, turn)
        call.turns.clear()
        last = max([end, call.start] + [item.end for item in call.items])
        for item in call.items:  # after the last turn: under the call itself
            self._write_item(call.span, item, call_sid=sid)
        call.items.clear()
        call.span.end(end_time=_ns(last))

    # ------------------------------------------------------------------------ turns
    def _item(self, item: _Item) -> None:
        call = self._call_for(item.event.call_sid, item.start)
        call.items.append(item)
        if len(call.items) > MAX_ITEMS:  # a call with no turns at all: write as they come
            for old in call.items[: -MAX_ITEMS // 2]:
                self._write_item(call.span, old, call_sid=item.event.call_sid)
            del call.items[: -MAX_ITEMS // 2]

    def _turn(self, event: ev.TurnTimeline) -> None:
        call = self._call_for(event.call_sid, event.ts)
        for turn in call.turns:  # an earlier turn's late items have come by now
            self._write_turn(call, turn)
        anchors = [t for t in call.prompts if call.mark - SLACK <= t <= event.ts + SLACK]
        # A prompt at the turn's very end may be the next turn's (it cut this one short).
        call.prompts = [t for t in call.prompts if t >= event.ts - SLACK]
        call.turns = [_Turn(_turn_start(event, anchors), event.ts, call.mark, event)]
        call.mark = event.ts

    def _write_turn(self, call: _Call, turn: _Turn) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        event = turn.event
        lo = (turn.start if turn.start is not None else turn.after) - SLACK
        hi = turn.end + SLACK
        before = [i for i in call.items if i.start < lo]
        mine = [i for i in call.items if lo <= i.start <= hi]
        call.items = [i for i in call.items if i.start > hi]
        for item in before:  # no caller turn (a silence reminder): under the call
            self._write_item(call.span, item, call_sid=event.call_sid)
        starts = [i.start for i in mine] + ([turn.start] if turn.start is not None else [])
        start = min(starts) if starts else turn.end
        end = max([turn.end] + [i.end for i in mine])
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": self.agent,
            "gen_ai.conversation.id": event.call_sid,
            "twilio.call_sid": event.call_sid,
            "crctl.turn": event.turn,
            "crctl.turn.end": event.end,
            "crctl.barge_in": event.barge_in,
        }
        for stage in STAGES:
            value = getattr(event, stage)
            if value is not None:
                attributes[f"crctl.{stage}"] = float(value)
        if self.content:
            said = [i.event.text for i in mine if isinstance(i.event, ev.CallerSpeech)]
            replies = [i.event for i in mine if isinstance(i.event, ev.AgentReply)]
            if said:
                attributes["gen_ai.input.messages"] = _messages("user", said)
            if replies:
                attributes["gen_ai.output.messages"] = json.dumps(
                    [
                        {
                            "role": "assistant",
                            "parts": [{"type": "text", "content": r.text}],
                            "finish_reason": "cancelled" if r.cancelled else "stop",
                        }
                        for r in replies
                    ]
                )
        span = self._tracer.start_span(
            f"invoke_agent {self.agent}",
            context=trace.set_span_in_context(call.span),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=_ns(start),
        )
        for item in mine:
            if isinstance(item.event, (ev.LlmRequest, ev.ToolCall)):  # content: attributes above
                self._write_item(span, item, call_sid=event.call_sid)
        span.end(end_time=_ns(end))

    # ------------------------------------------------------------------------ items
    def _write_item(self, parent: Span, item: _Item, *, call_sid: str) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        event = item.event
        context = trace.set_span_in_context(parent)
        if isinstance(event, ev.LlmRequest):
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.system": PROVIDER,
                "gen_ai.request.model": event.model,
                "crctl.llm.round": event.round,
                "crctl.llm.outcome": event.outcome,
            }
            if event.input_tokens is not None:
                attributes["gen_ai.usage.input_tokens"] = event.input_tokens
            if event.output_tokens is not None:
                attributes["gen_ai.usage.output_tokens"] = event.output_tokens
            if event.first_token_ms is not None:
                attributes["crctl.llm.first_token_ms"] = float(event.first_token_ms)
            reason = {"completed": "stop", "tool_calls": "tool_calls"}.get(event.outcome)
            if reason:
                attributes["gen_ai.response.finish_reasons"] = [reason]
            if event.outcome == "fault":
                attributes["error.type"] = "llm.fault"
            span = self._tracer.start_span(
                f"chat {event.model}".strip(),
                context=context,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=_ns(item.start),
            )
            if event.outcome == "fault":
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=_ns(item.end))
        elif isinstance(event, ev.ToolCall):
            attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": event.name,
                "gen_ai.tool.type": "function",
            }
            failed = isinstance(event.result, str) and event.result.startswith("error:")
            if failed:
                attributes["error.type"] = "tool_error"
            if self.content:
                attributes["gen_ai.tool.call.arguments"] = event.arguments or ""
                result = event.result
                attributes["gen_ai.tool.call.result"] = (
                    result if isinstance(result, str) else json.dumps(result, default=str)
                )
            span = self._tracer.start_span(
                f"execute_tool {event.name}".strip(),
                context=context,
                kind=SpanKind.INTERNAL,
                attributes=attributes,
                start_time=_ns(item.start),
            )
            if failed:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=_ns(item.end))
        elif self.content:
            # Content outside a caller turn (a silence reminder): an event on the call's span.
            if isinstance(event, ev.AgentReply):
                name, text = "crctl.agent.reply", event.text
            elif isinstance(event, ev.CallerSpeech):
                name, text = "crctl.caller.speech", event.text
            else:
                return
            if parent.is_recording():
                parent.add_event(name, {"text": text}, timestamp=_ns(item.end))


def _messages(role: str, texts: list[str]) -> str:
    """GenAI convention's message list (``gen_ai.input.messages``), as JSON text."""
    return json.dumps([{"role": role, "parts": [{"type": "text", "content": t}]} for t in texts])


def _turn_start(event: ev.TurnTimeline, prompts: list[float]) -> float | None:
    """When the turn began: the caller stopped speaking, else the final prompt; None: unknown.

    Counted back from the turn's end (the event's time) through its stages, and from the
    final prompt's arrival (``prompts``: the ``caller.speech`` times that fall in the turn).
    """
    points: list[float] = []
    end = event.ts
    if event.speaking_ms is not None:
        on = end - event.speaking_ms / 1000  # agentSpeaking on
        if event.caller_wait_ms is not None:
            points.append(on - event.caller_wait_ms / 1000)
        if event.speech_start_ms is not None and event.relay_ms is not None:
            prompt = (
                on
                - (event.speech_start_ms + event.relay_ms + (event.llm_first_token_ms or 0)) / 1000
            )
            points.append(prompt)
            if event.transcription_ms is not None:
                points.append(prompt - event.transcription_ms / 1000)
    if prompts:
        points.append(prompts[0])
        if event.transcription_ms is not None:
            points.append(prompts[0] - event.transcription_ms / 1000)
    points = [p for p in points if p <= end]
    return min(points) if points else None


class Tracing:
    """The relay's tracer provider and its :class:`CallTracer`; :meth:`shutdown` at stop."""

    def __init__(self, provider: Any, recorder: CallTracer) -> None:
        self.provider = provider
        self.recorder = recorder

    def shutdown(self) -> None:
        """End the open calls' spans and export what is left (blocking: run in a thread)."""
        self.recorder.end_calls()
        self.provider.shutdown()


def open_tracing(agent: str = "llm", env: Mapping[str, str] | None = None) -> Tracing | None:
    """The relay's tracing when the ``OTEL_*`` variables ask for it, else ``None``.

    Without the ``otel`` extra, or with an exporter it cannot make: one warning line, and the
    relay runs untraced.
    """
    env = os.environ if env is None else env
    if not tracing_requested(env):
        return None
    names = [
        n.strip()
        for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")
        if n.strip() and n.strip() != "none"
    ] or ["otlp"]
    unknown = [n for n in names if n not in _EXPORTERS]
    if unknown:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s: crctl exports traces with otlp or console only; "
            "the relay runs untraced",
            ",".join(unknown),
        )
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if "otlp" in names:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        log.warning(
            "OTEL_* asks for traces but OpenTelemetry is not installed (%s): "
            "pip install 'crctl[otel]'; the relay runs untraced",
            exc.name or exc,
        )
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol and protocol != "http/protobuf":
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s: crctl sends traces over http/protobuf", protocol
        )
    try:
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
        provider = TracerProvider(resource=resource)
        for name in names:
            exporter = OTLPSpanExporter() if name == "otlp" else ConsoleSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(exporter))
    except Exception as exc:  # a bad OTEL_* value the SDK refuses
        log.warning("OpenTelemetry cannot start (%s); the relay runs untraced", exc)
        return None
    tracer = provider.get_tracer("crctl.relay")
    return Tracing(provider, CallTracer(tracer, agent, content=capture_content(env)))
