"""Scenario files: a list of turns or a mapping; a bad one is one line (file, key, value, allowed).

No call is placed: these only load files (tests/test_expect.py plays them).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from crctl.call_script import DEFAULT_MAX_TURNS, ScriptError, Turn, load_scenario, load_script

JUDGE = "a rubric, as non-empty text (an LLM judges the conversation against it)"
TOOL = (
    "a tool's name, a mapping {name: …, arguments: {…}} (a subset of the call's JSON arguments), "
    "or a list of them"
)
SCENARIO_TAKES = "a scenario takes name, description, caller, expect, turns"
WHOLE_CALL = (
    "judge, tool_called, ends_call, handoff, language, dtmf_sent, max_first_token_ms, "
    "max_caller_wait_ms"
)


def write(tmp_path: Path, text: str, name: str = "billing.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_list_of_turns_is_a_scenario_named_after_its_file(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, "- say: hi\n  expect: {judge: greets back}\n"))
    assert scenario.name == "billing" and scenario.caller is None and scenario.expect is None
    assert [t.expect.judge for t in scenario.turns] == ["greets back"]


def test_a_mapping_has_a_name_a_description_a_caller_and_whole_call_expectations(
    tmp_path: Path,
) -> None:
    scenario = load_scenario(
        write(
            tmp_path,
            "name: refund asked twice\n"
            "description: the caller insists\n"
            "caller: {persona: an angry customer, goal: get a refund}\n"
            "expect:\n"
            "  judge: stays polite\n"
            "  tool_called: [refund, {name: lookup, arguments: {order: '42'}}]\n"
            "  language: es\n"
            "  dtmf_sent: '1#'\n"
            "  handoff: {reason: person}\n"
            "turns:\n"
            "  - say: I want my money back\n"
            "    expect: {tool_called: lookup, dtmf_sent: true}\n",
        )
    )
    assert scenario.name == "refund asked twice"
    assert scenario.description == "the caller insists"
    assert scenario.caller is not None and scenario.caller.max_turns == DEFAULT_MAX_TURNS
    assert scenario.caller.goal == "get a refund"
    expect = scenario.expect
    assert expect is not None and expect.judge == "stays polite"
    assert expect.tool_called == (("refund", {}), ("lookup", {"order": "42"}))
    assert expect.language == "es" and expect.dtmf_sent == "1#"
    assert expect.handoff == {"reason": "person"} and expect.wants_end
    (turn,) = scenario.turns
    assert turn.expect.tool_called == (("lookup", {}),) and turn.expect.dtmf_sent is True


def test_a_caller_alone_is_a_scenario(tmp_path: Path) -> None:
    scenario = load_scenario(
        write(tmp_path, "caller: {persona: a tourist, goal: opening hours, max_turns: 3}\n")
    )
    assert scenario.turns == [] and scenario.caller is not None
    assert scenario.caller.max_turns == 3


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "nmae: x\nturns: [{say: hi}]\n",
            f"unknown key 'nmae' (value 'x'), did you mean 'name'? {SCENARIO_TAKES}",
        ),
        (
            "persona: x\nturns: [{say: hi}]\n",
            "unknown key 'persona' (value 'x'), did you mean 'persona' under caller: (caller: "
            f"{{persona: …}})? {SCENARIO_TAKES}",
        ),
        (
            "judge: x\nturns: [{say: hi}]\n",
            "unknown key 'judge' (value 'x'), did you mean 'judge' under expect: (expect: "
            f"{{judge: …}})? {SCENARIO_TAKES}",
        ),
        (
            "say: hi\n",
            "unknown key 'say' (value 'hi'), did you mean 'say' in a turn under turns: (turns: "
            f"[{{say: …}}])? {SCENARIO_TAKES}",
        ),
        (
            "name: ''\nturns: [{say: hi}]\n",
            "name: got ''; expected non-empty text (the scenario's name in reports; default the "
            "file's name)",
        ),
        (
            "description: 3\nturns: [{say: hi}]\n",
            "description: got 3; expected text (what the scenario is about)",
        ),
        (
            "name: x\n",
            "the scenario has neither turns: nor caller:; expected turns: (a list of say:/dtmf: "
            "turns), caller: (persona, goal, max_turns) or both",
        ),
        (
            "turns: []\n",
            "turns: got []; expected a non-empty list of turns (- say: … / - dtmf: …)",
        ),
        (
            "hello\n",
            "a scenario is a YAML list of turns (- say: … / - dtmf: …) or a mapping of name, "
            "description, caller, expect, turns; got 'hello'",
        ),
        (
            "turns: [{say: hi, expect: {judge: ''}}]\n",
            f"turn 1: expect.judge: got ''; expected {JUDGE}",
        ),
        (
            "- say: hi\n  expect: {judg: x}\n",
            "turn 1: unknown key 'expect.judg' (value 'x'), did you mean 'judge'? expect takes "
            "contains, matches, max_first_token_ms, max_caller_wait_ms, ends_call, handoff, "
            "reply, settle_ms, judge, tool_called, language, dtmf_sent",
        ),
        (
            "- say: hi\n  expect: {tool_called: {name: x, args: {}}}\n",
            "turn 1: expect.tool_called: got {'name': 'x', 'args': {}} (unknown key 'args', did "
            f"you mean 'arguments'?); expected {TOOL}",
        ),
        (
            "- say: hi\n  expect: {tool_called: 3}\n",
            f"turn 1: expect.tool_called: got 3; expected {TOOL}",
        ),
        (
            "- say: hi\n  expect: {tool_called: {arguments: {a: 1}}}\n",
            "turn 1: expect.tool_called: got {'arguments': {'a': 1}} (no name); expected " + TOOL,
        ),
        (
            "- say: hi\n  expect: {language: spanish!}\n",
            "turn 1: expect.language: got 'spanish!'; expected a language code the agent "
            "switched to (es-ES, or es for any Spanish)",
        ),
        (
            "- say: hi\n  expect: {dtmf_sent: 12x}\n",
            "turn 1: expect.dtmf_sent: got '12x'; expected true, false, or the keys the agent "
            'sent (quote them: dtmf_sent: "1#")',
        ),
        (
            "turns: [{say: hi}]\ncaller: {persona: p}\n",
            "caller.goal: got None (missing); expected non-empty text (what the caller wants; a "
            "judge decides whether it was met)",
        ),
        (
            "caller: {persona: p, goal: g, max_turns: 0}\n",
            "caller.max_turns: got 0 (too small); expected a whole number of at least 1 "
            "(default 6)",
        ),
        (
            "caller: {persona: p, goal: g, max_turn: 3}\n",
            "unknown key 'caller.max_turn' (value 3), did you mean 'max_turns'? caller takes "
            "persona, goal, max_turns",
        ),
        (
            "caller: {persona: '', goal: g}\n",
            "caller.persona: got ''; expected non-empty text (who calls, and how they speak)",
        ),
        (
            "caller: persona\n",
            "caller: got 'persona'; expected a mapping of persona, goal and max_turns (an LLM "
            "plays the caller)",
        ),
        (
            "turns: [{say: hi}]\nexpect: {contains: x}\n",
            "expect.contains: checks one reply, not the whole call; put it under a turn's "
            f"expect:, or use one of {WHOLE_CALL}",
        ),
        (
            "turns: [{say: hi}]\nexpect: {tool_caled: x}\n",
            "unknown key 'expect.tool_caled' (value 'x'), did you mean 'tool_called'? the "
            f"scenario's expect takes {WHOLE_CALL}",
        ),
        (
            "turns: [{say: hi}]\nexpect: {max_first_token_ms: -1}\n",
            "expect.max_first_token_ms: got -1 (too small); expected a positive number of "
            "milliseconds",
        ),
        ("turns: [{say: hi}]\nexpect: {judge: 3}\n", f"expect.judge: got 3; expected {JUDGE}"),
        (
            "turns: [{say: hi}]\nexpect: [judge]\n",
            f"expect: got ['judge']; expected a mapping of {WHOLE_CALL} (checked over the whole "
            "call)",
        ),
        (
            "turns: [{say: hi}]\nexpect: {ends_call: maybe}\n",
            "expect.ends_call: got 'maybe'; expected true or false",
        ),
        (
            "turns: [{sya: hi}]\n",
            "turn 1: unknown key 'sya' (value 'hi'), did you mean 'say'? a turn takes "
            + ", ".join(Turn.model_fields),
        ),
    ],
)
def test_a_bad_scenario_is_one_line_naming_file_key_value_and_what_is_allowed(
    tmp_path: Path, text: str, line: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScriptError) as raised:
        load_scenario(path)
    assert str(raised.value) == f"{path}: {line}"


def test_crctl_call_script_says_a_scenario_mapping_runs_with_crctl_test(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nturns: [{say: hi}]\n")
    with pytest.raises(ScriptError) as raised:
        load_script(path)
    assert str(raised.value) == (
        f"{path}: a script is a non-empty YAML list of turns (- say: … / - dtmf: …), got "
        "{'name': 'x', 'turns': [{'say': 'hi'}]}; a scenario mapping (name:, caller:, turns:…) "
        "runs with `crctl test`"
    )
