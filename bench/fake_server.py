"""The benchmark's fake LLM process: fakes.fake_llm.FakeLLM with per-token write stamps.

Run by bench/run.py and bench/parse_bench.py (pinned to the load generator's core)::

    python -m bench.fake_server [--port N]

It prints its base URL on the first stdout line, then answers commands on stdin, one a line:
``dump`` prints one JSON line with the records since the last dump (and forgets them);
``quit`` (or EOF) stops it.

Every request is scripted by its last user message, written by the load generator::

    bench c=<call> t=<turn> n=<tokens> ttft=<s> d=<s> [tick=<s>]  tokens " c<call>t<turn>w<k>@<ns>"
    parse n=<tokens> ttft=<s> d=<s>                       tokens " tok<k>" (no stamp)

``<ns>`` is ``time.monotonic_ns()`` taken when the SSE event is serialised, i.e. immediately
before aiohttp hands it to the socket (``transport.writelines``, no buffering in between).
``tick``: every token on the fake's shared clock (``fakes.fake_llm.Script.tick``, the burst
profile). The relay forwards tokens verbatim, so a client parses the write time out of each token.
CLOCK_MONOTONIC is system-wide on Linux: the stamp compares with the client's clock.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any

import fakes.fake_llm as fake_llm
from fakes.fake_llm import FakeLLM, Script

MARK = "@@T@@"
_MARK_B = MARK.encode()
_orig_sse = fake_llm._sse


def _stamped_sse(obj: dict[str, Any]) -> bytes:
    data = _orig_sse(obj)
    if _MARK_B in data:
        data = data.replace(_MARK_B, str(time.monotonic_ns()).encode())
    return data


# The stream's event() closure looks _sse up in the module at call time, i.e. at write time.
fake_llm._sse = _stamped_sse

_FIELDS = re.compile(r"(\w+)=([0-9.]+)")


def last_user(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") == "user":
            return str(msg.get("content") or "")
    return ""


def responder(body: dict[str, Any]) -> Script:
    text = last_user(body)
    f = dict(_FIELDS.findall(text))
    n = int(f.get("n", 20))
    ttft = float(f.get("ttft", 0))
    delay = float(f.get("d", 0))
    if text.startswith("bench "):
        prefix = f" c{f.get('c', '0')}t{f.get('t', '0')}w"
        tokens = [f"{prefix}{k}@{MARK}" for k in range(n)]
    else:
        tokens = [f" tok{k}" for k in range(n)]
    return Script(tokens=tokens, ttft=ttft, delay=delay, tick=float(f.get("tick", 0)))


def dump(fake: FakeLLM) -> list[dict[str, Any]]:
    with fake._lock:
        records, fake.records = fake.records, []
    return [
        {
            "tag": last_user(r.body),
            "received_at": r.received_at,
            "first_chunk_at": r.first_chunk_at,
            "tokens_sent": r.tokens_sent,
            "completed": r.completed,
            "client_disconnected": r.client_disconnected,
            "disconnected_at": r.disconnected_at,
        }
        for r in records
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.fake_server")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    with FakeLLM(responder, port=args.port, keep_records=True) as fake:
        print(fake.base_url, flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "dump":
                print(json.dumps(dump(fake)), flush=True)
            elif cmd == "quit":
                break


if __name__ == "__main__":
    main()
