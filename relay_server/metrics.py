"""The relay's Prometheus metrics, fed by its event bus (``GET /metrics``).

:class:`MetricsRecorder` is an event-bus subscriber, like the store: every metric comes from a
call event, and call events are per turn or per call, so nothing here runs per LLM token.

Label values are bounded: a ``status``, an LLM fault ``kind`` or a tool ``name`` that is not a
short identifier (free text, a CallSid, a phone number) is reported as ``other``; no metric is
labelled by call.

Several worker processes (``crctl serve --workers N``) use prometheus-client's multiprocess
mode: the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a private folder before the workers
start (the value class is chosen when ``prometheus_client`` is imported), each worker writes its
values to files there, and any worker's ``/metrics`` reads them all. The gauge of live calls
sums over the live workers only (``livesum``). Without the variable the same code keeps the
values in this process.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relay_server import events as ev
from relay_server.errors import ConfigError

__all__ = [
    "CONTENT_TYPE",
    "EXTENSION",
    "MULTIPROC_ENV",
    "MetricsRecorder",
    "exposition_registry",
    "mark_process_dead",
    "multiprocess_dir",
    "serve_metrics",
]

#: The variable prometheus-client reads for its multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Where the app keeps its :class:`MetricsRecorder` (``app.extensions``).
EXTENSION = "crctl.metrics"
#: The Content-Type of the text exposition format.
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Seconds a caller waits or the LLM takes to its first token: voice-scale, 50 ms to 10 s.
VOICE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0)
#: The relay's own added time: milliseconds, up to a second.
RELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: How long the agent speaks in a turn.
SPEAKING_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0)

#: Session end statuses (Twilio's ``/action`` callback, ``SessionStatus``) and call statuses
#: (its status callback, ``CallStatus``) a call can end with; ``lost``: crctl's own (its
#: relay died with the call open).
END_STATUSES = frozenset(
    {"completed", "ended", "failed", "busy", "no-answer", "canceled", "lost", "other"}
)
#: Call statuses of a call that never got a session (so no ``/action``) (Twilio docs: the
#: status callback's ``CallStatus``).
_NEVER_CONNECTED = frozenset({"busy", "no-answer", "canceled", "failed"})
#: A label value taken from an event: a short identifier, never free text.
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}\Z")
#: A Twilio SID (``CA…`` a call, ``AC…`` an account…): an identifier, yet one per call.
_SID = re.compile(r"[A-Z]{2}[0-9a-fA-F]{32}\Z")
#: Distinct values one label may take in this process before the rest are ``other``.
MAX_VALUES = 64
#: The start of a tool result saying the model asked for a tool that does not exist.
_NO_SUCH_TOOL = "error: there is no tool named"


def multiprocess_dir() -> str | None:
    """The multiprocess folder of this process (``None``: single-process mode)."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition_registry(path: str | None = None) -> CollectorRegistry:
    """A registry that reads every process's values from the multiprocess folder ``path``."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry(auto_describe=False)
    multiprocess.MultiProcessCollector(registry, path=path or multiprocess_dir())  # type: ignore[no-untyped-call]
    return registry


def mark_process_dead(pid: int, path: str) -> None:
    """Forget the live-only values (the gauge of live calls) of worker ``pid`` that exited."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


class MetricsServer(Protocol):
    """The plain HTTP server of ``--metrics-port``."""

    def shutdown(self) -> None: ...

    def server_close(self) -> None: ...


