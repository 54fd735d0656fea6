"""Abusive HTTP clients against the relay (issue 9): the figures, for one source tree.

Runs ``crctl serve`` from ``--tree`` (default: this checkout; for the code before a change, a
``git worktree add /tmp/before <commit>``, run with this checkout's venv) as a subprocess on
127.0.0.1 (signatures off: no auth token, loopback only; its API token and events database in a
scratch state folder), against the fake LLM (``fakes/fake_llm.py``, in this process,
answering at once). The relay process and its callers are the ones of ``bench/abuse_llm.py``.
Nothing leaves the machine; everything is bounded in count and time.

Scenarios (``--only`` picks some):

* ``subscribers``: ``--subscribers`` (25) ``GET /events`` clients that never read (4 KiB
  receive buffer) while a call gets ``--pushes`` (600) messages of 60 KiB pushed into it
  through ``POST /calls/{sid}/messages`` (one ``agent.pushed`` event each, ~36 MiB in all).
  The relay's RSS before, its peak while the events flow, and at the end; meanwhile another
  call takes a turn every 0.1 s: its first-token latency (prompt sent to the first ``text``
  frame), against the same turns before the subscribers came.
* ``bigpost``: ``--posts`` (3) POSTs of 10 MiB to ``/action`` (a form with one huge field,
  or with ``--many-fields`` 2.6 million small ones; Content-Length given, no signature), one
  after the other. Meanwhile ``/healthz`` is asked every 20 ms (its latency) and another call
  takes a turn every 0.1 s; the relay's RSS peak; what the relay answered.

    .venv/bin/python -m bench.abuse_http [--tree /tmp/before] [--only bigpost] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.abuse_llm import Caller, Relay, ms  # noqa: E402
from bench.procs import rss_kib  # noqa: E402
from fakes.fake_llm import FakeLLM  # noqa: E402
from relay_server.protocol import Text, encode  # noqa: E402

now = time.monotonic


class Sampler:
    """The relay's RSS every 50 ms, in the background: its peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._task = pid, rss_kib(pid), None

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_kib(self.pid))
            await asyncio.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._task = asyncio.ensure_future(self._run())  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def steady_turns(caller: Caller, stop: asyncio.Event, cap: float) -> list[float]:
    """A turn every 0.1 s until ``stop`` (or ``cap`` s): first-token seconds of each."""
    firsts: list[float] = []
    until = now() + cap
    while not stop.is_set() and now() < until:
        await caller.prompt("are you there")
        first, _, _ = await caller.turn(30)
        if first is not None:
            firsts.append(first)
        await asyncio.sleep(0.1)
    return firsts


async def alone(caller: Caller, n: int) -> list[float]:
    firsts = []
    for _ in range(n):
        await caller.prompt("hello")
        first, _, _ = await caller.turn(10)
        if first is not None:
            firsts.append(first)
    return firsts


def token(relay: Relay) -> str:
    return (Path(relay.state) / "api-token").read_text().strip()


