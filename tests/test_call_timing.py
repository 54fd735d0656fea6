"""``crctl call``'s speaker timing: Twilio's ``info`` frames in order, on a (scaled) clock.

A recording server answers like the relay and stamps each frame as it arrives (no upper bounds
on time: only order, and delays at least what was asked). Twilio docs: ConversationRelay,
WebSocket messages (``info``: clientSpeaking, agentSpeaking, tokensPlayed; ``interrupt``).
"""

from __future__ import annotations

import time
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

from crctl.call_script import Turn, run_script
from crctl.caller import CallPlan, SimulatedCaller
from crctl.caller.speaker import Timing, clause_end
from relay_server.protocol import Inbound, Info, Prompt, Unknown, text_frame
from tests.support import AUTH_TOKEN
from tests.test_call import BASIC, Recorder

REPLY = ["Sure,", " your order", " ships today.", " Anything else?"]


def answering(tokens: list[str]) -> Any:
    async def behaviour(ws: ServerConnection, frame: Inbound | Unknown) -> None:
        if isinstance(frame, Prompt) and frame.last:
            for token in tokens:
                await ws.send(text_frame(token, False))
            await ws.send(text_frame("", True))

    return behaviour


async def call(attributes: dict[str, str], timing: Timing, turns: list[Turn]) -> tuple[Any, ...]:
    recorder = Recorder(answering(REPLY))
    stamps: list[float] = []
    inner = recorder.behaviour

    async def stamped(ws: ServerConnection, frame: Inbound | Unknown) -> None:
        stamps.append(time.monotonic())
        await inner(ws, frame)

    recorder.behaviour = stamped
    async with serve(recorder, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        plan = CallPlan(
            ws_url="wss://relay.example.test/ws",
            connect_url=f"ws://127.0.0.1:{port}/ws",
            attributes=attributes,
        )
        caller = SimulatedCaller(auth_token=AUTH_TOKEN, timing=timing)
        await caller.connect(plan)
        results = await run_script(caller, turns, 5.0, None)
        await caller.hangup()
    return recorder, stamps, results, caller


def test_clauses_keep_their_leading_space():
    text = "Sure, your order ships today. Anything else?"
    assert clause_end(text, 0, complete=False) == len("Sure,")
    assert text[5 : clause_end(text, 5, complete=False)] == " your order ships today."
    assert clause_end(text, 29, complete=False) is None  # not complete yet
    assert text[29 : clause_end(text, 29, complete=True)] == " Anything else?"


async def test_a_normal_turn_in_twilios_order_with_delays_at_least_as_asked():
    timing = Timing(agent_speaking_delay_ms=400, speaking_rate=100, time_scale=0.5)
    turn = Turn.numbered(1, say="where is my order", expect={"max_caller_wait_ms": 10_000})
    recorder, stamps, results, caller = await call(BASIC, timing, [turn])
    frames = recorder.shorts()
    assert frames == [
        ("info", "agentSpeaking", "on"),  # the welcome greeting, spoken first
        ("info", "tokensPlayed", "Hi!"),
        ("info", "agentSpeaking", "off"),
        ("info", "clientSpeaking", "on"),
        ("info", "clientSpeaking", "off"),
        ("prompt", "where is my order", True),
        ("info", "agentSpeaking", "on"),
        ("info", "tokensPlayed", "Sure,"),
        ("info", "tokensPlayed", " your order ships today."),
        ("info", "tokensPlayed", " Anything else?"),
        ("info", "agentSpeaking", "off"),
    ]
    at = stamps[1:]  # stamps[0] is setup
    # greeting: 700 ms x 0.5 after setup; agentSpeaking on: 400 ms x 0.5 after the prompt
    assert at[0] - stamps[0] >= 0.35 - 0.01
    assert at[6] - at[5] >= 0.2 - 0.01
    # each clause takes its length / 100 chars/s x 0.5
    assert at[7] - at[6] >= len("Sure,") / 100 * 0.5 - 0.01
    assert at[8] - at[7] >= len(" your order ships today.") / 100 * 0.5 - 0.01
    assert results[0].passed, results[0].reasons
    wait = caller.caller_wait_ms(results[0].reply)
    assert wait is not None and wait >= 200 - 10


async def test_a_scripted_barge_in_in_twilios_order():
    timing = Timing(speaking_rate=200, time_scale=0.1)
    turns = [
        Turn.numbered(1, say="where is my order", interrupt_after_words=3),
        Turn.numbered(2, say="thanks"),
    ]
    recorder, _, results, _ = await call(BASIC, timing, turns)
    frames = recorder.shorts()
    cut = frames.index(("interrupt", "Sure, your order"))
    assert frames[cut - 2 : cut + 5] == [
        ("info", "clientSpeaking", "on"),
        ("info", "tokensPlayed", " your order"),  # the fragment heard of the clause
        ("interrupt", "Sure, your order"),
        ("info", "agentSpeaking", "off"),
        ("info", "clientSpeaking", "off"),
        ("prompt", "thanks", True),
        ("info", "agentSpeaking", "on"),
    ]
    assert frames[cut - 3] == ("info", "tokensPlayed", "Sure,")
    assert results[0].reply is not None and results[0].reply.interrupted
    assert all(r.passed for r in results), [r.reasons for r in results]


async def test_max_caller_wait_ms_fails_saying_expected_and_got():
    timing = Timing(agent_speaking_delay_ms=300, time_scale=1.0, speaking_rate=1000)
    turn = Turn.numbered(1, say="hello", expect={"max_caller_wait_ms": 50})
    _, _, results, caller = await call(BASIC, timing, [turn])
    wait = caller.caller_wait_ms(results[0].reply)
    assert wait is not None and wait >= 300 - 10
    assert results[0].reasons == [
        f"caller wait: expected at most 50 ms (max_caller_wait_ms), got {wait:.0f} ms"
    ]


async def test_no_speaker_frames_when_the_twiml_does_not_ask():
    plain = {k: v for k, v in BASIC.items() if k != "events"}
    turn = Turn.numbered(1, say="hello", expect={"contains": "anything else"})
    recorder, _, results, caller = await call(plain, Timing(time_scale=0), [turn])
    assert not [f for f in recorder.frames if isinstance(f, Info)]
    assert results[0].passed
    assert caller.caller_wait_ms(results[0].reply) is None
