"""Two relays serving at the same time on one core, on the same burst load: CPU per token.

On a shared VM the CPU time of a 20-second run moves by 10-30 % with what the host's other
tenants do, so a ratio of two runs taken one after the other is only as good as those runs.
:func:`run_pair` runs two relays at once, pinned to the same core, each with ``args.calls``
calls, and reads each one's CPU over the same window: whatever slows the core slows both, and
the ratio keeps only the relays' own work. Used by ``bench/together.py`` (crctl against the
floor) and ``bench/cluster.py`` (with and without Redis, one worker and two).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

import psutil

from bench.loadgen import Caller, bench_tag, now, percentile
from bench.procs import AUTH_TOKEN, PUBLIC_URL, FakeProc, RelayProc
from bench.report import write_report
from bench.run import LOAD_CORE, RELAY_CORE, RESULTS, connect_all
from crctl.caller.webhook import sign

#: The second relay's callers are numbered from here: call SIDs and prompt tags stay unique.
SECOND_START = 50000


class Store(Protocol):
    """A server both relays may use (Redis), counted per round."""

    @property
    def pid(self) -> int:
        """Its process."""
        ...

    def commands(self) -> int:
        """Commands served so far."""
        ...


def add_load_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The burst load's options every side-by-side bench takes (``rounds``: its default)."""
    parser.add_argument("--calls", type=int, default=100, help="calls per relay")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--turns", type=int, default=3, help="turns per call per round")
    parser.add_argument("--tokens", type=int, default=30, help="tokens per reply")
    parser.add_argument(
        "--tokens-long",
        type=int,
        default=None,
        help="odd rounds' tokens per reply: splits per-token from per-turn CPU",
    )
    parser.add_argument("--ttft", type=float, default=0.3)
    parser.add_argument("--delay", type=float, default=0.020, help="the fake's tick, s")
    parser.add_argument("--stagger", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="results file stem")


