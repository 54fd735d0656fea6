"""``crctl test``: folders of scenarios against the real relay (fake LLM over real HTTP).

Each scenario is played by its own simulated caller; the summary, the exit code, the JUnit XML
(validated against tests/junit.xsd) and the JSON are checked.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx
import pytest
import xmlschema
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner

from crctl.call_script import RunContext
from crctl.cli import app as cli
from crctl.paths import read_api_token, state_dir
from fakes.fake_llm import FakeLLM, Script
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer

SCHEMA = xmlschema.XMLSchema(Path(__file__).parent / "junit.xsd")
_CLEAN_ENV = {
    "TWILIO_AUTH_TOKEN": None,
    "CRCTL_PUBLIC_URL": None,
    "OPENAI_API_KEY": None,
    "OPENAI_BASE_URL": None,
    "CRCTL_JUDGE_MODEL": None,
    "CRCTL_CALLER_MODEL": None,
}

GREETING = """\
- say: Hello there
  expect: {contains: hello}
- say: What are your opening hours?
  expect: {contains: [opening, hours]}
"""
FAREWELL = """\
- say: Goodbye
  expect: {matches: "(?i)^you said: goodbye$"}
"""
FAILING = """\
- say: I want a refund
  expect: {contains: refund approved}
"""


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """``crctl test ARGS`` through the real CLI (its root group says errors, once)."""
    return CliRunner().invoke(cli, ["test", *args], env={**_CLEAN_ENV, **(env or {})})


def signed(relay: RelayServer) -> list[str]:
    """Call the relay as Twilio would through its tunnel, with speaker frames at once."""
    return [
        "--url",
        relay.base_url,
        "--public-url",
        PUBLIC_URL,
        "--auth-token",
        AUTH_TOKEN,
        "--time-scale",
        "0",
    ]


def folder(tmp_path: Path, **files: str) -> Path:
    suite = tmp_path / "scenarios"
    suite.mkdir(exist_ok=True)
    for name, text in files.items():
        (suite / f"{name}.yaml").write_text(text)
    return suite


def started(relay: RelayServer) -> list[str]:
    return [e.call_sid for e in list(relay.events) if e.kind == "call.started"]


def test_a_folder_of_passing_scenarios_exits_0(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    (suite / "notes.txt").write_text("not a scenario")
    result = run(str(suite), *signed(relay), "-j", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # one line per scenario, in file order, then the totals
    assert lines[0].startswith("pass farewell  1 turn") and lines[1].startswith(
        "pass greeting  2 turns"
    )
    assert "2 of 2 scenarios passed (2 runs, -j 2," in result.output
    # each scenario had a call of its own
    assert len(set(started(relay))) == 2


def test_the_acceptance_command_line(relay: RelayServer, tmp_path: Path) -> None:
    """``crctl test DIR --url … --public-url … --junit out.xml -j 4``, token from the env."""
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    out = tmp_path / "out.xml"
    result = run(
        str(suite),
        "--url",
        relay.base_url,
        "--public-url",
        PUBLIC_URL,
        "--junit",
        str(out),
        "-j",
        "4",
        env={"TWILIO_AUTH_TOKEN": AUTH_TOKEN},
    )
    assert result.exit_code == 0, result.output
    SCHEMA.validate(str(out))
    cases = ET.parse(out).getroot().findall("testsuite/testcase")
    assert [c.get("name") for c in cases] == ["farewell", "greeting"]
    # real-time speaker frames (time scale 1): every turn's caller wait was measured
    assert "caller wait p50 " in result.output


def test_a_failing_scenario_exits_1_with_its_reason_in_the_report_and_junit(
    relay: RelayServer, tmp_path: Path
) -> None:
    suite = folder(tmp_path, greeting=GREETING, refund=FAILING)
    out = tmp_path / "reports" / "junit.xml"
    result = run(str(suite), *signed(relay), "--junit", str(out))
    assert result.exit_code == 1, result.output
    reason = "turn 1: reply does not contain 'refund approved'"
    assert "FAIL refund  1 turn" in result.output and reason in result.output
    assert "1 of 2 scenarios passed" in result.output
    SCHEMA.validate(str(out))
    root = ET.parse(out).getroot()
    suite_el = root.find("testsuite")
    assert suite_el is not None
    assert (suite_el.get("tests"), suite_el.get("failures"), suite_el.get("errors")) == (
        "2",
        "1",
        "0",
    )
    cases = {c.get("name"): c for c in suite_el.findall("testcase")}
    assert cases["greeting"].find("failure") is None
    failure = cases["refund"].find("failure")
    assert failure is not None and failure.get("message") == reason
    transcript = cases["refund"].findtext("system-out") or ""
    assert "'I want a refund' -> 'You said: I want a refund'" in transcript
    assert cases["refund"].get("file") == str(suite / "refund.yaml")


def test_a_junit_file_that_breaks_the_schema_is_caught(relay: RelayServer, tmp_path: Path) -> None:
    """The schema check can fail: a testcase without its time is invalid."""
    suite = folder(tmp_path, greeting=GREETING)
    out = tmp_path / "junit.xml"
    assert run(str(suite), *signed(relay), "--junit", str(out)).exit_code == 0
    broken = out.read_text().replace(' time="', ' duration="')
    assert SCHEMA.is_valid(out.read_text()) and not SCHEMA.is_valid(broken)


def test_json_has_every_run_and_turn(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING, refund=FAILING)
    out = tmp_path / "results.json"
    result = run(str(suite), *signed(relay), "--json", str(out), "-j", "3")
    assert result.exit_code == 1, result.output
    data = json.loads(out.read_text())
    assert (data["passed"], data["jobs"], data["repeat"], data["relay"]) == (
        False,
        3,
        1,
        relay.base_url,
    )
    by_name = {s["name"]: s for s in data["scenarios"]}
    assert list(by_name) == ["greeting", "refund"]
    greeting = by_name["greeting"]
    assert (greeting["passed"], greeting["pass_rate"], greeting["turns"], greeting["why"]) == (
        True,
        1.0,
        2,
        "",
    )
    (run_,) = greeting["runs"]
    assert run_["call_sid"] in started(relay)
    assert [t["reply"] for t in run_["turns"]] == [
        "You said: Hello there",
        "You said: What are your opening hours?",
    ]
    assert all(t["passed"] and t["first_token_ms"] is not None for t in run_["turns"])
    refund = by_name["refund"]
    assert refund["passed"] is False and refund["pass_rate"] == 0.0
    assert refund["runs"][0]["reasons"] == ["turn 1: reply does not contain 'refund approved'"]
    assert refund["runs"][0]["turns"][0]["reasons"] == ["reply does not contain 'refund approved'"]


PERSONA_ONLY = """\
name: order status
caller:
  persona: Dana, in a hurry
  goal: learn the status of order 42
  max_turns: 5
