"""Capacity: the most concurrent calls one core holds with added first-token p99 <= 20 ms.

Steps the number of calls (burst profile, bench/run.py's levels without the barge-in phase),
crctl and the floor (bench/floor.py) side by side at each step, each on a fresh relay pinned
to one core, until each one's added first-token latency p99 exceeds the limit (or a turn
fails) in every one of ``--tries`` fresh runs (2: one noisy p99 on a shared machine does not end
the search); reports the largest level that held for each. About 2-3 minutes on the 2-core machine::

    .venv/bin/python -m bench.capacity [--steps 100,200,300,400,500,600,800] [--limit-ms 20]

The load generator and the fake LLM share the other core: its event-loop lag and their CPU are
reported per step, since at high counts the load side, not the relay, can be what saturates.
Writes bench/results/capacity-<date>-<host>.json and .md; exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/capacity.py`
    sys.path.insert(0, str(REPO))

from bench.loadgen import now  # noqa: E402
from bench.procs import FakeProc  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.run import (  # noqa: E402
    LOAD_CORE,
    RELAY_CORE,
    RELAYS,
    RESULTS,
    Shape,
    fmt,
    git_state,
    machine,
    run_level,
    versions,
)

WATCHDOG_S = 420
#: A step whose load generator's loop lag p99 is above this measured the load side too (the
#: client's receive stamps are late): it is flagged, and a break there is not the relay's alone.
LOAD_LAG_MS = 5.0


def step_figures(lv: dict[str, Any], limit_ms: float) -> dict[str, Any]:
    t = lv["turns"]
    p99 = t["added_latency_ms"].get("p99")
    return {
        "added_p50_ms": t["added_latency_ms"].get("p50"),
        "added_p99_ms": p99,
        "per_token_p99_ms": t["per_token_ms"].get("p99"),
        "cpu_us_per_token": t["relay_cpu_us_per_token"],
        "relay_cpu_pct": t["relay_cpu_pct"],
        "tokens_per_s": t["tokens_per_s"],
        "idle_kib": lv["rss"]["per_call_kib"],
        "errors": t["errors"],
        "loadgen_lag_p99_ms": t["loadgen_loop_lag_ms"].get("p99"),
        "load_core_pct": round(t["fake_cpu_pct"] + t["loadgen_cpu_pct"], 1),
        "other_jobs_pct": max(t["other_load_relay_core_pct"], t["other_load_load_core_pct"]),
        "held": p99 is not None and p99 <= limit_ms and t["errors"] == 0 and not t["unmatched"],
        "load_bound": (t["loadgen_loop_lag_ms"].get("p99") or 0) > LOAD_LAG_MS,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    shape = Shape(
        "burst",
        (args.ttft, args.ttft),
        (args.delay, args.delay),
        args.delay,
        args.stagger,
        {n: args.turns for n in args.steps},
        {},
    )
    result: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "versions": versions(),
        "config": {
            k: v for k, v in vars(args).items() if isinstance(v, int | float | str | list | tuple)
        },
        "steps": {r: {} for r in args.relays},
        "held": {r: None for r in args.relays},
    }
    log_dir = RESULTS / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    broke = dict.fromkeys(args.relays, False)
    fake = FakeProc(LOAD_CORE if args.pin else None)
    try:
        for i, n in enumerate(args.steps):
            for relay in args.relays if i % 2 == 0 else args.relays[::-1]:
                if broke[relay]:
                    continue
                for attempt in range(1, args.tries + 1):
                    t0 = now()
                    lv = await run_level(
                        n, fake, args, random.Random(f"{args.seed}-{n}-{attempt}"), log_dir,
                        shape, relay, barge=False,
                    )  # fmt: skip
                    fig = {**step_figures(lv, args.limit_ms), "attempt": attempt}
                    result["steps"][relay].setdefault(str(n), []).append(fig)
                    print(
                        f"-- {relay}, {n} calls, try {attempt}: added p50/p99 "
                        f"{fig['added_p50_ms']}/{fig['added_p99_ms']} ms, "
                        f"{fig['cpu_us_per_token']} µs/token, relay {fig['relay_cpu_pct']}%, "
                        f"loadgen lag p99 {fig['loadgen_lag_p99_ms']} ms, other jobs "
                        f"{fig['other_jobs_pct']}%: {'held' if fig['held'] else 'BROKE'} "
                        f"({now() - t0:.0f} s)",
                        flush=True,
                    )
                    if fig["held"]:
                        break
                if fig["held"]:
                    result["held"][relay] = n
                else:
                    broke[relay] = True
            if all(broke.values()):
                break
    finally:
        fake.stop()
    return result


def row(relay: str, n: str, f: dict[str, Any]) -> str:
    return (
        f"| {relay} | {n} (try {f['attempt']}) | {fmt(f['added_p50_ms'])} / "
        f"{fmt(f['added_p99_ms'])} | {fmt(f['per_token_p99_ms'])} | "
        f"{fmt(f['cpu_us_per_token'])} | {fmt(f['relay_cpu_pct'])} | {fmt(f['tokens_per_s'])} | "
        f"{fmt(f['idle_kib'])} | {fmt(f['loadgen_lag_p99_ms'])} | {fmt(f['load_core_pct'])} | "
        f"{fmt(f['other_jobs_pct'])} | {'held' if f['held'] else 'broke'}"
        f"{', load side saturated' if f['load_bound'] else ''} |"
    )


def markdown(result: dict[str, Any]) -> str:
    m, c, g = result["machine"], result["config"], result["git"]
    lines = [
        f"# Capacity at added first-token p99 <= {c['limit_ms']:g} ms, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"{m['python_impl']} {m['python']}, Linux {m['kernel']}.",
        f"- crctl at commit {g['commit']}{' (uncommitted changes)' if g['product_dirty'] else ''};"
        f" each relay pinned to core {RELAY_CORE}, fake LLM and load generator on core "
        f"{LOAD_CORE}.",
        f"- Burst profile: fake TTFT {c['ttft']} s, {c['tokens']} tokens per reply, one every "
        f"{c['delay'] * 1000:g} ms on the fake's shared clock; calls start within "
        f"{c['stagger']:g} s; {c['turns']} turns per call, pauses {c['think']} s.",
        "",
        "| relay | largest level that held |",
        "|---|--:|",
    ]
    for relay, held in result["held"].items():
        steps = result["steps"][relay]
        last = steps[list(steps)[-1]][-1] if steps else None
        note = ""
        if last is not None and not last["held"] and last["load_bound"]:
            note = f" (the next step broke with the load generator saturated: at least {held})"
        lines.append(f"| {relay} | {held if held is not None else 'none'}{note} |")
    lines += [
        "",
        "| relay | calls | added p50 / p99 ms | per-token p99 ms | µs CPU / token | relay CPU % "
        "| tokens/s | idle KiB | loadgen lag p99 ms | load core % | other jobs % | |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for relay, steps in result["steps"].items():
        for n, tries in steps.items():
            for f in tries:
                lines.append(row(relay, n, f))
    lines += [
        "",
        f"A load generator lag p99 above {LOAD_LAG_MS:g} ms (flagged *load side saturated*), or a "
        "load core near 100 %, means the load side saturated too: the step's latencies then "
        "include the client's own delay, and a break there is not the relay's alone.",
        "",
    ]
    return "\n".join(lines)


def _watchdog(*_: Any) -> None:
    raise TimeoutError(f"bench.capacity: watchdog, still running after {WATCHDOG_S} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.capacity", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="100,200,300,400,500,600,800", help="calls per step")
    parser.add_argument("--limit-ms", type=float, default=20.0, help="added first-token p99")
    parser.add_argument("--turns", type=int, default=2, help="turns per call at each step")
    parser.add_argument(
        "--tries",
        type=int,
        default=2,
        help="a step that breaks is run again, up to this many "
        "times in all: it breaks only if every try does (one noisy p99 does not end the search)",
    )
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--ttft", type=float, default=0.3)
    parser.add_argument("--delay", type=float, default=0.020, help="the shared tick, s")
    parser.add_argument("--stagger", type=float, default=2.0, help="calls start within, s")
    parser.add_argument("--think", default="0.5,1.5")
    parser.add_argument("--no-floor", dest="floor", action="store_false")
    parser.add_argument("--no-pin", dest="pin", action="store_false")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.steps = [int(x) for x in args.steps.split(",")]
    lo, _, hi = args.think.partition(",")
    args.think = (float(lo), float(hi or lo))
    args.relays = list(RELAYS) if args.floor else ["crctl"]
    # run_level's other options: crctl as bench.run runs it by default
    args.deflate = args.profile = args.probe = args.probe_slow = args.pyinstrument = False
    args.agent, args.relay_module, args.quiet = "llm", "crctl", 0.3
    if args.pin and (os.cpu_count() or 1) < 2:
        args.pin = False
    if args.pin:
        os.sched_setaffinity(0, {LOAD_CORE})
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(WATCHDOG_S)
    t0 = now()
    try:
        result = asyncio.run(main_async(args))
    finally:
        signal.alarm(0)
    result["duration_s"] = round(now() - t0, 1)
    stem = args.out or f"capacity-{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    write_report(stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
