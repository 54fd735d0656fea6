"""What a relay pays for ``--redis-url`` (issue 12): CPU per token and added first-token latency.

Side by side, as bench/together.py does: two ``crctl serve`` relays run at once, pinned to the
same core, each with half the calls (100 + 100: the core carries 200), on the same burst load
(the fake LLM's shared tick); their CPU is read over the same window, so whatever else slows the
shared VM slows both. Pair 1 is a relay alone against a replica with ``--redis-url`` (a real
``redis-server`` the bench starts on the load core, with the fake LLM and the callers). Pair 2,
once ``crctl serve --workers`` exists, is ``--workers 2`` against one worker (both with Redis;
CPU is the whole process tree's). Target: no per-token difference beyond the rounds' spread;
Redis is spoken to per call and per turn, never per token (its commands per token are listed).

    .venv/bin/python -m bench.cluster [--calls 100] [--rounds 5] [--pairs redis,workers]

Writes bench/results/cluster-<date>-<host>.json and .md; exit status 0. About 2-4 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/cluster.py`
    sys.path.insert(0, str(REPO))

from bench.loadgen import Caller, bench_tag, now, percentile  # noqa: E402
from bench.procs import (  # noqa: E402
    AUTH_TOKEN,
    PUBLIC_URL,
    FakeProc,
    RelayProc,
    free_port,
    pin_preexec,
    pin_prefix,
    wait_quiet,
)
from bench.report import write_report  # noqa: E402
from bench.run import (  # noqa: E402
    LOAD_CORE,
    RELAY_CORE,
    RESULTS,
    connect_all,
    git_state,
    machine,
    versions,
)
from bench.together import one_round  # noqa: E402
from crctl.caller.webhook import sign  # noqa: E402

WATCHDOG_S = 900
#: The second relay's callers are numbered from here: call SIDs and prompt tags stay unique.
SECOND_START = 50000


class RedisProc:
    """A scratch ``redis-server`` on a free port of 127.0.0.1 (no persistence), on one core."""

    def __init__(self, core: int | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # the project's script installs Debian's package
            out = subprocess.run([str(REPO / "scripts" / "ensure_redis.sh")], check=True,
                                 capture_output=True, text=True)  # fmt: skip
            binary = out.stdout.strip().splitlines()[-1]
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = tempfile.mkdtemp(prefix="crctl-bench-redis-")
        self.proc = subprocess.Popen(
            [*pin_prefix(core), binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.folder],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin_preexec(core),
        )  # fmt: skip
        self.client = redis.Redis.from_url(self.url, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def commands(self) -> int:
        """Commands served so far (the relays' and this bench's few)."""
        stats = self.client.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values())

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (``--workers``)."""
    total = 0.0
    parent = psutil.Process(pid)
    for p in [parent, *parent.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def added_ms(results: list[Any], records: dict[str, dict[str, Any]]) -> list[float]:
    """Per turn: first token at the caller minus the fake LLM's own time to first token, ms."""
    out = []
    for r in results:
        rec = records.get(r.tag)
        if r.error or r.first_at is None or rec is None or rec["first_chunk_at"] is None:
            continue
        fake_ttft = rec["first_chunk_at"] - rec["received_at"]
        out.append(1000 * ((r.first_at - r.sent_at) - fake_ttft))
    return out


def serves_workers() -> bool:
    """Whether ``crctl serve`` has ``--workers`` on this checkout."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "crctl", "serve", "--help"], env=env,
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    return "--workers" in out.stdout


async def run_pair(
    label: str, specs: dict[str, dict[str, Any]], fake: FakeProc, store: RedisProc,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Two relays side by side, ``args.rounds`` rounds; per round each one's CPU and latency.

    ``specs``: baseline first, candidate second (the ratio is candidate / baseline). With
    ``--swap`` the candidate is started, connected and driven first.
    """
    a, b = list(specs)
    if args.swap:
        specs = {b: specs[b], a: specs[a]}
    log_dir = RESULTS / "logs"
    relays: dict[str, RelayProc] = {}
    callers: dict[str, list[Caller]] = {}
    rounds: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {name: [] for name in specs}
    try:
        for name, spec in specs.items():
            relays[name] = RelayProc(
                fake.base_url, RELAY_CORE, log_dir / f"cluster-{label}-{name}.log", **spec
            )
        sig = sign(AUTH_TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws", {})
        for i, (name, relay) in enumerate(relays.items()):
            start = i * SECOND_START
            callers[name] = await connect_all(relay, args.calls, 1.0, sig, False, start=start)
        warm = random.Random(f"{args.seed}-warm")
        await asyncio.gather(
            *(
                c.turn(90000, bench_tag(c.index, 90000, 5, warm, (0.02, 0.02), (0.005, 0.005)))
                for cs in callers.values()
                for c in cs
            )
        )
        fake.dump()
        for rnd in range(args.rounds):
            rng = random.Random(f"{args.seed}-{rnd}")
            cpu0 = {name: tree_cpu(r.pid) for name, r in relays.items()}
            redis_cpu0, commands0 = tree_cpu(store.proc.pid), store.commands()
            t0 = now()
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        one_round(cs, rnd, args, random.Random(rng.random()))
                        for cs in callers.values()
                    )
                ),
                timeout=120,
            )
            wall = now() - t0
            cpu = {name: tree_cpu(r.pid) - cpu0[name] for name, r in relays.items()}
            redis_cpu = tree_cpu(store.proc.pid) - redis_cpu0
            commands = store.commands() - commands0 - 1  # the INFO above
            await asyncio.sleep(0.3)
            records = {r["tag"]: r for r in fake.dump()}
            row: dict[str, Any] = {"wall_s": round(wall, 2)}
            for name, res in zip(relays, results, strict=True):
                tokens = sum(r.tokens for r in res)
                added = added_ms(res, records)
                pooled[name].extend(added)
                row[name] = {
                    "turns": len(res),
                    "errors": sum(1 for r in res if r.error),
                    "cross_talk_tokens": sum(r.wrong for r in res),
                    "tokens": tokens,
                    "cpu_s": round(cpu[name], 3),
                    "cpu_us_per_token": round(1e6 * cpu[name] / max(1, tokens), 1),
                    "added_p50_ms": round(percentile(added, 50) or 0, 2),
                    "added_p99_ms": round(percentile(added, 99) or 0, 2),
                }
            row["ratio"] = round(row[b]["cpu_us_per_token"] / row[a]["cpu_us_per_token"], 3)
            turns = sum(row[n]["turns"] for n in specs)
            row["store"] = {
                "cpu_s": round(redis_cpu, 3),
                "commands": commands,
                "commands_per_turn": round(commands / max(1, turns), 2),
            }
            rounds.append(row)
            print(
                f"-- {label} round {rnd + 1}: {a} {row[a]['cpu_us_per_token']} µs, {b} "
                f"{row[b]['cpu_us_per_token']} µs per token: {row['ratio']}x; added p99 "
                f"{row[a]['added_p99_ms']} / {row[b]['added_p99_ms']} ms; redis {commands} "
                "commands",
                flush=True,
            )
    finally:
        await asyncio.gather(*(c.close() for cs in callers.values() for c in cs))
        for relay in relays.values():
            relay.stop()
    ratios = [r["ratio"] for r in rounds]
    return {
        "relays": {name: {k: v for k, v in spec.items()} for name, spec in specs.items()},
        "baseline": a,
        "candidate": b,
        "started_first": next(iter(specs)),
        "rounds": rounds,
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "added_ms": {
            name: {
                "n": len(v),
                "p50": round(percentile(v, 50) or 0, 2),
                "p99": round(percentile(v, 99) or 0, 2),
            }
            for name, v in pooled.items()
        },
        "errors": sum(r[n]["errors"] for r in rounds for n in specs),
        "cross_talk_tokens": sum(r[n]["cross_talk_tokens"] for r in rounds for n in specs),
        "redis_commands_per_token": round(
            sum(r["store"]["commands"] for r in rounds)
            / max(1, sum(r[b]["tokens"] for r in rounds)),
            4,
        ),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    quiet = await wait_quiet()
    fake = FakeProc(LOAD_CORE)
    store = RedisProc(LOAD_CORE)
    pairs: dict[str, Any] = {}
    try:
        if "redis" in args.pairs:
            specs = {"alone": {}, "redis": {"redis_url": store.url}}
            pairs["redis"] = await run_pair("redis", specs, fake, store, args)
        if "workers" in args.pairs:
            if serves_workers():
                one = {"redis_url": store.url}
                two = {"redis_url": store.url, "extra_args": ("--workers", "2")}
                pairs["workers"] = await run_pair(
                    "workers", {"1-worker": one, "2-workers": two}, fake, store, args
                )
            else:
                pairs["workers"] = {"skipped": "crctl serve has no --workers on this checkout"}
                print("-- workers: skipped, crctl serve has no --workers here", flush=True)
    finally:
        store.stop()
        fake.stop()
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_before": quiet,
        "git": git_state(),
        "versions": {**versions(), "redis-server": redis_version()},
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "pairs": pairs,
    }


