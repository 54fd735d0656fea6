"""Tests for the fake OpenAI server, over real HTTP with the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from fakes.fake_llm import FakeLLM, Script, ToolCallSpec

MESSAGES: Any = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there general"},
]
REQUEST: dict[str, Any] = {"model": "gpt-test", "messages": MESSAGES, "stream": True}


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest_asyncio.fixture
async def api(fake: FakeLLM) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=fake.base_url, api_key="x", max_retries=0, timeout=5.0) as sdk:
        yield sdk


# ``timeout`` is FakeLLM.wait_for's own (a thread's wait), passed on (ASYNC109).
async def wait_for(fake: FakeLLM, predicate: Any, timeout: float) -> bool:  # noqa: ASYNC109
    """``fake.wait_for`` without blocking this test's event loop."""
    return await asyncio.to_thread(fake.wait_for, predicate, timeout)


async def raw_lines(fake: FakeLLM) -> tuple[list[str], Exception | None]:
    """POST a streaming request with httpx; return the SSE lines and the read error."""
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=5) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json=REQUEST) as resp,
    ):
        assert resp.status_code == 200
        try:
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
        except httpx.TransportError as exc:
            return lines, exc
    return lines, None


@pytest.mark.asyncio
async def test_echo_streaming_content_deltas(fake: FakeLLM, api: AsyncOpenAI) -> None:
    stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert contents == ["You", " said", ":", " hello", " there", " general"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].model == "gpt-test"
    (rec,) = fake.records
    assert rec.completed and not rec.client_disconnected
    assert rec.tokens_sent == 6
    assert rec.body["messages"] == MESSAGES
    assert rec.first_chunk_at is not None and rec.first_chunk_at >= rec.received_at


@pytest.mark.asyncio
async def test_two_tool_calls_stream_as_fragments(fake: FakeLLM, api: AsyncOpenAI) -> None:
    weather = json.dumps({"city": "Paris", "unit": "celsius"})
    time_args = json.dumps({"tz": "Europe/Paris"})
    fake.enqueue(
        Script(
            tokens=["Let me", " check."],
            tool_calls=[
                ToolCallSpec("get_weather", weather),
                ToolCallSpec("get_time", time_args, id="call_abc", fragments=5),
            ],
        )
    )
    stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    calls: dict[int, dict[str, Any]] = {}
    fragments: dict[int, int] = {}
    content = ""
    finish = None
    async for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        finish = choice.finish_reason or finish
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function and tc.function.name:
                call["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
                fragments[tc.index] = fragments.get(tc.index, 0) + 1

    assert content == "Let me check."
    assert finish == "tool_calls"
    assert sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather"
    assert calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls[1] == {"id": "call_abc", "name": "get_time", "arguments": time_args}
    assert fragments == {0: 3, 1: 5}
    assert fake.records[0].completed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "exc_type"), [(429, openai.RateLimitError), (500, openai.InternalServerError)]
)
async def test_status_fault_raises_sdk_error(
    fake: FakeLLM, api: AsyncOpenAI, status: int, exc_type: type[openai.APIStatusError]
) -> None:
    fake.enqueue(Script(fault="status", status=status))
    with pytest.raises(exc_type) as info:
        await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and info.value.body["message"]
    assert (info.value.response.headers.get("retry-after") == "0") == (status == 429)
    assert fake.records[0].tokens_sent == 0 and not fake.records[0].completed


@pytest.mark.asyncio
async def test_cut_closes_without_done(fake: FakeLLM) -> None:
    fake.enqueue(Script(tokens=["a", "b", "c", "d", "e"], fault="cut", cut_after=2))
    lines, error = await raw_lines(fake)

    assert isinstance(error, httpx.RemoteProtocolError)  # incomplete chunked body
    assert len(lines) == 3  # role chunk + 2 tokens
    assert not any("[DONE]" in line or 'finish_reason":"stop' in line for line in lines)
    rec = fake.records[0]
    assert rec.tokens_sent == 2 and not rec.completed and not rec.client_disconnected


@pytest.mark.asyncio
async def test_cut_and_reset_surface_as_sdk_connection_errors(
    fake: FakeLLM, api: AsyncOpenAI
) -> None:
    for fault in ("cut", "reset"):
        fake.enqueue(Script(tokens=["a", "b", "c"], fault=fault, cut_after=1))
        stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        got: list[str | None] = []
        with pytest.raises(openai.APIConnectionError):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert got == ["", "a"], fault
    assert [r.tokens_sent for r in fake.records] == [1, 1]


@pytest.mark.asyncio
async def test_garbage_line_then_stream_continues(fake: FakeLLM) -> None:
    fake.enqueue(Script(tokens=["a", "b", "c"], fault="garbage", cut_after=1))
    lines, error = await raw_lines(fake)

    assert error is None
    assert lines[2] == "data: {not json"
    assert lines[-1] == "data: [DONE]"
    assert [json.loads(x[6:])["choices"][0]["delta"] for x in lines[3:5]] == [
        {"content": "b"},
        {"content": "c"},
    ]
    assert fake.records[0].completed


