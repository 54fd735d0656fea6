"""Scenario expectations against the real relay: each passing and failing.

The relay runs its LLM agent on the fake LLM (real HTTP) and stores its events (SQLite), so
``tool_called`` reads them back through ``GET /calls/{sid}``; the judge has a fake LLM of its
own (tests/test_judge.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from crctl.call_script import RunContext, ScenarioResult, load_scenario, run_scenario
from crctl.caller import SimulatedCaller
from crctl.caller.speaker import Timing
from fakes.fake_llm import FakeLLM, Script, ToolCallSpec
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer

API_TOKEN = "api-token-of-the-test-relay"


@pytest.fixture
def stored_relay(relay_factory: Callable[..., RelayServer], tmp_path: Path) -> RelayServer:
    """The LLM agent's relay, storing its events and serving them with :data:`API_TOKEN`."""
    return relay_factory(api_token=API_TOKEN, events_db=str(tmp_path / "events.sqlite3"))


def context(relay: RelayServer, judge: FakeLLM | None = None, **overrides: Any) -> RunContext:
    """The run context of a test: the relay's API, and the judge on ``judge`` when given."""
    keys: dict[str, Any] = {"relay_url": relay.base_url, "api_token": API_TOKEN}
    if judge is not None:
        keys.update(judge_base_url=judge.base_url, judge_api_key="sk-test", judge_model="judge-1")
    keys.update(overrides)
    return RunContext(**keys)


