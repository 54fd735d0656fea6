"""Simulated callers: an LLM plays the caller of ``caller: {persona, goal, max_turns}``.

Each of its turns the caller model (``RunContext.caller_model``, on the judge's endpoint) reads
the call so far and answers its next move as structured output (``{say, dtmf,
barge_in_after_words, done}``); the move is played with the :class:`~crctl.caller.SimulatedCaller`
(speech, keys, a barge-in) like a scripted turn. The loop stops when the model says ``done``,
when the agent ends the call, or after ``max_turns``; then the judge decides whether the goal
was met.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from crctl.call_script import (
    NO_BARGE_IN,
    CallerSpec,
    RunContext,
    Turn,
    TurnResult,
    call_transcript,
    run_script,
)
from crctl.caller import SimulatedCaller
from crctl.judge import Judge, JudgeError, structured

#: The line of a persona scenario run without a caller model.
NO_CALLER_MODEL = "caller: no caller model: pass --caller-model or set CRCTL_CALLER_MODEL"
#: The caller's move (``response_format``): strict, so every key is there (null: unused).
MOVE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "say": {"type": ["string", "null"]},
        "dtmf": {"type": ["string", "null"]},
        "barge_in_after_words": {"type": ["integer", "null"]},
        "done": {"type": "boolean"},
    },
    "required": ["say", "dtmf", "barge_in_after_words", "done"],
    "additionalProperties": False,
}
_SYSTEM = (
    "You are testing a phone agent by playing a caller. Stay in character.\n"
    "Who you are: {persona}\nWhat you want: {goal}\n"
    "Each time, answer with your next move as JSON: say (what you say next, short and spoken, "
    "as a caller would), or dtmf (keys 0-9, * and # to press, when the agent asks you to press "
    "keys), not both; barge_in_after_words (cut the agent off after that many words of its "
    "answer, as an impatient caller does; null otherwise); done: true once your goal is met or "
    "cannot be met (then say nothing)."
)


@dataclass(frozen=True)
class Move:
    """One move of the simulated caller."""

    say: str | None
    dtmf: str | None
    barge_in_after_words: int | None
    done: bool


async def next_move(context: RunContext, spec: CallerSpec, conversation: str, model: str) -> Move:
    """Ask the caller model for its next move; raises :class:`JudgeError` (one line)."""
    messages = [
        {"role": "system", "content": _SYSTEM.format(persona=spec.persona, goal=spec.goal)},
        {
            "role": "user",
            "content": f"The call so far:\n{conversation or '(silence)'}\n\nYour next move:",
        },
    ]
    answer = await structured(context, model, messages, "caller_move", MOVE_SCHEMA)
    say, dtmf, barge, done = (answer[k] for k in MOVE_SCHEMA["required"])
    if not isinstance(done, bool):
        raise JudgeError(f"{model} answered a move whose done is not true or false: {answer}")
    return Move(
        say if isinstance(say, str) and say.strip() else None,
        dtmf if isinstance(dtmf, str) and dtmf.strip() else None,
        barge if isinstance(barge, int) and not isinstance(barge, bool) and barge > 0 else None,
        done,
    )


async def play_persona(
    caller: SimulatedCaller,
    spec: CallerSpec,
    context: RunContext,
    *,
    timeout: float,  # noqa: ASYNC109 (each reply's own wait)
    first: int = 1,
    max_caller_wait_ms: float | None = None,
) -> tuple[list[TurnResult], list[str]]:
    """Let the caller model play up to ``spec.max_turns`` turns (numbered from ``first``).

    Returns the turns' results and the scenario-level reasons (no caller model, a bad move).
    """
    model = context.caller_model
    if not model:
        return [], [NO_CALLER_MODEL]
    results: list[TurnResult] = []
    for number in range(first, first + spec.max_turns):
        await caller.quiet(timeout)
        if caller.closed.is_set() or caller.end_frame is not None:
            break
        try:
            move = await next_move(context, spec, call_transcript(caller), model)
        except JudgeError as exc:
            return results, [f"caller: {exc}"]
        if move.done:
            break
        if (move.say is None) == (move.dtmf is None):
            got = "both say and dtmf" if move.say is not None else "neither say nor dtmf"
            return results, [f"caller: {model} answered {got} in a move that is not done"]
        keys: dict[str, Any] = {"say": move.say} if move.say is not None else {"dtmf": move.dtmf}
        if move.barge_in_after_words is not None:
            keys["interrupt_after_words"] = move.barge_in_after_words
        try:
            turn = Turn.numbered(number, **keys)
        except ValidationError:
            return results, [f"caller: {model} answered a move that cannot be played: {keys}"]
        played = await run_script(caller, [turn], timeout, max_caller_wait_ms)
        for result in played:  # its barge-in is the caller's try: a short answer is no fault
            result.reasons[:] = [r for r in result.reasons if not r.startswith(NO_BARGE_IN)]
        results += played
        if played and played[0].reply is None:
            break  # not sent: the call is over, or Twilio would not report it
    return results, []


async def judge_goal(caller: SimulatedCaller, spec: CallerSpec, context: RunContext) -> list[str]:
    """Whether the call met the simulated caller's goal (the judge's verdict); reasons if not."""
    rubric = (
        f"The caller wanted: {spec.goal}. By the end of the call the agent has done what the "
        "caller wanted, or given them what they asked for."
    )
    try:
        verdict = await Judge(context).verdict(rubric, call_transcript(caller))
    except JudgeError as exc:
        line = str(exc)
        return [line if line.startswith("judge:") else f"goal: {line}"]
    return [] if verdict.passed else [f"goal not met ({spec.goal}): {verdict.reason}"]