def push(relay: Relay, sid: str, text: str) -> int:
    body = encode(Text(token=text, last=True)).encode()
    request = urllib.request.Request(
        f"{relay.base}/calls/{sid}/messages",
        data=body,
        headers={"Authorization": f"Bearer {token(relay)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


async def subscribers(relay: Relay, count: int, pushes: int, turns: int) -> dict[str, Any]:
    pid = relay.proc.pid
    out: dict[str, Any] = {"rss_kib_before": rss_kib(pid)}
    measured = await Caller(relay, 1).connect()
    out["first_token_alone"] = ms(await alone(measured, turns))
    # the call messages are pushed into: it reads every frame, as Twilio would
    target = await Caller(relay, 2).connect()
    await target.prompt("hi")
    await target.turn(10)

    async def drain() -> None:
        with contextlib.suppress(Exception):
            while True:
                await target.ws.recv()

    drainer = asyncio.ensure_future(drain())
    socks = []
    request = (
        b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
        + token(relay).encode()
        + b"\r\n\r\n"
    )
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(request)  # ... and never reads
        socks.append(sock)
    await asyncio.sleep(0.5)
    out["rss_kib_with_subscribers"] = rss_kib(pid)
    stop = asyncio.Event()
    text = "x" * (60 << 10)
    with Sampler(pid) as sampler:
        meanwhile = asyncio.ensure_future(steady_turns(measured, stop, 120))
        started = now()
        for _ in range(pushes):
            await asyncio.to_thread(push, relay, target.sid, text)
        out["push_s"] = round(now() - started, 1)
        await asyncio.sleep(1)  # the writer stores the last ones and fans them out
        stop.set()
        out["first_token_while_pushing"] = ms(await meanwhile)
    out["rss_kib_peak"] = sampler.peak
    out["rss_kib_after"] = rss_kib(pid)
    ended = 0
    for sock in socks:  # which streams did the relay end? (read what waits, up to 5 s each)
        sock.settimeout(0.2)
        data, deadline = b"", now() + 5
        with contextlib.suppress(OSError):
            while now() < deadline:
                try:
                    chunk = sock.recv(1 << 20)
                except TimeoutError:
                    break  # nothing more now: the stream is still open
                if not chunk or chunk.endswith(b"\r\n0\r\n\r\n"):
                    ended += 1
                    break
                data += chunk
        sock.close()
    out["streams_ended_by_relay"] = ended
    drainer.cancel()
    await measured.close()
    await target.close()
    return out


def big_post(relay: Relay, size: int, many: bool) -> tuple[int, float]:
    """POST ``size`` bytes to /action (one huge field, or ``many`` 4-byte ones); (status, s)."""
    junk = b"&a=b" * (size // 4) if many else b"&Junk=" + b"x" * size
    body = b"CallSid=CA" + b"1" * 32 + junk
    started = now()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=60) as sock:
        sock.sendall(
            b"POST /action HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        with contextlib.suppress(OSError):
            sock.sendall(body)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, now() - started


async def bigpost(relay: Relay, posts: int, turns: int, many: bool) -> dict[str, Any]:
    pid = relay.proc.pid
    out: dict[str, Any] = {"rss_kib_before": rss_kib(pid)}
    measured = await Caller(relay, 1).connect()
    out["first_token_alone"] = ms(await alone(measured, turns))
    health: list[float] = []
    stop = asyncio.Event()

    def healthz() -> None:
        while not stop.is_set():
            started = now()
            with urllib.request.urlopen(relay.base + "/healthz", timeout=30) as response:
                response.read()
            health.append(now() - started)
            time.sleep(0.02)

    with Sampler(pid) as sampler:
        prober = asyncio.ensure_future(asyncio.to_thread(healthz))
        meanwhile = asyncio.ensure_future(steady_turns(measured, stop, 120))
        answers = [await asyncio.to_thread(big_post, relay, 10 << 20, many) for _ in range(posts)]
        await asyncio.sleep(0.5)
        stop.set()
        firsts = await meanwhile
        await prober
    out["answers"] = [{"status": s, "s": round(t, 2)} for s, t in answers]
    out["healthz"] = ms(health)
    out["healthz_max_ms"] = round(max(health) * 1000, 1) if health else None
    out["first_token_during_posts"] = ms(firsts)
    out["first_token_max_ms"] = round(max(firsts) * 1000, 1) if firsts else None
    out["rss_kib_peak"] = sampler.peak
    out["rss_kib_after"] = rss_kib(pid)
    await measured.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree of the relay")
    parser.add_argument("--only", default="subscribers,bigpost")
    parser.add_argument("--subscribers", type=int, default=25, help="/events clients")
    parser.add_argument("--pushes", type=int, default=600, help="60 KiB messages pushed")
    parser.add_argument("--posts", type=int, default=3, help="10 MiB POSTs to /action")
    parser.add_argument("--turns", type=int, default=20, help="turns of the call alone")
    parser.add_argument(
        "--many-fields", action="store_true", help="bigpost: 2.6 million 4-byte fields"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if (
        not 1 <= args.subscribers <= 200
        or not 1 <= args.pushes <= 2000
        or not 1 <= args.posts <= 10
    ):
        parser.error("--subscribers 1..200, --pushes 1..2000, --posts 1..10")
    results: dict[str, Any] = {"tree": str(args.tree)}
    with FakeLLM(keep_records=False) as fake:
        for name in args.only.split(","):
            relay = Relay(args.tree, fake.base_url, llm_timeout=5)
            try:
                if name == "subscribers":
                    results[name] = await subscribers(
                        relay, args.subscribers, args.pushes, args.turns
                    )
                elif name == "bigpost":
                    results[name] = await bigpost(relay, args.posts, args.turns, args.many_fields)
                else:
                    parser.error(f"unknown scenario {name}")
            finally:
                relay.stop()
    print(json.dumps(results, indent=None if args.json else 2))


if __name__ == "__main__":
    asyncio.run(main())
