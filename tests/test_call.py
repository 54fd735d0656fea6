"""``crctl call``: the simulated Twilio caller against the real relay, scripted and interactive.

A recording server captures the exact frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import Result
from rich.console import Console
from typer.testing import CliRunner
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from crctl.call import LivePrinter
from crctl.call_script import Turn, TurnResult, _check_handoff, report
from crctl.caller import CallError, CallPlan, Outcome, Reply, SimulatedCaller
from crctl.caller.outcome import Closed
from crctl.cli import app as cli
from crctl.console import crctl_command
from fakes.fake_llm import Script, ToolCallSpec
from relay_server.protocol import (
    Dtmf,
    End,
    Error,
    Inbound,
    Info,
    Interrupt,
    Prompt,
    Setup,
    Unknown,
    decode,
    text_frame,
)
from relay_server.protocol.handoff import encode_handoff, parse_handoff
from relay_server.protocol.replies import (
    DigitsSent,
    Dropped,
    Ended,
    Greeting,
    Interrupted,
    Invalid,
    LanguageSwitched,
    Played,
    ReplyDone,
    TokenHeard,
)
from relay_server.security import SignatureChecker
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer, config, free_port

EXAMPLE = Path(__file__).parent.parent / "crctl" / "examples" / "conversation.yaml"
_CLEAN_ENV = {"TWILIO_AUTH_TOKEN": None, "CRCTL_PUBLIC_URL": None}


def run(*args: str, input: str | None = None) -> Result:
    """``crctl call ARGS`` through the real CLI (its root group says errors, once).

    ``--time-scale 0``: Twilio's speaker frames in order, without the real-time waits.
    """
    argv = ["call", *args, "--time-scale", "0"]
    return CliRunner().invoke(cli, argv, input=input, env=_CLEAN_ENV)


def signed(relay: RelayServer) -> list[str]:
    """Sign like Twilio calling the relay's public URL, while connecting locally."""
    return [relay.base_url, "--auth-token", AUTH_TOKEN, "--public-url", PUBLIC_URL]