@pytest.mark.asyncio
async def test_hang_times_out_and_records_disconnect(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(fault="hang"))
    with pytest.raises(openai.APITimeoutError):  # the client's 0.3 s, not a hung test
        await api.with_options(timeout=0.3).chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True
        )

    assert await wait_for(fake, lambda: fake.records[0].client_disconnected, 30.0)
    rec = fake.records[0]
    assert rec.tokens_sent == 0 and not rec.completed
    assert rec.disconnected_at is not None
    assert rec.disconnected_at - rec.received_at > 0.25  # the client gave up at its timeout


@pytest.mark.asyncio
async def test_early_close_marks_client_disconnected(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(tokens=[f" t{i}" for i in range(50)], delay=0.02))
    async with api.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=MESSAGES, stream=True
    ) as resp:
        async for line in resp.http_response.aiter_lines():
            assert line.startswith("data: ")
            break
        await resp.http_response.aclose()

    assert await wait_for(fake, lambda: fake.records[0].client_disconnected, 30.0)
    rec = fake.records[0]
    assert rec.tokens_sent < 50 and not rec.completed  # the close cut the stream short
    assert rec.disconnected_at is not None
    sent = rec.tokens_sent
    await asyncio.sleep(0.1)
    assert rec.tokens_sent == sent  # the server stopped writing


@pytest.mark.asyncio
async def test_tokens_are_paced_and_flushed_individually(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(tokens=["a", "b", "c", "d"], ttft=0.2, delay=0.1))
    started = time.monotonic()
    stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    arrivals = [time.monotonic() async for c in stream if c.choices and c.choices[0].delta.content]

    assert len(arrivals) == 4
    assert arrivals[0] - started > 0.18  # the first token waits for its TTFT
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(gap > 0.07 for gap in gaps), gaps  # each token on its own, paced, not batched
    rec = fake.records[0]
    assert rec.first_chunk_at is not None
    assert rec.first_chunk_at - rec.received_at >= 0.2


@pytest.mark.asyncio
async def test_non_streaming_and_models(fake: FakeLLM, api: AsyncOpenAI) -> None:
    done = await api.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert done.choices[0].message.content == "You said: hello there general"
    assert done.choices[0].finish_reason == "stop"

    fake.enqueue(Script(tool_calls=[ToolCallSpec("get_weather", '{"city": "Oslo"}')]))
    done = await api.chat.completions.create(model="gpt-test", messages=MESSAGES)
    (call,) = done.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Oslo"}'  # type: ignore[union-attr]

    models = [m.id async for m in api.models.list()]
    assert len(models) == 1


@pytest.mark.asyncio
async def test_queue_is_fifo_then_responder(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(tokens=["one"]), Script(tokens=["two"]))
    fake.responder = lambda body: Script(tokens=[body["model"]])
    texts = []
    for _ in range(3):
        done = await api.chat.completions.create(model="m3", messages=MESSAGES)
        texts.append(done.choices[0].message.content)
    assert texts == ["one", "two", "m3"]
    assert [r.script.tokens for r in fake.records] == [["one"], ["two"], ["m3"]]


