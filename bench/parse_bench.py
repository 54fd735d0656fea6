"""Micro-benchmark of the relay's LLM-stream parsing choice ("measure the choice").

CPU per token of the *consuming* process (``time.process_time``) for four ways of reading the
same streamed chat completion from the fake LLM over loopback:

* ``relay``  – relay_server.llm.LLMClient/ChatStream: the SDK's raw streaming response, SSE
  lines split by hand, each ``data:`` payload decoded by msgspec into small Structs;
* ``sdk``    – the SDK's own parsed stream: ``client.chat.completions.create(..., stream=True)``
  iterating ``ChatCompletionChunk`` (pydantic) objects;
* ``json``   – the relay's raw path with ``json.loads`` instead of msgspec (what msgspec buys);
* ``floor``  – the raw response's bytes read and thrown away (HTTP + SDK request cost, no parse).

All four share one ``openai.AsyncOpenAI`` (the relay's LLMClient's), so the HTTP stack is the
same. The consumer is pinned to core 0, the fake LLM to core 1. Each round runs every path
(in rotated order) over ``--streams`` streams of ``--tokens`` tokens, ``--concurrency`` at a
time, and once more with 1 token per stream to split the per-stream overhead from the
marginal per-token cost. The median of ``--rounds`` rounds is reported.

    .venv/bin/python -m bench.parse_bench [--streams 200 --tokens 100] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procs import FakeProc  # noqa: E402
from relay_server.config import LLMConfig  # noqa: E402
from relay_server.llm import LLMClient  # noqa: E402

MODEL = "fake-llm"
LABELS = {
    "relay": "the relay's: raw response + msgspec (relay_server.llm)",
    "sdk": "SDK parsed stream (ChatCompletionChunk)",
    "json": "raw response + json.loads",
    "floor": "raw bytes only, no parsing (floor)",
}


def messages(n: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a friendly voice assistant on a phone call."},
        {"role": "user", "content": f"parse n={n} ttft=0 d=0"},
    ]


async def path_relay(llm: LLMClient, n: int) -> int:
    count = 0
    async with llm.stream(model=MODEL, messages=messages(n)) as stream:
        async for text in stream:
            # One string per network read, holding every token of that read: the fake's
            # tokens are " tok<k>", so they are counted by their "tok".
            count += text.count("tok")
    return count


async def path_sdk(llm: LLMClient, n: int) -> int:
    count = 0
    stream = await llm._client.chat.completions.create(
        model=MODEL,
        messages=messages(n),
        stream=True,  # type: ignore[arg-type]
    )
    async with stream:
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    count += 1
    return count


async def path_json(llm: LLMClient, n: int) -> int:
    count = 0
    manager = llm._client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=messages(n),
        stream=True,  # type: ignore[arg-type]
    )
    async with manager as response:
        buffer = b""
        done = False
        async for chunk in response.http_response.aiter_raw():
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    break
                line = buffer[:end].rstrip(b"\r")
                buffer = buffer[end + 1 :]
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                obj = json.loads(payload)
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        count += 1
            if done:
                break
    return count


async def path_floor(llm: LLMClient, n: int) -> int:
    manager = llm._client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=messages(n),
        stream=True,  # type: ignore[arg-type]
    )
    async with manager as response:
        async for _chunk in response.http_response.aiter_raw():
            pass
    return n  # not counted: nothing is parsed


PATHS: dict[str, Callable[[LLMClient, int], Awaitable[int]]] = {
    "relay": path_relay,
    "sdk": path_sdk,
    "json": path_json,
    "floor": path_floor,
}


async def batch(
    fn: Callable[[LLMClient, int], Awaitable[int]],
    llm: LLMClient,
    streams: int,
    tokens: int,
    concurrency: int,
) -> tuple[float, float, int]:
    """(CPU s, wall s, tokens) for ``streams`` streams, ``concurrency`` at a time."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> int:
        async with sem:
            return await fn(llm, tokens)

    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    c1, w1 = time.process_time(), time.perf_counter()
    got = sum(counts)
    if got != streams * tokens:
        raise RuntimeError(f"{fn.__name__}: {got} tokens, expected {streams * tokens}")
    return c1 - c0, w1 - w0, got


async def run(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    llm = LLMClient(LLMConfig(api_key="x", base_url=base_url, timeout=30.0, max_retries=0))
    names = list(PATHS)
    per_token: dict[str, list[float]] = {k: [] for k in names}
    per_stream: dict[str, list[float]] = {k: [] for k in names}
    walls: dict[str, list[float]] = {k: [] for k in names}
    try:
        for name in names:  # warm-up: connections, imports, caches
            await batch(PATHS[name], llm, 2 * args.concurrency, args.tokens, args.concurrency)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                cpu, wall, got = await batch(
                    PATHS[name], llm, args.streams, args.tokens, args.concurrency
                )
                cpu1, _, _ = await batch(PATHS[name], llm, args.streams, 1, args.concurrency)
                per_token[name].append(cpu / got)
                # marginal cost of one more token, and the cost of a stream with no tokens
                marginal = (cpu - cpu1) / (args.streams * (args.tokens - 1))
                per_stream[name].append(cpu1 / args.streams - marginal)
                walls[name].append(wall)
    finally:
        await llm.aclose()
    paths = {}
    for name in names:
        paths[name] = {
            "label": LABELS[name],
            "us_per_token": round(1e6 * statistics.median(per_token[name]), 2),
            "rounds_us_per_token": [round(1e6 * v, 2) for v in per_token[name]],
            "us_per_stream_overhead": round(1e6 * statistics.median(per_stream[name]), 1),
            "wall_s": round(statistics.median(walls[name]), 3),
        }
    relay, sdk = paths["relay"]["us_per_token"], paths["sdk"]["us_per_token"]
    floor = paths["floor"]["us_per_token"]
    return {
        "streams": args.streams,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "paths": paths,
        "sdk_over_relay": round(sdk / relay, 2),
        # Parsing cost above the raw-bytes floor; None when the relay path is within noise of
        # the floor (the ratio would be meaningless).
        "parse_only_sdk_over_relay": (
            round((sdk - floor) / (relay - floor), 2) if relay - floor > 0.05 * floor else None
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.parse_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    args = parser.parse_args(argv)
    pin = args.pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {0})
    fake = FakeProc(1 if pin else None)
    try:
        result = asyncio.run(run(args, fake.base_url))
    finally:
        fake.stop()
    out = sys.stderr if args.json else sys.stdout
    print(
        f"{args.streams} streams x {args.tokens} tokens, CPU of this process per token:", file=out
    )
    for name, p in result["paths"].items():
        print(
            f"  {name:6} {p['us_per_token']:8.2f} µs/token  (+{p['us_per_stream_overhead']:.0f} µs"
            f"/stream)  rounds {p['rounds_us_per_token']}  {p['label']}",
            file=out,
        )
    print(
        f"  SDK parsed / relay: {result['sdk_over_relay']}x total, "
        f"{floor_ratio_text(result['parse_only_sdk_over_relay'])} above the raw-bytes floor",
        file=out,
    )
    if args.json:
        print(json.dumps(result))
    return 0


def floor_ratio_text(ratio: float | None) -> str:
    """The above-floor ratio for people: ``None`` means the relay path is at the floor."""
    return "n/a (the relay path is at the raw-bytes floor)" if ratio is None else f"{ratio}x"


if __name__ == "__main__":
    sys.exit(main())
