"""An LLM that abuses the relay (issue 9): the figures, for one source tree at a time.

Runs ``crctl serve`` from ``--tree`` (default: this checkout; for the code before a change, a
``git worktree add /tmp/before <commit>``, run with this checkout's venv) as a subprocess on
127.0.0.1, against the fake LLM (``fakes/fake_llm.py``, in this process) and a caller
that talks ConversationRelay over a WebSocket (the socket URL taken from the relay's own
``/twiml``, signatures off: no auth token, loopback only). Nothing leaves the machine; every
scenario is bounded in count and time (``--cap``).

Scenarios (``--only`` picks some):

* ``keepalive``: the LLM answers 200, then only ``: keep-alive`` SSE comments (every 0.5 s,
  as queuing gateways do) for ever; the relay runs with ``--llm-timeout 2``. Seconds from the
  prompt to the end of the caller's turn (the apology), or "none" within ``--cap`` s.
* ``longline``: one call's LLM sends a 32 MiB ``data:`` line without a newline (64 KiB pieces,
  as fast as the relay reads; then the line ends and the answer goes on). Meanwhile a second
  call takes turns one after the other (a 3-token answer at once): its first-token latency
  (prompt sent to first ``text`` frame received), against the same turns without the flood;
  the relay's RSS (sampled every 50 ms, and the kernel's peak VmHWM) and its CPU seconds
  until the flooded call's turn ends (or ``--cap``).
* ``longreply``: one reply of 10,000 and one of 60,000 tokens (" w00001"…, 7 characters), sent
  as fast as the relay reads: the relay process's CPU (utime + stime) over the reply, per token.

    .venv/bin/python -m bench.abuse_llm [--tree /tmp/before] [--only keepalive,longline] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import websockets  # noqa: E402

from bench.loadgen import setup_for  # noqa: E402
from bench.procs import cpu_seconds, end_relay, free_port, rss_kib  # noqa: E402
from fakes.fake_llm import FakeLLM, Script  # noqa: E402
from relay_server.protocol import Text  # noqa: E402
from relay_server.protocol.twilio_side import TwilioSide  # noqa: E402

now = time.monotonic


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


class Relay:
    """``crctl serve`` from ``tree`` on a free loopback port, wired to ``llm_url``."""

    def __init__(self, tree: Path, llm_url: str, llm_timeout: float) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.state = tempfile.mkdtemp(prefix="crctl-abuse-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CRCTL_", "TWILIO_"))}
        env.update(
            OPENAI_API_KEY="x",
            OPENAI_BASE_URL=llm_url,
            PYTHONPATH=str(tree),
            CRCTL_STATE_DIR=self.state,
            NO_PROXY="127.0.0.1",
            no_proxy="127.0.0.1",
        )
        args = [
            sys.executable, "-m", "crctl", "serve", "--host", "127.0.0.1", "--port",
            str(self.port), "--agent", "llm", "--silence-timeout", "0", "--filler-after-ms",
            "0", "--llm-timeout", f"{llm_timeout:g}",
        ]  # fmt: skip
        self.log = open(Path(self.state) / "relay.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, env=env, cwd=self.state, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = now() + 30
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited; see {self.log.name}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.base + "/healthz", timeout=1),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("relay did not start in 30 s")

    def socket_url(self, call_sid: str) -> str:
        """``/ws`` with the query the relay's ``/twiml`` gives this call (if any)."""
        form = f"CallSid={call_sid}&CallStatus=ringing&AccountSid=AC{'0' * 32}".encode()
        with urllib.request.urlopen(self.base + "/twiml", data=form, timeout=5) as resp:
            twiml = resp.read().decode()
        node = ET.fromstring(twiml).find("Connect/ConversationRelay")
        query = urlsplit(node.attrib["url"] if node is not None else "").query
        return f"ws://127.0.0.1:{self.port}/ws" + (f"?{query}" if query else "")

    def stop(self) -> None:
        end_relay(self.proc, self.log, self.state)


class Caller:
    def __init__(self, relay: Relay, n: int) -> None:
        self.relay = relay
        self.sid = f"CA{n:032x}"
        self.ws: Any = None
        self.side = TwilioSide()

    async def connect(self) -> Caller:
        url = await asyncio.to_thread(self.relay.socket_url, self.sid)
        self.ws = await websockets.connect(url, max_size=None, open_timeout=10)
        self.side.send_setup(setup_for(self.sid))
        await self._flush()
        return self

    async def _flush(self) -> None:
        for frame in self.side.data_to_send():
            await self.ws.send(frame)

    async def prompt(self, text: str) -> None:
        self.side.send_prompt(text)
        await self._flush()

    # A timeout is a measured outcome here: the run records it and goes on (ASYNC109).
    async def turn(self, timeout: float) -> tuple[float | None, int, str]:  # noqa: ASYNC109
        """Until ``last: true``: seconds to the first text frame, frames, the text's end."""
        started, first, frames, tail = now(), None, 0, ""
        deadline = started + timeout
        while True:
            self.side.receive_data(await asyncio.wait_for(self.ws.recv(), deadline - now()))
            self.side.events_received()
            self.side.data_to_send()  # no 64107 answers: they would skew what is measured
            for frame in self.side.messages_received():
                if not isinstance(frame, Text):
                    continue
                frames += 1
                if first is None and frame.token:
                    first = now() - started
                tail = (tail + frame.token)[-80:]
                if frame.last:
                    return first, frames, tail

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()


