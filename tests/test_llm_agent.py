"""The default LLM agent over real sockets: streaming, barge-in, history, tools, faults."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.fakes.fake_llm import Script, ToolCallSpec
from tests.support import TwilioCaller, free_port, wait_until

pytestmark = pytest.mark.asyncio

LONG = [f" word{i}" for i in range(60)]


def messages(fake_llm, i=-1):
    return fake_llm.records[i].body["messages"]


async def test_tokens_stream_as_they_arrive_and_turn_closes(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=["Hello", " there", ",", " friend."], delay=0.15))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    first = await caller.recv()
    t0 = time.monotonic()
    assert first == {"type": "text", "token": "Hello", "last": False}
    rest = await caller.recv_turn()
    # tokens were forwarded one by one while the model was still generating (not buffered)
    assert time.monotonic() - t0 >= 0.3
    assert [f["token"] for f in rest] == [" there", ",", " friend.", ""]
    assert rest[-1]["last"] is True
    body = fake_llm.records[-1].body
    assert body["stream"] is True and body["model"] == "gpt-4o-mini"
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "hi"}
    await caller.hangup()


async def test_empty_answer_still_closes_the_turn(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=[]))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("say nothing")
    assert await caller.recv() == {"type": "text", "token": "", "last": True}
    await caller.hangup()


async def test_partial_prompts_wait_for_the_final_one(relay, fake_llm):
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("what is", last=False)
    await caller.prompt("what is the", last=False)
    assert await caller.quiet(0.3) == []
    assert fake_llm.records == []
    await caller.prompt("what is the time")
    assert await caller.reply_text() == "You said: what is the time"
    assert len(fake_llm.records) == 1
    await caller.hangup()


async def test_barge_in_stops_the_reply_and_closes_the_llm_stream(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=LONG, delay=0.03))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("tell me a long story")
    got = [await caller.recv() for _ in range(5)]
    assert all(f["type"] == "text" and not f["last"] for f in got)
    await caller.interrupt("word0 word1", 700)
    after = await caller.quiet(0.5)
    # apart from the turn-closing frame, nothing of the interrupted reply follows
    worded = [f for f in after if f["type"] == "text" and f["token"]]
    closing = [f for f in after if f == {"type": "text", "token": "", "last": True}]
    assert len(worded) <= 1  # at most a token already on the wire when the interrupt left
    assert len(closing) == 1 and after[-1] == closing[0]
    record = fake_llm.records[-1]
    assert wait_until(lambda: record.client_disconnected, 2)
    assert record.tokens_sent < len(LONG) and not record.completed
    assert relay.kinds(caller.call_sid).count("barge_in") == 1
    await caller.hangup()


async def test_history_keeps_only_what_the_caller_heard(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=LONG, delay=0.02))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("first question")
    for _ in range(6):
        await caller.recv()
    await caller.interrupt(" word0 word1 wo", "460")  # the early docs' string duration
    await caller.quiet(0.2)
    await caller.prompt("second question")
    await caller.reply_text()
    history = messages(fake_llm)
    assert history[-3:] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": " word0 word1 wo"},
        {"role": "user", "content": "second question"},
    ]
    await caller.hangup()


async def test_interrupt_after_a_finished_reply_truncates_history(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=["One.", " Two.", " Three."]))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("count")
    assert await caller.reply_text() == "One. Two. Three."
    await caller.interrupt("One.", 300)  # Twilio was still speaking when the caller cut in
    await caller.prompt("stop")
    await caller.reply_text()
    assert {"role": "assistant", "content": "One."} in messages(fake_llm)
    assert all("Three" not in str(m.get("content")) for m in messages(fake_llm))
    await caller.hangup()


async def test_interrupt_with_nothing_heard_drops_the_reply(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=LONG, delay=0.02))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("question")
    await caller.recv()
    await caller.interrupt("", 15)
    await caller.quiet(0.2)
    await caller.prompt("next")
    await caller.reply_text()
    assert [m["role"] for m in messages(fake_llm)[-2:]] == ["user", "user"]
    await caller.hangup()


async def test_new_prompt_during_a_reply_cancels_it(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=LONG, delay=0.03))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("first")
    first = await caller.recv()
    await caller.prompt("actually, something else")
    cut = [first, *await caller.recv_turn()]  # up to the cancelled reply's closing frame
    sent = "".join(f["token"] for f in cut)
    assert 0 < len(sent) < len("".join(LONG))
    assert await caller.reply_text() == "You said: actually, something else"
    assert wait_until(lambda: fake_llm.records[0].client_disconnected, 2)
    # Without an interrupt Twilio plays everything queued: history keeps what was sent.
    assert messages(fake_llm)[-3:] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": sent},
        {"role": "user", "content": "actually, something else"},
    ]
    await caller.hangup()


async def test_python_tools_several_per_turn(relay_factory, fake_llm, tmp_path, monkeypatch):
    (tmp_path / "crm_tools.py").write_text(
        "from relay_server import tool\n"
        "@tool\n"
        "def lookup_order(order_id: int) -> dict:\n"
        "    '''Look up an order.'''\n"
        "    return {'order': order_id, 'status': 'shipped'}\n"
        "@tool\n"
        "async def weather(city: str, unit: str = 'C') -> str:\n"
        "    '''Weather in a city.'''\n"
        "    return f'sunny in {city}, 21{unit}'\n"
        "@tool\n"
        "def broken() -> str:\n"
        "    '''Always fails.'''\n"
        "    raise RuntimeError('database down')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    relay = relay_factory(tool_modules=("crm_tools",))
    fake_llm.enqueue(
        Script(
            tokens=["Let", " me", " check."],
            tool_calls=[
                ToolCallSpec("lookup_order", '{"order_id": 42}', fragments=4),
                ToolCallSpec("weather", '{"city": "Paris"}'),
                ToolCallSpec("broken", "{}"),
                ToolCallSpec("teleport", '{"to": "mars"}'),
                ToolCallSpec("lookup_order", '{"order_id": "not a number"}'),
            ],
        ),
        Script(tokens=["Your", " order", " shipped."]),
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("where is my order")
    assert await caller.reply_text() == "Let me check.Your order shipped."
    tools_offered = {t["function"]["name"] for t in fake_llm.records[0].body["tools"]}
    assert {"lookup_order", "weather", "broken", "end_call", "transfer_to_human"} <= tools_offered
    lookup = next(
        t for t in fake_llm.records[0].body["tools"] if t["function"]["name"] == "lookup_order"
    )
    assert lookup["function"]["parameters"]["properties"]["order_id"]["type"] == "integer"
    history = messages(fake_llm, 1)
    call_msg = next(m for m in history if m.get("tool_calls"))
    assert call_msg["content"] == "Let me check."
    assert [c["function"]["name"] for c in call_msg["tool_calls"]][:2] == [
        "lookup_order",
        "weather",
    ]
    results = [m["content"] for m in history if m["role"] == "tool"]
    assert json.loads(results[0]) == {"order": 42, "status": "shipped"}
    assert results[1] == "sunny in Paris, 21C"
    assert results[2].startswith("error: broken failed: RuntimeError: database down")
    assert "no tool named 'teleport'" in results[3]
    assert results[4].startswith("error: bad arguments for lookup_order")
    assert relay.kinds(caller.call_sid).count("tool.call") == 5
    await caller.hangup()


async def test_end_call_tool_sends_end_after_the_goodbye(relay, fake_llm):
    fake_llm.enqueue(
        Script(tokens=["Goodbye", "!"], tool_calls=[ToolCallSpec("end_call", '{"reason": "bye"}')])
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("bye")
    frames = [await caller.recv() for _ in range(4)]
    assert frames == [
        {"type": "text", "token": "Goodbye", "last": False},
        {"type": "text", "token": "!", "last": False},
        {"type": "text", "token": "", "last": True},
        {"type": "end"},
    ]
    assert len(fake_llm.records) == 1  # the goodbye came with the call: no extra round
    await caller.hangup()


async def test_end_call_without_words_asks_for_a_goodbye_first(relay, fake_llm):
    fake_llm.enqueue(
        Script(tool_calls=[ToolCallSpec("end_call", "{}")]),
        Script(tokens=["Bye", " now."]),
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hang up")
    assert await caller.reply_text() == "Bye now."
    assert await caller.recv() == {"type": "end"}
    assert "tools" not in fake_llm.records[1].body  # the goodbye round offers no tools
    await caller.hangup()


async def test_handoff_tool_ends_with_json_handoff_data(relay, fake_llm):
    fake_llm.enqueue(
        Script(
            tokens=["Transferring", " you."],
            tool_calls=[ToolCallSpec("transfer_to_human", '{"reason": "billing dispute"}')],
        )
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("I want a person")
    await caller.recv_turn()
    end = await caller.recv()
    assert end["type"] == "end" and isinstance(end["handoffData"], str)
    assert json.loads(end["handoffData"]) == {
        "reasonCode": "live-agent-handoff",
        "reason": "billing dispute",
        "summary": "",
    }
    await caller.hangup()


async def test_send_dtmf_and_switch_language_tools(relay, fake_llm):
    fake_llm.enqueue(
        Script(
            tool_calls=[
                ToolCallSpec("send_dtmf", '{"digits": "1w2#"}'),
                ToolCallSpec("send_dtmf", '{"digits": "12a"}'),
                ToolCallSpec("switch_language", '{"language": "es-ES"}'),
            ]
        ),
        Script(tokens=["Hola."]),
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("press one two and speak spanish")
    assert await caller.recv() == {"type": "sendDigits", "digits": "1w2#"}
    assert await caller.recv() == {
        "type": "language",
        "ttsLanguage": "es-ES",
        "transcriptionLanguage": "es-ES",
    }
    assert await caller.reply_text() == "Hola."
    results = [m["content"] for m in messages(fake_llm) if m["role"] == "tool"]
    assert "error" in results[1] and "0-9, w, #, *" in results[1]
    await caller.hangup()


@pytest.mark.parametrize(
    "script",
    [
        Script(fault="status", status=429),
        Script(fault="status", status=500),
        Script(fault="status", status=503),
        Script(tokens=["Partly", " said"], fault="cut", cut_after=2),
        Script(tokens=["Partly"], fault="reset", cut_after=1),
        Script(tokens=["x"], fault="garbage", cut_after=0),
        Script(fault="hang"),
    ],
    ids=["429", "500", "503", "cut", "reset", "garbage", "timeout"],
)
async def test_llm_faults_apologise_and_keep_the_call(relay_factory, fake_llm, script):
    relay = relay_factory(llm_timeout=0.5)
    fake_llm.enqueue(script)
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hello")
    text = await caller.reply_text(timeout=5)
    assert text.endswith(relay.config.agent_config.apology)
    assert "llm.fault" in relay.kinds(caller.call_sid)
    await caller.prompt("still there")  # the call goes on
    assert await caller.reply_text() == "You said: still there"
    await caller.hangup()


async def test_unreachable_llm_apologises(relay_factory):
    relay = relay_factory(llm_base_url=f"http://127.0.0.1:{free_port()}/v1")
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hello")
    assert await caller.reply_text() == relay.config.agent_config.apology
    fault = next(e for e in relay.events if e.kind == "llm.fault")
    assert fault.data["kind"] == "connection"
    await caller.hangup()


async def test_slow_first_token_triggers_a_preemptible_filler(relay_factory, fake_llm):
    relay = relay_factory(agent_filler_after_ms=100, agent_filler="Let me see.")
    fake_llm.enqueue(Script(tokens=["Found", " it."], ttft=0.5))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("look it up")
    filler = await caller.recv()
    assert filler == {"type": "text", "token": "Let me see.", "last": True, "preemptible": True}
    assert await caller.reply_text() == "Found it."
    fake_llm.enqueue(Script(tokens=["Quick."], ttft=0.0))
    await caller.prompt("again")
    assert await caller.recv() == {"type": "text", "token": "Quick.", "last": False}
    await caller.hangup()


async def test_dtmf_becomes_a_turn(relay, fake_llm):
    caller = await TwilioCaller(relay).connect()
    await caller.dtmf("5")
    await caller.reply_text()
    assert messages(fake_llm)[-1] == {
        "role": "user",
        "content": "[The caller pressed 5 on the keypad]",
    }
    await caller.hangup()


async def test_dtmf_buffer_collects_until_hash_or_pause(relay_factory, fake_llm):
    relay = relay_factory(agent_dtmf_buffer=True, agent_dtmf_pause=0.3)
    caller = await TwilioCaller(relay).connect()
    for digit in "1234#":
        await caller.dtmf(digit)
    await caller.reply_text()
    assert messages(fake_llm)[-1]["content"] == "[The caller entered 1234 on the keypad]"
    for digit in "98":
        await caller.dtmf(digit)
    assert await caller.quiet(0.15) == []
    await caller.reply_text()  # after the pause
    assert messages(fake_llm)[-1]["content"] == "[The caller entered 98 on the keypad]"
    await caller.hangup()


async def test_silence_reminders_then_goodbye_and_end(relay_factory, fake_llm):
    relay = relay_factory(
        agent_silence_timeout=0.25, agent_silence_max_reminders=2, welcome_greeting=None
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    await caller.reply_text()
    # speaker events: the reminder clock starts when Twilio stops speaking
    await caller.info("agentSpeaking", "on")
    assert await caller.quiet(0.4) == []
    await caller.info("agentSpeaking", "off")
    assert await caller.reply_text() == "Are you still there?"
    assert await caller.reply_text() == "Are you still there?"
    assert await caller.reply_text() == relay.config.agent_config.silence_goodbye
    assert await caller.recv() == {"type": "end"}
    await caller.hangup()


async def test_caller_speech_resets_the_silence_count(relay_factory, fake_llm):
    relay = relay_factory(agent_silence_timeout=0.3, agent_silence_max_reminders=1)
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    await caller.reply_text()
    assert await caller.reply_text() == "Are you still there?"
    await caller.prompt("yes")
    assert await caller.reply_text() == "You said: yes"
    assert await caller.reply_text() == "Are you still there?"
    await caller.hangup()
    await asyncio.sleep(0)


SLOW_TOOLS = (
    "import asyncio\n"
    "from relay_server import tool\n"
    "@tool\n"
    "async def slow_lookup(q: str) -> str:\n"
    "    '''Slow.'''\n"
    "    await asyncio.sleep(2)\n"
    "    return 'found'\n"
    "class Weird:\n"
    "    pass\n"
    "@tool\n"
    "def weird() -> object:\n"
    "    '''Returns something JSON cannot hold.'''\n"
    "    return Weird()\n"
)


@pytest.fixture
def slow_tools(tmp_path, monkeypatch):
    (tmp_path / "slow_tools.py").write_text(SLOW_TOOLS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return ("slow_tools",)


def unanswered_tool_calls(history):
    asked = {c["id"] for m in history for c in m.get("tool_calls") or []}
    answered = {m["tool_call_id"] for m in history if m["role"] == "tool"}
    return asked - answered


async def test_barge_in_during_a_tool_keeps_history_valid(relay_factory, fake_llm, slow_tools):
    relay = relay_factory(tool_modules=slow_tools)
    fake_llm.enqueue(
        Script(
            tokens=["Let", " me", " check."], tool_calls=[ToolCallSpec("slow_lookup", '{"q": "x"}')]
        )
    )
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("look it up")
    for _ in range(3):
        await caller.recv()  # "Let me check." is spoken, then the tool runs for 2 s
    assert wait_until(lambda: fake_llm.records[0].completed)
    await asyncio.sleep(0.1)  # the tool is running now
    await caller.interrupt("Let me", 400)
    assert await caller.recv() == {"type": "text", "token": "", "last": True}
    await caller.prompt("hello?")
    assert await caller.reply_text() == "You said: hello?"
    history = messages(fake_llm)
    # The API refuses a tool call without its answer (HTTP 400) for the rest of the call.
    assert unanswered_tool_calls(history) == set()
    tool_msg = next(m for m in history if m["role"] == "tool")
    assert tool_msg["content"].startswith("cancelled")
    assert history[-1] == {"role": "user", "content": "hello?"}
    await caller.hangup()


async def test_new_prompt_during_a_tool_keeps_history_valid(relay_factory, fake_llm, slow_tools):
    relay = relay_factory(tool_modules=slow_tools)
    fake_llm.enqueue(Script(tool_calls=[ToolCallSpec("slow_lookup", '{"q": "x"}')]))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("look it up")
    assert wait_until(lambda: len(fake_llm.records) == 1 and fake_llm.records[0].completed)
    await caller.prompt("never mind")
    frames = await caller.recv_turn()
    frames += [] if "You said" in "".join(f["token"] for f in frames) else await caller.recv_turn()
    history = messages(fake_llm)
    assert unanswered_tool_calls(history) == set()
    roles = [m["role"] for m in history[-4:]]
    assert roles == ["user", "assistant", "tool", "user"]  # tool answer before the new input
    await caller.hangup()


async def test_tool_result_that_json_cannot_hold_is_reported(relay_factory, fake_llm, slow_tools):
    relay = relay_factory(tool_modules=slow_tools)
    fake_llm.enqueue(Script(tool_calls=[ToolCallSpec("weird", "{}")]), Script(tokens=["Ok."]))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("do the weird thing")
    assert await caller.reply_text() == "Ok."
    result = next(m for m in messages(fake_llm) if m["role"] == "tool")["content"]
    assert result.startswith("error: weird failed: TypeError")
    await caller.hangup()


async def test_gzipped_stream_is_read(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=["Zipped", " reply."], gzip=True))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    assert await caller.reply_text() == "Zipped reply."
    await caller.hangup()


async def test_stream_ending_with_finish_reason_but_no_done_is_complete(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=["All", " said."], done=False))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    assert await caller.reply_text() == "All said."
    assert "llm.fault" not in relay.kinds()
    await caller.hangup()


async def test_stall_in_the_middle_of_a_stream_times_out(relay_factory, fake_llm):
    relay = relay_factory(llm_timeout=0.3)
    fake_llm.enqueue(Script(tokens=["Start", " then", " stall"], delay=1.0))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hi")
    text = await caller.reply_text()
    assert text.startswith("Start") and text.endswith(relay.config.agent_config.apology)
    fault = next(e for e in relay.events if e.kind == "llm.fault")
    assert fault.data["kind"] == "timeout"
    await caller.hangup()


async def test_hangup_with_a_pending_dtmf_flush_starts_nothing(relay_factory, fake_llm):
    relay = relay_factory(agent_dtmf_buffer=True, agent_dtmf_pause=0.2)
    caller = await TwilioCaller(relay).connect()
    await caller.dtmf("9")
    await caller.hangup()
    await asyncio.sleep(0.5)
    assert wait_until(lambda: len(relay.registry) == 0)
    assert fake_llm.records == []
    assert "agent.reply" not in relay.kinds()
