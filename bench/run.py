"""Benchmark of the relay: added latency, per-token delay, barge-in, RSS per idle call.

One command, from the repository root (about 2 minutes on 2 cores, always under 5)::

    .venv/bin/python -m bench.run            # or: .venv/bin/python bench/run.py

See bench/README.md for what is measured, how, and the criteria. Loopback only; every loop is
bounded and every child process is stopped at the end (or on any error, Ctrl-C or the watchdog).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/run.py`
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.loadgen import (  # noqa: E402
    BargeResult,
    Caller,
    LoopLag,
    TurnResult,
    bench_tag,
    now,
    summary,
)
from bench.parse_bench import floor_ratio_text  # noqa: E402
from bench.procs import (  # noqa: E402
    AUTH_TOKEN,
    PUBLIC_URL,
    FakeProc,
    RelayProc,
    core_load,
    core_times,
    cpu_seconds,
    rss_kib,
    self_cpu,
    wait_quiet,
)
from crctl.caller.webhook import sign  # noqa: E402

RESULTS = REPO / "bench" / "results"
RELAY_CORE, LOAD_CORE = 0, 1
TARGET_ADDED_P99_MS = 5.0
TARGET_IDLE_KIB = 30.0
WATCHDOG_S = 600  # the whole run, hard limit
#: Issue 11's targets, crctl against the floor at 200 calls, burst profile.
TARGET_FIRST_TOKEN_RATIO = 1.5
TARGET_CPU_RATIO = 1.2
TARGET_IDLE_KIB_11 = 18.0
RELAYS = ("crctl", "floor")
BARGE_TURN = 1000  # barge-in turns are numbered from here (tags stay unique per call)


# ------------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    return {
        "hostname": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory": mem,
        "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "kernel": platform.release(),
        "taskset": bool(shutil.which("taskset")),
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the product's files differ from it."""

    def git(*args: str) -> str:
        try:
            run = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return run.stdout.strip()

    dirty = git("status", "--porcelain", "--", "relay_server", "crctl", "pyproject.toml")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "product_dirty": bool(dirty),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "uvicorn", "hypercorn", "quart", "websockets", "wsproto", "openai", "httpx2",
        "httpcore2", "msgspec", "aiohttp", "pydantic",
    ):  # fmt: skip
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------- load shapes
@dataclass(frozen=True)
class Shape:
    """How the fake LLM paces its replies, and how the calls start.

    ``jitter``: TTFT and per-token delay drawn per reply from ranges, starts spread over up to
    3 s. ``burst``: fixed TTFT, fixed delay on the fake's shared clock (``tick``: every
    stream's next token leaves on the same tick), starts within ``stagger`` s.
    """

    name: str
    ttft: tuple[float, float]
    delay: tuple[float, float]
    tick: float
    stagger: float  # the calls' first turns start within this (s), at most
    turns: dict[int, int]
    barge_rounds: dict[int, int]

    def spread(self, n: int) -> float:
        return min(self.stagger, n * 0.015) if self.tick == 0 else self.stagger


def shapes(args: argparse.Namespace) -> dict[str, Shape]:
    every = {
        "jitter": Shape("jitter", args.ttft, args.delay, 0.0, 3.0, args.turns, args.barge_rounds),
        "burst": Shape(
            "burst",
            (args.burst_ttft, args.burst_ttft),
            (args.burst_delay, args.burst_delay),
            args.burst_delay,
            args.burst_stagger,
            args.burst_turns,
            args.barge_rounds,
        ),
    }
    return {name: every[name] for name in args.shape}


