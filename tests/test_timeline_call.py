"""``crctl call``'s Twilio timing, measured by a real relay: the timeline testable with no phone.

The simulated caller plays the speaker events as Twilio sends them (Twilio docs,
ConversationRelay WebSocket messages: ``events="speaker-events tokens-played"``, which the
``basic`` template sets); the relay's own ``turn.timeline`` events must then know every stage,
and the caller wait the relay records must agree with the one the caller measured.
"""

from __future__ import annotations

from typing import Any

from crctl.call_script import Turn, run_script
from crctl.caller import SimulatedCaller
from crctl.caller.speaker import Timing
from fakes.fake_llm import FakeLLM, Script
from relay_server import events as ev
from tests.events_support import wait_kind
from tests.support import AUTH_TOKEN, PUBLIC_URL

STAGES = ev.TIMELINE_STAGES
DELAY_MS = 150


def timelines(relay: Any, sid: str) -> list[dict[str, Any]]:
    return [
        {f: getattr(e, f) for f in ("turn", "end", "barge_in", *STAGES)}
        for e in list(relay.events)
        if e.call_sid == sid and e.kind == "turn.timeline"
    ]


async def test_a_timed_call_gives_the_relay_every_stage(relay_factory, fake_llm: FakeLLM):
    relay = relay_factory()
    fake_llm.enqueue(
        Script(tokens=["Your order", " ships today."], ttft=0.05),
        Script(tokens=["Well,", " the weather", " tomorrow", " will be", " sunny and warm."]),
    )
    timing = Timing(agent_speaking_delay_ms=DELAY_MS, speaking_rate=400, time_scale=1.0)
    caller = SimulatedCaller(
        relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL, timing=timing
    )
    await caller.connect(await caller.fetch())
    turns = [
        Turn.model_validate({"say": "Where is my order?"}),
        Turn.model_validate({"say": "And the weather?", "interrupt_after_words": 2}),
    ]
    results = await run_script(caller, turns, 10.0)
    waits = [caller.caller_wait_ms(r.reply) if r.reply else None for r in results]
    await caller.hangup()
    await wait_kind(relay, caller.call_sid, "turn.timeline", 2)

    first, second = timelines(relay, caller.call_sid)
    assert (first["turn"], first["end"], first["barge_in"]) == (1, "completed", False)
    assert (second["turn"], second["end"], second["barge_in"]) == (2, "interrupted", True)
    for stage in STAGES:  # every frame the stages need came from the simulated caller
        assert first[stage] is not None and first[stage] >= 0, (stage, first)
    assert first["llm_first_token_ms"] >= 50  # the fake model's own delay
    assert first["speech_start_ms"] >= DELAY_MS  # agentSpeaking on, as delayed by the caller
    assert first["speaking_ms"] > 0
    # The relay's caller wait is the caller's own, seen from the other end of the socket: the
    # caller stamps when it sends clientSpeaking off and agentSpeaking on, the relay when it
    # receives them. The wait covers the model's delay and the speech start.
    assert waits[0] is not None and waits[0] >= DELAY_MS + 50
    assert first["caller_wait_ms"] >= DELAY_MS + 50
    parts = ("transcription_ms", "relay_ms", "llm_first_token_ms", "speech_start_ms")
    assert abs(sum(first[p] for p in parts) - first["caller_wait_ms"]) < 0.5
    assert second["speech_start_ms"] is not None and second["speech_start_ms"] >= DELAY_MS
