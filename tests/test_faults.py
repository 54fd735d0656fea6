"""Fault steps of ``crctl call --script`` (and so ``crctl test``) against the real relay.

Each step runs through the real CLI, the relay on 127.0.0.1 with the fake LLM over HTTP: a
dropped socket and Twilio's ``/action`` 64105 reconnect, silence, a malformed frame, partial
prompts, a noisy transcript, and a hang-up mid-reply.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from crctl.call_faults import NOISE_TRANSCRIPTS, Noise, noisy
from crctl.call_script import parse_turns, run_script
from crctl.caller import SimulatedCaller
from crctl.caller.speaker import Timing
from crctl.cli import app as cli
from fakes.fake_llm import Script
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer

_CLEAN_ENV = {"TWILIO_AUTH_TOKEN": None, "CRCTL_PUBLIC_URL": None}
API_TOKEN = "api-token-for-tests"


def run(relay: RelayServer, tmp_path: Path, text: str, *extra: str) -> Result:
    """``crctl call --script`` of ``text`` against ``relay``, signed as Twilio signs."""
    path = tmp_path / "faults.yaml"
    path.write_text(text)
    argv = ["call", relay.base_url, "--auth-token", AUTH_TOKEN, "--public-url", PUBLIC_URL]
    argv += ["--script", str(path), *extra]
    if "--time-scale" not in extra:
        argv += ["--time-scale", "0"]
    return CliRunner().invoke(cli, argv, env=_CLEAN_ENV)


def events(relay: RelayServer, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in list(relay.events) if e.kind == kind]


def user_messages(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "user"]


# ----------------------------------------------------------------------------- drop_socket


def test_a_dropped_socket_reconnects_through_action_and_the_conversation_goes_on(
    relay, fake_llm, tmp_path
):
    result = run(
        relay,
        tmp_path,
        "- say: my name is Ada\n  expect: {contains: my name is ada}\n"
        "- drop_socket: true\n"
        "- say: what is my name\n  expect: {contains: what is my name}\n",
    )
    assert result.exit_code == 0, result.output
    assert "turn 2 pass  drop_socket → Sorry, we were cut off. Where were we?" in result.output
    assert "3 of 3 turns passed" in result.output
    # Twilio's side of it: the session failed with 64105, then a new one of the same call
    first, second = events(relay, "session.end")
    assert (first["status"], first["error_code"]) == ("failed", "64105")
    assert second["status"] == "completed"
    started = events(relay, "call.started")
    assert [s["resumed"] for s in started] == [False, True]
    assert started[0]["session_id"] != started[1]["session_id"]
    assert len({e.call_sid for e in relay.events}) == 1
    # no close frame: the server reports "no status" (1005) or "abnormal" (1006), never 1000
    assert events(relay, "socket.closed")[0]["code"] in (1005, 1006)
    # the relay kept the conversation: the model sees the turn before the drop
    assert user_messages(fake_llm.records[-1].body) == ["my name is Ada", "what is my name"]


def test_a_drop_the_relay_does_not_take_back_fails_the_step(relay_factory, tmp_path):
    relay = relay_factory(max_reconnects=0)
    result = run(relay, tmp_path, "- say: hi\n- drop_socket: true\n- say: are you there\n")
    assert result.exit_code == 1
    assert "turn 2 FAIL  drop_socket → (no reply): the call did not come back after the " in (
        result.output
    )
    assert "/action answered: says" in result.output and "hangs up" in result.output
    assert "turn 3 FAIL" in result.output and "not played: the call was over" in result.output


# --------------------------------------------------------------------------------- silence


def test_silence_records_the_agents_reminder_for_expect(relay_factory, tmp_path):
    relay = relay_factory(agent_silence_timeout=0.3, agent_silence_max_reminders=10)
    result = run(
        relay,
        tmp_path,
        "- say: hello\n- silence: 1\n  expect: {contains: are you still there}\n",
        # the caller's clock is scaled to nothing; the silence is not: it is the agent's
    )
    assert result.exit_code == 0, result.output
    assert "turn 2 pass  silence 1 s → Are you still there?" in result.output
    assert [e["text"] for e in events(relay, "caller.speech")] == ["hello"]  # nothing said


def test_silence_with_reply_none_fails_naming_the_reminder(relay_factory, tmp_path):
    relay = relay_factory(agent_silence_timeout=0.3)
    result = run(
        relay,
        tmp_path,
        "- say: hello\n- silence: 1\n  expect: {reply: none}\n",
    )
    assert result.exit_code == 1
    assert (
        "expected no reply during 1 s of silence (reply: none), but the agent said 'Are you "
        "still there?'" in result.output
    )


def test_silence_the_agent_ignores_fails_an_expectation(relay, tmp_path):
    # silence reminders off (the tests' relay): nothing comes
    result = run(relay, tmp_path, "- silence: 1\n  expect: {contains: still there}\n")
    assert result.exit_code == 1
    assert "the agent said nothing during 1 s of silence" in result.output


# ------------------------------------------------------------------------------- bad_frame


@pytest.mark.parametrize("frame", ["true", "'not json at all'", '\'{"type": "prompt"}\''])
def test_a_bad_frame_is_survived_and_the_next_turn_answered(relay, tmp_path, frame):
    result = run(
        relay,
        tmp_path,
        f"- bad_frame: {frame}\n- say: still here\n  expect: {{contains: still here}}\n",
    )
    assert result.exit_code == 0, result.output
    assert "2 of 2 turns passed" in result.output
    assert len(events(relay, "frame.bad")) == 1
    assert events(relay, "session.end")[0]["status"] == "completed"


# -------------------------------------------------------------------------------- partials


def test_partials_on_a_turn_send_interim_prompts_before_the_final(relay, tmp_path):
    result = run(
        relay,
        tmp_path,
        "- say: one two three\n  partials: true\n  expect: {contains: one two three}\n"
        "- say: four\n",
    )
    assert result.exit_code == 0, result.output
    speech = [(e["text"], e["last"]) for e in events(relay, "caller.speech")]
    assert speech == [
        ("one", False),
        ("one two", False),
        ("one two three", False),
        ("one two three", True),
        ("four", True),  # only the turn that asked for partials has them
    ]


# ----------------------------------------------------------------------------------- noise


def test_a_noisy_transcript_reaches_the_agent_as_twilio_sends_it(relay, fake_llm, tmp_path):
    said = "please book the table for two people tonight"
    result = run(
        relay,
        tmp_path,
        f"- say: {said}\n  noise: {{confidence: 0.3, garble: true}}\n"
        "- noise: true\n"
        "- say: table for two\n  noise: {confidence: 1}\n  expect: {contains: table for two}\n",
    )
    assert result.exit_code == 0, result.output
    assert f"turn 1 pass  {said!r} heard as " in result.output  # the transcript sent
    heard = [e["text"] for e in events(relay, "caller.speech")]
    assert heard[0] == noisy(said, Noise(0.3, True), 1)
    assert heard[0] != said and len(heard[0].split()) == len(said.split())
    kept = [a == b for a, b in zip(heard[0].split(), said.split(), strict=True)]
    assert sum(kept) == 2  # 30% of 7 words heard right, the rest misheard
    assert heard[1] in NOISE_TRANSCRIPTS  # background noise alone
    assert heard[2] == "table for two"  # confidence 1: every word
    # the prompt frame has Twilio's fields only: no confidence on the wire
    assert user_messages(fake_llm.records[0].body) == [heard[0]]


def test_noise_is_deterministic_and_lost_words_are_dropped():
    text = "please call me back tomorrow morning"
    assert noisy(text, Noise(0.5, True), 3) == noisy(text, Noise(0.5, True), 3)
    lost = noisy(text, Noise(0.5, False), 3)
    assert len(lost.split()) == 3 and all(w in text.split() for w in lost.split())
    assert noisy(text, Noise(0.0, False)) in NOISE_TRANSCRIPTS  # nothing left: noise
    assert noisy("bed", Noise(0.0, True)) == "ped"


# ---------------------------------------------------------------------------------- hangup


async def _stored_call(relay: RelayServer, call_sid: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with httpx.AsyncClient(base_url=relay.base_url, headers=headers) as http:
        for _ in range(200):
            found = await http.get(f"/calls/{call_sid}")
            if found.status_code == 200 and found.json().get("status") == "completed":
                return dict(found.json())
            await asyncio.sleep(0.05)
    return dict(found.json())


def test_a_hangup_mid_reply_is_stored_as_the_callers_and_the_relay_survives(
    relay_factory, fake_llm, tmp_path
):
    relay = relay_factory(api_token=API_TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    story = ["Once", " upon", " a", " time", " there", " was", " a", " long", " story."]
    fake_llm.enqueue(Script(tokens=story, delay=0.1))
    result = run(
        relay,
        tmp_path,
        "- say: tell me a story\n  hangup: {after_words: 3}\n- say: never said\n",
    )
    assert result.exit_code == 1  # turn 2 was not played: the call was over
    assert "turn 1 pass  'tell me a story' (hangup after 3 words) → Once upon a" in result.output
    assert "not played: the call was over after turn 1" in result.output
    assert 'call: the caller hung up (close 1000 "Closing websocket session")' in result.output
    (end,) = events(relay, "session.end")
    assert end["status"] == "completed"
    (reply,) = events(relay, "agent.reply")
    assert reply["cancelled"] is True and reply["text"].startswith("Once upon a")
    assert "story." not in reply["text"]
    call_sid = next(e.call_sid for e in relay.events if e.kind == "session.end")
    stored = asyncio.run(_stored_call(relay, call_sid))
    assert stored["status"] == "completed" and stored["ended"]
    # the relay goes on: the next call is answered
    again = run(relay, tmp_path, "- say: hello again\n  expect: {contains: hello again}\n")
    assert again.exit_code == 0, again.output


def test_hangup_now_and_a_reply_too_short_to_cut(relay, fake_llm, tmp_path):
    result = run(relay, tmp_path, "- say: hi\n- hangup: true\n")
    assert result.exit_code == 0, result.output
    assert "turn 2 pass  hangup" in result.output
    fake_llm.enqueue(Script(tokens=["Hi", "."]))
    short = run(relay, tmp_path, "- say: hi\n  hangup: {after_words: 5}\n")
    assert short.exit_code == 1
    assert "no hang-up mid-reply: the reply ended after 1 words, before hangup after_words: 5" in (
        short.output
    )


# ------------------------------------------------------------------------ in run_script


async def test_fault_steps_play_through_run_script_on_a_timed_caller(relay_factory):
    """The seam ``crctl test`` uses: fault turns in ``run_script`` with speaker timing on."""
    relay = relay_factory(agent_silence_timeout=0.2, agent_silence_max_reminders=10)
    caller = SimulatedCaller(
        relay.base_url,
        auth_token=AUTH_TOKEN,
        public_url=PUBLIC_URL,
        timeout=5,
        timing=Timing(time_scale=0.05),
    )
    await caller.connect(await caller.fetch())
    turns = parse_turns(
        [
            {"say": "first", "partials": True, "expect": {"contains": "first"}},
            {"bad_frame": True},
            {"drop_socket": True},
            {"silence": 1, "expect": {"contains": "still there"}},
            {"say": "second", "noise": {"confidence": 1}, "expect": {"contains": "second"}},
            {"say": "third", "noise": {"confidence": 1}, "hangup": {"after_words": 1}},
        ]
    )
    results = await run_script(caller, turns, 5)
    assert [r.reasons for r in results] == [[]] * 6
    assert caller.outcome is not None and caller.outcome.status == "completed"
    assert [o.error_code for o in caller.earlier] == ["64105"]


def test_the_readmes_fault_example_is_a_valid_script():
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Fault steps", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    turns = parse_turns(yaml.safe_load(block), "README.md")
    assert [t.fault for t in turns] == [
        None,
        "drop_socket",
        None,
        "silence",
        "bad_frame",
        "partials",
        "hangup",
    ]
    assert turns[5].noise == Noise(0.3, True)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "- drop_socket: false\n",
            "turn 1: drop_socket: got False; expected true (the WebSocket drops, then Twilio's "
            "/action 64105 reconnect)",
        ),
        (
            "- silence: 0\n",
            "turn 1: silence: got 0 (too small); expected a positive number of seconds (the "
            "caller says nothing that long)",
        ),
        (
            "- say: hi\n  drop_socket: true\n",
            "turn 1: drop_socket: got True (together with say); expected drop_socket as a turn "
            "of its own (- drop_socket: …)",
        ),
        (
            "- dtmf: '1'\n  partials: true\n",
            "turn 1: partials: got '1' (on a dtmf turn); expected true, on a say turn (interim "
            "prompt frames before the final)",
        ),
        (
            "- say: hi\n  noise: {confidense: 0.2}\n",
            "turn 1: noise.confidense: got 0.2 (unknown key, did you mean 'confidence'?); "
            "expected noise takes confidence, garble",
        ),
        (
            "- say: hi\n  noise: {confidence: 2}\n",
            "turn 1: noise.confidence: got 2 (out of range); expected a number from 0 to 1 (the "
            "share of words heard right; default 0.5)",
        ),
        (
            "- hangup: {after_words: 2}\n",
            "turn 1: hangup: got {'after_words': 2} (without say or dtmf); expected true (hang "
            "up now), or on a say or dtmf turn {after_words: N} (hang up mid-reply)",
        ),
        (
            "- say: hi\n  hangup: {after_words: 0}\n",
            "turn 1: hangup.after_words: got 0 (too small); expected a whole number of at least "
            "1 (words of the reply before hanging up)",
        ),
        (
            "- bad_frame: true\n  expect: {contains: x}\n",
            "turn 1: expect: got ['contains'] (on a bad_frame step, which has no reply to "
            "check); expected expect only on say, dtmf, silence and noise turns (check the next "
            "turn)",
        ),
        (
            "- drop_sockets: true\n",
            "turn 1: unknown key 'drop_sockets' (value True), did you mean 'drop_socket'? a "
            "turn takes say, dtmf, interrupt_after_words, expect, drop_socket, silence, "
            "bad_frame, partials, noise, hangup",
        ),
    ],
)
def test_a_bad_fault_step_is_one_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = ["call", "http://127.0.0.1:9", "--script", str(path)]
    result = CliRunner().invoke(cli, argv, env=_CLEAN_ENV)
    assert result.exit_code == 2
    assert result.output == f"error: {path}: {line}\n"
