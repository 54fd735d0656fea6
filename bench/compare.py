"""crctl at another commit against this tree, serving at the same time: CPU per token, latency.

Issue 13 asks that its work (the turn timeline, metrics, traces, usage) add nothing on the
per-token path: this runs ``crctl serve`` from the packages of ``--base`` (a git archive first
on ``PYTHONPATH``, the same venv) beside ``crctl serve`` from this tree, both pinned to one
core, 100 calls each on the burst load (bench/side_by_side.py), and reports per round each
one's CPU per token and added first-token p99, and their ratios::

    .venv/bin/python -m bench.compare --base d13286e [--rounds 10] [--tokens-long 120] [--swap]

``--relay-module M`` runs "after" as ``python -m M serve`` (a what-if wrapper that patches this
tree before starting crctl; put its folder on ``PYTHONPATH``) against ``--base HEAD``.

Writes bench/results/compare-<date>-<host>.json and .md; exit status 0. About 2 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/compare.py`
    sys.path.insert(0, str(REPO))

from bench.procs import FakeProc, wait_quiet  # noqa: E402
from bench.run import LOAD_CORE, RELAY_CORE, RESULTS, git_state, machine, versions  # noqa: E402
from bench.side_by_side import add_load_arguments, run_bench, run_pair  # noqa: E402
from bench.startup import tree_at  # noqa: E402

WATCHDOG_S = 900


async def main_async(args: argparse.Namespace, base_tree: Path) -> dict[str, Any]:
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    quiet = await wait_quiet()
    fake = FakeProc(LOAD_CORE)
    try:
        specs = {"before": {"tree": base_tree}, "after": {"module": args.relay_module}}
        pair = await run_pair("compare", specs, fake, None, args)
    finally:
        fake.stop()
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "machine_before": quiet,
        "git": git_state(),
        "base": args.base_commit,
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "pair": pair,
    }


def markdown(result: dict[str, Any]) -> str:
    m, c, p = result["machine"], result["config"], result["pair"]
    add = p["added_ms"]
    out = [
        f"# crctl at {result['base']} (before) and this tree (after), side by side, "
        f"{result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"CPython {m['python']}, Linux {m['kernel']}.",
        f"- After: commit {result['git']['commit']}"
        f"{' (with changes)' if result['git'].get('product_dirty') else ''}"
        + (f", run as `{c['relay_module']}`" if c.get("relay_module", "crctl") != "crctl" else "")
        + "; before: "
        f"{result['base']}. Both `crctl serve` at once pinned to core {RELAY_CORE}; fake LLM and "
        f"callers on core {LOAD_CORE}; started, connected and driven first: {p['started_first']}.",
        f"- Load: {c['calls']} calls per relay ({2 * c['calls']} on the core), burst profile "
        f"(TTFT {c['ttft']} s, one token every {c['delay'] * 1000:g} ms on the fake's shared "
        f"clock, {c['tokens']} tokens per reply"
        + (f", every second round {c['tokens_long']}" if c.get("tokens_long") else "")
        + f"), {c['turns']} turns per call per round, {c['rounds']} rounds.",
        "",
        f"CPU per token after / before: median {p['median_ratio']}x (rounds "
        f"{p['ratio_range'][0]}-{p['ratio_range'][1]}). Added first-token latency p50/p99: "
        f"before {add['before']['p50']} / {add['before']['p99']} ms, after "
        f"{add['after']['p50']} / {add['after']['p99']} ms. Turn errors {p['errors']}, "
        f"cross-talk tokens {p['cross_talk_tokens']}.",
        "",
    ]
    split = p.get("split")
    if split:
        out += [
            f"Split by reply length: per-token CPU after / before median "
            f"{split['per_token_ratio']}x (pairs {split['per_token_ratio_range'][0]}-"
            f"{split['per_token_ratio_range'][1]}); per turn after minus before median "
            f"{split['per_turn_extra_us']} µs (pairs {split['per_turn_extra_us_range'][0]} to "
            f"{split['per_turn_extra_us_range'][1]}).",
            "",
        ]
    out += [
        "| round | before µs/token | after µs/token | after / before | before p99 ms | "
        "after p99 ms | tokens each |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for i, r in enumerate(p["rounds"], 1):
        out.append(
            f"| {i} | {r['before']['cpu_us_per_token']} | {r['after']['cpu_us_per_token']} | "
            f"{r['ratio']} | {r['before']['added_p99_ms']} | {r['after']['added_p99_ms']} | "
            f"{r['before']['tokens']} / {r['after']['tokens']} |"
        )
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (before)")
    add_load_arguments(parser, rounds=10)
    parser.add_argument("--swap", action="store_true", help="start and drive 'after' first")
    parser.add_argument(
        "--relay-module",
        default="crctl",
        help="the module 'after' runs as `python -m MODULE serve` (a what-if wrapper)",
    )
    args = parser.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs: the relays on one, the load on the other")
    found = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO,
                           capture_output=True, text=True)  # fmt: skip
    if found.returncode != 0:
        parser.error(f"--base: no commit {args.base!r} in this repository")
    args.base_commit = found.stdout.strip()

    def work() -> dict[str, Any]:
        with tree_at(args.base_commit) as base_tree:
            return asyncio.run(main_async(args, base_tree))

    return run_bench("compare", WATCHDOG_S, args, work, markdown)


if __name__ == "__main__":
    sys.exit(main())