def play(
    relay: RelayServer,
    tmp_path: Path,
    text: str,
    run_context: RunContext | None = None,
    name: str = "scenario",
    max_caller_wait_ms: float | None = None,
) -> ScenarioResult:
    """Write ``text`` as a scenario file, load it and play it on a call to ``relay``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    scenario = load_scenario(path)

    async def call() -> ScenarioResult:
        caller = SimulatedCaller(
            relay.base_url,
            auth_token=AUTH_TOKEN,
            public_url=PUBLIC_URL,
            timeout=5.0,
            timing=Timing(time_scale=0),
        )
        await caller.connect(await caller.fetch())
        return await run_scenario(
            caller,
            scenario,
            timeout=5.0,
            context=run_context,
            max_caller_wait_ms=max_caller_wait_ms,
        )

    return asyncio.run(call())


def reasons(result: ScenarioResult) -> list[str]:
    """Every reason of a result: each turn's, then the scenario's."""
    return [r for t in result.turns for r in t.reasons] + result.reasons


def tool_then(name: str, arguments: str, *then: str) -> list[Script]:
    """The agent calls ``name`` with ``arguments``, then says ``then``."""
    return [
        Script(tool_calls=[ToolCallSpec(name, arguments)]),
        Script(tokens=list(then) or ["Done", "."]),
    ]


# ---------------------------------------------------------------------------- language


def test_language_passes_when_the_agent_switches_and_fails_naming_what_it_switched_to(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(*tool_then("switch_language", '{"language": "es-ES"}', "Hola", "."))
    fake_llm.enqueue(*tool_then("switch_language", '{"language": "de-DE"}', "Hallo", "."))
    result = play(
        stored_relay,
        tmp_path,
        "- say: hablo español\n  expect: {language: es}\n"
        "- say: auf deutsch bitte\n  expect: {language: fr-FR}\n"
        "- say: and now?\n  expect: {language: de}\n",
        context(stored_relay),
    )
    first, second, third = result.turns
    assert first.passed, first.reasons
    assert second.reasons == ["language: the agent switched to de-DE, de-DE, expected fr-FR"]
    assert third.reasons == [
        "language: the agent did not switch language (no language message), expected de"
    ]


# ---------------------------------------------------------------------------- dtmf_sent


def test_dtmf_sent_passes_on_the_agents_keys_and_fails_naming_the_keys_it_sent(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(*tool_then("send_dtmf", '{"digits": "12#"}', "Pressed", "."))
    fake_llm.enqueue(*tool_then("send_dtmf", '{"digits": "4"}', "Pressed", "."))
    result = play(
        stored_relay,
        tmp_path,
        "- say: press one two hash\n  expect: {dtmf_sent: '12#'}\n"
        "- say: press nine\n  expect: {dtmf_sent: 9}\n"
        "- say: press nothing\n  expect: {dtmf_sent: true}\n"
        "- say: still nothing\n  expect: {dtmf_sent: false}\n",
        context(stored_relay),
    )
    assert [t.reasons for t in result.turns] == [
        [],
        ["dtmf_sent: expected keys '9', the agent sent '4'"],
        ["dtmf_sent: the agent sent no keys (no sendDigits)"],
        [],
    ]


# ---------------------------------------------------------------------------- tool_called


def test_tool_called_reads_the_relays_stored_events_per_turn(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(*tool_then("switch_language", '{"language": "es-ES"}', "Vale", "."))
    result = play(
        stored_relay,
        tmp_path,
        "- say: in Spanish please\n"
        "  expect:\n"
        "    tool_called: {name: switch_language, arguments: {language: es}}\n"
        "- say: thanks\n  expect: {tool_called: switch_language}\n"  # turn 1's call, not this
        "- say: and again\n"
        "  expect: {tool_called: [end_call]}\n",
        context(stored_relay),
    )
    assert [t.reasons for t in result.turns] == [
        [],
        ["tool_called: switch_language was not called (tools called: none)"],
        ["tool_called: end_call was not called (tools called: none)"],
    ]


def test_tool_called_fails_on_the_wrong_arguments_and_names_the_calls_made(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(*tool_then("switch_language", '{"language": "fr-FR"}', "Oui", "."))
    result = play(
        stored_relay,
        tmp_path,
        "- say: in Spanish please\n"
        "  expect:\n"
        "    tool_called:\n"
        "      - {name: switch_language, arguments: {language: es}}\n"
        "      - send_dtmf\n",
        context(stored_relay),
    )
    assert result.turns[0].reasons == [
        "tool_called: switch_language was called without arguments {'language': 'es'}: "
        '{"language": "fr-FR"}',
        "tool_called: send_dtmf was not called (tools called: switch_language)",
    ]


def test_tool_called_without_the_api_token_is_one_line_with_the_fix(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(*tool_then("switch_language", '{"language": "es-ES"}'))
    result = play(
        stored_relay,
        tmp_path,
        "- say: hi\n  expect: {tool_called: switch_language}\n",
        context(stored_relay, api_token=None),
    )
    url = f"{stored_relay.base_url}/calls/"
    (line,) = result.turns[0].reasons
    assert line.startswith(f"tool_called: the relay refused the API token (HTTP 401) at {url}")
    assert line.endswith(": pass --token or set CRCTL_API_TOKEN")


# ------------------------------------------------------- the expectations that existed


def test_reply_ends_call_handoff_and_the_latency_budgets_pass(
    fake_llm: FakeLLM, relay_factory: Callable[..., RelayServer], tmp_path: Path
) -> None:
    # keys are collected until # (or a pause): one key alone gets no answer
    stored_relay = relay_factory(api_token=API_TOKEN, agent_dtmf_buffer=True)
    handoff = '{"reason": "wants a person", "summary": "billing"}'
    fake_llm.enqueue(
        Script(tokens=["We", " open", " at", " 9", "."]),
        *tool_then("transfer_to_human", handoff, "Transferring", " you", "."),
    )
    result = play(
        stored_relay,
        tmp_path,
        "- say: when do you open?\n"
        "  expect: {contains: open, max_first_token_ms: 4000, max_caller_wait_ms: 4000}\n"
        "- dtmf: '5'\n  expect: {reply: none, settle_ms: 300}\n"
        "- say: a person please\n"
        "  expect: {handoff: {reason: person}, ends_call: true}\n",
        context(stored_relay),
    )
    assert result.passed, reasons(result)


def test_reply_ends_call_handoff_and_the_latency_budgets_fail_each_with_its_line(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(
        Script(tokens=["Slowly", "."], ttft=0.4),
        Script(tokens=["A", " reply", "."]),
        Script(tokens=["Still", " here", "."]),
    )
    result = play(
        stored_relay,
        tmp_path,
        "- say: anyone there?\n  expect: {max_first_token_ms: 100, max_caller_wait_ms: 100}\n"
        "- say: say nothing\n  expect: {reply: none, settle_ms: 3000}\n"
        "- say: put me through\n  expect: {handoff: true, ends_call: true}\n",
        context(stored_relay),
    )
    slow, silent, handoff = (t.reasons for t in result.turns)
    assert [r.split(" ")[0] for r in slow] == ["first", "caller"]
    assert "over max_first_token_ms 100" in slow[0]
    assert "(max_caller_wait_ms)" in slow[1]
    assert silent == [
        "expected no reply within 3000 ms (reply: none), but the agent said 'A reply.'"
    ]
    assert handoff == [
        "the agent did not end the call (no end message)",
        "no hand-off: the agent did not end the call",
    ]


# ------------------------------------------------------------ scenario-level expectations


SCENARIO = """\
name: spanish caller
description: switches to Spanish, presses keys, hangs up
expect:
  tool_called: [{name: switch_language, arguments: {language: es-ES}}, send_dtmf]
  language: es
  dtmf_sent: "7"
  ends_call: true
  max_first_token_ms: 4000
  max_caller_wait_ms: 4000
