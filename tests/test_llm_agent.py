"""The default LLM agent over real sockets: the wiring end to end.

Streaming, barge-in closing the HTTP stream, a tool round-trip, faults of the wire. The agent's
behaviour (history, tools, filler, silence, DTMF) is tested in-process over the gated fake model:
tests/test_agent_*.py.
"""

from __future__ import annotations

import json
import time

import pytest

from fakes.fake_llm import Script, ToolCallSpec
from relay_server.protocol import Text
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
    assert first == Text(token="Hello", last=False)
    rest = await caller.recv_turn()
    # tokens were forwarded one by one while the model was still generating (not buffered)
    assert time.monotonic() - t0 >= 0.3
    assert [f.token for f in rest] == [" there", ",", " friend.", ""]
    assert rest[-1].last is True
    body = fake_llm.records[-1].body
    assert body["stream"] is True and body["model"] == "gpt-4o-mini"
    assert body["messages"][0]["role"] == "system"
    assert body["messages"][-1] == {"role": "user", "content": "hi"}
    await caller.hangup()


async def test_barge_in_stops_the_reply_and_closes_the_llm_stream(relay, fake_llm):
    fake_llm.enqueue(Script(tokens=LONG, delay=0.03))
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("tell me a long story")
    got = [await caller.recv() for _ in range(5)]
    assert all(isinstance(f, Text) and not f.last for f in got)
    await caller.interrupt("word0 word1", 700)
    after = await caller.quiet(0.5)
    # apart from the turn-closing frame, nothing of the interrupted reply follows
    worded = [f for f in after if isinstance(f, Text) and f.token]
    closing = [f for f in after if f == Text(token="", last=True)]
    assert len(worded) <= 1  # at most a token already on the wire when the interrupt left
    assert len(closing) == 1 and after[-1] == closing[0]
    record = fake_llm.records[-1]
    assert wait_until(lambda: record.client_disconnected, 2)
    assert record.tokens_sent < len(LONG) and not record.completed
    assert relay.kinds(caller.call_sid).count("barge_in") == 1
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
