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
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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


#: The per-turn metrics: the counter of turns, and the histograms (name, help, buckets).
_TURNS = ("crctl_turns", "Agent replies (turns), including those cut by a barge-in.")
_HISTOGRAMS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    (
        "crctl_caller_wait_seconds",
        "Caller stopped speaking to the agent audible (turn.timeline caller_wait_ms).",
        VOICE_BUCKETS,
    ),
    (
        "crctl_llm_first_token_seconds",
        "LLM request to its first token (turn.timeline llm_first_token_ms).",
        VOICE_BUCKETS,
    ),
    (
        "crctl_relay_added_seconds",
        "The relay's own time in a turn (turn.timeline relay_ms).",
        RELAY_BUCKETS,
    ),
    (
        "crctl_speaking_seconds",
        "agentSpeaking on to off in a turn (turn.timeline speaking_ms).",
        SPEAKING_BUCKETS,
    ),
)


class _LocalHistogram:
    """One histogram of this process as plain numbers: a count per bucket and the sum."""

    __slots__ = ("bounds", "counts", "doc", "name", "total")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe_ms(self, ms: float | None) -> None:
        if ms is not None and ms >= 0:
            seconds = ms / 1000.0
            self.counts[bisect_left(self.bounds, seconds)] += 1  # le: the bound holds it
            self.total += seconds

    def family(self) -> HistogramMetricFamily:
        buckets, seen = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += count
            buckets.append((floatToGoString(bound), seen))  # type: ignore[no-untyped-call]
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.total)


class _PerTurn:
    """The per-turn metrics of a single process, as plain numbers read at scrape time.

    prometheus-client's own objects take a lock and several calls per observation: some 300
    bytecodes a turn on the relay's loop (bench/instructions.py). A scrape (``/metrics``, or
    the ``--metrics-port`` thread) reads these as a custom collector (prometheus-client's
    documented way). With several workers the shared files need prometheus-client's objects:
    :class:`_Metrics` keeps them there.
    """

    def __init__(self) -> None:
        self.turns = 0
        hists = [_LocalHistogram(name, doc, buckets) for name, doc, buckets in _HISTOGRAMS]
        self.histograms = hists
        self.caller_wait, self.llm_first_token, self.relay_added, self.speaking = hists

    def reply(self, event: ev.CallEvent) -> None:
        self.turns += 1

    def timeline(self, event: ev.TurnTimeline) -> None:
        self.caller_wait.observe_ms(event.caller_wait_ms)
        self.llm_first_token.observe_ms(event.llm_first_token_ms)
        self.relay_added.observe_ms(event.relay_ms)
        self.speaking.observe_ms(event.speaking_ms)

    def collect(self) -> Iterator[Metric]:
        """The prometheus-client collector's answer: the values as of now."""
        yield CounterMetricFamily(*_TURNS, value=self.turns)
        for histogram in self.histograms:
            yield histogram.family()

    def describe(self) -> Iterator[Metric]:
        """The names, for the registry's duplicate check (no values)."""
        return self.collect()


class _Metrics:
    """The metric objects; one set per registry (per process in multiprocess mode).

    ``per_turn``: with the per-turn ones (multiprocess mode; else :class:`_PerTurn` has them).
    """

    def __init__(self, registry: CollectorRegistry | None, *, per_turn: bool = True) -> None:
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
        if per_turn:
            self.turns = Counter(*_TURNS, registry=reg)
            self.caller_wait, self.llm_first_token, self.relay_added, self.speaking = (
                Histogram(name, doc, buckets=buckets, registry=reg)
                for name, doc, buckets in _HISTOGRAMS
            )

    def reply(self, event: ev.CallEvent) -> None:
        self.turns.inc()

    def timeline(self, event: ev.TurnTimeline) -> None:
        _observe(self.caller_wait, event.caller_wait_ms)
        _observe(self.llm_first_token, event.llm_first_token_ms)
        _observe(self.relay_added, event.relay_ms)
        _observe(self.speaking, event.speaking_ms)


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
        per_turn: _Metrics | _PerTurn
        if self.multiprocess:
            self.registry = exposition_registry()
            self._m = per_turn = _multiprocess_metrics()
        else:
            self.registry = CollectorRegistry(auto_describe=True)
            self._m = _Metrics(self.registry, per_turn=False)
            per_turn = _PerTurn()
            self.registry.register(per_turn)
        #: Open sockets per live call (a reconnect may overlap the old socket's close).
        self._open: dict[str, int] = {}
        self._status = _Bounded(END_STATUSES, closed=True)
        self._fault = _Bounded()
        self._tool = _Bounded(tool_names)
        #: The handler of each kind of event that counts (the bus calls this on every event:
        #: one dict lookup, not a match of every kind).
        self._handlers: dict[type[ev.CallEvent], Callable[[ev.CallEvent], None]] = {
            ev.TurnTimeline: per_turn.timeline,  # type: ignore[dict-item]
            ev.AgentReply: per_turn.reply,
            ev.BargeIn: self._barge_in,
            ev.CallStarted: self._started,
            ev.SocketClosed: self._closed,
            ev.SessionEnd: self._session_end,  # type: ignore[dict-item]
            ev.CallLost: self._lost,
            ev.CallStatus: self._call_status,  # type: ignore[dict-item]
            ev.LlmFault: self._llm_fault,  # type: ignore[dict-item]
            ev.ToolCall: self._tool_call,  # type: ignore[dict-item]
            ev.BadFrame: self._bad_frame,
        }

    def render(self) -> bytes:
        """The metrics in Prometheus' text format (reads files in multiprocess mode)."""
        return generate_latest(self.registry)

    def __call__(self, event: ev.CallEvent) -> None:
        """Record one event (the bus calls this; per turn or per call, never per token)."""
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def _barge_in(self, event: ev.CallEvent) -> None:
        self._m.barge_ins.inc()

    def _started(self, event: ev.CallEvent) -> None:
        self._m.calls_started.inc()
        self._open[event.call_sid] = self._open.get(event.call_sid, 0) + 1
        self._m.calls_active.inc()

    def _closed(self, event: ev.CallEvent) -> None:
        left = self._open.get(event.call_sid, 0)
        if left:  # a socket whose call.started was counted (not every agent says it)
            if left == 1:
                del self._open[event.call_sid]
            else:
                self._open[event.call_sid] = left - 1
            self._m.calls_active.dec()

    def _session_end(self, event: ev.SessionEnd) -> None:
        self._m.calls_ended.labels(self._status(event.status or "other")).inc()

    def _lost(self, event: ev.CallEvent) -> None:
        self._m.calls_ended.labels("lost").inc()

    def _call_status(self, event: ev.CallStatus) -> None:
        # A call that never reached the relay has no session end; a completed one has one,
        # counted there.
        if event.status in _NEVER_CONNECTED:
            self._m.calls_ended.labels(event.status).inc()

    def _llm_fault(self, event: ev.LlmFault) -> None:
        self._m.llm_faults.labels(self._fault(event.fault)).inc()

    def _tool_call(self, event: ev.ToolCall) -> None:
        result = event.result
        failed = isinstance(result, str) and result.startswith("error:")
        if isinstance(result, str) and result.startswith(_NO_SUCH_TOOL):
            name = "unknown"  # the model made the name up: not a label value
        else:
            name = self._tool(event.name)
        self._m.tool_calls.labels(name, "error" if failed else "ok").inc()

    def _bad_frame(self, event: ev.CallEvent) -> None:
        self._m.bad_frames.inc()


def _observe(histogram: Histogram, ms: float | None) -> None:
    if ms is not None and ms >= 0:
        histogram.observe(ms / 1000.0)
