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
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/together.py`
    sys.path.insert(0, str(REPO))

from bench.procs import (  # noqa: E402
    FakeProc,
    wait_quiet,
)
from bench.run import (  # noqa: E402
    LOAD_CORE,
    RELAY_CORE,
    RESULTS,
    TARGET_CPU_RATIO,
    fmt,
    git_state,
    machine,
    versions,
)
from bench.side_by_side import add_load_arguments, run_bench, run_pair  # noqa: E402

WATCHDOG_S = 420


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    quiet = await wait_quiet()
    fake = FakeProc(LOAD_CORE)
    specs = {"floor": {"module": "bench.floor"}, "crctl": {"module": args.relay_module}}
    args.swap = True  # crctl (the candidate) is started, connected and driven first
    try:
        pair = await run_pair("together", specs, fake, None, args)
    finally:
        fake.stop()
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_before": quiet,
        "git": git_state(),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "swap")},
        "rounds": pair["rounds"],
        "median_ratio": pair["median_ratio"],
        "errors": pair["errors"],
        "cross_talk_tokens": pair["cross_talk_tokens"],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.together", description=__doc__.split("\n")[0])
    add_load_arguments(parser, rounds=5)
    parser.add_argument(
        "--relay-module", default="crctl", help="python -m MODULE serve ... (what-if runs)"
    )
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs: the relays on one, the load on the other")
    return run_bench("together", WATCHDOG_S, args, lambda: asyncio.run(main_async(args)), markdown)


if __name__ == "__main__":
    sys.exit(main())