def ms(values: list[float]) -> dict[str, Any]:
    values = sorted(values)
    if not values:
        return {"n": 0}
    p99 = values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 2),
        "p99_ms": round(p99 * 1000, 2),
        "max_ms": round(values[-1] * 1000, 2),
    }


# ------------------------------------------------------------------------------ scenarios
async def keepalive(tree: Path, fake: FakeLLM, cap: float) -> dict[str, Any]:
    relay = Relay(tree, fake.base_url, llm_timeout=2)
    try:
        fake.enqueue(Script(tokens=["never"], keepalive=math.inf, keepalive_every=0.5))
        caller = await Caller(relay, 1).connect()
        started = now()
        await caller.prompt("hello")
        try:
            _, _, tail = await caller.turn(cap)
            return {"apology_after_s": round(now() - started, 2), "said": tail.strip()}
        except TimeoutError:
            return {"apology_after_s": None, "said": f"nothing within {cap:g} s"}
        finally:
            await caller.close()
    finally:
        relay.stop()


async def other_turns(caller: Caller, stop: asyncio.Event, cap: float) -> list[float]:
    firsts: list[float] = []
    deadline = now() + cap
    while not stop.is_set() and now() < deadline:
        await caller.prompt("are you there")
        first, _, _ = await caller.turn(cap)
        if first is not None:
            firsts.append(first)
        await asyncio.sleep(0.05)
    return firsts


async def longline(tree: Path, fake: FakeLLM, cap: float) -> dict[str, Any]:
    relay = Relay(tree, fake.base_url, llm_timeout=max(cap, 30))
    fake.responder = lambda _body: Script(tokens=["Yes", " I", " am."])
    try:
        other = await Caller(relay, 2).connect()
        quiet = asyncio.Event()
        quiet_task = asyncio.ensure_future(other_turns(other, quiet, cap))
        await asyncio.sleep(3)
        quiet.set()
        baseline = await quiet_task
        rss_before = rss_kib(relay.proc.pid)

        fake.enqueue(Script(tokens=[" end."], long_line=32 << 20, line_piece=64 << 10))
        flood = await Caller(relay, 1).connect()
        cpu0, started = cpu_seconds(relay.proc.pid), now()
        await flood.prompt("hello")
        flooded = asyncio.Event()
        during_task = asyncio.ensure_future(other_turns(other, flooded, cap))
        samples: list[int] = []

        async def sample() -> None:
            while not flooded.is_set():
                samples.append(rss_kib(relay.proc.pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        try:
            _, _, tail = await flood.turn(cap)
            outcome = {"turn_ended_after_s": round(now() - started, 2), "said": tail.strip()}
        except TimeoutError:
            outcome = {"turn_ended_after_s": None, "said": f"nothing within {cap:g} s"}
        cpu = cpu_seconds(relay.proc.pid) - cpu0
        flooded.set()
        during = await during_task
        await sampler
        result = {
            **outcome,
            "relay_cpu_s": round(cpu, 2),
            "rss_before_mib": round(rss_before / 1024, 1),
            "rss_max_sampled_mib": round(max(samples, default=0) / 1024, 1),
            "rss_peak_vmhwm_mib": round(peak_rss_kib(relay.proc.pid) / 1024, 1),
            "other_call_first_token_baseline": ms(baseline),
            "other_call_first_token_during": ms(during),
        }
        await flood.close()
        await other.close()
        return result
    finally:
        fake.responder = _echo
        relay.stop()


async def longreply(tree: Path, fake: FakeLLM, cap: float) -> dict[str, Any]:
    relay = Relay(tree, fake.base_url, llm_timeout=30)
    result: dict[str, Any] = {}
    try:
        for n in (10_000, 60_000):
            words = [f" w{i:05d}" for i in range(10_000)]
            fake.enqueue(Script(tokens=words, repeat=n // 10_000))
            caller = await Caller(relay, n).connect()
            await asyncio.sleep(0.5)
            cpu0 = cpu_seconds(relay.proc.pid)
            await caller.prompt("tell me everything")
            _, frames, _ = await caller.turn(cap)
            cpu = cpu_seconds(relay.proc.pid) - cpu0
            result[f"{n}_tokens"] = {
                "frames": frames,
                "relay_cpu_s": round(cpu, 2),
                "cpu_per_token_us": round(cpu / n * 1e6, 1),
            }
            await caller.close()
        return result
    finally:
        relay.stop()


def _echo(body: dict[str, Any]) -> Script:
    from fakes.fake_llm import echo_responder

    return echo_responder(body)


SCENARIOS = {"keepalive": keepalive, "longline": longline, "longreply": longreply}


async def run(tree: Path, only: list[str], cap: float) -> dict[str, Any]:
    out: dict[str, Any] = {"tree": str(tree)}
    with contextlib.suppress(Exception):
        done = await asyncio.to_thread(
            subprocess.run,
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        out["commit"] = done.stdout.strip()
    with FakeLLM(keep_records=False) as fake:
        for name in only:
            out[name] = await SCENARIOS[name](tree, fake, cap)
            print(f"{name}: {json.dumps(out[name])}", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="abuse_llm", description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree of the relay")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios")
    parser.add_argument("--cap", type=float, default=90.0, help="seconds per wait, at most")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    result = asyncio.run(run(args.tree.resolve(), only, args.cap))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
