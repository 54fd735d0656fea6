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
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/cluster.py`
    sys.path.insert(0, str(REPO))

from bench.procs import (  # noqa: E402
    FakeProc,
    free_port,
    pin_preexec,
    pin_prefix,
    wait_quiet,
)
from bench.run import (  # noqa: E402
    LOAD_CORE,
    RELAY_CORE,
    RESULTS,
    git_state,
    machine,
    versions,
)
from bench.side_by_side import add_load_arguments, run_bench, run_pair  # noqa: E402

WATCHDOG_S = 900


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

    @property
    def pid(self) -> int:
        """The server's process."""
        return self.proc.pid

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


def serves_workers() -> bool:
    """Whether ``crctl serve`` has ``--workers`` on this checkout."""
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "crctl", "serve", "--help"], env=env,
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    return "--workers" in out.stdout


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
        split = p.get("split")
        if split:
            out[-2:-2] = [
                f"Split by reply length (short rounds {c['tokens']} tokens, long rounds "
                f"{c['tokens_long']}; a long round against the short one before it): per-token "
                f"CPU {b} / {a} median {split['per_token_ratio']}x (pairs "
                f"{split['per_token_ratio_range'][0]}-{split['per_token_ratio_range'][1]}); "
                f"per-turn CPU {b} minus {a} median {split['per_turn_extra_us']} µs (pairs "
                f"{split['per_turn_extra_us_range'][0]} to {split['per_turn_extra_us_range'][1]}).",
                "",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cluster", description=__doc__.split("\n")[0])
    add_load_arguments(parser, rounds=5)
    parser.add_argument("--pairs", default="redis,workers", help="redis, workers or both")
    parser.add_argument(
        "--swap", action="store_true", help="start and drive the candidate first (order check)"
    )
    args = parser.parse_args(argv)
    args.pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    if not set(args.pairs) <= {"redis", "workers"}:
        parser.error("--pairs: redis, workers or both")
    if (os.cpu_count() or 1) < 2:
        parser.error("needs 2 CPUs: the relays on one, the load on the other")
    return run_bench("cluster", WATCHDOG_S, args, lambda: asyncio.run(main_async(args)), markdown)


if __name__ == "__main__":
    sys.exit(main())
