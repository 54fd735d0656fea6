"""CPU per token, crctl against the floor, both serving at the same time on one core.

bench/run.py runs crctl and the floor one after the other: on a shared VM the CPU time of a
20-second run moves by 10-30 % with what the host's other tenants do, so a ratio of two runs is
only as good as those two runs. Here both relays run at once, pinned to the same core, each with
half the calls, on the same burst load (the fake LLM's shared tick), and each one's CPU is read
over the same window: whatever slows the core slows both, and the ratio keeps only the relays'
own work. Several rounds of turns run on the same processes; the median ratio is reported.

    .venv/bin/python -m bench.together [--calls 100] [--rounds 5]

``--calls`` is per relay (100 + 100: the core carries 200 calls, as bench.run's burst level).
Writes bench/results/together-<date>-<host>.json and .md; exit status 0. About 1-2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/together.py`
    sys.path.insert(0, str(REPO))

from bench.loadgen import Caller, bench_tag, now  # noqa: E402
from bench.procs import (  # noqa: E402
    AUTH_TOKEN,
    PUBLIC_URL,
    FakeProc,
    RelayProc,
    cpu_seconds,
    wait_quiet,
)
from bench.report import write_report  # noqa: E402
from bench.run import (  # noqa: E402
    LOAD_CORE,
    RELAY_CORE,
    RESULTS,
    TARGET_CPU_RATIO,
    connect_all,
    fmt,
    git_state,
    machine,
    versions,
)
from crctl.caller.webhook import sign  # noqa: E402

WATCHDOG_S = 420
#: Call indices of the floor's callers (crctl's start at 0): every prompt tag is unique.
FLOOR_START = 50000


async def one_round(
    callers: list[Caller], rnd: int, args: argparse.Namespace, rng: random.Random
) -> list[Any]:
    """Every call runs ``args.turns`` burst turns, starts spread over ``args.stagger`` s."""

    async def call_turns(c: Caller) -> list[Any]:
        crng = random.Random(rng.random())
        await asyncio.sleep(crng.uniform(0, args.stagger))
        results = []
        for t in range(args.turns):
            turn = rnd * args.turns + t
            tick = args.delay
            tag = bench_tag(
                c.index, turn, args.tokens, crng, (args.ttft, args.ttft), (tick, tick), tick
            )
            res = await c.turn(turn, tag)
            results.append(res)
            if res.error:
                break
            await asyncio.sleep(crng.uniform(0.5, 1.5))
        return results

    per_call = await asyncio.gather(*(call_turns(c) for c in callers))
    return [r for rs in per_call for r in rs]


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    quiet = await wait_quiet()
    fake = FakeProc(LOAD_CORE)
    relays: dict[str, RelayProc] = {}
    callers: dict[str, list[Caller]] = {}
    rounds: list[dict[str, Any]] = []
    try:
        for name, module in (("crctl", args.relay_module), ("floor", "bench.floor")):
            relays[name] = RelayProc(
                fake.base_url, RELAY_CORE, log_dir / f"together-{name}.log", module=module
            )
        sig = sign(AUTH_TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws", {})
        for name, relay in relays.items():
            start = 0 if name == "crctl" else FLOOR_START
            callers[name] = await connect_all(relay, args.calls, 1.0, sig, False, start=start)
        # warm-up: every call one short turn on both relays, then the measured rounds
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
            cpu0 = {name: cpu_seconds(r.pid) for name, r in relays.items()}
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
            cpu = {name: cpu_seconds(r.pid) - cpu0[name] for name, r in relays.items()}
            fake.dump()  # the fake keeps records until dumped: none are needed here
            row: dict[str, Any] = {"wall_s": round(wall, 2)}
            for name, res in zip(relays, results, strict=True):
                tokens = sum(r.tokens for r in res)
                row[name] = {
                    "turns": len(res),
                    "errors": sum(1 for r in res if r.error),
                    "cross_talk_tokens": sum(r.wrong for r in res),
                    "tokens": tokens,
                    "cpu_s": round(cpu[name], 3),
                    "cpu_us_per_token": round(1e6 * cpu[name] / max(1, tokens), 1),
                }
            row["ratio"] = round(
                row["crctl"]["cpu_us_per_token"] / row["floor"]["cpu_us_per_token"], 3
            )
            rounds.append(row)
            print(
                f"-- round {rnd + 1}: crctl {row['crctl']['cpu_us_per_token']} µs, floor "
                f"{row['floor']['cpu_us_per_token']} µs per token: {row['ratio']}x",
                flush=True,
            )
    finally:
        await asyncio.gather(*(c.close() for cs in callers.values() for c in cs))
        for relay in relays.values():
            relay.stop()
        fake.stop()
    ratios = [r["ratio"] for r in rounds]
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_before": quiet,
        "git": git_state(),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rounds,
        "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "errors": sum(r[n]["errors"] for r in rounds for n in ("crctl", "floor")),
        "cross_talk_tokens": sum(r["crctl"]["cross_talk_tokens"] for r in rounds),
    }


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    median = result["median_ratio"]
    verdict = "PASS" if median is not None and median <= TARGET_CPU_RATIO else "FAIL"
    out = [
        f"# CPU per token, crctl and the floor at the same time, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"CPython {m['python']}, Linux {m['kernel']}.",
        f"- Relays: `{c['relay_module']} serve` at commit {result['git']['commit']}"
        f"{' (with changes)' if result['git'].get('product_dirty') else ''} and bench/floor.py, "
        "both pinned to "
        f"core {RELAY_CORE}, serving at the same time; fake LLM and load generator on core "
        f"{LOAD_CORE}.",
        f"- Load: {c['calls']} calls per relay ({2 * c['calls']} on the core), burst profile "
        f"(TTFT {c['ttft']} s, then one token every {c['delay'] * 1000:g} ms on the fake's "
        f"shared clock, {c['tokens']} tokens per reply), {c['turns']} turns per call per round, "
        f"starts within {c['stagger']:g} s, {c['rounds']} rounds on the same processes.",
        "",
        f"**{verdict}** CPU per token <= {TARGET_CPU_RATIO:g}x the floor's: median of the rounds "
        f"{fmt(median)}x. Turn errors {result['errors']}, cross-talk tokens "
        f"{result['cross_talk_tokens']}.",
        "",
        "| round | crctl µs/token | floor µs/token | crctl / floor | tokens each | wall s |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for i, r in enumerate(result["rounds"], 1):
        out.append(
            f"| {i} | {r['crctl']['cpu_us_per_token']} | {r['floor']['cpu_us_per_token']} | "
            f"{r['ratio']} | {r['crctl']['tokens']} / {r['floor']['tokens']} | {r['wall_s']} |"
        )
    return "\n".join(out) + "\n"


def _watchdog(*_: Any) -> None:
    raise TimeoutError(f"bench.together: watchdog, still running after {WATCHDOG_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.together", description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="calls per relay")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--turns", type=int, default=3, help="turns per call per round")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per reply")
    parser.add_argument("--ttft", type=float, default=0.3)
    parser.add_argument("--delay", type=float, default=0.020, help="the fake's tick, s")
    parser.add_argument("--stagger", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--relay-module", default="crctl", help="python -m MODULE serve ... (what-if runs)"
    )
    parser.add_argument("--out", default=None, help="results file stem")
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs: the relays on one, the load on the other")
    os.sched_setaffinity(0, {LOAD_CORE})
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG_S)
    try:
        result = asyncio.run(main_async(args))
    finally:
        signal.alarm(0)
    stem = args.out or f"together-{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    write_report(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