def run_bench(
    name: str,
    watchdog_s: int,
    args: argparse.Namespace,
    work: Callable[[], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> int:
    """Run a side-by-side bench: ``work`` under a watchdog, then its report.

    This process goes on the load core; the report is written as ``args.out`` or
    ``<name>-<date>-<host>``.
    """
    os.sched_setaffinity(0, {LOAD_CORE})

    def watchdog(*_: Any) -> None:
        raise TimeoutError(f"bench.{name}: watchdog, still running after {watchdog_s} s")

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(watchdog_s)
    try:
        result = work()
    finally:
        signal.alarm(0)
    stem = args.out or f"{name}-{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    write_report(stem, result, markdown(result))
    return 0


def round_tokens(args: argparse.Namespace, rnd: int) -> int:
    """Tokens per reply in round ``rnd``: with ``args.tokens_long``, odd rounds use it."""
    long: int | None = getattr(args, "tokens_long", None)
    tokens: int = args.tokens
    return long if long and rnd % 2 == 1 else tokens


async def one_round(
    callers: list[Caller], rnd: int, args: argparse.Namespace, rng: random.Random
) -> list[Any]:
    """Every call runs ``args.turns`` burst turns, starts spread over ``args.stagger`` s."""
    tokens = round_tokens(args, rnd)

    async def call_turns(c: Caller) -> list[Any]:
        crng = random.Random(rng.random())
        await asyncio.sleep(crng.uniform(0, args.stagger))
        results = []
        for t in range(args.turns):
            turn = rnd * args.turns + t
            tick = args.delay
            tag = bench_tag(c.index, turn, tokens, crng, (args.ttft, args.ttft), (tick, tick), tick)
            res = await c.turn(turn, tag)
            results.append(res)
            if res.error:
                break
            await asyncio.sleep(crng.uniform(0.5, 1.5))
        return results

    per_call = await asyncio.gather(*(call_turns(c) for c in callers))
    return [r for rs in per_call for r in rs]


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


async def run_pair(
    label: str, specs: dict[str, dict[str, Any]], fake: FakeProc, store: Store | None,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Two relays side by side, ``args.rounds`` rounds; per round each one's CPU and latency.

    ``specs``: ``RelayProc`` arguments by name, baseline first, candidate second (the ratio is
    candidate / baseline). With ``args.swap`` the candidate is started, connected and driven
    first. ``store``: a Redis both may use, whose commands and CPU are counted per round.
    """
    a, b = list(specs)
    if getattr(args, "swap", False):
        specs = {b: specs[b], a: specs[a]}
    log_dir = RESULTS / "logs"
    relays: dict[str, RelayProc] = {}
    callers: dict[str, list[Caller]] = {}
    rounds: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {name: [] for name in specs}
    try:
        for name, spec in specs.items():
            relays[name] = RelayProc(
                fake.base_url, RELAY_CORE, log_dir / f"{label}-{name}.log", **spec
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
            store0 = (tree_cpu(store.pid), store.commands()) if store is not None else None
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
            if store is not None and store0 is not None:
                commands = store.commands() - store0[1] - 1  # the INFO above
                turns = sum(row[n]["turns"] for n in specs)
                row["store"] = {
                    "cpu_s": round(tree_cpu(store.pid) - store0[0], 3),
                    "commands": commands,
                    "commands_per_turn": round(commands / max(1, turns), 2),
                }
            rounds.append(row)
            print(
                f"-- {label} round {rnd + 1}: {a} {row[a]['cpu_us_per_token']} µs, {b} "
                f"{row[b]['cpu_us_per_token']} µs per token: {row['ratio']}x; added p99 "
                f"{row[a]['added_p99_ms']} / {row[b]['added_p99_ms']} ms"
                + (f"; redis {row['store']['commands']} commands" if "store" in row else ""),
                flush=True,
            )
    finally:
        await asyncio.gather(*(c.close() for cs in callers.values() for c in cs))
        for relay in relays.values():
            relay.stop()
    ratios = [r["ratio"] for r in rounds]
    split = split_costs(rounds, a, b) if getattr(args, "tokens_long", None) else None
    return {
        "split": split,
        "relays": {
            name: {k: str(v) if isinstance(v, os.PathLike) else v for k, v in spec.items()}
            for name, spec in specs.items()
        },
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
        )
        if store is not None
        else None,
    }


def split_costs(rounds: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Per-token and per-turn CPU of each relay, from rounds of short and long replies.

    Rounds alternate short and long replies (``--tokens-long``) on the same processes and the
    same turns. For each relay, a short round and the long one after it give ``cpu = turns *
    per_turn + tokens * per_token``: the marginal CPU of a token is the difference of their CPU
    over the difference of their tokens, and the rest of the short round is per turn. Costs
    that go with time (timers, heartbeats) land in the per-token figure, as a long round lasts
    longer. Both relays share each round's window, so ``b``'s per-token cost over ``a``'s
    keeps only their own work; the median over the pairs is reported.
    """
    pairs = []
    for short, long in zip(rounds[0::2], rounds[1::2], strict=False):
        pair: dict[str, Any] = {}
        for name in (a, b):
            s_, l_ = short[name], long[name]
            extra_tokens = l_["tokens"] - s_["tokens"]
            if extra_tokens <= 0 or s_["turns"] != l_["turns"] or not s_["turns"]:
                return None
            per_token = 1e6 * (l_["cpu_s"] - s_["cpu_s"]) / extra_tokens
            per_turn = (1e6 * s_["cpu_s"] - per_token * s_["tokens"]) / s_["turns"]
            pair[name] = {"per_token_us": round(per_token, 1), "per_turn_us": round(per_turn)}
        pair["per_token_ratio"] = round(pair[b]["per_token_us"] / pair[a]["per_token_us"], 3)
        pair["per_turn_extra_us"] = pair[b]["per_turn_us"] - pair[a]["per_turn_us"]
        pairs.append(pair)
    if not pairs:
        return None
    ratios = [p["per_token_ratio"] for p in pairs]
    extra = [p["per_turn_extra_us"] for p in pairs]
    return {
        "pairs": pairs,
        "per_token_ratio": round(statistics.median(ratios), 3),
        "per_token_ratio_range": [min(ratios), max(ratios)],
        "per_turn_extra_us": round(statistics.median(extra)),
        "per_turn_extra_us_range": [min(extra), max(extra)],
    }