# ------------------------------------------------------------------------------- one level
async def connect_all(
    relay: RelayProc, n: int, window: float, sig: str, deflate: bool, start: int = 0
) -> list[Caller]:
    """Open ``n`` signed calls, spread over ``window`` s; each sends its setup frame.

    Each call first gets its socket URL from ``/twiml``, as Twilio does (the relay gives each
    call its own one-time URL), all before the timed part and through one HTTP client; it then
    connects to the local address while signing the public URL. A relay that names the plain
    ``/ws`` (before per-call URLs) is driven with ``sig`` as before.
    """
    callers = [Caller(start + i, relay.ws_url, sig, deflate) for i in range(n)]
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        for c in callers:
            form = {"CallSid": c.call_sid, "CallStatus": "ringing", "AccountSid": "AC" + "0" * 32}
            answer = await http.post(
                f"http://127.0.0.1:{relay.port}/twiml",
                data=form,
                headers={"X-Twilio-Signature": sign(AUTH_TOKEN, PUBLIC_URL + "/twiml", form)},
            )
            answer.raise_for_status()
            found = ET.fromstring(answer.text).find("Connect/ConversationRelay")
            public = found.attrib["url"] if found is not None else ""
            if urlsplit(public).query:
                c.ws_url = f"{relay.ws_url}?{urlsplit(public).query}"
                c.signature = sign(AUTH_TOKEN, public, {})
    gap = window / max(1, n)

    async def one(i: int, c: Caller) -> None:
        await asyncio.sleep(i * gap)
        await c.connect()

    results = await asyncio.gather(
        *(one(i, c) for i, c in enumerate(callers)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(c.close() for c in callers))
        raise RuntimeError(f"{len(errors)} of {n} calls failed to connect: {errors[0]!r}")
    return callers


def by_tag(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["tag"]: r for r in records}


def _busy(cores: dict[int, dict[str, float]], core: int) -> float:
    c = cores.get(core, {})
    return c.get("task", 0.0) + c.get("irq", 0.0)


class Meter:
    """CPU of the relay, the fake and this process, and of each core, over one phase."""

    def __init__(self, relay: RelayProc, fake: FakeProc) -> None:
        self.relay, self.fake = relay, fake
        self.cores0 = core_times()
        self.r0, self.f0 = cpu_seconds(relay.pid), cpu_seconds(fake.pid)
        self.l0, self.w0 = self_cpu(), now()

    def stop(self) -> dict[str, Any]:
        wall = now() - self.w0
        relay = 100 * (cpu_seconds(self.relay.pid) - self.r0) / wall
        fake = 100 * (cpu_seconds(self.fake.pid) - self.f0) / wall
        load = 100 * (self_cpu() - self.l0) / wall
        cores = core_load(self.cores0, core_times(), wall)
        return {
            "wall_s": round(wall, 2),
            "relay_cpu_pct": round(relay, 1),
            "fake_cpu_pct": round(fake, 1),
            "loadgen_cpu_pct": round(load, 1),
            "cores_pct": cores,
            # CPU time on the pinned cores used by processes other than ours (another job on
            # the machine): it skews the figures, so it is reported with them.
            # (task + irq time of the core, minus our processes' CPU time, which includes the
            # softirq work done in their context: about 0 when nothing else runs).
            "other_load_relay_core_pct": round(_busy(cores, RELAY_CORE) - relay, 1),
            "other_load_load_core_pct": round(_busy(cores, LOAD_CORE) - fake - load, 1),
        }


async def run_level(
    n: int,
    fake: FakeProc,
    args: argparse.Namespace,
    rng: random.Random,
    log_dir: Path,
    shape: Shape,
    relay_kind: str = "crctl",
    barge: bool = True,
) -> dict[str, Any]:
    """One concurrency level against a fresh relay (crctl or the floor): RSS, turns, barge-ins.

    ``barge`` False: no barge-in phase (bench/capacity.py).
    """
    crctl = relay_kind == "crctl"
    name = f"{shape.name}-{relay_kind}-{n}"
    sig = sign(AUTH_TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws", {})
    quiet = await wait_quiet()
    if not quiet["quiet"]:
        print(
            f"   warning: the machine is busy ({quiet['busiest_core_pct']}% on one core): "
            "another job skews this level",
            flush=True,
        )
    relay = RelayProc(
        fake.base_url,
        RELAY_CORE if args.pin else None,
        log_dir / f"relay-{name}.log",
        profile=log_dir / f"relay-{name}.prof" if args.profile and crctl else None,
        probe=log_dir / f"relay-{name}-probe.json"
        if (args.probe or args.probe_slow) and crctl
        else None,
        probe_slow=args.probe_slow,
        agent=args.agent,
        module=args.relay_module if crctl else "bench.floor",
        pyinstrument=log_dir / f"relay-{name}-pyinstrument.txt"
        if args.pyinstrument and crctl
        else None,
    )
    out: dict[str, Any] = {"calls": n, "relay": relay_kind, "machine_before": quiet}
    callers: list[Caller] = []
    try:
        # -- warm-up: two calls, two short turns each, then hang up
        warm = await connect_all(relay, 2, 0.0, sig, args.deflate, start=90000)
        for t in range(2):
            tags = [bench_tag(c.index, t, 5, rng, (0.02, 0.02), (0.005, 0.005)) for c in warm]
            await asyncio.gather(*(c.turn(t, tag) for c, tag in zip(warm, tags, strict=True)))
        await asyncio.gather(*(c.close() for c in warm))
        await relay.wait_calls(0)
        await asyncio.sleep(1.0)
        fake.dump()

        # -- RSS per idle call: setup sent, nothing else
        rss0 = rss_kib(relay.pid)
        callers = await connect_all(relay, n, min(1.0, n * 0.005), sig, args.deflate)
        if not await relay.wait_calls(n):
            raise RuntimeError(f"relay did not register {n} calls")
        await asyncio.sleep(1.0)
        rss_n = rss_kib(relay.pid)
        out["rss"] = {
            "baseline_kib": rss0,
            "with_calls_kib": rss_n,
            "per_call_kib": round((rss_n - rss0) / n, 2),
        }
        out["turns"] = await turns_phase(n, callers, relay, fake, args, rng, shape)
        if barge:
            out["barge_in"] = await barge_phase(n, callers, relay, fake, args, rng, shape)
    finally:
        await asyncio.gather(*(c.close() for c in callers))
        relay.stop()
    if relay.probe is not None and relay.probe.exists():
        out["relay_probe"] = json.loads(relay.probe.read_text())
    return out


async def turns_phase(
    n: int,
    callers: list[Caller],
    relay: RelayProc,
    fake: FakeProc,
    args: argparse.Namespace,
    rng: random.Random,
    shape: Shape,
) -> dict[str, Any]:
    """Every call runs several turns; added latency and per-token delay."""
    turns = shape.turns.get(n, 5)
    stagger = shape.spread(n)

    async def call_turns(c: Caller) -> list[TurnResult]:
        crng = random.Random(rng.random())
        await asyncio.sleep(crng.uniform(0, stagger))
        results = []
        for t in range(turns):
            tag = bench_tag(c.index, t, args.tokens, crng, shape.ttft, shape.delay, shape.tick)
            res = await c.turn(t, tag)
            results.append(res)
            if res.error:
                break
            await asyncio.sleep(crng.uniform(*args.think))
        return results

    lag = LoopLag()
    lag.start()
    meter = Meter(relay, fake)
    per_call = await asyncio.wait_for(
        asyncio.gather(*(call_turns(c) for c in callers)), timeout=120
    )
    load = meter.stop()
    lag_summary = await lag.stop()
    await asyncio.sleep(0.3)
    records = by_tag(fake.dump())
    results = [r for rs in per_call for r in rs]
    added, req_leg, tok_leg, ttft, delays = [], [], [], [], []
    unmatched = 0
    for r in results:
        delays.extend(r.token_delays)
        rec = records.get(r.tag)
        if r.error or r.first_at is None or rec is None or rec["first_chunk_at"] is None:
            unmatched += 1
            continue
        fake_ttft = rec["first_chunk_at"] - rec["received_at"]
        ttft.append(fake_ttft)
        added.append((r.first_at - r.sent_at) - fake_ttft)
        req_leg.append(rec["received_at"] - r.sent_at)
        tok_leg.append(r.first_at - rec["first_chunk_at"])
    tokens = sum(r.tokens for r in results)
    relay_cpu_s = load["relay_cpu_pct"] / 100 * load["wall_s"]
    return {
        "turns": len(results),
        "turns_per_call": turns,
        "errors": sum(1 for r in results if r.error),
        "lost_last_true": sum(1 for r in results if r.last_at is None),
        "error_sample": next((r.error for r in results if r.error), None),
        "unmatched": unmatched,
        "cross_talk_tokens": sum(r.wrong for r in results),
        "tokens": tokens,
        "tokens_per_s": round(tokens / load["wall_s"], 1),
        "added_latency_ms": summary(added),
        "request_leg_ms": summary(req_leg),
        "first_token_leg_ms": summary(tok_leg),
        "fake_ttft_ms": summary(ttft),
        "per_token_ms": summary(delays),
        "relay_cpu_us_per_token": round(1e6 * relay_cpu_s / max(1, tokens), 1),
        "loadgen_loop_lag_ms": lag_summary,
        **load,
    }


async def barge_phase(
    n: int,
    callers: list[Caller],
    relay: RelayProc,
    fake: FakeProc,
    args: argparse.Namespace,
    rng: random.Random,
    shape: Shape,
) -> dict[str, Any]:
    """Interrupt long replies: time to last:true, words generated after the barge-in."""
    rounds = shape.barge_rounds.get(n, 1)
    stagger = min(2.0, n * 0.01)

    async def call_barge(c: Caller) -> list[BargeResult]:
        crng = random.Random(rng.random())
        await asyncio.sleep(crng.uniform(0, stagger))
        results = []
        for b in range(BARGE_TURN, BARGE_TURN + rounds):
            tag = bench_tag(c.index, b, 400, crng, shape.ttft, shape.delay, shape.tick)
            results.append(await c.barge_in(b, tag, crng.randint(3, 15), args.quiet))
            await asyncio.sleep(crng.uniform(0.1, 0.3))
        return results

    lag = LoopLag()
    lag.start()
    meter = Meter(relay, fake)
    per_call = await asyncio.wait_for(
        asyncio.gather(*(call_barge(c) for c in callers)), timeout=120
    )
    load = meter.stop()
    lag_summary = await lag.stop()
    await asyncio.sleep(0.5)  # let the fake notice the last disconnects
    records = by_tag(fake.dump())
    return {
        **barge_figures([b for bs in per_call for b in bs], records),
        "relay_cpu_pct": load["relay_cpu_pct"],
        "other_load_relay_core_pct": load["other_load_relay_core_pct"],
        "loadgen_loop_lag_ms": lag_summary,
    }


def barge_figures(results: list[BargeResult], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The criterion (bench/README.md) for a token *generated after the barge-in*.

    A token received after the interrupt was sent counts as generated after the barge-in when
    the fake wrote it after the client's ``ws.send(interrupt)`` had returned (the interrupt was
    then in the relay's socket).
    """
    silence, close_after = [], []
    after_sent = in_flight = ambiguous = generated_after = stray = not_closed = dropped = 0
    violations: list[dict[str, Any]] = []
    for b in results:
        if b.error or b.last_at is None:
            continue
        silence.append(b.last_at - b.int_before)
        stray += len(b.stray)
        for at, written, k in b.late:
            after_sent += 1
            if written > b.int_after:
                generated_after += 1
                violations.append(
                    {
                        "call": b.call,
                        "k": k,
                        "written_after_interrupt_ms": round(1e3 * (written - b.int_after), 3),
                        "received_after_interrupt_ms": round(1e3 * (at - b.int_after), 3),
                    }
                )
            elif written > b.int_before:
                ambiguous += 1
            else:
                in_flight += 1
        rec = records.get(b.tag)
        if rec is None or not rec["client_disconnected"] or rec["disconnected_at"] is None:
            not_closed += 1
        else:
            close_after.append(rec["disconnected_at"] - b.int_after)
            last_k = max([k for _, _, k in b.late] + [b.max_k_before])
            dropped += max(0, rec["tokens_sent"] - (last_k + 1))
    return {
        "barge_ins": len(results),
        "errors": sum(1 for b in results if b.error or b.last_at is None),
        "error_sample": next((b.error for b in results if b.error), None),
        "silence_ms": summary(silence),
        "tokens_after_interrupt_sent": after_sent,
        "tokens_in_flight": in_flight,
        "tokens_ambiguous": ambiguous,
        "tokens_generated_after_barge_in": generated_after,
        "violations_sample": violations[:10],
        "frames_after_last_true": stray,
        "upstream_not_closed": not_closed,
        "upstream_close_after_interrupt_ms": summary(close_after),
        "tokens_written_but_dropped_by_relay": dropped,
    }


# ------------------------------------------------------------------------------ reporting
def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def targets(levels: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    top = levels.get("200")
    if top:
        p99 = top["turns"]["added_latency_ms"].get("p99")
        checks.append(
            {
                "target": f"added latency p99 <= {TARGET_ADDED_P99_MS:g} ms at 200 calls",
                "value": f"{fmt(p99)} ms",
                "pass": p99 is not None and p99 <= TARGET_ADDED_P99_MS,
            }
        )
    words = sum(
        lv["barge_in"]["tokens_generated_after_barge_in"] + lv["barge_in"]["frames_after_last_true"]
        for lv in levels.values()
    )
    failed = sum(
        lv["barge_in"]["errors"] + lv["barge_in"]["upstream_not_closed"] for lv in levels.values()
    )
    total = sum(lv["barge_in"]["barge_ins"] for lv in levels.values())
    checks.append(
        {
            "target": "no word generated after a barge-in reaches the caller",
            "value": f"{words} such words in {total} barge-ins; {failed} barge-ins failed or "
            "left the LLM stream open",
            "pass": words == 0 and failed == 0,
        }
    )
    big = {k: lv["rss"]["per_call_kib"] for k, lv in levels.items() if int(k) >= 50}
    if big:
        checks.append(
            {
                "target": f"<= {TARGET_IDLE_KIB:g} KiB RSS per idle call (levels of 50+ calls)",
                "value": ", ".join(f"{k} calls: {v:.1f} KiB" for k, v in big.items()),
                "pass": max(big.values()) <= TARGET_IDLE_KIB,
            }
        )
    return checks


def _get(lv: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(lv, dict) or key not in lv:
            return None
        lv = lv[key]
    return lv


def _ratio(a: Any, b: Any) -> float | None:
    if a is None or b is None or not b:
        return None
    return float(a) / float(b)


def pair_cpu(pair: dict[str, Any]) -> dict[str, Any]:
    """One crctl/floor pair's CPU per token, and their ratio."""
    c = _get(pair.get("crctl", {}), "turns", "relay_cpu_us_per_token")
    f = _get(pair.get("floor", {}), "turns", "relay_cpu_us_per_token")
    r = _ratio(c, f)
    return {"crctl_us": c, "floor_us": f, "ratio": None if r is None else round(r, 3)}


def median_pair(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pair whose CPU ratio is the median (the lower middle one of an even count).

    On a shared VM the CPU of one 20-second run moves by 10-20 % with the host's other
    tenants; a ratio taken in one pair is only as good as that pair, so a level may be run
    several times (``--burst-repeat``) and reported by its median pair, every ratio listed.
    """
    ranked = sorted(pairs, key=lambda p: pair_cpu(p)["ratio"] or 0.0)
    return ranked[(len(ranked) - 1) // 2]


def floor_targets(runs: dict[str, Any], n: int = 200, shape: str = "burst") -> list[dict[str, Any]]:
    """Issue 11's targets: crctl against the floor, ``n`` calls, ``shape`` profile, one run."""
    pair = runs.get(shape, {})
    crctl, floor = pair.get("crctl", {}).get(str(n)), pair.get("floor", {}).get(str(n))
    checks: list[dict[str, Any]] = []
    where = f"at {n} calls, {shape}"
    if crctl is None:
        return checks
    if floor is not None:
        for p in ("p50", "p99"):
            c = _get(crctl, "turns", "added_latency_ms", p)
            f = _get(floor, "turns", "added_latency_ms", p)
            r = _ratio(c, f)
            checks.append(
                {
                    "target": f"added first-token latency {p} <= {TARGET_FIRST_TOKEN_RATIO:g}x "
                    f"the floor's ({where})",
                    "value": f"{fmt(c)} / {fmt(f)} ms = {fmt(r)}x",
                    "pass": r is not None and r <= TARGET_FIRST_TOKEN_RATIO,
                }
            )
        c = _get(crctl, "turns", "relay_cpu_us_per_token")
        f = _get(floor, "turns", "relay_cpu_us_per_token")
        r = _ratio(c, f)
        checks.append(
            {
                "target": f"CPU per token <= {TARGET_CPU_RATIO:g}x the floor's ({where})",
                "value": f"{fmt(c)} / {fmt(f)} µs = {fmt(r)}x",
                "pass": r is not None and r <= TARGET_CPU_RATIO,
            }
        )
    idle = _get(crctl, "rss", "per_call_kib")
    checks.append(
        {
            "target": f"RSS per idle call <= {TARGET_IDLE_KIB_11:g} KiB ({where})",
            "value": f"{fmt(idle)} KiB (floor {fmt(_get(floor or {}, 'rss', 'per_call_kib'))})",
            "pass": idle is not None and idle <= TARGET_IDLE_KIB_11,
        }
    )
    levels = [lv for sh in runs.values() for lv in sh.get("crctl", {}).values()]
    words = sum(
        _get(lv, "barge_in", "tokens_generated_after_barge_in") or 0 for lv in levels
    ) + sum(_get(lv, "barge_in", "frames_after_last_true") or 0 for lv in levels)
    barges = sum(_get(lv, "barge_in", "barge_ins") or 0 for lv in levels)
    checks.append(
        {
            "target": "0 words after barge-in (crctl, every level and profile)",
            "value": f"{words} in {barges} barge-ins",
            "pass": words == 0,
        }
    )
    cross = sum(_get(lv, "turns", "cross_talk_tokens") or 0 for lv in levels)
    checks.append(
        {
            "target": "0 cross-talk (crctl, every level and profile)",
            "value": f"{cross} tokens of another call or turn",
            "pass": cross == 0,
        }
    )
    lost = sum(_get(lv, "turns", "lost_last_true") or 0 for lv in levels) + sum(
        _get(lv, "barge_in", "errors") or 0 for lv in levels
    )
    checks.append(
        {
            "target": "0 lost last:true (crctl, every turn and barge-in)",
            "value": f"{lost} turns or barge-ins without their last:true",
            "pass": lost == 0,
        }
    )
    return checks


#: The side-by-side rows: (label, path into a level's figures).
COMPARE: list[tuple[str, tuple[str, ...]]] = [
    ("relay CPU per token, µs", ("turns", "relay_cpu_us_per_token")),
    ("added first-token latency p50, ms", ("turns", "added_latency_ms", "p50")),
    ("added first-token latency p99, ms", ("turns", "added_latency_ms", "p99")),
    ("per-token forwarding p50, ms", ("turns", "per_token_ms", "p50")),
    ("per-token forwarding p99, ms", ("turns", "per_token_ms", "p99")),
    ("memory per idle call, KiB", ("rss", "per_call_kib")),
    ("relay CPU, % of its core", ("turns", "relay_cpu_pct")),
    ("barge-in to last:true p99, ms", ("barge_in", "silence_ms", "p99")),
]


def compare_table(pair: dict[str, dict[str, Any]]) -> str:
    """The crctl and floor figures at each level of one profile, with the ratios."""
    levels = list(pair.get("crctl", {}))
    head = "| |" + "".join(f" {k}: crctl | floor | ×  |" for k in levels)
    lines = [head, "|---|" + "--:|--:|--:|" * len(levels)]
    for label, path in COMPARE:
        cells = []
        for k in levels:
            c = _get(pair.get("crctl", {}).get(k, {}), *path)
            f = _get(pair.get("floor", {}).get(k, {}), *path)
            r = _ratio(c, f)
            cells += [fmt(c), fmt(f), f"{r:.2f}" if r is not None else "-"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pair(a: Any, b: Any) -> str:
    return f"{fmt(a)} / {fmt(b)}"


ROWS: list[tuple[str, Any]] = [
    ("added latency p50 (ms)", lambda x: x["turns"]["added_latency_ms"]["p50"]),
    ("added latency p95 (ms)", lambda x: x["turns"]["added_latency_ms"]["p95"]),
    ("added latency p99 (ms)", lambda x: x["turns"]["added_latency_ms"]["p99"]),
    ("added latency max (ms)", lambda x: x["turns"]["added_latency_ms"]["max"]),
    ("  of which request leg p50 / p99", lambda x: _pair(
        x["turns"]["request_leg_ms"]["p50"], x["turns"]["request_leg_ms"]["p99"])),
    ("  of which first-token leg p50 / p99", lambda x: _pair(
        x["turns"]["first_token_leg_ms"]["p50"], x["turns"]["first_token_leg_ms"]["p99"])),
    ("turns measured", lambda x: x["turns"]["turns"] - x["turns"]["unmatched"]),
    ("per-token delay p50 (ms)", lambda x: x["turns"]["per_token_ms"]["p50"]),
    ("per-token delay p99 (ms)", lambda x: x["turns"]["per_token_ms"]["p99"]),
    ("per-token delay max (ms)", lambda x: x["turns"]["per_token_ms"]["max"]),
    ("tokens forwarded / s", lambda x: x["turns"]["tokens_per_s"]),
    ("relay CPU, % of its core", lambda x: x["turns"]["relay_cpu_pct"]),
    ("relay CPU per token, µs (all costs)", lambda x: x["turns"]["relay_cpu_us_per_token"]),
    ("load core CPU %: fake / loadgen", lambda x: _pair(
        x["turns"]["fake_cpu_pct"], x["turns"]["loadgen_cpu_pct"])),
    ("other jobs % on relay / load core", lambda x: _pair(
        x["turns"]["other_load_relay_core_pct"], x["turns"]["other_load_load_core_pct"])),
    ("loadgen loop lag p99 (ms)", lambda x: x["turns"]["loadgen_loop_lag_ms"]["p99"]),
    ("turn errors / cross-talk tokens", lambda x: _pair(
        x["turns"]["errors"], x["turns"]["cross_talk_tokens"])),
    ("barge-ins", lambda x: x["barge_in"]["barge_ins"]),
    ("barge-in to last:true p50 (ms)", lambda x: x["barge_in"]["silence_ms"]["p50"]),
    ("barge-in to last:true p99 (ms)", lambda x: x["barge_in"]["silence_ms"]["p99"]),
    ("barge-in to last:true max (ms)", lambda x: x["barge_in"]["silence_ms"]["max"]),
    ("tokens in flight at the interrupt", lambda x: x["barge_in"]["tokens_in_flight"]),
    ("tokens generated after barge-in", lambda x: x["barge_in"]["tokens_generated_after_barge_in"]),
    ("frames after last:true", lambda x: x["barge_in"]["frames_after_last_true"]),
    ("LLM streams closed / barge-ins", lambda x: _pair(
        x["barge_in"]["barge_ins"] - x["barge_in"]["upstream_not_closed"],
        x["barge_in"]["barge_ins"])),
    ("LLM closed after interrupt p50/max ms", lambda x: _pair(
        x["barge_in"]["upstream_close_after_interrupt_ms"].get("p50"),
        x["barge_in"]["upstream_close_after_interrupt_ms"].get("max"))),
    ("RSS with no call (KiB)", lambda x: x["rss"]["baseline_kib"]),
    ("RSS per idle call (KiB)", lambda x: x["rss"]["per_call_kib"]),
]  # fmt: skip


def table(levels: dict[str, Any]) -> str:
    keys = list(levels)
    width = max(len(name) for name, _ in ROWS)
    head = " | ".join((k if " " in k else f"{k} calls").rjust(15) for k in keys)
    lines = [
        f"| {'metric'.ljust(width)} | {head} |",
        "|" + "-" * (width + 2) + "|" + "|".join("-" * 16 + ":" for _ in keys) + "|",
    ]
    for name, get in ROWS:
        cells = []
        for k in keys:
            try:
                cells.append(fmt(get(levels[k])))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(
            "| " + name.ljust(width) + " | " + " | ".join(c.rjust(15) for c in cells) + " |"
        )
    return "\n".join(lines)


def parse_table(pb: dict[str, Any]) -> str:
    base = pb["paths"]["relay"]["us_per_token"]
    lines = [
        "| path | µs CPU per token | per-stream overhead, µs | × relay path |",
        "|---|---:|---:|---:|",
    ]
    for name, p in pb["paths"].items():
        lines.append(
            f"| `{name}`: {p['label']} | {p['us_per_token']:.2f} | "
            f"{p['us_per_stream_overhead']:.0f} | {p['us_per_token'] / base:.2f} |"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    m, c, g = result["machine"], result["config"], result["git"]
    turns = ", ".join(f"{v} at {k} calls" for k, v in c["turns"].items())
    dirty = " (with uncommitted changes to the relay)" if g["product_dirty"] else ""
    out = [
        f"# Relay benchmark, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"{m['python_impl']} {m['python']}, Linux {m['kernel']}.",
        f"- Relay: `crctl serve` at commit {g['commit']}{dirty} ({g['subject']}), agent "
        f"`{c['agent']}`, pinned to core {RELAY_CORE}; fake LLM and load generator pinned to "
        f"core {LOAD_CORE} (pinning {'on' if c['pin'] else 'OFF'}).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        f"- Load, `jitter` profile: turns per call {turns}; fake TTFT "
        f"{c['ttft'][0]}-{c['ttft'][1]} s, "
        f"{c['tokens']} tokens per reply at {c['delay'][0] * 1000:g}-{c['delay'][1] * 1000:g} ms "
        f"per token, both drawn per reply; the caller pauses {c['think'][0]}-{c['think'][1]} s "
        f"after last:true; starts spread over up to 3 s; WebSocket compression "
        f"{'permessage-deflate offered' if c['deflate'] else 'not offered (as Twilio)'}.",
        "- Load, `burst` profile: turns per call "
        + ", ".join(f"{v} at {k} calls" for k, v in c["burst_turns"].items())
        + f"; fake TTFT {c['burst_ttft']} s, then one token every {c['burst_delay'] * 1000:g} ms "
        f"on the fake's shared clock (every stream's next token leaves on the same tick); calls "
        f"start within {c['burst_stagger']:g} s; the same pauses.",
        f"- Profiles run: {', '.join(c['shapes'])}; relays: {', '.join(c['relays'])} (each "
        "level runs each relay, fresh, on the same load: same seed, same fake LLM process; "
        "`floor` is bench/floor.py, a bare relay on the same server).",
        "",
        "## Targets",
        "",
    ]
    if result.get("floor_targets"):
        out += ["Issue 11 (crctl against the floor, one run):", ""]
        for t in result["floor_targets"]:
            out.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['value']}")
        for shape, levels in result.get("repeats", {}).items():
            for n, pairs in levels.items():
                ratios = ", ".join(
                    f"{p['crctl_us']}/{p['floor_us']} µs = {fmt(p['ratio'])}x" for p in pairs
                )
                out.append(
                    f"- The {shape} level of {n} calls ran {len(pairs)} times (crctl and the "
                    f"floor alternating who goes first); figures are from the pair with the "
                    f"median CPU ratio. CPU per token of each pair: {ratios}."
                )
        out += ["", "Earlier targets (crctl, first profile run):", ""]
    for t in result["targets"]:
        out.append(f"- **{'PASS' if t['pass'] else 'FAIL'}** {t['target']}: {t['value']}")
    busy = [
        f"{shape} {relay} {k}"
        for shape, pair in result["runs"].items()
        for relay, levels in pair.items()
        for k, lv in levels.items()
        if max(lv["turns"]["other_load_relay_core_pct"], lv["turns"]["other_load_load_core_pct"])
        > 5
    ]
    if busy:
        out += [
            "",
            f"Warning: other jobs used more than 5% of a pinned core during the "
            f"{', '.join(busy)}-call level(s) (row 'other jobs'): those figures are skewed.",
        ]
    for shape, pair in result["runs"].items():
        out += ["", f"## `{shape}` profile: crctl beside the floor", "", compare_table(pair)]
        merged = {
            f"{k} {relay}": lv for k in pair.get("crctl", {}) for relay, lvs in pair.items()
            if (lv := lvs.get(k)) is not None
        }  # fmt: skip
        out += ["", f"### `{shape}` profile: every figure", "", table(merged), ""]
    pb = result.get("parse_bench")
    if pb:
        out += [
            "## LLM stream parsing (bench/parse_bench.py)",
            "",
            f"{pb['streams']} streams × {pb['tokens']} tokens, {pb['concurrency']} at a time, "
            f"CPU of the consuming process (time.process_time), median of {pb['rounds']} "
            f"rounds. SDK parsed / relay path: {pb['sdk_over_relay']}× per token; above the "
            f"raw-bytes floor: {floor_ratio_text(pb['parse_only_sdk_over_relay'])}.",
            "",
            parse_table(pb),
            "",
        ]
    out += [f"Run time {result['duration_s']:.0f} s. Raw figures: the JSON file beside this.", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------- main
def run_parse_bench(args: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [
        sys.executable,
        "-m",
        "bench.parse_bench",
        "--json",
        "--streams",
        str(args.parse_streams),
    ]
    if not args.pin:
        cmd.append("--no-pin")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150)
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
        return None
    print(proc.stderr, end="", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def parse_pair(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    return float(lo), float(hi or lo)


def parse_map(text: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in (p.split(":") for p in text.split(","))}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "versions": versions(),
        "config": {
            "calls": args.calls,
            "turns": {str(k): v for k, v in args.turns.items() if k in args.calls},
            "barge_rounds": {str(k): v for k, v in args.barge_rounds.items() if k in args.calls},
            "tokens": args.tokens,
            "ttft": args.ttft,
            "delay": args.delay,
            "think": args.think,
            "quiet": args.quiet,
            "deflate": args.deflate,
            "agent": args.agent,
            "pin": args.pin,
            "seed": args.seed,
            "shapes": args.shape,
            "relays": args.relays,
            "burst_ttft": args.burst_ttft,
            "burst_delay": args.burst_delay,
            "burst_stagger": args.burst_stagger,
            "burst_repeat": args.burst_repeat,
            "burst_turns": {
                str(k): v for k, v in args.burst_turns.items() if k in args.burst_calls
            },
        },
        "runs": {},
    }
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    fake = FakeProc(LOAD_CORE if args.pin else None)
    try:
        for shape in shapes(args).values():
            runs = result["runs"].setdefault(shape.name, {r: {} for r in args.relays})
            repeat = args.burst_repeat if shape.tick and len(args.relays) > 1 else 1
            for i, n in enumerate(args.burst_calls if shape.tick else args.calls):
                pairs: list[dict[str, Any]] = []
                for rep in range(repeat):
                    # crctl and the floor alternate who goes first, on the same load (same seed)
                    order = args.relays if (i + rep) % 2 == 0 else args.relays[::-1]
                    pair: dict[str, Any] = {}
                    for relay in order:
                        t0 = now()
                        print(f"-- {shape.name}, {relay}, {n} calls ...", flush=True)
                        level_rng = random.Random(f"{args.seed}-{shape.name}-{n}")
                        pair[relay] = await run_level(
                            n, fake, args, level_rng, log_dir, shape, relay
                        )
                        t = pair[relay]["turns"]
                        print(
                            f"   done in {now() - t0:.1f} s: added p50/p99 "
                            f"{t['added_latency_ms'].get('p50')}/"
                            f"{t['added_latency_ms'].get('p99')} "
                            f"ms, {t['relay_cpu_us_per_token']} µs/token",
                            flush=True,
                        )
                    pairs.append(pair)
                chosen = median_pair(pairs)
                for relay in args.relays:
                    runs[relay][str(n)] = chosen[relay]
                if repeat > 1:
                    result.setdefault("repeats", {}).setdefault(shape.name, {})[str(n)] = [
                        pair_cpu(p) for p in pairs
                    ]
    finally:
        fake.stop()
    first: dict[str, Any] = next(iter(result["runs"].values()), {})
    result["levels"] = first.get("crctl", {})  # the earlier targets' levels
    return result


def _watchdog(*_: Any) -> None:
    raise TimeoutError(f"bench.run: watchdog, still running after {WATCHDOG_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", default="1,50,200", help="concurrency levels")
    parser.add_argument("--turns", default="1:12,50:6,200:5", help="turns per call, by level")
    parser.add_argument("--barge-rounds", default="1:8,50:2,200:1", help="barge-ins per call")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per reply")
    parser.add_argument("--ttft", default="0.25,0.35", help="fake TTFT range, s")
    parser.add_argument("--delay", default="0.020,0.030", help="fake per-token delay range, s")
    parser.add_argument("--think", default="0.5,1.5", help="caller pause after last:true, s")
    parser.add_argument("--quiet", type=float, default=0.3, help="listen after last:true, s")
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument("--agent", default="llm", help="crctl serve --agent (llm, module:Class)")
    parser.add_argument(
        "--relay-module",
        default="crctl",
        help="python -m MODULE serve ... (a wrapper of crctl's CLI, for what-if runs)",
    )
    parser.add_argument(
        "--shape",
        default="jitter,burst",
        help="load profiles to run: jitter (TTFT and delay drawn per reply), burst (fixed "
        "TTFT, every token on the fake's shared tick, calls start within --burst-stagger s)",
    )
    parser.add_argument("--burst-calls", default="200", help="levels of the burst profile")
    parser.add_argument("--burst-turns", default="1:3,50:3,200:3", help="burst turns per call")
    parser.add_argument("--burst-ttft", type=float, default=0.3, help="burst: fixed TTFT, s")
    parser.add_argument(
        "--burst-delay", type=float, default=0.020, help="burst: the tick between tokens, s"
    )
    parser.add_argument("--burst-stagger", type=float, default=2.0, help="burst: starts within")
    parser.add_argument(
        "--burst-repeat",
        type=int,
        default=3,
        help="burst: run each level's crctl/floor pair this many times, alternating who goes "
        "first; figures are the pair with the median CPU ratio, every ratio is listed",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="crctl only (default: the floor, bench/floor.py, runs beside it at every level)",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    parser.add_argument("--profile", action="store_true", help="run the relay under cProfile")
    parser.add_argument(
        "--pyinstrument", action="store_true", help="run the relay under pyinstrument (not a dep)"
    )
    parser.add_argument(
        "--probe", action="store_true", help="relay loop lag and GC pauses (bench/relay_probe.py)"
    )
    parser.add_argument(
        "--probe-slow", action="store_true", help="--probe plus slow-callback sites (debug mode)"
    )
    parser.add_argument("--no-parse-bench", dest="parse_bench", action="store_false")
    parser.add_argument("--parse-streams", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="results file stem (default <date>-<host>)")
    args = parser.parse_args(argv)
    args.calls = [int(x) for x in args.calls.split(",")]
    args.turns, args.barge_rounds = parse_map(args.turns), parse_map(args.barge_rounds)
    args.ttft, args.delay = parse_pair(args.ttft), parse_pair(args.delay)
    args.think = parse_pair(args.think)
    args.shape = [s.strip() for s in args.shape.split(",") if s.strip()]
    if not args.shape or set(args.shape) - {"jitter", "burst"}:
        parser.error("--shape: jitter, burst or both (jitter,burst)")
    args.burst_calls = [int(x) for x in args.burst_calls.split(",")]
    args.burst_turns = parse_map(args.burst_turns)
    args.relays = ["crctl", "floor"] if args.floor else ["crctl"]
    if args.pin and (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs: running unpinned", file=sys.stderr)
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {LOAD_CORE})  # this process is the load generator
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG_S)
    t0 = now()
    try:
        result = asyncio.run(main_async(args))
        if args.parse_bench:
            print("-- parse micro-benchmark ...", flush=True)
            result["parse_bench"] = run_parse_bench(args)
    finally:
        signal.alarm(0)
    result["duration_s"] = round(now() - t0, 1)
    result["targets"] = targets(result["levels"])
    result["floor_targets"] = floor_targets(result["runs"])

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / f"{stem}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {RESULTS / stem}.json and {stem}.md")
    checks = result["targets"] + result["floor_targets"]
    return 0 if all(t["pass"] for t in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
