"""The per-turn timeline: the pure recorder on a fake clock, then wired into the agents.

Frames in Twilio's order (Twilio docs, ConversationRelay WebSocket messages): a normal turn is
``clientSpeaking off`` → final ``prompt`` → reply ``text`` → ``agentSpeaking on`` → ``off``; a
barge-in is ``clientSpeaking on`` → ``tokensPlayed`` → ``interrupt`` → ``agentSpeaking off``.
"""

from __future__ import annotations

from typing import Any

import pytest

from relay_server import EchoAgent, LLMAgent
from relay_server import events as ev
from relay_server.config import AgentConfig, RelayConfig
from relay_server.services import Services
from relay_server.testing import FakeCall, FakeChatModel, FakeClock
from relay_server.timeline import Timeline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def at(self, seconds: float) -> float:
        self.now = 100.0 + seconds
        return self.now


def recorder() -> tuple[Timeline, list[ev.TurnTimeline], Clock]:
    out: list[ev.TurnTimeline] = []
    clock = Clock()

    def emit(event: ev.CallEvent) -> None:
        assert isinstance(event, ev.TurnTimeline)
        out.append(event)

    return Timeline("CA1", emit, clock), out, clock


def normal_turn(t: Timeline, c: Clock, base: float = 0.0) -> None:
    t.caller_speaking(True, c.at(base + 0.0))
    t.caller_speaking(False, c.at(base + 1.0))
    t.start(c.at(base + 1.2))
    t.llm_request(c.at(base + 1.21))
    t.llm_first_token(c.at(base + 1.71))
    t.first_text(c.at(base + 1.72))
    t.agent_speaking(True, c.at(base + 2.02))
    t.reply_done()


def test_normal_order_gives_every_stage():
    t, out, c = recorder()
    normal_turn(t, c)
    assert out == []  # not complete before the agent stopped speaking
    t.agent_speaking(False, c.at(5.02))
    [turn] = out
    assert (turn.turn, turn.end, turn.barge_in) == (1, "completed", False)
    assert turn.transcription_ms == 200.0
    assert turn.relay_ms == 20.0  # 10 ms before the request + 10 ms after the first token
    assert turn.llm_first_token_ms == 500.0
    assert turn.speech_start_ms == 300.0
    assert turn.speaking_ms == 3000.0
    assert turn.caller_wait_ms == 1020.0
    # caller wait is the sum of the stages before the agent is audible
    stages = (turn.transcription_ms, turn.relay_ms, turn.llm_first_token_ms, turn.speech_start_ms)
    assert sum(stages) == pytest.approx(turn.caller_wait_ms)
    t.agent_speaking(False, c.at(6))  # nothing left open: ignored
    assert len(out) == 1


def test_barge_in_counts_speaking_up_to_the_interrupt():
    t, out, c = recorder()
    normal_turn(t, c)
    t.caller_speaking(True, c.at(3.0))
    t.reply_done(cancelled=True)
    t.barge_in(c.at(3.52))
    [turn] = out
    assert (turn.end, turn.barge_in, turn.speaking_ms, turn.caller_wait_ms) == (
        "interrupted",
        True,
        1500.0,
        1020.0,
    )
    t.agent_speaking(False, c.at(3.6))  # Twilio's off after the interrupt: no second event
    t.caller_speaking(False, c.at(4.0))
    t.start(c.at(4.3))  # the caller's new turn measures from their own stop
    t.first_text(c.at(4.4))
    t.agent_speaking(True, c.at(4.6))
    t.reply_done()
    t.agent_speaking(False, c.at(5.0))
    assert [e.turn for e in out] == [1, 2]
    assert out[1].transcription_ms == 300.0 and out[1].caller_wait_ms == 600.0


def test_a_new_prompt_while_the_agent_speaks_is_a_barge_in():
    t, out, c = recorder()
    normal_turn(t, c)
    t.caller_speaking(False, c.at(2.5))
    t.start(c.at(2.8))
    [turn] = out
    assert (turn.end, turn.barge_in, turn.speaking_ms) == ("interrupted", True, 780.0)


