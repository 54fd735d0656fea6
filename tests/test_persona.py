"""Simulated callers: the caller model's moves and the goal's verdict, served by a fake LLM.

The relay runs its LLM agent on one fake LLM; the caller model and the judge share another
(the same endpoint, as ``RunContext`` has it), which answers their structured requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crctl.persona import NO_CALLER_MODEL
from fakes.fake_llm import FakeLLM, Script
from tests.support import RelayServer
from tests.test_expect import context, play

PERSONA = """\
name: order status
turns:
  - say: hello
caller:
  persona: Dana, in a hurry, answers in few words
  goal: learn the status of order 42
  max_turns: {max_turns}
"""


def move(
    say: str | None = None, dtmf: str | None = None, barge: int | None = None, done: bool = False
) -> dict[str, Any]:
    """One structured answer of the caller model."""
    return {"say": say, "dtmf": dtmf, "barge_in_after_words": barge, "done": done}


@pytest.fixture
def models() -> Iterator[FakeLLM]:
    """The caller model's and the judge's endpoint."""
    with FakeLLM() as llm:
        yield llm


def test_a_simulated_caller_reaching_its_goal_passes(
    fake_llm: FakeLLM, relay: RelayServer, models: FakeLLM, tmp_path: Path
) -> None:
    story = ["Your", " order", " 42", " left", " our", " warehouse", " this", " morning", "."]
    fake_llm.enqueue(
        Script(tokens=["Hi", "."]),
        Script(tokens=story, delay=0.05),
        Script(tokens=["Order", " 42", " ships", " today", "."]),
    )
    models.answer(
        "caller_move",
        move(say="where is my order", barge=3),
        move(dtmf="42"),
        move(done=True),
    )
    models.answer("verdict", {"passed": True, "reason": "the agent said order 42 ships today"})
    result = play(
        relay,
        tmp_path,
        PERSONA.format(max_turns=5),
        context(relay, models, caller_model="caller-1"),
    )
    assert result.passed, ([t.reasons for t in result.turns], result.reasons)
    scripted, said, keys = result.turns
    assert scripted.turn.say == "hello" and scripted.passed
    assert [t.turn.number for t in result.turns] == [1, 2, 3]
    assert said.turn.say == "where is my order" and said.turn.interrupt_after_words == 3
    assert said.reply is not None and said.reply.interrupted  # it barged in
    assert keys.turn.dtmf == "42" and keys.reply is not None
    moves = models.structured_records("caller_move")
    assert len(moves) == 3
    first = moves[0].body
    assert first["model"] == "caller-1" and first["temperature"] == 0
    assert first["response_format"]["json_schema"]["schema"]["required"] == [
        "say",
        "dtmf",
        "barge_in_after_words",
        "done",
    ]
    system = first["messages"][0]["content"]
    assert "Dana, in a hurry" in system and "learn the status of order 42" in system
    # each move is asked with the call so far: the scripted turn, then its own turns
    assert "Caller: hello\nAgent: Hi." in first["messages"][-1]["content"]
    last = moves[2].body["messages"][-1]["content"]
    assert "Caller: where is my order\nAgent: Your order 42" in last
    assert "(the caller cut in here)" in last
    assert "Caller: (presses key 4)" in last and "Caller: (presses key 2)" in last
    (goal,) = models.structured_records("verdict")
    assert "learn the status of order 42" in goal.body["messages"][-1]["content"]


def test_a_barge_in_the_answer_is_too_short_for_is_no_fault_of_the_agent(
    fake_llm: FakeLLM, relay: RelayServer, models: FakeLLM, tmp_path: Path
) -> None:
    # a scripted interrupt_after_words is an expectation; the caller model's is only a try
    fake_llm.enqueue(Script(tokens=["Hi", "."]), Script(tokens=["It", " shipped", "."]))
    models.answer("caller_move", move(say="where is my order", barge=10), move(done=True))
    models.answer("verdict", {"passed": True, "reason": "the agent said it shipped"})
    result = play(
        relay,
        tmp_path,
        PERSONA.format(max_turns=3),
        context(relay, models, caller_model="caller-1"),
    )
    assert result.passed, ([t.reasons for t in result.turns], result.reasons)
    _, said = result.turns
    assert said.turn.interrupt_after_words == 10 and said.reply is not None
    assert said.reply.text == "It shipped." and not said.reply.interrupted


def test_a_simulated_caller_missing_its_goal_fails_after_max_turns(
    relay: RelayServer, models: FakeLLM, tmp_path: Path
) -> None:
    models.structured["caller_move"] = lambda body: move(say="what about my order?")
    models.answer("verdict", {"passed": False, "reason": "the agent never gave a status"})
    result = play(
        relay,
        tmp_path,
        PERSONA.format(max_turns=2),
        context(relay, models, caller_model="caller-1"),
    )
    assert [t.turn.label for t in result.turns] == ["'hello'", *["'what about my order?'"] * 2]
    assert all(t.passed for t in result.turns)
    assert result.reasons == [
        "goal not met (learn the status of order 42): the agent never gave a status"
    ]
    assert len(models.structured_records("caller_move")) == 2


def test_without_a_caller_model_the_scenario_fails_with_one_line(
    relay: RelayServer, models: FakeLLM, tmp_path: Path
) -> None:
    result = play(relay, tmp_path, PERSONA.format(max_turns=3), context(relay, models))
    assert result.reasons == [NO_CALLER_MODEL]
    assert (
        NO_CALLER_MODEL == "caller: no caller model: pass --caller-model or set CRCTL_CALLER_MODEL"
    )
    assert len(result.turns) == 1 and not result.passed
    assert models.records == []


def test_a_move_that_cannot_be_played_ends_the_caller_with_one_line(
    relay: RelayServer, models: FakeLLM, tmp_path: Path
) -> None:
    models.answer("caller_move", move(say="hi", dtmf="1"))
    models.answer("verdict", {"passed": True, "reason": "fine"})
    both = play(
        relay, tmp_path, PERSONA.format(max_turns=3), context(relay, models, caller_model="m")
    )
    assert both.reasons == ["caller: m answered both say and dtmf in a move that is not done"]
    models.answer("caller_move", move(dtmf="12x"))
    models.answer("verdict", {"passed": True, "reason": "fine"})
    bad_keys = play(
        relay, tmp_path, PERSONA.format(max_turns=3), context(relay, models, caller_model="m")
    )
    assert bad_keys.reasons == ["caller: m answered a move that cannot be played: {'dtmf': '12x'}"]
