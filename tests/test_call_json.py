"""``crctl call URL --json``: the turn-by-turn driver, a real subprocess against a real relay.

Commands go in on stdin, one JSON object a line; events come out on stdout, one JSON object a
line and nothing else. The relay runs on 127.0.0.1 with the fake LLM over HTTP.
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from crctl.driver import CommandError, parse_command
from fakes.fake_llm import Script, ToolCallSpec
from tests.events_support import REPO, subprocess_env
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer


def argv(relay: RelayServer, *extra: str) -> list[str]:
    """The acceptance check's command line (the auth token from the environment)."""
    return [
        sys.executable,
        "-m",
        "crctl",
        "call",
        relay.base_url,
        "--public-url",
        PUBLIC_URL,
        "--json",
        "--time-scale",
        "0",
        *extra,
    ]


def env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path / "state", TWILIO_AUTH_TOKEN=AUTH_TOKEN)


def drive(relay: RelayServer, tmp_path: Path, commands: list[Any], *extra: str) -> Any:
    """Run the driver with ``commands`` piped at once (then stdin closes)."""
    lines = "".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in commands)
    return subprocess.run(
        argv(relay, *extra),
        input=lines,
        capture_output=True,
        text=True,
        env=env(tmp_path),
        cwd=REPO,
        timeout=60,
    )