def test_no_speaker_events_only_relay_and_llm_known():
    t, out, c = recorder()
    t.start(c.at(1.0))
    t.llm_request(c.at(1.01))
    t.llm_first_token(c.at(1.41))
    t.first_text(c.at(1.42))
    t.reply_done()
    assert out == []  # no off will come: the next turn or the close ends it
    t.start(c.at(9.0))
    [turn] = out
    assert turn.end == "completed" and not turn.barge_in
    assert (turn.relay_ms, turn.llm_first_token_ms) == (20.0, 400.0)
    assert turn.transcription_ms is None and turn.caller_wait_ms is None
    assert turn.speech_start_ms is None and turn.speaking_ms is None
    t.first_text(c.at(9.1))
    t.reply_done()
    t.close(c.at(10))
    assert [(e.turn, e.end) for e in out] == [(1, "completed"), (2, "completed")]


def test_no_client_speaking_off_leaves_transcription_and_wait_unknown():
    t, out, c = recorder()
    t.caller_speaking(True, c.at(0.0))  # on, never off
    t.start(c.at(1.0))
    t.first_text(c.at(1.1))
    t.agent_speaking(True, c.at(1.4))
    t.reply_done()
    t.agent_speaking(False, c.at(2.4))
    [turn] = out
    assert turn.transcription_ms is None and turn.caller_wait_ms is None
    assert (turn.relay_ms, turn.speech_start_ms, turn.speaking_ms) == (100.0, 300.0, 1000.0)


def test_agent_without_llm_the_relay_stage_is_prompt_to_first_text():
    t, out, c = recorder()
    t.caller_speaking(False, c.at(0.5))
    t.start(c.at(1.0))
    t.first_text(c.at(1.03))
    t.agent_speaking(True, c.at(1.33))
    t.reply_done()
    t.agent_speaking(False, c.at(2.0))
    [turn] = out
    assert turn.llm_first_token_ms is None
    assert turn.relay_ms == 30.0 and turn.caller_wait_ms == 830.0


def test_llm_fault_no_first_token_leaves_relay_unknown():
    t, out, c = recorder()
    t.start(c.at(1.0))
    t.llm_request(c.at(1.01))
    t.first_text(c.at(3.0))  # the apology
    t.reply_done()
    t.close(c.at(4))
    [turn] = out
    assert turn.relay_ms is None and turn.llm_first_token_ms is None


def test_dtmf_turn_waits_from_the_last_key():
    t, out, c = recorder()
    t.key(c.at(0.0))
    t.key(c.at(0.5))
    t.start(c.at(2.5))  # the buffered entry ends after the pause
    t.first_text(c.at(2.51))
    t.agent_speaking(True, c.at(2.8))
    t.reply_done()
    t.agent_speaking(False, c.at(3.0))
    [turn] = out
    assert turn.transcription_ms == 2000.0 and turn.caller_wait_ms == 2300.0


def test_silence_reminder_and_greeting_get_no_timeline():
    t, out, c = recorder()
    t.agent_speaking(True, c.at(0.7))  # the welcome greeting
    t.agent_speaking(False, c.at(2.0))
    normal_turn(t, c, 3.0)
    t.agent_speaking(False, c.at(6.0))
    assert len(out) == 1
    # the reminder: the agent speaks on its own, no caller turn opens
    t.first_text(c.at(16.0))
    t.agent_speaking(True, c.at(16.3))
    t.agent_speaking(False, c.at(17.0))
    t.close(c.at(18.0))
    assert len(out) == 1 and t.turns == 1


def test_close_mid_reply_is_closed():
    t, out, c = recorder()
    normal_turn(t, c)
    t.reply_done(cancelled=True)  # the socket's close cancels the turn
    t.close(c.at(2.52))
    [turn] = out
    assert (turn.end, turn.barge_in, turn.speaking_ms) == ("closed", False, 500.0)
    t.close(c.at(3))
    assert len(out) == 1


