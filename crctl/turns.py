"""The caller-wait timeline of stored calls: per-turn stages, a call's summary, percentiles.

Built from the relay's ``turn.timeline`` events (:class:`relay_server.events.TurnTimeline`),
for ``crctl calls show --json`` and ``crctl calls stats``. Percentiles are nearest-rank: every
one is a value that was measured, never interpolated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from relay_server import events as ev

#: The stages of a turn, in the order the caller lives them, then the headline.
STAGES = (
    "transcription_ms",
    "relay_ms",
    "llm_first_token_ms",
    "speech_start_ms",
    "speaking_ms",
    "caller_wait_ms",
)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of ``values`` (``None`` when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def timelines(events: Iterable[ev.CallEvent | Mapping[str, Any]]) -> list[ev.TurnTimeline]:
    """The ``turn.timeline`` events among ``events`` (typed, or as ``/events`` serves them)."""
    found = []
    for event in events:
        if isinstance(event, Mapping):
            if event.get("kind") != ev.TURN_TIMELINE:
                continue
            event = ev.from_wire(event)
        if isinstance(event, ev.TurnTimeline):
            found.append(event)
    return found


def turn_row(event: ev.TurnTimeline) -> dict[str, Any]:
    """One turn as ``calls show --json`` lists it."""
    return {"turn": event.turn, "end": event.end, "barge_in": event.barge_in} | {
        stage: getattr(event, stage) for stage in STAGES
    }


def summary(turns: Sequence[ev.TurnTimeline]) -> dict[str, Any]:
    """A call's turns, barge-ins and caller wait p50/p95 (ms; ``None``: never known)."""
    waits = [t.caller_wait_ms for t in turns if t.caller_wait_ms is not None]
    return {
        "turns": len(turns),
        "barge_ins": sum(1 for t in turns if t.barge_in),
        "caller_wait_ms": {"p50": percentile(waits, 50), "p95": percentile(waits, 95)},
    }


def with_turns(call: Mapping[str, Any]) -> dict[str, Any]:
    """A stored call (``/calls/{sid}``) with its ``turns`` list and their ``summary``."""
    turns = timelines(call.get("events") or [])
    return {**call, "turns": [turn_row(t) for t in turns], "summary": summary(turns)}


def stats(turns: Sequence[ev.TurnTimeline]) -> dict[str, Any]:
    """Counts and p50/p95/p99 of each stage across ``turns`` (``crctl calls stats --json``)."""
    ends: dict[str, int] = {}
    for turn in turns:
        ends[turn.end] = ends.get(turn.end, 0) + 1
    stages: dict[str, Any] = {}
    for stage in STAGES:
        values = [v for t in turns if (v := getattr(t, stage)) is not None]
        stages[stage] = {
            "count": len(values),
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "p99": percentile(values, 99),
        }
    return {
        "calls": len({t.call_sid for t in turns}),
        "turns": len(turns),
        "barge_ins": sum(1 for t in turns if t.barge_in),
        "ends": ends,
        "stages": stages,
    }
