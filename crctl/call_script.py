"""Scripted calls for ``crctl call --script``: load a YAML conversation, run it through a
:class:`~crctl.call.SimulatedCaller`, check each reply and print a pass/fail report.

A script is a YAML list of turns::

    - say: What are your opening hours?
      expect:
        contains: [open, monday]        # each, case-insensitive
        matches: "\\d+ ?(am|pm)"        # a Python regex searched in the reply
        max_first_token_ms: 1500
    - dtmf: "1"                          # keys 0-9 * #, one frame per key
    - say: Tell me everything about your prices.
      interrupt_after_words: 5          # barge in after 5 words of the reply
    - say: Put me through to a person, please.
      expect:
        handoff: {reason: person}       # true/false, text in handoffData, or JSON subset
        ends_call: true
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl.caller import CallError, Reply, SimulatedCaller, complete_words
from crctl.errors import CrctlError

_TURN_KEYS = ("say", "dtmf", "interrupt_after_words", "expect")
_EXPECT_KEYS = ("contains", "matches", "max_first_token_ms", "ends_call", "handoff")
#: How long a turn that must *not* end the call waits for a stray ``end``.
_END_GRACE = 0.3


class ScriptError(CrctlError):
    """A malformed script: one line naming the file, the turn and the problem."""


@dataclass(frozen=True)
class Expect:
    contains: tuple[str, ...] = ()
    matches: re.Pattern[str] | None = None
    max_first_token_ms: float | None = None
    ends_call: bool | None = None
    handoff: bool | str | dict[str, Any] | None = None

    @property
    def wants_end(self) -> bool:
        return bool(self.ends_call) or (self.handoff is not None and self.handoff is not False)


@dataclass(frozen=True)
class Turn:
    number: int
    say: str | None = None
    dtmf: str | None = None
    interrupt_after_words: int | None = None
    expect: Expect = field(default_factory=Expect)

    @property
    def label(self) -> str:
        return repr(self.say) if self.say is not None else f"dtmf {self.dtmf}"


@dataclass
class TurnResult:
    turn: Turn
    reply: Reply | None
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons


def load_script(path: Path) -> list[Turn]:
    """Read and check a script; raises :class:`ScriptError` naming the file and turn."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read the script: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScriptError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_turns(data, path)


def parse_turns(data: Any, source: Path | str = "<script>") -> list[Turn]:
    if not isinstance(data, list) or not data:
        raise ScriptError(
            f"{source}: a script is a non-empty YAML list of turns (- say: … / - dtmf: …)"
        )
    return [_turn(item, number, source) for number, item in enumerate(data, 1)]


def _turn(item: Any, number: int, source: Path | str) -> Turn:
    def bad(problem: str) -> ScriptError:
        return ScriptError(f"{source}: turn {number}: {problem}")

    if not isinstance(item, dict):
        raise bad("expected a mapping with say: or dtmf:")
    unknown = [str(k) for k in item if k not in _TURN_KEYS]
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}; a turn takes {', '.join(_TURN_KEYS)}")
    if ("say" in item) == ("dtmf" in item):
        raise bad("give exactly one of say: (what the caller says) or dtmf: (keys to press)")
    say = item.get("say")
    if "say" in item and (not isinstance(say, str) or not say.strip()):
        raise bad("say: must be non-empty text")
    dtmf = item.get("dtmf")
    if "dtmf" in item:
        if isinstance(dtmf, int) and not isinstance(dtmf, bool) and dtmf >= 0:
            dtmf = str(dtmf)
        if not isinstance(dtmf, str) or not dtmf or set(dtmf) - set("0123456789*#"):
            raise bad(f'dtmf: must be keys 0-9, * and # (quote them: dtmf: "1#"), got {dtmf!r}')
    words = item.get("interrupt_after_words")
    if "interrupt_after_words" in item and (
        not isinstance(words, int) or isinstance(words, bool) or words < 1
    ):
        raise bad(f"interrupt_after_words: must be a whole number of at least 1, got {words!r}")
    return Turn(number, say, dtmf, words, _expect(item.get("expect"), bad))