def parsed(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line is one JSON event (nothing else is printed there)."""
    return [json.loads(line) for line in stdout.splitlines()]


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in events]


def only(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


class Live:
    """The driver with stdin kept open: write a command, read events as they come."""

    def __init__(self, relay: RelayServer, tmp_path: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            argv(relay, *extra),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(tmp_path),
            cwd=REPO,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))
        self.events.put(None)

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def until(self, name: str, timeout: float = 20) -> dict[str, Any]:
        while True:
            event = self.events.get(timeout=timeout)
            assert event is not None, f"stdout closed before {name!r}: {self.seen}"
            self.seen.append(event)
            if event["event"] == name:
                return event

    def close(self) -> int:
        """Close stdin (the driver hangs up), wait for the exit; its code."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):  # it exited already
                self.proc.stdin.close()
        code = self.proc.wait(30)
        self.reader.join(5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code


# -------------------------------------------------------------------------------- piped


def test_every_command_piped_at_once_each_after_the_last_reply(relay_factory, tmp_path):
    relay = relay_factory(agent="echo")
    result = drive(
        relay,
        tmp_path,
        [{"say": "hello there"}, {"dtmf": "7"}, {"wait": 0.1}, {"hangup": True}, {"say": "never"}],
    )
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    assert names(events)[:2] == ["connected", "greeting"]
    connected = events[0]
    assert connected["call_sid"].startswith("CA") and connected["session_id"].startswith("VX")
    assert connected["url"].startswith("wss://relay.example.test/ws")
    assert events[1]["text"] == "Hello! How can I help you today?"
    replies = only(events, "reply")
    assert [(r["input"], r["text"]) for r in replies] == [
        ("hello there", "You said: hello there"),
        ("dtmf 7", "You said: [The caller pressed 7 on the keypad]"),
    ]
    for reply in replies:
        assert reply["first_token_ms"] >= 0 and reply["caller_wait_ms"] >= 0
        assert reply["solicited"] is True and reply["interrupted"] is False
    assert names(events)[-1] == "closed"
    assert events[-1]["status"] == "completed" and events[-1]["close_code"] == 1000
    # commands after hangup are not played
    assert [e.data["text"] for e in relay.events if e.kind == "caller.speech"] == ["hello there"]
    assert result.stderr == ""


def test_bad_command_lines_are_error_events_and_the_call_goes_on(relay_factory, tmp_path):
    relay = relay_factory(agent="echo")
    result = drive(
        relay,
        tmp_path,
        [
            "not json",
            {"sya": "typo"},
            {"say": ""},
            {"dtmf": "12a"},
            {"interrupt": True},  # nothing is being said
            '{"say": "a", "dtmf": "1"}',
            "",
            {"say": "still here"},
        ],
    )
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    errors = [e["message"] for e in only(events, "error")]
    assert errors[0].startswith("line 1: not JSON (")
    assert errors[1] == (
        "line 2: unknown command 'sya', did you mean 'say'? expected one JSON object a line: "
        '{"say": "…"}, {"dtmf": "12"}, {"interrupt": true}, {"wait": seconds} or '
        '{"hangup": true}'
    )
    assert errors[2] == 'line 3: say: got ""; expected non-empty text'
    assert errors[3] == "line 4: dtmf: DTMF keys are 0-9, * and #, got '12a'"
    assert errors[4] == "nothing to interrupt: the agent is not speaking"
    assert errors[5].startswith('line 6: got {"say": "a", "dtmf": "1"}; expected one JSON')
    assert len(errors) == 6
    assert [r["text"] for r in only(events, "reply")] == ["You said: still here"]
    assert events[-1]["event"] == "closed" and events[-1]["status"] == "completed"


def test_stdin_closing_hangs_up_once_the_last_reply_is_in(relay, fake_llm, tmp_path):
    fake_llm.enqueue(Script(tokens=["Slow", " but", " complete", "."], delay=0.1))
    result = drive(relay, tmp_path, [{"say": "take your time"}])
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    assert [r["text"] for r in only(events, "reply")] == ["Slow but complete."]
    assert names(events)[-2:] == ["reply", "closed"]
    session = [e.data for e in relay.events if e.kind == "session.end"]
    assert session[0]["status"] == "completed"


def test_an_unreachable_relay_is_an_error_event_and_one_stderr_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "crctl", "call", "http://127.0.0.1:9", "--json"],
        input='{"say": "hi"}\n',
        capture_output=True,
        text=True,
        env=env(tmp_path),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 1
    (event,) = parsed(proc.stdout)
    assert event["event"] == "error" and event["message"].startswith("cannot reach")
    assert proc.stderr.startswith("error: cannot reach") and proc.stderr.count("\n") == 1


# ------------------------------------------------------------------------- interactive


def test_interrupt_barges_in_on_the_reply_being_spoken(relay, fake_llm, tmp_path):
    story = ["Once", " upon", " a", " time", " there", " was", " a", " very", " long", " story."]
    fake_llm.enqueue(Script(tokens=story, delay=0.2), Script(tokens=["Okay", "."]))
    live = Live(relay, tmp_path)
    try:
        live.until("greeting")
        live.send({"say": "tell me a story"})
        assert live.until("speaking")["input"] == "tell me a story"
        live.send({"interrupt": True})
        interrupted = live.until("interrupted")
        cut = live.until("reply")
        assert cut["interrupted"] is True and cut["text"] == interrupted["heard"]
        assert "story." not in cut["text"]
        live.send({"say": "stop"})
        assert live.until("reply")["text"] == "Okay."
        live.send({"hangup": True})
        assert live.until("closed")["status"] == "completed"
    finally:
        assert live.close() == 0
    heard = [e.data["heard"] for e in relay.events if e.kind == "barge_in"]
    assert heard == [interrupted["heard"]]


def test_an_interrupt_piped_right_after_a_say_waits_for_the_agent_to_speak(
    relay, fake_llm, tmp_path
):
    fake_llm.enqueue(Script(tokens=["One", " two", " three", " four", "."], ttft=0.3, delay=0.2))
    result = drive(relay, tmp_path, [{"say": "count"}, {"interrupt": True}])
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    (reply,) = only(events, "reply")
    assert reply["interrupted"] is True and reply["text"] != "One two three four."
    assert only(events, "interrupted")[0]["heard"] == reply["text"]


def test_piped_on_the_speaker_clock_each_command_waits_and_interrupt_keeps_its_place(
    relay, fake_llm, tmp_path
):
    # the acceptance line has no --time-scale: the greeting and each reply take real time
    long = [" word"] * 12 + ["."]
    fake_llm.enqueue(
        Script(tokens=["Short", "."]),
        Script(tokens=["Also", " short", "."]),
        Script(tokens=["Story", *long], delay=0.05),
    )
    commands = [{"say": "one"}, {"say": "two"}, {"say": "three"}, {"interrupt": True}]
    result = drive(relay, tmp_path, commands, "--time-scale", "0.3")
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    # the greeting is heard to its end, not talked over; the interrupt is the last say's
    assert [e["input"] for e in only(events, "interrupted")] == ["three"]
    replies = [(r["input"], r["interrupted"]) for r in only(events, "reply")]
    assert replies == [("one", False), ("two", False), ("three", True)]
    assert only(events, "reply")[0]["text"] == "Short."
    # a hang-up while the speaker plays leaves nothing on stderr (no task traceback)
    assert result.stderr == ""
    assert [e.data["heard"] for e in relay.events if e.kind == "barge_in"] == [
        only(events, "interrupted")[0]["heard"]
    ]


def test_the_agent_ending_the_call_ends_the_driver_with_stdin_still_open(
    relay_factory, fake_llm, tmp_path
):
    relay = relay_factory(handoff_number="+15550100999")
    fake_llm.enqueue(
        Script(
            tokens=["Transferring", " you."],
            tool_calls=[ToolCallSpec("transfer_to_human", '{"reason": "billing"}')],
        )
    )
    live = Live(relay, tmp_path)
    try:
        live.until("greeting")
        live.send({"say": "a person please"})
        handoff = live.until("handoff")
        assert handoff["fields"]["reasonCode"] == "live-agent-handoff"
        assert handoff["fields"]["reason"] == "billing"
        assert json.loads(live.until("end")["handoff_data"]) == handoff["fields"]
        closed = live.until("closed")
        assert closed["status"] == "ended" and "dials" in closed["action"]
        assert live.proc.wait(30) == 0  # stdin is still open: the end of the call ends it
    finally:
        live.close()
    assert "reply" in names(live.seen)


def test_the_agents_keys_and_language_switch_are_events(relay, fake_llm, tmp_path):
    fake_llm.enqueue(
        Script(tool_calls=[ToolCallSpec("send_dtmf", '{"digits": "12#"}')]),
        Script(tokens=["Done", "."]),
        Script(tool_calls=[ToolCallSpec("switch_language", '{"language": "es-ES"}')]),
        Script(tokens=["Hola", "."]),
    )
    result = drive(relay, tmp_path, [{"say": "press one two pound"}, {"say": "en español"}])
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    assert only(events, "dtmf") == [{"event": "dtmf", "digits": "12#"}]
    assert only(events, "language") == [
        {"event": "language", "tts_language": "es-ES", "transcription_language": "es-ES"}
    ]
    texts = [r["text"] for r in only(events, "reply")]
    assert texts == ["Done.", "Hola."]
    assert only(events, "reply")[0]["digits"] == ["12#"]


def test_wait_reports_what_the_agent_says_on_its_own(relay_factory, tmp_path):
    relay = relay_factory(agent="echo", agent_silence_timeout=0.2)
    result = drive(relay, tmp_path, [{"wait": 1.0}, {"hangup": True}])
    assert result.returncode == 0, result.stderr
    events = parsed(result.stdout)
    unsolicited = [r for r in only(events, "reply") if not r["solicited"]]
    assert unsolicited and unsolicited[0]["text"] == "Are you still there?"
    assert unsolicited[0]["first_token_ms"] is None


def test_json_and_script_together_is_one_error_line(relay, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("- say: hi\n")
    result = subprocess.run(
        [*argv(relay), "--script", str(path)],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        cwd=REPO,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "error: --json drives the call from stdin; --script plays a file: pick one\n"
    )


# ---------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ('{"say": "hi"}', ("say", "hi")),
        ('{"dtmf": 12}', ("dtmf", "12")),
        ('{"interrupt": true}', ("interrupt", True)),
        ('{"hangup": true}', ("hangup", True)),
        ('{"wait": 0}', ("wait", 0)),
    ],
)
def test_commands_parse(line, command):
    parsed_command = parse_command(line)
    assert (parsed_command.name, parsed_command.value) == command


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"wait": -1}', "wait: got -1; expected a number of seconds, 0 or more"),
        ('{"hangup": false}', "hangup: got false; expected true"),
        ("[1]", "got [1]; expected one JSON object a line"),
    ],
)
def test_bad_commands_say_what_is_expected(line, message):
    with pytest.raises(CommandError) as caught:
        parse_command(line)
    assert str(caught.value).startswith(message)