def script(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conversation.yaml"
    path.write_text(text)
    return str(path)


def events(relay: RelayServer, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in list(relay.events) if e.kind == kind]


# ------------------------------------------------------------------------ scripted calls


def test_the_sample_script_passes_against_the_echo_agent(relay_factory):
    relay = relay_factory(agent="echo")
    result = run(*signed(relay), "--script", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert "via ws://127.0.0.1:" in result.output  # the TwiML names wss://relay.example.test/ws
    assert "4 of 4 turns passed" in result.output
    assert "turn 3 pass" in result.output and "[barged in]" in result.output
    # the latency of a turn has one name: first token
    assert re.search(
        r"turn 1 pass .*You said: Hello.*  first token \d+ ms  caller wait \d+ ms\n", result.output
    )
    started = events(relay, "call.started")[0]
    assert (started["from"], started["to"], started["direction"]) == (
        "+15550100001",
        "+15550100002",
        "inbound",
    )
    # The barge-in said what the caller heard: the first four words of the reply.
    assert [e["heard"] for e in events(relay, "barge_in")] == ["You said: Tell me"]
    # Hang-up, then the signed <Connect action> callback the relay accepted.
    assert events(relay, "session.end")[0]["status"] == "completed"
    assert 'call: the caller hung up (close 1000 "Closing websocket session")' in result.output


def test_setup_has_the_twiml_parameters_and_partials_are_cumulative(relay_factory, tmp_path):
    template = tmp_path / "with-params.toml"
    template.write_text('extends = "basic"\n[parameters]\ncustomerId = "42"\n')
    relay = relay_factory(agent="echo", twiml_template=str(template))
    path = script(tmp_path, "- say: check my order\n  expect: {contains: check my order}\n")
    result = run(*signed(relay), "--script", path, "--partials")
    assert result.exit_code == 0, result.output
    started = events(relay, "call.started")[0]
    assert started["custom_parameters"] == {"customerId": "42"}
    assert re.fullmatch(r"VX[0-9a-f]{32}", started["session_id"])
    speech = [(e["text"], e["last"]) for e in events(relay, "caller.speech")]
    assert speech == [
        ("check", False),
        ("check my", False),
        ("check my order", False),
        ("check my order", True),  # the final repeats the last partial
    ]


def test_a_failing_script_exits_nonzero_and_says_why(relay_factory, tmp_path):
    relay = relay_factory(agent="echo")
    path = script(
        tmp_path,
        "- say: hello\n  expect: {contains: goodbye}\n"
        "- say: again\n  expect: {matches: '^Nope', max_first_token_ms: 5000}\n",
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 1
    assert "turn 1 FAIL  'hello' → You said: hello" in result.output
    assert "reply does not contain 'goodbye'" in result.output
    assert "reply does not match /^Nope/" in result.output
    assert "0 of 2 turns passed" in result.output


def test_a_barge_in_leaves_only_the_heard_words_in_the_relays_history(relay, fake_llm, tmp_path):
    story = ["Once", " upon", " a", " time", " there", " was", " a", " long", " story."]
    fake_llm.enqueue(Script(tokens=story, delay=0.05), Script(tokens=["Okay", "."]))
    path = script(
        tmp_path,
        "- say: tell me a story\n  interrupt_after_words: 3\n"
        "- say: stop\n  expect: {contains: okay}\n",
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 0, result.output
    assert [e["heard"] for e in events(relay, "barge_in")] == ["Once upon a"]
    assert isinstance(events(relay, "barge_in")[0]["duration_ms"], int)
    messages = fake_llm.records[1].body["messages"]
    assert messages[-3:] == [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "Once upon a"},
        {"role": "user", "content": "stop"},
    ]


def test_a_preemptible_filler_does_not_end_the_reply(relay_factory, fake_llm, tmp_path):
    relay = relay_factory(agent_filler_after_ms=100)
    fake_llm.enqueue(Script(tokens=["Here", " it", " is."], ttft=0.5))
    path = script(
        tmp_path, "- say: hi\n  expect: {contains: here it is, max_first_token_ms: 400}\n"
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 0, result.output
    assert "One moment.Here it is." in result.output


def test_end_call_and_handoff_are_checked_and_reported(relay_factory, fake_llm, tmp_path):
    relay = relay_factory(handoff_number="+15550100999")
    fake_llm.enqueue(
        Script(tokens=["Goodbye", "!"], tool_calls=[ToolCallSpec("end_call", '{"reason": "x"}')])
    )
    path = script(tmp_path, "- say: bye\n  expect: {contains: goodbye, ends_call: true}\n")
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 0, result.output
    assert "the agent ended the call (end)" in result.output
    assert events(relay, "session.end")[0]["status"] == "ended"

    fake_llm.enqueue(
        Script(
            tokens=["Transferring", " you."],
            tool_calls=[ToolCallSpec("transfer_to_human", '{"reason": "billing dispute"}')],
        )
    )
    path = script(
        tmp_path,
        "- say: I want a person\n  expect: {handoff: {reason: billing}, ends_call: true}\n"
        "- say: hello?\n",
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 1
    assert "turn 1 pass" in result.output
    assert "turn 2 FAIL" in result.output and "the call was over after turn 1" in result.output
    assert '"reasonCode": "live-agent-handoff"' in result.output
    assert "/action → dials +15550100999" in result.output
    end = events(relay, "session.end")[1]
    assert end["status"] == "ended" and parse_handoff(end["handoff_data"]).fields["reason"] == (
        "billing dispute"
    )


@pytest.mark.parametrize(
    ("wanted", "reasons"),
    [
        (True, []),
        ("billing", []),
        ({"reason": "BILLING", "reasonCode": "live-agent-handoff"}, []),
        ({"reason": "refund"}, ["handoffData reason is 'billing dispute', expected 'refund'"]),
        ({"queue": "vip"}, ["handoffData has no 'queue'"]),
        (False, ["unexpected hand-off"]),
    ],
)
def test_handoff_expectations(wanted, reasons):
    data = encode_handoff({"reasonCode": "live-agent-handoff", "reason": "billing dispute"})
    got = _check_handoff(wanted, End(handoff_data=data))
    assert len(got) == len(reasons)
    assert all(got[i].startswith(reason) for i, reason in enumerate(reasons))
    assert _check_handoff(True, None) == ["no hand-off: the agent did not end the call"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("billing dispute", "handoffData is not JSON: billing dispute"),
        ('["billing"]', 'handoffData is not a JSON object: ["billing"]'),
        ('"billing"', 'handoffData is not a JSON object: "billing"'),
    ],
)
def test_a_handoff_expected_as_an_object_needs_a_json_object(data, reason):
    assert _check_handoff({"reason": "billing"}, End(handoff_data=data)) == [reason]


# ------------------------------------------------------------------------------- failures


def test_a_wrong_auth_token_is_refused_in_one_line(relay):
    result = run(relay.base_url, "--auth-token", "wrong", "--public-url", PUBLIC_URL)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "refused POST" in lines[0] and "HTTP 403" in lines[0]
    assert f"over {PUBLIC_URL}/twiml did not match" in lines[0]


async def test_a_refused_websocket_handshake_is_one_error(relay):
    caller = SimulatedCaller(relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    plan = await caller.fetch()
    query = urlsplit(plan.ws_url).query  # the call's one-time socket URL, followed as is
    assert plan.ws_url == f"wss://relay.example.test/ws?{query}"
    assert plan.connect_url == f"{relay.ws_url}?{query}"
    # Signed over a URL the relay is not published at: it refuses the upgrade.
    with pytest.raises(CallError, match=r"refused the WebSocket .* \(HTTP 403\)"):
        await caller.connect(replace(plan, ws_url="wss://elsewhere.example.test/ws"))


async def test_a_local_relay_is_reached_past_the_environments_proxy(relay, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # a proxy that answers nothing
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, dead)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    caller = SimulatedCaller(relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    plan = await caller.fetch()  # went direct: through the dead proxy it could not have
    assert plan.connect_url.startswith(relay.ws_url)


def test_an_unreachable_relay_is_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env here
    url = f"http://127.0.0.1:{free_port()}"
    result = run(url, "--timeout", "2")
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: cannot reach {url}/twiml: connection refused; is the relay running? "
        f"`{crctl_command()} up --no-tunnel --port {url.rsplit(':', 1)[1]}` starts one"
    )
    tls = run(url.replace("http:", "https:"), "--timeout", "2")  # not one `crctl up` starts
    assert tls.exit_code == 1 and "cannot reach" in tls.output
    assert "is the relay running" not in tls.output


ONE_OF = (
    "expected exactly one of say: (what the caller says) or dtmf: (keys to press), or a fault "
    "step (drop_socket, silence, bad_frame, noise, hangup)"
)
TURN_KEYS = (
    "a turn takes say, dtmf, interrupt_after_words, expect, drop_socket, silence, bad_frame, "
    "partials, noise, hangup"
)
EXPECT_KEYS = (
    "expect takes contains, matches, max_first_token_ms, max_caller_wait_ms, ends_call, handoff, "
    "reply, settle_ms, judge, tool_called, language, dtmf_sent"
)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (
            "- say: hi\n- say: there\n  dtmf: '1'\n",
            f"turn 2: say/dtmf: got both, say 'there' and dtmf '1'; {ONE_OF}",
        ),
        ("- say: hi\n- expect: {contains: x}\n", f"turn 2: say/dtmf: got neither; {ONE_OF}"),
        (
            "- say: hi\n- sya: typo\n",
            f"turn 2: unknown key 'sya' (value 'typo'), did you mean 'say'? {TURN_KEYS}",
        ),
        (
            "- say: hi\n  expect: {contain: hi}\n",
            "turn 1: unknown key 'expect.contain' (value 'hi'), did you mean 'contains'? "
            + EXPECT_KEYS,
        ),
        (  # an expect key beside expect:
            "- say: hi\n  max_first_token_ms: 900\n",
            "turn 1: unknown key 'max_first_token_ms' (value 900), did you mean "
            f"'max_first_token_ms' under expect: (expect: {{max_first_token_ms: …}})? {TURN_KEYS}",
        ),
        ("- say: hi\n  zzz: 1\n", f"turn 1: unknown key 'zzz' (value 1); {TURN_KEYS}"),
        (
            "- say: hi\n  expect: {matches: '('}\n",
            "turn 1: expect.matches: got '(' (not a valid regular expression (missing ), "
            "unterminated subpattern at position 0)); expected a Python regular expression, "
            "as text",
        ),
        (
            "- say: hi\n  expect: {max_first_token_ms: fast}\n",
            "turn 1: expect.max_first_token_ms: got 'fast'; expected a positive number of "
            "milliseconds",
        ),
        (
            "- say: hi\n  expect: {max_first_token_ms: 0}\n",
            "turn 1: expect.max_first_token_ms: got 0 (too small); expected a positive number "
            "of milliseconds",
        ),
        (
            "- say: hi\n  expect: {contains: []}\n",
            "turn 1: expect.contains: got []; expected text or a non-empty list of texts (each "
            "must be in the reply)",
        ),
        (
            "- say: hi\n  expect: {ends_call: }\n",
            "turn 1: expect.ends_call: got None (an empty value); expected true or false",
        ),
        (
            "- say: hi\n  expect: {handoff: 3}\n",
            "turn 1: expect.handoff: got 3; expected true, false, text in handoffData, or a "
            "mapping of handoffData keys",
        ),
        (
            "- dtmf: '12a'\n",
            "turn 1: dtmf: got '12a'; expected keys 0-9, * and # (quote them: dtmf: \"1#\")",
        ),
        (
            "- say: hi\n  interrupt_after_words: 0\n",
            "turn 1: interrupt_after_words: got 0 (too small); expected a whole number of at "
            "least 1 (barge in after that many words)",
        ),
        (
            "- say: hi\n  interrupt_after_words: '3'\n",
            "turn 1: interrupt_after_words: got '3'; expected a whole number of at least 1 "
            "(barge in after that many words)",
        ),
        (
            "- say: hi\n  expect: {reply: no}\n",
            "turn 1: expect.reply: got False (YAML reads an unquoted no, off or false as false); "
            "expected none (the agent must not answer this turn)",
        ),
        (
            "- say: hi\n  expect: {reply: none, contains: hi}\n",
            "turn 1: expect.reply: got 'none' (together with contains, which check a reply that "
            "must not come); expected reply: none alone, or checks of a reply without reply: none",
        ),
        (
            "- say: hi\n  expect: {settle_ms: 500}\n",
            "turn 1: expect.settle_ms: got 500.0 (without reply: none); expected a positive "
            "number of milliseconds (default 1000), only with reply: none",
        ),
        (
            "- say: hi\n  interrupt_after_words: 2\n  expect: {reply: none}\n",
            "turn 1: interrupt_after_words: got 2 (on a turn whose expect has reply: none, so "
            "there is nothing to barge in on); expected no interrupt_after_words with reply: none",
        ),
        ("- hi\n", "turn 1: the turn: got 'hi'; expected a mapping with say: or dtmf:"),
        (
            "- say: hi\n  expect: [contains]\n",
            "turn 1: expect: got ['contains']; expected a mapping of contains, matches, "
            "max_first_token_ms, max_caller_wait_ms, ends_call, handoff, reply, settle_ms, "
            "judge, tool_called, language, dtmf_sent",
        ),
        (
            "say: hi\n",
            "a script is a non-empty YAML list of turns (- say: … / - dtmf: …), got {'say': 'hi'}",
        ),
        (
            "- say: [unclosed\n",
            "not valid YAML (line 2): expected ',' or ']', but got '<stream end>'",
        ),
    ],
)
def test_a_malformed_script_is_one_line_naming_turn_key_value_and_what_is_allowed(
    tmp_path, text, line
):
    path = script(tmp_path, text)
    result = run("http://127.0.0.1:9", "--script", path)
    assert result.exit_code == 2
    assert result.output == f"error: {path}: {line}\n"


def test_a_missing_script_says_how_to_get_the_example(tmp_path):
    result = run("http://127.0.0.1:9", "--script", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {tmp_path / 'nope.yaml'}: cannot read the script: No such")
    assert "call --script example` plays the shipped example" in lines[0]
    assert "call --example > my-agent.yaml` copies it to edit" in lines[0]


# ---------------------------------------------------------------------------- interactive


def test_interactive_mode_from_stdin(relay_factory):
    relay = relay_factory(agent="echo")
    result = run(*signed(relay), input="hello there\n/dtmf 7\n/what\n/hangup\nnot sent\n")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "agent: Hello! How can I help you today? (welcome greeting)" in out
    assert "agent: You said: hello there  first token" in out
    assert "agent: You said: [The caller pressed 7 on the keypad]" in out
    assert "/dtmf 1 presses keys" in out  # /what: the help
    assert 'call over: the caller hung up (close 1000 "Closing websocket session")' in out
    assert [e["text"] for e in events(relay, "caller.speech")] == ["hello there"]
    assert events(relay, "session.end")[0]["status"] == "completed"


# ------------------------------------------------------------- the frames, byte for byte

BASIC = {
    "welcomeGreeting": "Hi!",
    "interruptible": "any",
    "dtmfDetection": "true",
    "events": "speaker-events tokens-played",
}


class Recorder:
    """A WebSocket server that records what the caller sends and answers like the relay."""

    def __init__(self, behaviour: Callable[[ServerConnection, Inbound | Unknown], Any]) -> None:
        self.behaviour = behaviour
        #: What the caller sent, as the relay decodes it.
        self.frames: list[Inbound | Unknown] = []
        #: The same frames as the JSON objects sent (for the checks on the wire itself).
        self.wire: list[dict[str, Any]] = []
        self.request: Any = None
        self.close: tuple[int | None, str | None] = (None, None)

    async def __call__(self, ws: ServerConnection) -> None:
        self.request = ws.request
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                # Decoded as the relay decodes it: a frame the relay would refuse fails the test.
                message = decode(raw)
                # Also the raw JSON object, on purpose: "byte for byte" checks are about the wire
                # itself (key order, an int where Twilio sends one), which a decoded value hides.
                self.wire.append(json.loads(raw))
                self.frames.append(message)
                await self.behaviour(ws, message)
        self.close = (ws.close_code, ws.close_reason)

    def shorts(self, start: int = 1) -> list[tuple[Any, ...]]:
        """The frames from ``start`` on, in short (see :func:`short`)."""
        return [
            short(message, wire)
            for message, wire in zip(self.frames[start:], self.wire[start:], strict=True)
        ]


def short(message: Inbound | Unknown, wire: dict[str, Any]) -> tuple[Any, ...]:
    """``message`` in short, after the checks on its wire form."""
    if isinstance(message, Info):
        assert isinstance(wire["value"], str)  # a string on the wire, as Twilio sends it
        return ("info", message.name, message.value)
    if isinstance(message, Prompt):
        assert list(wire) == ["type", "voicePrompt", "lang", "last"]
        return ("prompt", message.voice_prompt, message.last)
    if isinstance(message, Interrupt):
        assert isinstance(wire["durationUntilInterruptMs"], int)
        return ("interrupt", message.utterance_until_interrupt)
    if isinstance(message, Dtmf):
        return ("dtmf", message.digit)
    if isinstance(message, Error):
        return ("error", message.description)
    return (wire["type"],)


async def test_frames_and_handshake_are_twilios():
    answering: list[asyncio.Task[None]] = []

    async def behaviour(ws: ServerConnection, frame: Inbound | Unknown) -> None:
        async def answer() -> None:
            for token in ["Let", " me", " check", " that", " for", " you."]:
                await ws.send(text_frame(token, False))
                await asyncio.sleep(0.03)
            await ws.send(text_frame("", True))

        if isinstance(frame, Prompt) and frame.last:
            answering.append(asyncio.create_task(answer()))
        elif isinstance(frame, Interrupt):  # as the relay does: stop, close the cycle
            answering.pop().cancel()
            await ws.send(text_frame("", True))
        elif isinstance(frame, Dtmf):
            await ws.send("not json")  # raw on purpose: the frame Twilio answers with 64107
            await ws.send(text_frame("Pressed.", True))

    recorder = Recorder(behaviour)
    async with serve(recorder, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        plan = CallPlan(
            ws_url="wss://relay.example.test/ws?tenant=7",
            connect_url=f"ws://127.0.0.1:{port}/ws?tenant=7",
            attributes=BASIC,
            parameters={"customerId": "42"},
        )
        caller = SimulatedCaller(auth_token=AUTH_TOKEN, partials=True, partial_gap=0.01)
        await caller.connect(plan)
        first = await caller.say("is my order here", interrupt_after_words=3)
        assert first is not None
        assert await caller.finished(first, 5)
        second = await caller.dtmf("1")
        assert await caller.finished(second, 5)
        outcome = await caller.hangup()

    assert first.interrupted and first.text == "Let me check"
    assert second.text == "Pressed." and second.first_token_ms is not None
    headers = recorder.request.headers
    assert recorder.request.path == "/ws?tenant=7"
    assert headers["User-Agent"] == "Jetty/11.0.24"
    assert headers["Accept-Encoding"] == "gzip"
    assert "Sec-WebSocket-Protocol" not in headers  # no subprotocol
    assert "Sec-WebSocket-Extensions" not in headers  # no permessage-deflate
    signature = headers["X-Twilio-Signature"]
    assert SignatureChecker(AUTH_TOKEN).websocket_ok(plan.ws_url, signature)
    assert headers["x-amzn-bedrock-agentcore-runtime-custom-twilio-signature"] == signature

    setup = recorder.frames[0]
    assert isinstance(setup, Setup)
    assert list(recorder.wire[0]) == [
        "type", "sessionId", "callSid", "parentCallSid", "from", "to", "forwardedFrom",
        "callerName", "direction", "callType", "callStatus", "accountSid", "customParameters",
    ]  # fmt: skip
    assert re.fullmatch(r"VX[0-9a-f]{32}", setup.session_id)
    assert re.fullmatch(r"CA[0-9a-f]{32}", setup.call_sid)
    assert re.fullmatch(r"AC[0-9a-f]{32}", setup.account_sid)
    assert (setup.parent_call_sid, setup.caller_name, setup.forwarded_from) == (
        "",
        "",
        "+15550100002",
    )
    assert (setup.direction, setup.call_type, setup.call_status) == (
        "inbound",
        "PSTN",
        "RINGING",
    )
    assert setup.custom_parameters == {"customerId": "42"}
    assert recorder.shorts() == [
        ("info", "agentSpeaking", "on"),  # the welcome greeting
        ("info", "tokensPlayed", "Hi!"),
        ("info", "agentSpeaking", "off"),
        ("info", "clientSpeaking", "on"),
        ("prompt", "is", False),  # cumulative partials
        ("prompt", "is my", False),
        ("prompt", "is my order", False),
        ("prompt", "is my order here", False),
        ("info", "clientSpeaking", "off"),
        ("prompt", "is my order here", True),  # the final repeats the last partial
        ("info", "agentSpeaking", "on"),
        ("info", "clientSpeaking", "on"),  # barge-in, in Twilio's order
        ("info", "tokensPlayed", "Let me check"),
        ("interrupt", "Let me check"),
        ("info", "agentSpeaking", "off"),
        ("info", "clientSpeaking", "off"),
        ("dtmf", "1"),
        ("error", "Invalid message received, code: 64107, not json"),
        ("info", "agentSpeaking", "on"),
        ("info", "tokensPlayed", "Pressed."),
        ("info", "agentSpeaking", "off"),
    ]
    assert recorder.close == (1000, "Closing websocket session")
    assert outcome.status == "completed"


@pytest.mark.parametrize("fault", ["malformed", "drop"])
async def test_a_broken_session_ends_failed_64105(fault):
    async def behaviour(ws: ServerConnection, frame: Inbound | Unknown) -> None:
        if not isinstance(frame, Setup):
            return
        if fault == "drop":
            await ws.close(1011, "bye")
            return
        for _ in range(10):
            await ws.send('{"type": "text"}')  # raw on purpose: no token, invalid

    recorder = Recorder(behaviour)
    async with serve(recorder, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}/ws"
        caller = SimulatedCaller(on_event=lambda *_: None)
        await caller.connect(CallPlan(ws_url=url, connect_url=url, attributes=BASIC))
        outcome = await caller.wait_closed(5)
    assert (outcome.status, outcome.error_code) == ("failed", "64105")
    if fault == "malformed":
        assert recorder.close == (1007, "Too many consecutive malformed messages.")
        errors = [f for f in recorder.frames if isinstance(f, Error)]
        assert len(errors) == 10 and "64107" in errors[0].description
    else:
        assert outcome.close_code == 1011


def test_the_report_is_a_table_on_a_terminal():
    turn = Turn.numbered(1, say="hi")
    reply = Reply(input="hi", sent_at=0.0, text="Hello!", first_token_at=0.123)
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120, color_system=None)
    ok = report(
        console, [TurnResult(turn, reply, ["reply does not contain 'bye'"])], SimulatedCaller()
    )
    text = buffer.getvalue()
    assert not ok
    assert (
        "┃ # ┃ caller" in text
        and "first token" in text
        and "123 ms" in text
        and "reply does not contain 'bye'" in text
    )
    assert "0 of 1 turns passed" in text


def test_a_socket_dropped_mid_reply_fails_the_script(tmp_path: Path) -> None:
    """A script fails on a relay that drops the socket after one token, despite the expected words.

    Twilio would report that call as failed/64105.
    """
    from aiohttp import web
    from rich.console import Console as FileConsole

    from crctl.call_script import parse_turns, play_script

    port = free_port()

    async def twiml(request: web.Request) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<ConversationRelay url="ws://127.0.0.1:{port}/ws" /></Connect></Response>'
        )
        return web.Response(text=body, content_type="text/xml")

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if isinstance(decode(message.data), Prompt):
                await ws.send_str(text_frame("It is 42.", False))
                await ws.close(code=1011)
        return ws

    async def run() -> int:
        app = web.Application()
        app.router.add_post("/twiml", twiml)
        app.router.add_get("/ws", socket)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            caller = SimulatedCaller(f"http://127.0.0.1:{port}", timeout=3.0)
            await caller.connect(await caller.fetch())
            turns = parse_turns([{"say": "what is my order", "expect": {"contains": "42"}}])
            with (tmp_path / "report.txt").open("w") as out:
                return await play_script(caller, turns, FileConsole(file=out))
        finally:
            await runner.cleanup()

    assert asyncio.run(run()) == 1
    assert "FAIL" in (tmp_path / "report.txt").read_text()


async def test_speaking_over_the_agent_follows_twilios_barge_in_order() -> None:
    """The barge-in order observed on real calls, from clientSpeaking on to agentSpeaking off.

    clientSpeaking on → tokensPlayed → interrupt → prompt(last:false) → agentSpeaking off.
    """
    answering: list[asyncio.Task[None]] = []

    async def behaviour(ws: ServerConnection, frame: Inbound | Unknown) -> None:
        async def answer() -> None:
            for token in ["A", " long", " story", " about", " many", " things."] * 5:
                await ws.send(text_frame(token, False))
                await asyncio.sleep(0.03)
            await ws.send(text_frame("", True))

        if isinstance(frame, Prompt) and frame.last and not answering:
            answering.append(asyncio.create_task(answer()))
        elif isinstance(frame, Interrupt):
            answering[0].cancel()
            await ws.send(text_frame("", True))

    recorder = Recorder(behaviour)
    async with serve(recorder, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        plan = CallPlan(
            ws_url="wss://relay.example.test/ws",
            connect_url=f"ws://127.0.0.1:{port}/ws",
            attributes=BASIC,
            parameters={},
        )
        story = asyncio.Event()  # set by the token that makes the reply end in "story"

        def on_event(event: Any) -> None:
            if isinstance(event, TokenHeard) and event.reply.received.strip().endswith("story"):
                story.set()

        caller = SimulatedCaller(
            auth_token=AUTH_TOKEN, partials=True, partial_gap=0.01, on_event=on_event
        )
        await caller.connect(plan)
        first = await caller.say("tell me")
        assert first is not None
        await story.wait()
        await caller.say("stop now")
        await caller.hangup()
    frames = recorder.shorts()
    cut = frames.index(("interrupt", first.text))
    assert frames[cut - 2 : cut + 3] == [
        ("info", "clientSpeaking", "on"),
        ("info", "tokensPlayed", frames[cut - 1][2]),
        ("interrupt", first.text),
        ("prompt", "stop", False),
        ("info", "agentSpeaking", "off"),
    ]


# ------------------------------------------------------------- reply: none, settle_ms


def test_reply_none_passes_while_a_digit_collector_stays_silent(relay_factory, tmp_path):
    relay = relay_factory(agent="echo", agent_dtmf_buffer=True)
    path = script(
        tmp_path,
        '- dtmf: "12"\n  expect: {reply: none}\n'
        '- dtmf: "3"\n  expect: {reply: none, settle_ms: 300}\n'
        '- dtmf: "4#"\n  expect: {contains: entered 1234}\n',
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 0, result.output
    assert "turn 1 pass  dtmf 12 → (no reply)" in result.output
    assert "turn 2 pass  dtmf 3 → (no reply)" in result.output
    assert re.search(
        r"turn 3 pass .*entered 1234 on the keypad.*  first token \d+ ms", result.output
    )
    assert "3 of 3 turns passed" in result.output
    assert [e["digit"] for e in events(relay, "dtmf")] == ["1", "2", "3", "4", "#"]


def test_reply_none_fails_naming_what_the_agent_said(relay_factory, tmp_path):
    relay = relay_factory(agent="echo")  # answers every key and every prompt
    path = script(
        tmp_path,
        '- dtmf: "1"\n  expect: {reply: none}\n'
        "- say: hello\n  expect: {reply: none, settle_ms: 3000}\n"
        "- say: still there?\n  expect: {contains: still there}\n",
    )
    result = run(*signed(relay), "--script", path)
    assert result.exit_code == 1, result.output
    assert re.search(
        r"turn 1 FAIL  dtmf 1 → You said: \[The caller pressed 1 on the keypad\]  first token "
        r"\d+ ms  caller wait \d+ ms: expected no reply within 1000 ms \(reply: none\), "
        r"but the agent said "
        r"'You said: \[The caller pressed 1 on the keypad\]'\n",
        result.output,
    ), result.output
    assert (
        "expected no reply within 3000 ms (reply: none), but the agent said 'You said: hello'"
        in result.output
    )
    assert "turn 3 pass" in result.output and "1 of 3 turns passed" in result.output


# ------------------------------------------------------------------- the shipped example


def test_script_example_plays_the_shipped_script_and_example_prints_it(
    relay_factory, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # no file called "example" here
    relay = relay_factory(agent="echo")
    result = run(*signed(relay), "--script", "example")
    assert result.exit_code == 0, result.output
    assert "4 of 4 turns passed" in result.output

    printed = run("--example")
    assert printed.exit_code == 0
    shipped = (
        Path(__file__).parent.parent / "crctl" / "examples" / "conversation.yaml"
    ).read_text()
    assert [line for line in printed.output.splitlines() if not line.startswith("#")] == [
        line for line in shipped.splitlines() if not line.startswith("#")
    ]
    assert f"{crctl_command()} call --script example" in printed.output
    mine = tmp_path / "my-agent.yaml"
    mine.write_text(printed.output.replace("contains: pressed 1", "contains: pressed 9"))
    edited = run(*signed(relay), "--script", str(mine))
    assert edited.exit_code == 1 and "reply does not contain 'pressed 9'" in edited.output

    (tmp_path / "example").write_text("- say: a file of that name wins\n")
    local = run(*signed(relay), "--script", "example")
    assert local.exit_code == 0 and "1 of 1 turns passed" in local.output


def test_the_example_ships_in_the_package():
    from crctl.call_script import example_path, load_script

    assert example_path().is_file()
    assert example_path().parent == Path(__file__).parent.parent / "crctl" / "examples"
    assert [t.number for t in load_script(Path("example"))] == [1, 2, 3, 4]


# ------------------------------------------------------------------- plain-http relays


def test_a_plain_http_relay_naming_wss_on_its_own_port_is_reached_with_ws():
    """A relay that answered /twiml over plain HTTP and names wss:// on that same host and port.

    The socket (and /action) go there without TLS, still signed over the wss:// URL.
    """
    port = free_port()
    public = f"https://127.0.0.1:{port}"
    relay = RelayServer(config(public_url=public, agent="echo"))
    relay.port, relay.base_url = port, f"http://127.0.0.1:{port}"
    with relay:
        path_args = [relay.base_url, "--auth-token", AUTH_TOKEN, "--public-url", public]
        result = run(*path_args, "--script", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    followed = rf"wss://127\.0\.0\.1:{port}/ws\?(callSid=CA\w+&token=\S+) via ws://127\.0\.0\.1:{port}/ws\?\1\b"
    assert re.search(followed, result.output), result.output
    assert "4 of 4 turns passed" in result.output
    assert "/action → hangs up" in result.output  # the signed callback, over http
    assert events(relay, "session.end")[0]["status"] == "completed"


def test_the_live_printer_renders_every_step_of_a_call():
    buffer = io.StringIO()
    printer = LivePrinter(Console(file=buffer, width=200, color_system=None))
    reply = Reply(input="hi", sent_at=0.0, first_token_at=0.25, tokens=2)
    for event in [
        Greeting("Hi!"),
        TokenHeard(reply, "Hello"),
        TokenHeard(reply, " there."),
        ReplyDone(reply),
        Interrupted(reply, "Hello"),
        Played(reply, "https://x/a.mp3"),
        DigitsSent(reply, "12#"),
        LanguageSwitched(reply, "sv-SE", None),
        Invalid("not JSON", "nope"),
        Dropped("the TwiML says no"),
        Ended('{"a":1}'),
        Closed(Outcome("ended", close_code=1000, handoff_data='{"a":1}')),
    ]:
        printer(event)
    assert buffer.getvalue().splitlines() == [
        "agent: Hi! (welcome greeting)",
        "agent: Hello there.  first token 250 ms",
        "  ↳ barged in; the caller heard: 'Hello'",
        "agent plays https://x/a.mp3",
        "agent sends digits 12#",
        "agent switches language ttsLanguage=sv-SE",
        "Twilio would reject this frame (64107): not JSON: nope",
        "not sent: the TwiML says no",
        'agent ended the call: handoffData {"a":1}',
        'call over: the agent ended the call (end), handoffData {"a":1}',
    ]