@pytest.mark.asyncio
async def test_many_concurrent_streams(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.responder = lambda _body: Script(tokens=[" x"] * 20, ttft=0.05, delay=0.01)

    async def one() -> str:
        stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    results = await asyncio.gather(*(one() for _ in range(200)))
    assert results == [" x" * 20] * 200
    assert len(fake.records) == 200 and all(r.completed for r in fake.records)


def test_stop_does_not_hang_with_open_hanging_stream() -> None:
    fake = FakeLLM().start()
    fake.enqueue(Script(fault="hang"))
    http = httpx.Client(timeout=10)

    def request() -> None:
        with contextlib.suppress(httpx.TransportError):
            http.post(f"{fake.base_url}/chat/completions", json=REQUEST)

    caller = threading.Thread(target=request, daemon=True)
    caller.start()
    assert fake.wait_for(lambda: len(fake.records) == 1, 2.0)
    stopper = threading.Thread(target=fake.stop, daemon=True)
    stopper.start()
    stopper.join(30)  # a hang guard: it returns at once (the stream is cut, not waited for)
    assert not stopper.is_alive()
    caller.join(30)
    assert not caller.is_alive()
    assert not fake.records[0].client_disconnected  # our own shutdown, not the client
    http.close()


def test_cli_serves_fixed_script() -> None:
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(  # leaving the block closes the pipe
        [sys.executable, "-m", "fakes.fake_llm", "--port", "0", "--tokens", "3"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            body = httpx.post(f"{base_url}/chat/completions", json=REQUEST, timeout=5).text
            deltas = [
                json.loads(line[6:])["choices"][0]["delta"].get("content")
                for line in body.splitlines()
                if line.startswith("data: {")
            ]
            assert deltas == ["", " tok1", " tok2", " tok3", None]
            assert body.rstrip().endswith("data: [DONE]")
        finally:
            proc.terminate()
            assert proc.wait(5) == 0


async def raw_bytes(fake: FakeLLM, limit: int) -> tuple[bytes, int]:
    """POST a streaming request; read at most ``limit`` bytes of the body, then close.

    Returns what was read and the size of the largest single read.
    """
    data, largest = bytearray(), 0
    async with (
        httpx.AsyncClient(timeout=5) as http,
        http.stream("POST", f"{fake.base_url}/chat/completions", json=REQUEST) as resp,
    ):
        async for chunk in resp.aiter_raw():
            data += chunk
            largest = max(largest, len(chunk))
            if len(data) >= limit:
                break
    return bytes(data), largest


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kind", "line"),
    [
        ("comment", ": keep-alive"),
        ("empty", '"delta":{},"finish_reason":null'),
        ("role", '"delta":{"role":"assistant"}'),
    ],
)
async def test_keepalives_for_a_while_then_the_tokens(fake: FakeLLM, kind: str, line: str) -> None:
    fake.enqueue(
        Script(tokens=["a", "b"], keepalive=0.3, keepalive_every=0.05, keepalive_kind=kind)
    )
    lines, error = await raw_lines(fake)

    assert error is None
    keepalives = [x for x in lines[1:] if line in x]
    assert len(keepalives) >= 3
    assert lines.index(keepalives[-1]) < next(i for i, x in enumerate(lines) if '"a"' in x)
    assert lines[-1] == "data: [DONE]"
    assert fake.records[0].first_chunk_at - fake.records[0].received_at >= 0.3  # type: ignore[operator]


@pytest.mark.asyncio
async def test_keepalives_forever_after_some_tokens(fake: FakeLLM) -> None:
    fake.enqueue(Script(tokens=["a", "b"], keepalive=math.inf, keepalive_after=1))
    data, _ = await raw_bytes(fake, 2000)

    text = data.decode()
    assert '"a"' in text and '"b"' not in text
    assert text.count(": keep-alive\n\n") > 20
    assert await wait_for(fake, lambda: fake.records[0].client_disconnected, 2.0)
    assert fake.records[0].tokens_sent == 1


@pytest.mark.asyncio
async def test_an_endless_line_is_streamed_in_pieces(fake: FakeLLM) -> None:
    fake.enqueue(Script(tokens=["a"], long_line=math.inf, line_piece=4096))
    data, largest = await raw_bytes(fake, 1 << 20)

    head, _, line = data.partition(b"\n\n")
    assert head.startswith(b"data: ")
    assert line.startswith(b'data: {"choices":[{"index":0,"delta":{"content":"xxxx')
    assert b"\n" not in line  # 1 MiB and no end of line
    assert largest <= 64 * 1024
    assert await wait_for(fake, lambda: fake.records[0].client_disconnected, 2.0)


@pytest.mark.asyncio
async def test_a_long_line_that_ends_is_a_valid_chunk(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(tokens=["!"], long_line=100_000, line_piece=1000))
    stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    content = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert content == "x" * 100_000 + "!"


@pytest.mark.asyncio
async def test_repeat_streams_a_very_long_reply(fake: FakeLLM, api: AsyncOpenAI) -> None:
    fake.enqueue(Script(tokens=[" a", " b"], repeat=5000))
    stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
    content = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert content == " a b" * 5000
    assert fake.records[0].tokens_sent == 10_000 and fake.records[0].completed
    done = await api.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert done.choices[0].message.content == "You said: hello there general"


def test_on_tick_rounds_up_to_the_shared_clock() -> None:
    """A due time moves to the first multiple of the tick at or after it."""
    from fakes.fake_llm import _on_tick

    assert _on_tick(1.000, 0.02) == pytest.approx(1.00)
    assert _on_tick(1.001, 0.02) == pytest.approx(1.02)
    assert _on_tick(1.019, 0.02) == pytest.approx(1.02)
    with pytest.raises(ValueError, match="tick"):
        Script(tick=-1)


@pytest.mark.asyncio
async def test_tick_paces_every_stream_on_one_clock(fake: FakeLLM, api: AsyncOpenAI) -> None:
    """With a tick, a stream's tokens wait for the shared clock; all of them arrive in order.

    Only lower bounds: a token never leaves before its tick (a loaded machine makes it late).
    """
    fake.enqueue(*(Script(tokens=["a", "b", "c"], ttft=0.03, delay=0.02, tick=0.02),) * 2)

    async def read() -> list[str]:
        stream = await api.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        return [
            c.choices[0].delta.content
            async for c in stream
            if c.choices and c.choices[0].delta.content
        ]

    first, second = await asyncio.gather(read(), read())

    assert first == second == ["a", "b", "c"]
    for rec in fake.records:
        assert rec.first_chunk_at is not None
        due = math.ceil((rec.received_at + 0.03) / 0.02 - 1e-9) * 0.02
        assert rec.first_chunk_at >= due - 1e-3  # the loop's clock resolution