def redis_version() -> str:
    binary = shutil.which("redis-server") or "redis-server"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    words = out.stdout.split()  # "Redis server v=7.0.15 sha=… malloc=…"
    return " ".join(words[:3]) if words else "redis-server ?"


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    out = [
        f"# crctl serve with and without --redis-url, side by side, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"CPython {m['python']}, Linux {m['kernel']}; {result['versions']['redis-server']}.",
        f"- Relays: `crctl serve` at commit {result['git']['commit']}"
        f"{' (with changes)' if result['git'].get('product_dirty') else ''}, two at once "
        f"pinned to core {RELAY_CORE}; fake LLM, redis-server and callers on core {LOAD_CORE}.",
        f"- Load: {c['calls']} calls per relay ({2 * c['calls']} on the core), burst profile "
        f"(TTFT {c['ttft']} s, one token every {c['delay'] * 1000:g} ms on the fake's shared "
        f"clock, {c['tokens']} tokens per reply), {c['turns']} turns per call per round, "
        f"{c['rounds']} rounds on the same processes.",
        "- Added latency: first token at the caller minus the fake LLM's own time to first "
        "token, every turn of every round pooled.",
        "",
    ]
    for label, p in result["pairs"].items():
        if "skipped" in p:
            out += [f"## {label}", "", f"Skipped: {p['skipped']}.", ""]
            continue
        a, b = p["baseline"], p["candidate"]
        add = p["added_ms"]
        out += [
            f"## {b} against {a}",
            "",
            f"Started, connected and driven first: {p['started_first']}.",
            "",
            f"CPU per token {b} / {a}: median {p['median_ratio']}x (rounds "
            f"{p['ratio_range'][0]}-{p['ratio_range'][1]}). Added first-token latency p50/p99: "
            f"{a} {add[a]['p50']} / {add[a]['p99']} ms, {b} {add[b]['p50']} / {add[b]['p99']} "
            f"ms. Redis commands per token: {p['redis_commands_per_token']}. Turn errors "
            f"{p['errors']}, cross-talk tokens {p['cross_talk_tokens']}.",
            "",
            f"| round | {a} µs/token | {b} µs/token | {b} / {a} | {a} p99 ms | {b} p99 ms | "
            "redis cmds / turn | redis CPU s | tokens each |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for i, r in enumerate(p["rounds"], 1):
            out.append(
                f"| {i} | {r[a]['cpu_us_per_token']} | {r[b]['cpu_us_per_token']} | "
                f"{r['ratio']} | {r[a]['added_p99_ms']} | {r[b]['added_p99_ms']} | "
                f"{r['store']['commands_per_turn']} | {r['store']['cpu_s']} | "
                f"{r[a]['tokens']} / {r[b]['tokens']} |"
            )
        out.append("")
    return "\n".join(out)


def _watchdog(*_: Any) -> None:
    raise TimeoutError(f"bench.cluster: watchdog, still running after {WATCHDOG_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per relay")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=3, help="turns per call per round")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per reply")
    parser.add_argument("--ttft", type=float, default=0.3)
    parser.add_argument("--delay", type=float, default=0.020, help="the fake's tick, s")
    parser.add_argument("--stagger", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pairs", default="redis,workers", help="redis, workers or both")
    parser.add_argument(
        "--swap", action="store_true", help="start and drive the candidate first (order check)"
    )
    parser.add_argument("--out", default=None, help="results file stem")
    args = parser.parse_args(argv)
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if not set(args.pairs) <= {"redis", "workers"}:
        parser.error("--pairs: redis, workers or both")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs: the relays on one, the load on the other")
    os.sched_setaffinity(0, {LOAD_CORE})
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG_S)
    try:
        result = asyncio.run(main_async(args))
    finally:
        signal.alarm(0)
    stem = args.out or f"cluster-{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    write_report(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
