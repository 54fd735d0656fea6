"""Idle sockets and slow clients against the relay (issue 9): the figures, for one source tree.

Runs ``crctl serve`` from ``--tree`` (default: this checkout; for the code before a change, a
``git worktree add /tmp/before <commit>``, run with this checkout's venv) as a subprocess on
127.0.0.1 (signatures off: no auth token, loopback only), against the fake LLM
(``fakes/fake_llm.py``, in this process, answering at once). The relay process, its
callers and the fake are the ones of ``bench/abuse_llm.py``. Nothing leaves the machine;
everything is bounded: ``--sockets`` connections (default 500), ``--cap`` seconds of waiting.

Scenarios (``--only`` picks some):

* ``nosetup``: ``--sockets`` WebSockets opened (each at the URL the relay's ``/twiml`` gives
  it) that never send ``setup``. The relay's open descriptors (``/proc/<pid>/fd``) and RSS with
  none, right after they are open, and ``--cap`` s later; how many the relay has closed by
  then. Meanwhile one real call takes ``--turns`` turns: first-token latency (prompt sent to
  the first ``text`` frame), against the same turns before the idle sockets were opened, and
  a turn every 0.1 s from then until the relay closed them all (or ``--cap``).
* ``headers``: ``--sockets`` TCP connections that send half a request
  (``GET /healthz HTTP/1.1``, a ``Host`` header) and then one byte of a header every second;
  the relay's descriptors right after they are open and ``--cap`` s later; how many the relay
  has closed by then, and how many of those with a ``408``.

    .venv/bin/python -m bench.abuse_sockets [--tree /tmp/before] [--only nosetup] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import websockets  # noqa: E402

from bench.abuse_llm import Caller, Relay, ms  # noqa: E402
from bench.procs import rss_kib  # noqa: E402
from fakes.fake_llm import FakeLLM  # noqa: E402

now = time.monotonic


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def turns(caller: Caller, n: int) -> list[float]:
    firsts = []
    for i in range(n):
        await caller.prompt(f"turn {i}")
        first, _, _ = await caller.turn(10)
        if first is not None:
            firsts.append(first)
    return firsts


async def nosetup(relay: Relay, count: int, n_turns: int, cap: float) -> dict[str, Any]:
    pid = relay.proc.pid
    out: dict[str, Any] = {"fds_before": fds(pid), "rss_kib_before": rss_kib(pid)}
    caller = await Caller(relay, 1).connect()
    out["first_token_alone"] = ms(await turns(caller, n_turns))
    urls = [await asyncio.to_thread(relay.socket_url, f"CA{n + 2:032x}") for n in range(count)]
    opened = now()
    idle = await asyncio.gather(
        *(websockets.connect(url, open_timeout=30, ping_interval=None) for url in urls)
    )
    out["open_s"] = round(now() - opened, 2)
    await asyncio.sleep(1)
    out["fds_with_idle"] = fds(pid)
    out["rss_kib_with_idle"] = rss_kib(pid)
    out["first_token_with_idle"] = ms(await turns(caller, n_turns))
    # The idle sockets answer the relay's close (websockets does it), as a live client would.
    closers = [asyncio.ensure_future(ws.wait_closed()) for ws in idle]
    stop = asyncio.Event()

    async def steady() -> list[float]:  # a turn every 0.1 s while the relay closes them
        firsts: list[float] = []
        while not stop.is_set():
            firsts += await turns(caller, 1)
            await asyncio.sleep(0.1)
        return firsts

    meanwhile = asyncio.ensure_future(steady())
    await asyncio.wait(closers, timeout=max(0.0, cap - (now() - opened)))
    stop.set()
    out["first_token_until_closed"] = ms(await meanwhile)
    out["after_s"] = round(now() - opened, 1)
    out["closed_by_relay"] = sum(1 for c in closers if c.done())
    codes = {ws.close_code for ws in idle if ws.close_code is not None}
    out["close_codes"] = sorted(codes)
    await asyncio.sleep(0.5)
    out["fds_after"] = fds(pid)
    out["rss_kib_after"] = rss_kib(pid)
    for c in closers:
        c.cancel()
    await asyncio.gather(*(ws.close() for ws in idle), return_exceptions=True)
    await caller.close()
    return out


async def headers(relay: Relay, count: int, cap: float) -> dict[str, Any]:
    pid = relay.proc.pid
    out: dict[str, Any] = {"fds_before": fds(pid)}
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        conns.append((reader, writer))
    opened = now()
    await asyncio.sleep(1)
    out["fds_with_slow"] = fds(pid)
    closed: list[bytes] = []

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1)
                except TimeoutError:
                    writer.write(b"a")  # one more byte of the header, every second
                    continue
                closed.append(data)  # b"" (closed) or the relay's answer before it closes
                return

    tasks = [asyncio.ensure_future(dribble(r, w)) for r, w in conns]
    await asyncio.wait(tasks, timeout=max(0.0, cap - (now() - opened)))
    out["after_s"] = round(now() - opened, 1)
    out["closed_by_relay"] = len(closed)
    out["answered_408"] = sum(1 for d in closed if d.startswith(b"HTTP/1.1 408"))
    await asyncio.sleep(0.5)
    out["fds_after"] = fds(pid)
    for t in tasks:
        t.cancel()
    for _, w in conns:
        w.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree of the relay")
    parser.add_argument("--only", default="nosetup,headers")
    parser.add_argument("--sockets", type=int, default=500, help="idle/slow connections")
    parser.add_argument("--turns", type=int, default=20, help="turns of the real call")
    parser.add_argument("--cap", type=float, default=15.0, help="s to wait for the relay")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.sockets <= 2000 or not 0 < args.cap <= 120:
        parser.error("--sockets 1..2000, --cap up to 120 s")
    results: dict[str, Any] = {"tree": str(args.tree)}
    with FakeLLM(keep_records=False) as fake:
        for name in args.only.split(","):
            relay = Relay(args.tree, fake.base_url, llm_timeout=5)
            try:
                if name == "nosetup":
                    results[name] = await nosetup(relay, args.sockets, args.turns, args.cap)
                elif name == "headers":
                    results[name] = await headers(relay, args.sockets, args.cap)
                else:
                    parser.error(f"unknown scenario {name}")
            finally:
                relay.stop()
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    asyncio.run(main())
