"""The chat request, both ways it is sent: directly (no retries, the default) or by the SDK.

The relay sends the request itself when no retries are configured (issue 11: the SDK's request
path cost about 0.7 ms of CPU per turn). Both ways must be the same request on the wire and the
same fault in the call's events. Real HTTP against the fake LLM on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fakes.fake_llm import FakeLLM, Script
from relay_server.chat import LLMError
from relay_server.config import LLMConfig
from relay_server.llm import LLMClient
from tests.support import free_port

pytestmark = pytest.mark.asyncio

#: max_retries -> the path it selects.
PATHS = {"direct": 0, "sdk": 1}

TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def client(base_url: str, path: str, timeout: float = 5.0) -> LLMClient:
    config = LLMConfig(
        base_url=base_url, api_key="sk-test", max_retries=PATHS[path], timeout=timeout
    )
    return LLMClient(config)


async def said(llm: LLMClient, **kwargs: Any) -> str:
    kwargs.setdefault("model", "fake-llm")
    kwargs.setdefault("messages", MESSAGES)
    async with llm.stream(**kwargs) as stream:
        return "".join([token async for token in stream])


async def fault(llm: LLMClient) -> LLMError:
    with pytest.raises(LLMError) as raised:
        await said(llm)
    return raised.value


@pytest.mark.parametrize("path", PATHS)
async def test_the_request_is_the_sdks_on_the_wire(fake_llm: FakeLLM, path: str) -> None:
    llm = client(fake_llm.base_url, path)
    try:
        fake_llm.enqueue(Script(tokens=["Hello", " there."]))
        assert await said(llm, tools=TOOLS, temperature=0.2) == "Hello there."
    finally:
        await llm.aclose()
    (record,) = fake_llm.records
    assert record.body == {
        "model": "fake-llm",
        "messages": MESSAGES,
        "stream": True,
        "tools": TOOLS,
        "temperature": 0.2,
        "stream_options": {"include_usage": True},
    }
    headers = {k.lower(): v for k, v in record.headers.items()}
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["content-type"] == "application/json"
    sdk = llm._client
    assert headers["user-agent"] == sdk.user_agent
    for name, value in sdk.platform_headers().items():  # X-Stainless-*: the SDK's own
        assert headers[name.lower()] == value


async def test_both_paths_send_the_same_request(fake_llm: FakeLLM) -> None:
    for path in PATHS:
        llm = client(fake_llm.base_url, path)
        try:
            await said(llm, tools=TOOLS)
        finally:
            await llm.aclose()
    direct, sdk = fake_llm.records
    assert direct.body == sdk.body
    skip = {"host", "content-length", "accept", "accept-encoding", "x-stainless-retry-count"}
    # the SDK's own bookkeeping (its retry count, read timeout, raw-response marker)
    skip |= {"x-stainless-read-timeout", "x-stainless-raw-response", "connection"}
    assert {k.lower(): v for k, v in direct.headers.items() if k.lower() not in skip} == {
        k.lower(): v for k, v in sdk.headers.items() if k.lower() not in skip
    }


@pytest.mark.parametrize(
    ("status", "kind"), [(400, "status"), (401, "status"), (429, "rate_limit"), (500, "server")]
)
async def test_a_refused_request_is_the_same_fault_both_ways(
    fake_llm: FakeLLM, status: int, kind: str
) -> None:
    faults = {}
    for path in PATHS:
        llm = client(fake_llm.base_url, path)
        # the SDK path retries once (max_retries 1): the second answer is the same refusal
        fake_llm.enqueue(*[Script(fault="status", status=status)] * (1 + PATHS[path]))
        try:
            faults[path] = await fault(llm)
        finally:
            await llm.aclose()
    assert (faults["direct"].kind, faults["direct"].status) == (kind, status)
    assert (faults["sdk"].kind, faults["sdk"].status) == (kind, status)
    if kind == "status":  # the server's own words reach the call's events
        assert "Invalid request." in faults["direct"].detail or "API key" in faults["direct"].detail
        assert faults["direct"].detail.startswith(f"the LLM refused the request (HTTP {status})")


@pytest.mark.parametrize("path", PATHS)
async def test_nothing_listening_is_a_connection_fault(path: str) -> None:
    port = free_port()
    llm = client(f"http://127.0.0.1:{port}/v1", path)
    try:
        problem = await fault(llm)
    finally:
        await llm.aclose()
    assert problem.kind == "connection"
    assert problem.detail == f"connection refused to 127.0.0.1:{port}"


async def test_no_answer_in_time_is_a_timeout_on_the_direct_path(fake_llm: FakeLLM) -> None:
    llm = client(fake_llm.base_url, "direct", timeout=0.3)
    fake_llm.enqueue(Script(fault="hang"))
    try:
        problem = await fault(llm)
    finally:
        await llm.aclose()
    assert (problem.kind, problem.detail) == ("timeout", "the LLM did not answer in time")


async def test_with_retries_the_sdk_tries_again(fake_llm: FakeLLM) -> None:
    llm = client(fake_llm.base_url, "sdk")
    fake_llm.enqueue(Script(fault="status", status=503), Script(tokens=["Second", " try."]))
    try:
        assert await said(llm) == "Second try."
    finally:
        await llm.aclose()
    assert len(fake_llm.records) == 2


@pytest.mark.parametrize("path", PATHS)
async def test_a_gzipped_stream_is_read(fake_llm: FakeLLM, path: str) -> None:
    llm = client(fake_llm.base_url, path)
    fake_llm.enqueue(Script(tokens=["Zipped", " reply."], gzip=True))
    try:
        assert await said(llm) == "Zipped reply."
    finally:
        await llm.aclose()


async def test_a_finished_stream_gives_its_connection_back_a_cut_one_closes_it(
    fake_llm: FakeLLM,
) -> None:
    llm = client(fake_llm.base_url, "direct")
    fake_llm.enqueue(
        Script(tokens=["One."]),
        Script(tokens=["Two."]),
        Script(tokens=["Three", " is", " cut"], delay=0.05),
        Script(tokens=["Four."]),
    )
    try:
        assert await said(llm) == "One."
        assert await said(llm) == "Two."
        async with llm.stream(model="fake-llm", messages=MESSAGES) as stream:
            async for _token in stream:
                break  # a barge-in: the turn leaves the stream at its first token
        assert await asyncio.to_thread(
            fake_llm.wait_for, lambda: fake_llm.records[2].client_disconnected, 30.0
        )
        assert await said(llm) == "Four."
    finally:
        await llm.aclose()
    one, two, three, four = (r.peer for r in fake_llm.records)
    assert one == two == three  # one kept-alive connection for the finished streams
    assert four != three  # the cut stream's connection was closed, not reused
    assert not fake_llm.records[2].completed