def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` over plain HTTP on ``host:port``, in a thread, without a token.

    Raises:
        OSError: the port cannot be listened on.
    """
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


class _Bounded:
    """A label's values, bounded: identifiers only, at most :data:`MAX_VALUES`, else ``other``."""

    __slots__ = ("_closed", "_lock", "_seen")

    def __init__(self, known: Iterable[str] = (), *, closed: bool = False) -> None:
        self._seen = set(known)
        #: Only the known values: any other is ``other``.
        self._closed = closed
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not _LABEL.match(value) or _SID.match(value):
            return "other"
        if value in self._seen:
            return value
        if self._closed:
            return "other"
        with self._lock:
            if len(self._seen) >= MAX_VALUES:
                return "other"
            self._seen.add(value)
        return value


class _Metrics:
    """The metric objects; one set per registry (per process in multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        reg = registry
        self.calls_active = Gauge(
            "crctl_calls_active",
            "Calls with an open ConversationRelay socket.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.calls_started = Counter(
            "crctl_calls_started",
            "Call sockets opened (a resumed socket counts again).",
            registry=reg,
        )
        self.calls_ended = Counter(
            "crctl_calls_ended",
            "Calls ended, by status (Twilio's session end or call status; lost: the relay died).",
            ["status"],
            registry=reg,
        )
        self.turns = Counter(
            "crctl_turns", "Agent replies (turns), including those cut by a barge-in.", registry=reg
        )
        self.barge_ins = Counter(
            "crctl_barge_ins", "Times the caller cut the agent off.", registry=reg
        )
        self.llm_faults = Counter(
            "crctl_llm_faults", "LLM requests that failed, by kind.", ["kind"], registry=reg
        )
        self.tool_calls = Counter(
            "crctl_tool_calls",
            "Tool calls, by tool name and outcome (ok or error).",
            ["name", "outcome"],
            registry=reg,
        )
        self.bad_frames = Counter(
            "crctl_bad_frames", "Frames from Twilio the relay dropped.", registry=reg
        )
        self.caller_wait = Histogram(
            "crctl_caller_wait_seconds",
            "Caller stopped speaking to the agent audible (turn.timeline caller_wait_ms).",
            buckets=VOICE_BUCKETS,
            registry=reg,
        )
        self.llm_first_token = Histogram(
            "crctl_llm_first_token_seconds",
            "LLM request to its first token (turn.timeline llm_first_token_ms).",
            buckets=VOICE_BUCKETS,
            registry=reg,
        )
        self.relay_added = Histogram(
            "crctl_relay_added_seconds",
            "The relay's own time in a turn (turn.timeline relay_ms).",
            buckets=RELAY_BUCKETS,
            registry=reg,
        )
        self.speaking = Histogram(
            "crctl_speaking_seconds",
            "agentSpeaking on to off in a turn (turn.timeline speaking_ms).",
            buckets=SPEAKING_BUCKETS,
            registry=reg,
        )


#: The metrics of this process in multiprocess mode: one set, however many apps are built
#: (two objects of one name would overwrite each other's values in the process's file).
_shared: _Metrics | None = None
_shared_lock = threading.Lock()


def _multiprocess_metrics() -> _Metrics:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _Metrics(None)
        return _shared


class MetricsRecorder:
    """Call events in, Prometheus metrics out: subscribe it to the relay's bus.

    Args:
        tool_names: the relay's own tools, always reported by name.
        multiprocess: read and write the values of every worker (default: when
            ``PROMETHEUS_MULTIPROC_DIR`` is set).

    Raises:
        ConfigError: multiprocess mode, and ``PROMETHEUS_MULTIPROC_DIR`` is not a folder.
    """

    def __init__(self, tool_names: Iterable[str] = (), *, multiprocess: bool | None = None) -> None:
        folder = multiprocess_dir()
        self.multiprocess = folder is not None if multiprocess is None else multiprocess
        if self.multiprocess and not (folder and os.path.isdir(folder)):
            raise ConfigError(
                f"{MULTIPROC_ENV} ({folder or 'not set'}) is not a folder: create it, or unset "
                "it to keep the metrics in this process"
            )
        if self.multiprocess:
            self.registry = exposition_registry()
            self._m = _multiprocess_metrics()
        else:
            self.registry = CollectorRegistry(auto_describe=True)
            self._m = _Metrics(self.registry)
        #: Open sockets per live call (a reconnect may overlap the old socket's close).
        self._open: dict[str, int] = {}
        self._status = _Bounded(END_STATUSES, closed=True)
        self._fault = _Bounded()
        self._tool = _Bounded(tool_names)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format (reads files in multiprocess mode)."""
        return generate_latest(self.registry)

    def __call__(self, event: ev.CallEvent) -> None:
        """Record one event (the bus calls this; per turn or per call, never per token)."""
        m = self._m
        match event:
            case ev.TurnTimeline():
                _observe(m.caller_wait, event.caller_wait_ms)
                _observe(m.llm_first_token, event.llm_first_token_ms)
                _observe(m.relay_added, event.relay_ms)
                _observe(m.speaking, event.speaking_ms)
            case ev.AgentReply():
                m.turns.inc()
            case ev.BargeIn():
                m.barge_ins.inc()
            case ev.CallStarted():
                m.calls_started.inc()
                self._open[event.call_sid] = self._open.get(event.call_sid, 0) + 1
                m.calls_active.inc()
            case ev.SocketClosed():
                left = self._open.get(event.call_sid, 0)
                if left:  # a socket whose call.started was counted (not every agent says it)
                    if left == 1:
                        del self._open[event.call_sid]
                    else:
                        self._open[event.call_sid] = left - 1
                    m.calls_active.dec()
            case ev.SessionEnd():
                m.calls_ended.labels(self._status(event.status or "other")).inc()
            case ev.CallLost():
                m.calls_ended.labels("lost").inc()
            case ev.CallStatus() if event.status in _NEVER_CONNECTED:
                # A call that never reached the relay has no session end; a completed one
                # has one, counted above.
                m.calls_ended.labels(event.status).inc()
            case ev.LlmFault():
                m.llm_faults.labels(self._fault(event.fault)).inc()
            case ev.ToolCall():
                result = event.result
                failed = isinstance(result, str) and result.startswith("error:")
                if isinstance(result, str) and result.startswith(_NO_SUCH_TOOL):
                    name = "unknown"  # the model made the name up: not a label value
                else:
                    name = self._tool(event.name)
                m.tool_calls.labels(name, "error" if failed else "ok").inc()
            case ev.BadFrame():
                m.bad_frames.inc()
            case _:
                pass


def _observe(histogram: Histogram, ms: float | None) -> None:
    if ms is not None and ms >= 0:
        histogram.observe(ms / 1000.0)
