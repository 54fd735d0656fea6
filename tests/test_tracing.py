"""OpenTelemetry traces of calls (relay_server/tracing.py).

Events published on a real :class:`EventBus` become spans in the SDK's
``InMemorySpanExporter``: the tree (call → invoke_agent → chat / execute_tool), names, GenAI
attributes, times and content (off unless asked). Then once over OTLP/HTTP: a real relay started
with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a receiver on 127.0.0.1, a real call, and the
spans the receiver decodes with OpenTelemetry's own protobuf classes.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from relay_server import events as ev
from relay_server.app import create_app
from relay_server.tracing import (
    EXTENSION,
    CallTracer,
    agent_name,
    capture_content,
    open_tracing,
    tracing_requested,
)
from tests.events_support import wait_kind
from tests.support import TwilioCaller, config
from tests.test_timeline_e2e import two_turns

CA = "CA" + "3" * 32
T0 = 1_700_000_000.0
SECRET_PROMPT = "my card number is 4111"
SECRET_REPLY = "Your balance is 12 dollars."
OTEL_VARS = (
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "CRCTL_OTEL_CONTENT",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)


class TimedToolCall(ev.ToolCall, tag=ev.TOOL_CALL, frozen=True):
    """``tool.call`` with ``duration_ms``, as newer relays publish it."""

    duration_ms: float | None = None


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def recorded(content: bool = False) -> tuple[ev.EventBus, InMemorySpanExporter, CallTracer]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    recorder = CallTracer(provider.get_tracer("test"), "llm", content=content)
    bus = ev.EventBus()
    bus.subscribe(recorder)
    return bus, exporter, recorder


def a_call(bus: ev.EventBus) -> None:
    """A call: a turn with a tool, a silence reminder, a barge-in turn, then the hang-up.

    Times (s after T0) are consistent with the stages: turn 1, caller stopped at 0.7, final
    prompt 1.0, request 1.01 (tool calls, 1.51), tool 1.52-1.60, request 1.61-2.01 with its first
    token at 1.71, first text 1.715, agentSpeaking on 2.015, off 4.0.
    """
    emit = bus.emit
    emit(ev.CallStarted(call_sid=CA, ts=T0))
    emit(ev.CallerSpeech(call_sid=CA, ts=T0 + 1.0, text=SECRET_PROMPT, last=True))
    emit(
        ev.LlmRequest(
            call_sid=CA,
            ts=T0 + 1.51,
            model="gpt-4o-mini",
            round=0,
            started=T0 + 1.01,
            duration_ms=500.0,
            first_token_ms=None,
            input_tokens=120,
            output_tokens=9,
            outcome="tool_calls",
        )
    )
    emit(
        TimedToolCall(
            call_sid=CA,
            ts=T0 + 1.60,
            name="balance",
            arguments='{"account": "4111"}',
            result="12 dollars",
            duration_ms=80.0,
        )
    )
    # The request that ends the reply rides in its agent.reply, as the relay publishes it.
    answer = {
        "model": "gpt-4o-mini",
        "round": 1,
        "started": T0 + 1.61,
        "duration_ms": 400.0,
        "first_token_ms": 100.0,
        "input_tokens": 140,
        "output_tokens": 7,
        "outcome": "completed",
    }
    emit(
        ev.AgentReply(call_sid=CA, ts=T0 + 2.01, text=SECRET_REPLY, duration_ms=1010.0, llm=answer)
    )
    emit(
        ev.TurnTimeline(
            call_sid=CA,
            ts=T0 + 4.0,
            turn=1,
            end="completed",
            transcription_ms=300.0,
            relay_ms=15.0,
            llm_first_token_ms=700.0,
            speech_start_ms=300.0,
            speaking_ms=1985.0,
            caller_wait_ms=1315.0,
        )
    )
    # a silence reminder: no caller turn
    emit(
        ev.LlmRequest(
            call_sid=CA, ts=T0 + 4.8, model="gpt-4o-mini", started=T0 + 4.5, duration_ms=300.0
        )
    )
    # turn 2: the caller cuts in; the cut request reports after the turn's timeline
    emit(ev.CallerSpeech(call_sid=CA, ts=T0 + 5.0, text="tell me more", last=True))
    emit(
        ev.TurnTimeline(
            call_sid=CA,
            ts=T0 + 6.0,
            turn=2,
            end="interrupted",
            barge_in=True,
            transcription_ms=250.0,
            relay_ms=12.0,
            llm_first_token_ms=300.0,
            speech_start_ms=288.0,
            speaking_ms=400.0,
            caller_wait_ms=850.0,
        )
    )
    emit(
        ev.LlmRequest(
            call_sid=CA,
            ts=T0 + 6.05,
            model="gpt-4o-mini",
            started=T0 + 5.01,
            duration_ms=1040.0,
            first_token_ms=300.0,
            outcome="cancelled",
        )
    )
    emit(ev.SocketClosed(call_sid=CA, ts=T0 + 7.0, code=1000))


def by_name(spans: Any) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def seconds(ns: int | None) -> float:
    assert ns is not None
    return ns / 1e9 - T0


def inside(child: ReadableSpan, parent: ReadableSpan, slack: float = 0.001) -> bool:
    assert child.start_time is not None and child.end_time is not None
    assert parent.start_time is not None and parent.end_time is not None
    return (
        parent.start_time - slack * 1e9 <= child.start_time
        and child.end_time <= parent.end_time + slack * 1e9
    )


def test_a_call_is_a_tree_of_call_turns_requests_and_tools() -> None:
    bus, exporter, _ = recorded()
    a_call(bus)
    spans = by_name(exporter.get_finished_spans())
    assert sorted(spans) == [
        "call " + CA,
        "chat gpt-4o-mini",
        "execute_tool balance",
        "invoke_agent llm",
    ]
    (call,) = spans["call " + CA]
    turns = sorted(
        spans["invoke_agent llm"], key=lambda s: int(str((s.attributes or {})["crctl.turn"]))
    )
    chats = sorted(spans["chat gpt-4o-mini"], key=lambda s: s.start_time or 0)
    (tool,) = spans["execute_tool balance"]

    assert call.parent is None
    assert call.attributes is not None and call.attributes["twilio.call_sid"] == CA
    assert (seconds(call.start_time), seconds(call.end_time)) == pytest.approx((0.0, 7.0))
    assert len({s.context.trace_id for group in spans.values() for s in group}) == 1

    first, second = turns
    for turn in turns:
        assert turn.parent is not None and turn.parent.span_id == call.context.span_id
        assert turn.attributes is not None
        assert turn.attributes["gen_ai.operation.name"] == "invoke_agent"
        assert turn.attributes["gen_ai.agent.name"] == "llm"
        assert inside(turn, call)
    assert first.attributes is not None and second.attributes is not None
    assert first.attributes["crctl.turn.end"] == "completed"
    assert first.attributes["crctl.barge_in"] is False
    assert first.attributes["crctl.caller_wait_ms"] == 1315.0
    assert first.attributes["crctl.llm_first_token_ms"] == 700.0
    # the turn begins when the caller stopped speaking and ends with its timeline
    assert seconds(first.start_time) == pytest.approx(0.7, abs=1e-3)
    assert seconds(first.end_time) == pytest.approx(4.0, abs=1e-3)
    assert second.attributes["crctl.turn.end"] == "interrupted"
    assert second.attributes["crctl.barge_in"] is True
    assert seconds(second.start_time) == pytest.approx(4.75, abs=1e-3)

    round0, round1, reminder, cut = chats  # by start: 1.01, 1.61, 4.5, 5.01
    assert round0.parent is not None and round0.parent.span_id == first.context.span_id
    assert round1.parent is not None and round1.parent.span_id == first.context.span_id
    assert tool.parent is not None and tool.parent.span_id == first.context.span_id
    assert reminder.parent is not None and reminder.parent.span_id == call.context.span_id
    assert cut.parent is not None and cut.parent.span_id == second.context.span_id
    for child, parent in ((round0, first), (round1, first), (tool, first), (cut, second)):
        assert inside(child, parent), child.name
    assert inside(reminder, call)

    assert round0.attributes is not None and round1.attributes is not None
    assert round0.attributes["gen_ai.operation.name"] == "chat"
    assert round0.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert round0.attributes["gen_ai.provider.name"] == "openai"
    assert round0.attributes["gen_ai.usage.input_tokens"] == 120
    assert round0.attributes["gen_ai.usage.output_tokens"] == 9
    assert round0.attributes["crctl.llm.outcome"] == "tool_calls"
    assert round1.attributes["crctl.llm.round"] == 1
    assert round1.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert (seconds(round0.start_time), seconds(round0.end_time)) == pytest.approx((1.01, 1.51))
    assert cut.attributes is not None and cut.attributes["crctl.llm.outcome"] == "cancelled"
    assert "gen_ai.usage.input_tokens" not in cut.attributes  # not reported: not guessed

    assert tool.attributes is not None
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"
    assert tool.attributes["gen_ai.tool.name"] == "balance"
    assert (seconds(tool.start_time), seconds(tool.end_time)) == pytest.approx((1.52, 1.60))


def test_spans_carry_no_content_by_default() -> None:
    bus, exporter, _ = recorded()
    a_call(bus)
    spans = exporter.get_finished_spans()
    texts = [str(v) for s in spans for v in (s.attributes or {}).values()]
    texts += [str(e.attributes) for s in spans for e in s.events]
    assert spans and texts
    for secret in (SECRET_PROMPT, SECRET_REPLY, "4111", "12 dollars"):
        assert not any(secret in t for t in texts), secret


def test_content_when_asked() -> None:
    bus, exporter, _ = recorded(content=True)
    a_call(bus)
    spans = by_name(exporter.get_finished_spans())
    first = next(s for s in spans["invoke_agent llm"] if (s.attributes or {})["crctl.turn"] == 1)
    assert first.attributes is not None
    inputs = msgspec.json.decode(str(first.attributes["gen_ai.input.messages"]))
    outputs = msgspec.json.decode(str(first.attributes["gen_ai.output.messages"]))
    assert inputs == [{"role": "user", "parts": [{"type": "text", "content": SECRET_PROMPT}]}]
    assert outputs[0]["parts"][0]["content"] == SECRET_REPLY
    (tool,) = spans["execute_tool balance"]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.call.arguments"] == '{"account": "4111"}'
    assert tool.attributes["gen_ai.tool.call.result"] == "12 dollars"


def test_content_is_asked_by_either_variable() -> None:
    assert not capture_content({})
    assert capture_content({"CRCTL_OTEL_CONTENT": "true"})
    assert capture_content({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "True"})
    assert not capture_content({"CRCTL_OTEL_CONTENT": "false"})


def test_a_tool_call_without_a_duration_is_a_moment_and_a_failed_one_an_error() -> None:
    bus, exporter, _ = recorded()
    bus.emit(ev.CallStarted(call_sid=CA, ts=T0))
    bus.emit(ev.ToolCall(call_sid=CA, ts=T0 + 1, name="lookup", result="error: no such order"))
    bus.emit(ev.LlmRequest(call_sid=CA, ts=T0 + 2, started=T0 + 1.5, model="m", outcome="fault"))
    bus.emit(ev.SocketClosed(call_sid=CA, ts=T0 + 3))
    spans = by_name(exporter.get_finished_spans())
    (tool,) = spans["execute_tool lookup"]
    assert tool.start_time == tool.end_time == int((T0 + 1) * 1e9)
    assert tool.status.status_code is StatusCode.ERROR
    (chat,) = spans["chat m"]
    assert chat.status.status_code is StatusCode.ERROR
    assert chat.attributes is not None and chat.attributes["crctl.llm.outcome"] == "fault"


def test_turns_go_to_their_own_call_and_open_calls_end_at_stop() -> None:
    bus, exporter, recorder = recorded()
    other = "CA" + "4" * 32
    bus.emit(ev.CallStarted(call_sid=CA, ts=T0))
    bus.emit(ev.CallStarted(call_sid=other, ts=T0 + 0.5))
    bus.emit(ev.TurnTimeline(call_sid=other, ts=T0 + 2, turn=1, end="closed"))
    bus.emit(ev.TurnTimeline(call_sid=CA, ts=T0 + 3, turn=1, speaking_ms=500.0))
    assert exporter.get_finished_spans() == ()  # calls still open
    recorder.end_calls(now=T0 + 9)
    bus.emit(ev.TurnTimeline(call_sid=CA, ts=T0 + 10, turn=2))  # after the stop: ignored
    spans = exporter.get_finished_spans()
    calls = {s.attributes["twilio.call_sid"]: s for s in spans if s.name.startswith("call ")}  # type: ignore[index]
    assert set(calls) == {CA, other}
    turns = [s for s in spans if s.name == "invoke_agent llm"]
    assert len(turns) == 2
    for turn in turns:
        assert turn.attributes is not None and turn.parent is not None
        owner = calls[turn.attributes["twilio.call_sid"]]
        assert turn.parent.span_id == owner.context.span_id
        assert seconds(owner.end_time) == pytest.approx(9.0)
    ended = {t.attributes["crctl.turn.end"] for t in turns if t.attributes}
    assert ended == {"closed", "completed"}


def test_the_otel_variables_turn_tracing_on_and_off() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h/v1/traces"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert agent_name(None, object) == "object" and agent_name("my:Agent", object) == "my:Agent"


def test_without_otel_variables_the_relay_has_no_tracer(no_otel_env: None) -> None:
    assert open_tracing("llm") is None
    bus = ev.EventBus()
    app = create_app(config(events_db=""), events=bus)
    assert EXTENSION not in app.extensions
    assert not any(isinstance(s, CallTracer) for s in bus._subscribers)


def test_with_otel_variables_the_relay_records(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    app = create_app(config(events_db=""))
    tracing = app.extensions[EXTENSION]
    assert tracing.recorder.agent == "echo" and tracing.recorder.content is False
    service = tracing.provider.resource.attributes["service.name"]
    tracing.provider.shutdown()
    assert service == "crctl"


def test_without_the_extra_one_warning_and_no_traces(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # ImportError on import
    with caplog.at_level(logging.WARNING, logger="relay_server.tracing"):
        app = create_app(config(events_db=""))
    assert EXTENSION not in app.extensions
    lines = [r.getMessage() for r in caplog.records if r.name == "relay_server.tracing"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "pip install 'crctl[otel]'" in lines[0]


def test_an_exporter_crctl_cannot_make_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relay_server.tracing"):
        assert open_tracing("llm", {"OTEL_TRACES_EXPORTER": "zipkin"}) is None
    (line,) = [r.getMessage() for r in caplog.records if r.name == "relay_server.tracing"]
    assert "zipkin" in line and "untraced" in line


# --------------------------------------------------------------------- over OTLP/HTTP
class Receiver:
    """An OTLP/HTTP trace receiver on a free port of 127.0.0.1: ``POST /v1/traces``."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.paths.append(self.path)
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                received.requests.append(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) of every span received."""
        out: list[tuple[dict[str, Any], Any]] = []
        for request in self.requests:
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend((resource, span) for span in ss.spans)
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


async def test_a_real_call_is_exported_over_otlp_http(
    no_otel_env: None, monkeypatch: pytest.MonkeyPatch, receiver: Receiver, relay_factory, fake_llm
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    relay = relay_factory(events_db="")
    caller = await TwilioCaller(relay, call_sid="CA" + "7" * 32).connect()
    await two_turns(caller, fake_llm, relay)
    await wait_kind(relay, caller.call_sid, "socket.closed")
    relay.stop()  # flushes the batch processor

    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    received = receiver.spans()
    assert {r["service.name"] for r, _ in received} == {"crctl"}
    spans = [s for _, s in received]
    (call,) = [s for s in spans if s.name == "call " + caller.call_sid]
    assert attrs(call)["twilio.call_sid"] == caller.call_sid
    assert call.parent_span_id == b""
    turns = sorted(
        (s for s in spans if s.name == "invoke_agent llm"), key=lambda s: attrs(s)["crctl.turn"]
    )
    assert [(attrs(t)["crctl.turn"], attrs(t)["crctl.turn.end"]) for t in turns] == [
        (1, "completed"),
        (2, "interrupted"),
    ]
    for turn in turns:
        assert turn.parent_span_id == call.span_id and turn.trace_id == call.trace_id
        assert call.start_time_unix_nano <= turn.start_time_unix_nano
        assert turn.start_time_unix_nano <= turn.end_time_unix_nano <= call.end_time_unix_nano
        assert attrs(turn)["crctl.caller_wait_ms"] >= 0
    turn_ids = {t.span_id for t in turns}
    for chat in (s for s in spans if s.name.startswith("chat ")):  # as the relay reports them
        assert chat.parent_span_id in turn_ids | {call.span_id}
        assert attrs(chat)["gen_ai.operation.name"] == "chat"