turns:
  - say: en español
  - say: press seven
  - say: goodbye
"""


def test_scenario_level_expectations_hold_over_the_whole_call(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(
        *tool_then("switch_language", '{"language": "es-ES"}', "Claro", "."),
        *tool_then("send_dtmf", '{"digits": "7"}', "Hecho", "."),
        *tool_then("end_call", '{"reason": "bye"}', "Adiós", "."),
    )
    result = play(stored_relay, tmp_path, SCENARIO, context(stored_relay))
    assert result.scenario.name == "spanish caller"
    assert result.scenario.description.startswith("switches to Spanish")
    assert result.passed, reasons(result)


def test_scenario_level_expectations_fail_as_scenario_reasons(
    fake_llm: FakeLLM, stored_relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(Script(tokens=["No", "."], ttft=0.3))
    result = play(
        stored_relay,
        tmp_path,
        SCENARIO.replace("max_first_token_ms: 4000", "max_first_token_ms: 50"),
        context(stored_relay),
    )
    assert all(t.passed for t in result.turns)
    assert result.reasons[:5] == [
        "tool_called: switch_language was not called (tools called: none)",
        "tool_called: send_dtmf was not called (tools called: none)",
        "the agent did not end the call (no end message)",
        "language: the agent did not switch language (no language message), expected es",
        "dtmf_sent: expected keys '7', the agent sent no keys (no sendDigits)",
    ]
    assert result.reasons[5].startswith("turn 1: first token ")
    assert result.reasons[5].endswith(" ms, over the scenario's max_first_token_ms 50")
    assert not result.passed


def test_a_scenarios_latency_budgets_bound_every_turn_but_its_own_and_win_over_the_flag(
    fake_llm: FakeLLM, relay: RelayServer, tmp_path: Path
) -> None:
    fake_llm.enqueue(Script(tokens=["Slow", "."], ttft=0.3), Script(tokens=["Also", "."], ttft=0.3))
    text = (
        "expect: {max_caller_wait_ms: 150, max_first_token_ms: 150}\n"
        "turns:\n  - say: first\n  - say: second\n"
        "    expect: {max_caller_wait_ms: 2000, max_first_token_ms: 2000}\n"
    )
    # --max-caller-wait-ms 10000 is the suite's default budget; the scenario's own is tighter
    result = play(relay, tmp_path, text, max_caller_wait_ms=10_000)
    first, second = result.turns
    (why,) = first.reasons
    assert why.startswith("caller wait: expected at most 150 ms (max_caller_wait_ms), got ")
    assert second.passed  # its own budgets win over the scenario's
    (slow,) = result.reasons  # the first turn's first token, over the scenario's budget
    assert slow.startswith("turn 1: first token ")
