"""The caller-wait timeline of stored calls: per-turn stages, a call's summary, percentiles.

Built from the relay's ``turn.timeline`` events (:class:`relay_server.events.TurnTimeline`),
for ``crctl calls show --json`` and ``crctl calls stats``; and what calls used (LLM requests,
tokens, tool calls, time, money with a price table) from ``llm.request`` (and the request an
``agent.reply`` carries), ``tool.call``,
``session.end`` and ``call.status``. Percentiles are nearest-rank: every
one is a value that was measured, never interpolated.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay_server import events as ev

#: The stages of a turn, in the order the caller lives them, then the headline.
STAGES = ev.TIMELINE_STAGES


def tool_arguments(text: Any) -> Any:
    """A ``tool.call`` event's arguments (JSON text) as values; text that is not JSON as it is."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


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


def with_turns(
    call: Mapping[str, Any], prices: Mapping[str, Price] | None = None
) -> dict[str, Any]:
    """A stored call (``/calls/{sid}``) with its turns, their summary and its usage."""
    turns = timelines(call.get("events") or [])
    _, used = call_usage(call, prices)
    return {
        **call,
        "turns": [turn_row(t) for t in turns],
        "summary": summary(turns),
        "usage": used,
    }


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


# ------------------------------------------------------------------------ usage and cost
#: The kinds a call's usage is counted from.
USAGE_KINDS = frozenset(
    {ev.LLM_REQUEST, ev.AGENT_REPLY, ev.TOOL_CALL, ev.SESSION_END, ev.CALL_STATUS}
)


@dataclass(frozen=True)
class Price:
    """A model's price, in money per million tokens."""

    input_per_million: float
    output_per_million: float


#: What a price table's file may say for a model.
_PRICE_KEYS = ("input_per_million", "output_per_million")


def load_prices(path: Path) -> dict[str, Price]:
    """A price table from TOML (money per million tokens, ≥ 0).

    ``[models."gpt-4o-mini"]`` with ``input_per_million`` and ``output_per_million``.

    Raises:
        UsageError: one line naming the file, the key, its value and what is allowed.
    """
    import tomllib

    from crctl.errors import UsageError

    where = f"--prices {path}"
    try:
        table = tomllib.loads(path.expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not TOML ({exc})") from None
    models = table.get("models")
    if not isinstance(models, dict) or not models:
        raise UsageError(
            f'{where}: key models: got {models!r}; expected tables like [models."gpt-4o-mini"] '
            "with input_per_million and output_per_million"
        )
    prices: dict[str, Price] = {}
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise UsageError(
                f"{where}: key models.{name}: got {entry!r}; expected a table with "
                "input_per_million and output_per_million"
            )
        values: dict[str, float] = {}
        for key in _PRICE_KEYS:
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise UsageError(
                    f"{where}: key models.{name}.{key}: got {value!r}; expected a number ≥ 0 "
                    "(money per million tokens)"
                )
            values[key] = float(value)
        if extra := sorted(set(entry) - set(_PRICE_KEYS)):
            raise UsageError(
                f"{where}: key models.{name}.{extra[0]}: got {entry[extra[0]]!r}; allowed keys "
                "are input_per_million and output_per_million"
            )
        prices[str(name)] = Price(**values)
    return prices


@dataclass
class Usage:
    """What calls used: LLM requests and their tokens, tool calls, time, and money.

    Fed events one by one (:meth:`add`); tokens are summed over the requests whose stream
    reported them (a request cut by a barge-in never does: :attr:`unreported`).
    """

    prices: Mapping[str, Price] | None = None
    llm_requests: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    tool_calls: int = 0
    #: Requests without a usage report (cut, failed, or a server that does not report it).
    unreported: int = 0
    #: Models used that the price table does not list: the cost is then unknown.
    unpriced: set[str] = field(default_factory=set)
    _cost: float = 0.0
    #: Per call: the session's duration (``session.end``), else the call's (``call.status``).
    _durations: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, event: ev.CallEvent | Mapping[str, Any]) -> None:
        """Count one event (typed, or as ``/events`` serves it); other kinds are ignored."""
        if isinstance(event, Mapping):
            if event.get("kind") not in USAGE_KINDS:
                return
            event = ev.from_wire(event)
        match event:
            case ev.LlmRequest() | ev.AgentReply():
                for request in ev.requests_in(event):  # a reply carries its last request
                    self._request(request)
            case ev.ToolCall():
                self.tool_calls += 1
            case ev.SessionEnd(duration=duration) | ev.CallStatus(duration=duration):
                seconds = _number(duration)
                if seconds is not None:
                    self._durations.setdefault(event.call_sid, {})[event.kind] = seconds

    def _request(self, event: ev.LlmRequest) -> None:
        self.llm_requests += 1
        if event.input_tokens is None and event.output_tokens is None:
            self.unreported += 1
            return
        tokens_in, tokens_out = event.input_tokens or 0, event.output_tokens or 0
        self.input_tokens = (self.input_tokens or 0) + tokens_in
        self.output_tokens = (self.output_tokens or 0) + tokens_out
        if self.prices is None:
            return
        price = self.prices.get(event.model)
        if price is None:
            self.unpriced.add(event.model)
            return
        self._cost += (
            tokens_in * price.input_per_million + tokens_out * price.output_per_million
        ) / 1_000_000

    @property
    def duration_s(self) -> float | None:
        """The calls' time summed, in s (``None``: no call's duration is known)."""
        known = [
            found.get(ev.SESSION_END, found.get(ev.CALL_STATUS))
            for found in self._durations.values()
        ]
        seconds = [s for s in known if s is not None]
        return round(sum(seconds), 1) if seconds else None

    @property
    def cost(self) -> float | None:
        """The money the reported tokens cost; ``None``: no price table, or a model not in it."""
        if self.prices is None or self.unpriced:
            return None
        return round(self._cost, 6)

    def as_json(self, duration_s: float | None = None) -> dict[str, Any]:
        """``usage`` of ``calls show --json`` / ``calls stats --json``.

        ``duration_s``: used when no event said the call's duration.
        """
        return {
            "llm_requests": self.llm_requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "tool_calls": self.tool_calls,
            "duration_s": self.duration_s if self.duration_s is not None else duration_s,
            "cost": self.cost,
        }

    def notes(self, prices_file: Path | str | None = None) -> list[str]:
        """What the numbers leave out, each said once."""
        said = []
        if self.unpriced:
            where = f" in {prices_file}" if prices_file else ""
            models = ", ".join(sorted(self.unpriced))
            said.append(f"cost unknown: no price{where} for model {models}")
        if self.unreported:
            n = self.unreported
            said.append(
                f"{n} LLM request{'' if n == 1 else 's'} without a usage report (cut by the "
                "caller, failed, or a server that does not report usage)"
            )
        return said


def call_usage(
    call: Mapping[str, Any], prices: Mapping[str, Price] | None = None
) -> tuple[Usage, dict[str, Any]]:
    """A stored call's usage, and its ``usage`` JSON.

    The duration is the call's start to end when no callback said it.
    """
    found = Usage(prices)
    for event in call.get("events") or []:
        found.add(event)
    started, ended = _number(call.get("started")), _number(call.get("ended"))
    fallback = round(ended - started, 1) if started is not None and ended is not None else None
    return found, found.as_json(fallback)


def _number(value: Any) -> float | None:
    """A duration as Twilio sends it (a string of seconds), or ``None``."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None
