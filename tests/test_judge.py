"""``judge:``: the verdict of an LLM, served over real HTTP by a fake LLM of its own.

The request is checked as the endpoint receives it (temperature 0, json_schema output, the
rubric and the transcript); verdicts are cached by content, so a second run asks nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from crctl.cli import app as cli
from crctl.judge import NO_JUDGE_MODEL
from fakes.fake_llm import FakeLLM, Script
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer
from tests.test_expect import context, play

PASS = {"passed": True, "reason": "the agent gave the opening hours"}
FAIL = {"passed": False, "reason": "the agent never said when it opens"}
HOURS = "- say: when do you open?\n  expect: {judge: gives the opening hours}\n"


@pytest.fixture
def judge_llm() -> Iterator[FakeLLM]:
    """The judge's endpoint: a second fake LLM, so its requests are counted apart."""
    with FakeLLM() as llm:
        yield llm


def test_a_turns_judge_passes_and_fails_on_the_verdict_it_is_served(
    fake_llm: FakeLLM, relay: RelayServer, judge_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.enqueue(Script(tokens=["We", " open", " at", " 9", "."]), Script(tokens=["Bye", "."]))
    judge_llm.answer("verdict", PASS, FAIL)
    result = play(
        relay,
        tmp_path,
        HOURS + "- say: and on Sunday?\n  expect: {judge: says whether it opens on Sunday}\n",
        context(relay, judge_llm),
    )
    first, second = result.turns
    assert first.passed and second.reasons == [
        "judge: 'says whether it opens on Sunday' not met: the agent never said when it opens"
    ]
    asked = judge_llm.structured_records("verdict")
    assert len(asked) == 2
    body = asked[0].body
    assert body["model"] == "judge-1" and body["temperature"] == 0
    schema = body["response_format"]["json_schema"]
    assert schema["name"] == "verdict" and schema["strict"] is True
    assert schema["schema"]["required"] == ["passed", "reason"]
    prompt = body["messages"][-1]["content"]
    assert prompt.startswith("Rubric: gives the opening hours\n")
    # the first turn is judged on the conversation up to its reply, the second on all of it
    assert prompt.endswith(
        "Agent: Hello! How can I help you today?\nCaller: when do you open?\nAgent: We open at 9."
    )
    assert asked[1].body["messages"][-1]["content"].endswith("Caller: and on Sunday?\nAgent: Bye.")


def test_an_unchanged_run_asks_the_judge_nothing_and_a_changed_rubric_asks_again(
    fake_llm: FakeLLM, relay: RelayServer, judge_llm: FakeLLM, tmp_path: Path
) -> None:
    judge_llm.structured["verdict"] = lambda body: PASS
    fake_llm.responder = lambda body: Script(tokens=["We", " open", " at", " 9", "."])
    run_context = context(relay, judge_llm, cache_dir=tmp_path / "cache")
    first = play(relay, tmp_path, HOURS, run_context)
    assert first.passed and len(judge_llm.structured_records()) == 1
    second = play(relay, tmp_path, HOURS, run_context)
    assert second.passed, second.turns[0].reasons
    assert len(judge_llm.structured_records()) == 1  # from the cache: no request
    judge_llm.structured["verdict"] = lambda body: FAIL
    changed = play(relay, tmp_path, HOURS.replace("gives", "states"), run_context)
    assert len(judge_llm.structured_records()) == 2
    assert changed.turns[0].reasons == [
        "judge: 'states the opening hours' not met: the agent never said when it opens"
    ]
    # a failed verdict is cached as well
    again = play(relay, tmp_path, HOURS.replace("gives", "states"), run_context)
    assert again.turns[0].reasons == changed.turns[0].reasons
    assert len(judge_llm.structured_records()) == 2


def test_without_a_judge_model_the_check_fails_with_one_line_saying_what_to_set(
    relay: RelayServer, judge_llm: FakeLLM, tmp_path: Path
) -> None:
    result = play(relay, tmp_path, HOURS, context(relay, judge_llm, judge_model=None))
    assert result.turns[0].reasons == [NO_JUDGE_MODEL]
    assert NO_JUDGE_MODEL == "judge: no judge model: pass --judge-model or set CRCTL_JUDGE_MODEL"
    assert judge_llm.records == []


def test_a_judge_that_fails_or_answers_no_verdict_is_one_line(
    relay: RelayServer, judge_llm: FakeLLM, tmp_path: Path
) -> None:
    judge_llm.enqueue(Script(fault="status", status=401))
    failed = play(relay, tmp_path, HOURS, context(relay, judge_llm))
    assert failed.turns[0].reasons == [
        f"judge: judge-1 at {judge_llm.base_url} answered HTTP 401: Incorrect API key provided. "
        "(check OPENAI_API_KEY)"
    ]
    # nothing scripted for the schema: the fake echoes, which is no JSON
    echoed = play(relay, tmp_path, HOURS, context(relay, judge_llm))
    (line,) = echoed.turns[0].reasons
    assert line.startswith("judge: judge-1 answered no JSON: You said: Rubric:")


def test_a_scenario_level_judge_reads_the_whole_call(
    fake_llm: FakeLLM, relay: RelayServer, judge_llm: FakeLLM, tmp_path: Path
) -> None:
    judge_llm.answer("verdict", FAIL)
    fake_llm.enqueue(Script(tokens=["Hi", "."]), Script(tokens=["Sure", "."]))
    text = (
        "expect: {judge: the agent stays polite}\nturns:\n  - say: hello\n  - say: tell me more\n"
    )
    result = play(relay, tmp_path, text, context(relay, judge_llm))
    assert all(t.passed for t in result.turns)
    assert result.reasons == [
        "judge: 'the agent stays polite' not met: the agent never said when it opens"
    ]
    prompt = judge_llm.structured_records("verdict")[0].body["messages"][-1]["content"]
    assert "Caller: hello\nAgent: Hi.\nCaller: tell me more\nAgent: Sure." in prompt


def test_crctl_call_script_judges_with_the_model_set_in_the_environment(
    fake_llm: FakeLLM,
    relay_factory: Callable[..., RelayServer],
    judge_llm: FakeLLM,
    tmp_path: Path,
) -> None:
    relay = relay_factory()
    judge_llm.answer("verdict", FAIL)
    fake_llm.enqueue(Script(tokens=["We", " open", " at", " 9", "."]))
    path = tmp_path / "hours.yaml"
    path.write_text(HOURS)
    env = {
        "CRCTL_JUDGE_MODEL": "judge-2",
        "CRCTL_JUDGE_BASE_URL": judge_llm.base_url,
        "OPENAI_API_KEY": "sk-judge",
        "TWILIO_AUTH_TOKEN": None,
        "CRCTL_PUBLIC_URL": None,
    }
    args = [relay.base_url, "--auth-token", AUTH_TOKEN, "--public-url", PUBLIC_URL]
    argv = ["call", *args, "--script", str(path), "--time-scale", "0"]
    result = CliRunner().invoke(cli, argv, env=env)
    assert result.exit_code == 1, result.output
    assert "judge: 'gives the opening hours' not met" in result.output
    assert "0 of 1 turns passed" in result.output
    (asked,) = judge_llm.structured_records("verdict")
    assert asked.body["model"] == "judge-2"
    assert asked.headers["Authorization"] == "Bearer sk-judge"
    assert json.loads(json.dumps(asked.body["response_format"]))["type"] == "json_schema"
    # the verdict is cached (the state folder's judge-cache): the same call asks nothing
    fake_llm.enqueue(Script(tokens=["We", " open", " at", " 9", "."]))
    again = CliRunner().invoke(cli, argv, env=env)
    assert again.exit_code == 1 and "judge: 'gives the opening hours' not met" in again.output
    assert len(judge_llm.structured_records("verdict")) == 1


def test_the_fake_answers_structured_output_by_schema_name_and_checks_the_schema(
    judge_llm: FakeLLM,
) -> None:
    from crctl.judge import VERDICT_SCHEMA

    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "strict": True, "schema": VERDICT_SCHEMA},
    }
    body = {"model": "m", "messages": [{"role": "user", "content": "judge this"}]}
    judge_llm.answer("verdict", PASS, {"passed": True})

    def ask() -> httpx.Response:
        url = judge_llm.base_url + "/chat/completions"
        return httpx.post(url, json={**body, "response_format": fmt}, timeout=10)

    def content(response: httpx.Response) -> str:
        return str(response.json()["choices"][0]["message"]["content"])

    assert json.loads(content(ask())) == PASS
    assert ask().status_code == 500  # no reason: the scripted answer does not fit the schema
    assert judge_llm.misfits == ["the answer scripted for 'verdict' does not fit: no reason"]
    # nothing scripted for the name: answered as any request (the echo)
    assert content(ask()) == "You said: judge this"
    assert len(judge_llm.structured_records("verdict")) == 3
    assert judge_llm.structured_records("caller_move") == []