def test_a_turn_superseded_before_it_was_heard_is_interrupted_not_barge_in():
    t, out, c = recorder()
    t.start(c.at(1.0))
    t.reply_done(cancelled=True)
    t.start(c.at(1.5))
    assert (out[0].end, out[0].barge_in) == ("interrupted", False)


def test_a_stale_stop_is_forgotten_when_the_caller_speaks_again():
    t, out, c = recorder()
    t.caller_speaking(False, c.at(0.0))  # noise: no prompt came of it
    t.caller_speaking(True, c.at(5.0))
    t.start(c.at(6.0))  # no off this time
    t.close(c.at(7.0))
    assert out[0].transcription_ms is None


# ------------------------------------------------------------------ wired into the agents


def timelines(call: FakeCall) -> list[ev.TurnTimeline]:
    return [e for e in call.events if isinstance(e, ev.TurnTimeline)]


async def llm_call(model: FakeChatModel, **agent: Any) -> FakeCall:
    agent.setdefault("silence_timeout", 0)
    config = RelayConfig(agent_config=AgentConfig(**agent))
    services = Services(chat=model, clock=FakeClock())
    return await FakeCall(LLMAgent, services=services, config=config).connect()


async def test_llm_agent_marks_every_stage_of_a_turn():
    model = FakeChatModel(echo=True)
    call = await llm_call(model)
    await call.info("clientSpeaking", "on")
    await call.info("clientSpeaking", "off")
    await call.prompt("hello")
    assert await call.reply_text() == "You said: hello"
    assert timelines(call) == []
    await call.info("agentSpeaking", "on")
    await call.info("agentSpeaking", "off")
    [turn] = timelines(call)
    assert (turn.turn, turn.end, turn.barge_in) == (1, "completed", False)
    for stage in (
        "transcription_ms",
        "relay_ms",
        "llm_first_token_ms",
        "speech_start_ms",
        "speaking_ms",
        "caller_wait_ms",
    ):
        value = getattr(turn, stage)
        assert value is not None and value >= 0, stage
    # the reply's own latency is unchanged
    [reply] = [e for e in call.events if isinstance(e, ev.AgentReply)]
    assert reply.first_token_ms is not None
    await call.hangup()


async def test_llm_agent_barge_in_and_close():
    model = FakeChatModel()
    reply = model.queue()
    call = await llm_call(model)
    await call.prompt("tell me a story")
    reply.say("Once")
    await call.recv()
    await call.info("agentSpeaking", "on")
    await call.info("clientSpeaking", "on")
    await call.info("tokensPlayed", "Once")
    await call.interrupt("Once")
    await call.info("agentSpeaking", "off")
    [turn] = timelines(call)
    assert (turn.end, turn.barge_in) == ("interrupted", True)
    assert turn.speaking_ms is not None and turn.transcription_ms is None
    second = model.queue()
    await call.prompt("go on")
    second.say("And")
    await call.recv()
    await call.hangup()
    assert [(e.turn, e.end) for e in timelines(call)] == [(1, "interrupted"), (2, "closed")]


async def test_echo_agent_dtmf_turn_and_silence_reminder():
    config = RelayConfig(
        agent_config=AgentConfig(silence_timeout=5, silence_reminder="Still there?")
    )
    clock = FakeClock()
    call = await FakeCall(EchoAgent, services=Services(clock=clock), config=config).connect()
    await call.dtmf("7")
    await call.turn()
    await call.info("agentSpeaking", "on")
    await call.info("agentSpeaking", "off")
    [turn] = timelines(call)
    assert turn.llm_first_token_ms is None and turn.relay_ms is not None
    assert turn.transcription_ms is not None and turn.caller_wait_ms is not None
    clock.advance(5)  # the silence reminder: the agent speaks on its own
    assert (await call.reply_text()) == "Still there?"
    await call.info("agentSpeaking", "on")
    await call.info("agentSpeaking", "off")
    await call.hangup()
    assert len(timelines(call)) == 1