def _expect(raw: Any, bad: Any) -> Expect:
    if raw is None:
        return Expect()
    if not isinstance(raw, dict):
        raise bad("expect: must be a mapping (contains, matches, max_first_token_ms, …)")
    unknown = [str(k) for k in raw if k not in _EXPECT_KEYS]
    if unknown:
        raise bad(f"unknown expect key {unknown[0]!r}; expect takes {', '.join(_EXPECT_KEYS)}")
    contains = raw.get("contains", ())
    if isinstance(contains, str):
        contains = (contains,)
    if (
        not isinstance(contains, (list, tuple))
        or ("contains" in raw and not contains)  # an empty list would check nothing
        or not all(isinstance(c, str) and c for c in contains)
    ):
        raise bad("expect.contains: must be text or a non-empty list of texts")
    pattern = None
    if "matches" in raw:
        if not isinstance(raw["matches"], str):
            raise bad("expect.matches: must be a regular expression (text)")
        try:
            pattern = re.compile(raw["matches"])
        except re.error as exc:
            raise bad(f"expect.matches: not a valid regular expression: {exc}") from None
    limit = raw.get("max_first_token_ms")
    if "max_first_token_ms" in raw and (
        not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0
    ):
        raise bad(f"expect.max_first_token_ms: must be a positive number, got {limit!r}")
    ends = raw.get("ends_call")
    if "ends_call" in raw and not isinstance(ends, bool):
        raise bad(f"expect.ends_call: must be true or false, got {ends!r}")
    handoff = raw.get("handoff")
    if "handoff" in raw and not isinstance(handoff, (bool, str, dict)):
        raise bad("expect.handoff: must be true/false, text, or a mapping of handoffData keys")
    return Expect(tuple(contains), pattern, limit, ends, handoff)


# ------------------------------------------------------------------------------- running


async def run_script(
    caller: SimulatedCaller, turns: list[Turn], timeout: float
) -> list[TurnResult]:
    """Play ``turns`` on a connected caller, waiting for each reply; returns the results."""
    results: list[TurnResult] = []
    for turn in turns:
        if caller.closed.is_set() or caller.end_frame is not None:
            last = results[-1].turn.number if results else 0
            results.append(
                TurnResult(turn, None, [f"not played: the call was over after turn {last}"])
            )
            continue
        words = turn.interrupt_after_words
        try:
            if turn.say is not None:
                reply = await caller.say(turn.say, interrupt_after_words=words)
            else:
                assert turn.dtmf is not None
                reply = await caller.dtmf(turn.dtmf, interrupt_after_words=words)
        except CallError as exc:  # the call ended while the input was being sent
            results.append(TurnResult(turn, None, [str(exc)]))
            continue
        if reply is None:
            results.append(TurnResult(turn, None, [caller.last_drop or "input not sent"]))
            continue
        reasons = await _await_reply(caller, reply, timeout)
        if turn.interrupt_after_words and not reply.interrupted and not reasons:
            reasons.append(
                f"no barge-in: the reply ended after {complete_words(reply.text)} words, before "
                f"interrupt_after_words: {turn.interrupt_after_words}"
            )
        if turn.expect.wants_end:
            await _wait(caller.closed, timeout)
        elif turn.expect.ends_call is False or turn.expect.handoff is False:
            await _wait(caller.closed, _END_GRACE)
        results.append(TurnResult(turn, reply, reasons + check(turn.expect, reply, caller)))
    return results


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _await_reply(caller: SimulatedCaller, reply: Reply, timeout: float) -> list[str]:
    if not await _wait(reply.done, timeout):
        got = f" (so far: {reply.received!r})" if reply.received else ""
        return [f"no complete reply within {timeout:g} s{got}"]
    if reply.error:
        # also after some text: a reply cut by a dropped socket is a failure, whatever it said
        return [reply.error]
    return []


def check(expect: Expect, reply: Reply, caller: SimulatedCaller) -> list[str]:
    """Why ``reply`` (and the call's end) does not meet ``expect``; empty: it does."""
    reasons: list[str] = []
    text = reply.text
    for wanted in expect.contains:
        if wanted.lower() not in text.lower():
            reasons.append(f"reply does not contain {wanted!r}")
    if expect.matches is not None and not expect.matches.search(text):
        reasons.append(f"reply does not match /{expect.matches.pattern}/")
    if expect.max_first_token_ms is not None:
        ms = reply.first_token_ms
        if ms is None:
            reasons.append("no token arrived, so no first-token time")
        elif ms > expect.max_first_token_ms:
            reasons.append(f"first token after {ms:.0f} ms (max {expect.max_first_token_ms:g})")
    end = caller.end_frame
    if expect.ends_call is True and end is None:
        reasons.append("the agent did not end the call (no end message)")
    if expect.ends_call is False and end is not None:
        reasons.append("the agent ended the call (end)")
    if expect.handoff is not None:
        reasons += _check_handoff(expect.handoff, end)
    return reasons