"""


def test_a_simulated_callers_turns_are_counted_as_played(
    relay: RelayServer, tmp_path: Path
) -> None:
    """A scenario listing no turns, whose caller model plays three: "3 turns", not 0."""
    suite = folder(tmp_path, order=PERSONA_ONLY)
    out = tmp_path / "results.json"
    moves = [{"say": s, "dtmf": None, "barge_in_after_words": None, "done": False} for s in "abc"]
    with FakeLLM() as models:
        models.answer("caller_move", *moves, {**moves[0], "say": None, "done": True})
        models.answer("verdict", {"passed": True, "reason": "it did"})
        result = run(
            str(suite), *signed(relay), "--json", str(out), "--caller-model", "caller-1",
            "--judge-model", "judge-1", "--judge-base-url", models.base_url,
            env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("pass order status  3 turns")
    (order,) = json.loads(out.read_text())["scenarios"]
    assert order["turns"] == 3
    assert [t["reply"] for t in order["runs"][0]["turns"]] == [
        "You said: a",
        "You said: b",
        "You said: c",
    ]


def test_k_selects_by_substring_or_glob(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL, refund=FAILING)
    result = run(str(suite), *signed(relay), "-k", "GREET")
    assert result.exit_code == 0, result.output
    assert "greeting" in result.output and "refund" not in result.output
    assert "1 of 1 scenarios passed" in result.output
    result = run(str(suite), *signed(relay), "-k", "*WELL")
    assert result.exit_code == 0, result.output
    assert "pass farewell" in result.output and "greeting" not in result.output
    assert len(started(relay)) == 2  # the refund scenario never ran


def test_k_that_matches_nothing_is_bad_input(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    result = run(str(suite), *signed(relay), "-k", "nothing")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: -k nothing: no scenario matches; the scenarios are farewell, greeting"
    )
    assert started(relay) == []


def test_repeat_reports_a_pass_rate(relay: RelayServer, fake_llm: FakeLLM, tmp_path: Path) -> None:
    """A flaky agent: the fake LLM answers right, then wrong, then right."""
    suite = folder(tmp_path, hours="- say: When do you open?\n  expect: {contains: nine}\n")
    fake_llm.enqueue(
        Script(tokens=["We", " open", " at", " nine."]),
        Script(tokens=["Sorry,", " I", " don't", " know."]),
        Script(tokens=["At", " nine."]),
    )
    out = tmp_path / "junit.xml"
    json_out = tmp_path / "results.json"
    result = run(
        str(suite), *signed(relay), "--repeat", "3", "-j", "1", "--junit", str(out),
        "--json", str(json_out),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "FAIL 2/3 (67%) hours" in result.output
    assert "turn 1: reply does not contain 'nine'" in result.output
    SCHEMA.validate(str(out))
    cases = ET.parse(out).getroot().findall("testsuite/testcase")
    assert [(c.get("name"), c.find("failure") is None) for c in cases] == [
        ("hours[1]", True),
        ("hours[2]", False),
        ("hours[3]", True),
    ]
    (hours,) = json.loads(json_out.read_text())["scenarios"]
    assert hours["pass_rate"] == 2 / 3
    assert [r["passed"] for r in hours["runs"]] == [True, False, True]
    assert len(set(started(relay))) == 3  # a new call for every run


def test_repeat_all_passing_is_exit_0(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING)
    result = run(str(suite), *signed(relay), "--repeat", "2")
    assert result.exit_code == 0, result.output
    assert "pass 2/2 (100%) greeting" in result.output


def test_without_url_a_relay_is_started_in_process(tmp_path: Path) -> None:
    """``--agent echo``: no LLM, no relay to start first; the JSON names the relay it used."""
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    out = tmp_path / "results.json"
    result = run(str(suite), "--agent", "echo", "--time-scale", "0", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "2 of 2 scenarios passed" in result.output
    data = json.loads(out.read_text())
    assert data["relay"].startswith("http://127.0.0.1:")
    replies = [t["reply"] for s in data["scenarios"] for r in s["runs"] for t in r["turns"]]
    assert replies == [
        "You said: Goodbye",
        "You said: Hello there",
        "You said: What are your opening hours?",
    ]


def test_in_process_relay_checks_the_signatures_the_callers_make(tmp_path: Path) -> None:
    """With --public-url and a Twilio auth token, the relay started here checks signatures."""
    suite = folder(tmp_path, greeting=GREETING)
    result = run(
        str(suite), "--agent", "echo", "--time-scale", "0", "--public-url", PUBLIC_URL,
        env={"TWILIO_AUTH_TOKEN": AUTH_TOKEN},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 of 1 scenarios passed" in result.output


def test_in_process_relay_warns_when_its_llm_cannot_be_reached(tmp_path: Path) -> None:
    from tests.support import free_port

    suite = folder(tmp_path, greeting=GREETING)
    down = f"http://127.0.0.1:{free_port()}/v1"
    result = run(
        str(suite), "--agent", "llm", "--openai-base-url", down, "--model", "m",
        "--llm-timeout", "0.5", "--time-scale", "0", env={"OPENAI_API_KEY": "sk-test"},
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.startswith("warning: ") and down in result.output.splitlines()[0]
    assert "FAIL greeting" in result.output


def test_in_process_relay_takes_the_agent_settings(tmp_path: Path, fake_llm: FakeLLM) -> None:
    """The LLM agent against the fake, and a welcome greeting, as ``serve`` would run them."""
    suite = folder(tmp_path, greeting=GREETING)
    out = tmp_path / "results.json"
    fake_llm.enqueue(Script(tokens=["hello"]), Script(tokens=["opening hours: 9 to 5"]))
    result = run(
        str(suite), "--agent", "llm", "--openai-base-url", fake_llm.base_url, "--model",
        "fake-llm", "--welcome-greeting", "Hi, suite here", "--time-scale", "0", "--json",
        str(out), env={"OPENAI_API_KEY": "sk-test"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(fake_llm.records) == 2
    first = fake_llm.records[0].body["messages"]
    assert any(m["role"] == "user" and m["content"] == "Hello there" for m in first)


def test_bad_files_are_all_named_before_anything_runs(relay: RelayServer, tmp_path: Path) -> None:
    suite = folder(
        tmp_path,
        good=GREETING,
        typo="- sya: hi\n",
        unparsable="- say: [oops\n",
    )
    result = run(str(suite), str(tmp_path / "missing"), *signed(relay))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == [
        f"error: {tmp_path / 'missing'}: no such file or folder",
        f"error: {suite / 'typo.yaml'}: turn 1: unknown key 'sya' (value 'hi'), did you mean "
        "'say'? a turn takes say, dtmf, interrupt_after_words, expect, drop_socket, silence, "
        "bad_frame, partials, noise, hangup",
        f"error: {suite / 'unparsable.yaml'}: not valid YAML (line 2): expected ',' or ']', but "
        "got '<stream end>'",
    ]
    assert started(relay) == []  # the good scenario did not run either


def test_an_empty_folder_is_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(str(empty), "--agent", "echo")
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: {empty}: no scenario files (*.yaml, *.yml) in this folder"
    )


def test_a_report_that_cannot_be_written_is_said_before_anything_runs(
    relay: RelayServer, tmp_path: Path
) -> None:
    suite = folder(tmp_path, greeting=GREETING)
    result = run(str(suite), *signed(relay), "--junit", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: --junit {tmp_path}: a folder; expected a file name (--junit out.xml)"
    )
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = run(str(suite), *signed(relay), "--json", str(blocked / "out.json"))
    assert result.exit_code == 2
    assert result.output.startswith(f"error: --json {blocked / 'out.json'}: cannot write it: ")
    assert started(relay) == []  # no call was placed


def test_a_relay_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    from tests.support import free_port

    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    port = free_port()
    result = run(str(suite), "--url", f"http://127.0.0.1:{port}", "--time-scale", "0")
    assert result.exit_code == 1
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and f"127.0.0.1:{port}" in line
    assert "up --no-tunnel" in line


def test_scenarios_run_concurrently_up_to_j(
    relay: RelayServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    """``-j 2``: two calls wait on the LLM at once, the third only once a slot is free."""
    suite = folder(
        tmp_path,
        **{name: f"- say: {name}\n  expect: {{contains: {name}}}\n" for name in ("a", "b", "c")},
    )
    fake_llm.responder = lambda body: Script(tokens=["You said it"], ttft=1.0)
    result = run(str(suite), *signed(relay), "-j", "2", "-k", "?")
    assert result.exit_code == 1, result.output  # "You said it" contains none of the names
    first, second, third = sorted(fake_llm.records, key=lambda r: r.received_at)
    assert first.first_chunk_at is not None and second.first_chunk_at is not None
    # the second request came while the first was still waiting for its first token…
    assert second.received_at < first.first_chunk_at
    # …and the third only after one of those calls was over
    assert third.received_at > min(first.first_chunk_at, second.first_chunk_at)


def test_j_1_runs_one_at_a_time(relay: RelayServer, fake_llm: FakeLLM, tmp_path: Path) -> None:
    suite = folder(tmp_path, greeting=GREETING, farewell=FAREWELL)
    fake_llm.responder = lambda body: Script(tokens=["hello goodbye"], ttft=0.2)
    assert run(str(suite), *signed(relay), "-j", "1").exit_code == 1
    records = sorted(fake_llm.records, key=lambda r: r.received_at)
    for before, after in itertools.pairwise(records):
        assert before.first_chunk_at is not None and after.received_at > before.first_chunk_at


def test_runs_get_the_relay_api_and_the_judge_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The context each run gets: the relay's URL and API token, the judge's settings.

    The token opens the relay's API, where expectations read the call's stored events.
    """
    import crctl.call_script

    real = crctl.call_script.run_scenario
    seen: list[tuple[RunContext, int, dict[str, Any]]] = []

    async def spy(caller: Any, scenario: Any, **kwargs: Any) -> Any:
        result = await real(caller, scenario, **kwargs)
        context = kwargs["context"]
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.get(
                f"{context.relay_url}/calls/{caller.call_sid}",
                headers={"Authorization": f"Bearer {context.api_token}"},
            )
        seen.append((context, answer.status_code, answer.json()))
        return result

    monkeypatch.setattr(crctl.call_script, "run_scenario", spy)
    suite = folder(tmp_path, greeting=GREETING)
    out = tmp_path / "results.json"
    result = run(
        str(suite), "--agent", "echo", "--time-scale", "0", "--json", str(out),
        "--judge-model", "judge-1", "--caller-model", "caller-1",
        env={"OPENAI_API_KEY": "sk-judge", "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ((context, status, stored),) = seen
    assert context.relay_url == json.loads(out.read_text())["relay"]
    assert context.api_token == read_api_token()  # the token file the relay made
    assert status == 200 and "call.started" in {e["kind"] for e in stored["events"]}
    assert (context.judge_model, context.caller_model) == ("judge-1", "caller-1")
    assert (context.judge_base_url, context.judge_api_key) == ("http://127.0.0.1:9/v1", "sk-judge")
    assert context.cache_dir == state_dir() / "judge-cache"


def test_the_summary_is_a_table_on_a_terminal(
    relay: RelayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import crctl.suite

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=200, color_system=None)
    monkeypatch.setattr(crctl.suite, "out", terminal)
    suite = folder(tmp_path, greeting=GREETING, refund=FAILING)
    assert run(str(suite), *signed(relay)).exit_code == 1
    lines = [line for line in screen.getvalue().splitlines() if line[:1] in "│┃"]
    cells = [[cell.strip() for cell in re.split("[│┃]", line)[1:-1]] for line in lines]
    assert cells[0] == [
        "scenario", "turns", "result", "caller wait p50", "max", "why it failed",
    ]  # fmt: skip
    assert cells[1][:3] == ["greeting", "2", "pass"] and cells[1][5] == ""
    assert cells[2][:3] == ["refund", "1", "FAIL"]
    assert cells[2][5] == "turn 1: reply does not contain 'refund approved'"
    assert cells[1][3].endswith(" ms") and cells[2][4].endswith(" ms")


def test_a_run_that_breaks_is_an_error_and_the_others_go_on(
    relay: RelayServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a run (a bug) is JUnit's <error> with its traceback, not a crash."""
    import crctl.call_script

    real = crctl.call_script.run_scenario

    async def breaks_on_refund(caller: Any, scenario: Any, **kwargs: Any) -> Any:
        if scenario.name == "refund":
            raise RuntimeError("expectation exploded")
        return await real(caller, scenario, **kwargs)

    monkeypatch.setattr(crctl.call_script, "run_scenario", breaks_on_refund)
    suite = folder(tmp_path, greeting=GREETING, refund=FAILING)
    out = tmp_path / "junit.xml"
    result = run(str(suite), *signed(relay), "--junit", str(out))
    assert result.exit_code == 1, result.output
    assert "FAIL refund  1 turn: RuntimeError: expectation exploded\n" in result.output
    assert "pass greeting" in result.output
    SCHEMA.validate(str(out))
    suite_el = ET.parse(out).getroot().find("testsuite")
    assert suite_el is not None
    assert (suite_el.get("failures"), suite_el.get("errors")) == ("0", "1")
    error = suite_el.find("testcase[@name='refund']/error")
    assert error is not None and error.get("message") == "RuntimeError: expectation exploded"
    assert "Traceback (most recent call last)" in (error.text or "")
    assert len(started(relay)) == 2  # its call was placed, then hung up