def _check_handoff(wanted: bool | str | dict[str, Any], end: dict[str, Any] | None) -> list[str]:
    data = end.get("handoffData") if end is not None else None
    if wanted is False:
        return [f"unexpected hand-off: handoffData {data}"] if data else []
    if end is None:
        return ["no hand-off: the agent did not end the call"]
    if not data:
        return ["no hand-off: end came without handoffData"]
    if wanted is True:
        return []
    if isinstance(wanted, str):
        return [] if wanted.lower() in data.lower() else [f"handoffData lacks {wanted!r}: {data}"]
    try:
        parsed = json.loads(data)
    except ValueError:
        return [f"handoffData is not JSON: {data}"]
    if not isinstance(parsed, dict):
        return [f"handoffData is not a JSON object: {data}"]
    reasons = []
    for key, value in wanted.items():
        if key not in parsed:
            reasons.append(f"handoffData has no {key!r}: {data}")
        elif isinstance(value, str) and isinstance(parsed[key], str):
            if value.lower() not in parsed[key].lower():
                reasons.append(f"handoffData {key} is {parsed[key]!r}, expected {value!r}")
        elif parsed[key] != value:
            reasons.append(f"handoffData {key} is {parsed[key]!r}, expected {value!r}")
    return reasons


# ------------------------------------------------------------------------------- report


def _shown(reply: Reply | None) -> str:
    if reply is None:
        return ""
    parts = [escape(reply.text.strip())]
    parts += [f"[dim]\\[play {escape(s)}][/]" for s in reply.plays]
    parts += [f"[dim]\\[sendDigits {escape(d)}][/]" for d in reply.digits]
    if reply.interrupted:
        parts.append("[yellow]\\[barged in][/]")
    return " ".join(p for p in parts if p)


def report(out: Console, results: list[TurnResult], caller: SimulatedCaller) -> bool:
    """Print the results (a table on a terminal, one line per turn in a log) and the call's
    end; True when every turn passed."""
    if out.is_terminal:
        table = Table("#", "caller", "agent", "1st token", "result")
        for result in results:
            ms = result.reply.first_token_ms if result.reply else None
            verdict = (
                "[green]pass[/]"
                if result.passed
                else "[red]FAIL[/]: " + escape("; ".join(result.reasons))
            )
            table.add_row(
                str(result.turn.number),
                escape(result.turn.label),
                _shown(result.reply),
                "" if ms is None else f"{ms:.0f} ms",
                verdict,
            )
        out.print(table)
    else:
        for result in results:
            ms = result.reply.first_token_ms if result.reply else None
            timing = "" if ms is None else f" [dim]({ms:.0f} ms to first token)[/]"
            verdict = "[green]pass[/]" if result.passed else "[red]FAIL[/]"
            why = "" if result.passed else ": " + escape("; ".join(result.reasons))
            out.print(
                f"turn {result.turn.number} {verdict}  {escape(result.turn.label)} → "
                f"{_shown(result.reply) or '(no reply)'}{timing}{why}",
                soft_wrap=True,
            )
    passed = sum(r.passed for r in results)
    failed_call = caller.outcome is not None and caller.outcome.status == "failed"
    if caller.outcome is not None:
        verdict = "[red]FAIL[/]: " if failed_call else ""
        out.print(f"call: {verdict}{escape(caller.outcome.describe())}", soft_wrap=True)
    ok = passed == len(results) and not failed_call
    style = "green" if ok else "red"
    out.print(f"[bold {style}]{passed} of {len(results)} turns passed[/]")
    return ok


async def play_script(caller: SimulatedCaller, turns: list[Turn], out: Console) -> int:
    """Run the script on a dialled caller, hang up (unless the agent ended the call) and print
    the report. Returns the exit code: 0 when every turn passed, else 1."""
    try:
        results = await run_script(caller, turns, caller.timeout)
    finally:
        await caller.hangup()
    return 0 if report(out, results, caller) else 1
