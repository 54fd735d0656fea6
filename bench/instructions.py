"""Instructions per token and per turn, crctl against the floor, counted by callgrind.

CPU time on a shared VM moves with the host's other tenants, and even bench/together.py's
ratio of two relays on one core moves by a few hundredths from one hour to the next. An
instruction count does not move: each relay runs under valgrind's callgrind with counting
off, serves a few calls (the burst profile's replies, one token per tick of the fake LLM),
and counts only the measured turns: first ``--turns`` turns of ``--tokens`` tokens per call,
then as many of ``--tokens-long``. The two phases give the per-token cost (their difference
over the extra tokens) and the rest per turn. Counts repeat to about ±5k instructions per
turn; a change that moves them by more is real, whatever the host does.

    .venv/bin/python -m bench.instructions [--relay-module crctl] [--tree DIR] [--calls 2]

``--tree`` puts another commit's packages first on ``PYTHONPATH`` (``git archive REV | tar
-x -C DIR``), to count a change against its base. Needs valgrind. A few minutes: the relay
runs some fifty times slower under valgrind, and the counts do not depend on it.
Writes bench/results/instructions-<date>-<host>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/instructions.py`
    sys.path.insert(0, str(REPO))

from bench.loadgen import Caller, bench_tag  # noqa: E402
from bench.procs import AUTH_TOKEN, PUBLIC_URL, FakeProc, RelayProc  # noqa: E402
from bench.report import write_report  # noqa: E402
from bench.run import LOAD_CORE, RELAY_CORE, RESULTS, connect_all, git_state, machine  # noqa: E402
from crctl.caller.webhook import sign  # noqa: E402

_TOTALS = re.compile(r"^totals:\s*(\d+)", re.M)


def control(pid: int, *flags: str) -> None:
    """``callgrind_control`` on the relay (counting on or off, zero, dump)."""
    subprocess.run(["callgrind_control", *flags, str(pid)], check=True, capture_output=True)


def dumped(out: Path) -> int:
    """Instructions in the newest callgrind dump next to ``out`` (``out.N`` files)."""
    parts = sorted(out.parent.glob(out.name + ".*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    if not parts:
        raise RuntimeError(f"callgrind wrote no dump next to {out}")
    found = _TOTALS.search(parts[-1].read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no totals in {parts[-1]}")
    return int(found[1])


async def phase(callers: list[Caller], first: int, turns: int, tokens: int, tick: float) -> int:
    """``turns`` turns of ``tokens`` tokens on every call; the tokens received."""
    rng = random.Random(f"phase-{first}")
    received = 0

    async def one(c: Caller) -> None:
        nonlocal received
        for t in range(first, first + turns):
            tag = bench_tag(c.index, t, tokens, rng, (0.3, 0.3), (tick, tick), tick)
            res = await c.turn(t, tag, timeout=120)
            if res.error:
                raise RuntimeError(f"call {c.index} turn {t}: {res.error}")
            received += res.tokens

    await asyncio.gather(*(one(c) for c in callers))
    return received


async def count(name: str, spec: dict[str, Any], fake: FakeProc, args: argparse.Namespace,
                scratch: Path) -> dict[str, Any]:  # fmt: skip
    """One relay under callgrind: instructions in each phase, per turn and per token."""
    out = scratch / f"{name}.cg"
    wrapper = ("valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}")
    log = RESULTS / "logs" / f"instructions-{name}.log"
    relay = RelayProc(fake.base_url, RELAY_CORE, log, wrapper=wrapper, start_timeout=300, **spec)
    callers: list[Caller] = []
    try:
        sig = sign(AUTH_TOKEN, PUBLIC_URL.replace("https://", "wss://") + "/ws", {})
        callers = await connect_all(relay, args.calls, 1.0, sig, False)
        await phase(callers, 0, args.warm, args.tokens, args.tick)  # imports, caches, pools
        counts = []
        for i, tokens in enumerate((args.tokens, args.tokens_long)):
            control(relay.pid, "--zero")
            control(relay.pid, "--instr=on")
            got = await phase(callers, 100 * (i + 1), args.turns, tokens, args.tick)
            await asyncio.sleep(1.5)  # the store's batch and the turn's tail are in the count
            control(relay.pid, "--instr=off")
            control(relay.pid, "--dump")
            turns = args.calls * args.turns
            if got != turns * tokens:
                raise RuntimeError(f"{name}: {got} tokens, expected {turns * tokens}")
            counts.append({"tokens": tokens, "turns": turns, "instructions": dumped(out)})
    finally:
        await asyncio.gather(*(c.close() for c in callers))
        relay.stop()
    short, long = counts
    turns = short["turns"]
    per_token = (long["instructions"] - short["instructions"]) / (
        turns * (long["tokens"] - short["tokens"])
    )
    per_turn = short["instructions"] / turns
    return {
        "phases": counts,
        "per_turn_short": round(per_turn),
        "per_token": round(per_token),
        "per_turn_fixed": round(per_turn - per_token * short["tokens"]),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    fake = FakeProc(LOAD_CORE)
    scratch = Path(tempfile.mkdtemp(prefix="crctl-callgrind-"))
    print(f"callgrind dumps in {scratch}", flush=True)
    relays: dict[str, dict[str, Any]] = {}
    if not args.no_floor:
        relays["floor"] = {"module": "bench.floor"}
    candidate: dict[str, Any] = {"module": args.relay_module}
    if args.tree:
        candidate["tree"] = args.tree
    relays["crctl"] = candidate
    try:
        counted = {}
        for name, spec in relays.items():
            counted[name] = await count(name, spec, fake, args, scratch)
    finally:
        fake.stop()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    floor, crctl = counted.get("floor"), counted["crctl"]
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "git": git_state(),
        "config": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        },
        "relays": counted,
        "ratio_per_turn_short": round(crctl["per_turn_short"] / floor["per_turn_short"], 3)
        if floor
        else None,
        "ratio_per_token": round(crctl["per_token"] / floor["per_token"], 3) if floor else None,
    }


def markdown(result: dict[str, Any]) -> str:
    c, r, m = result["config"], result["relays"], result["machine"]
    out = [
        f"# Instructions per turn and per token (callgrind), {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), CPython "
        f"{m['python']} (instruction counts do not depend on the host's load).",
        f"- Git: {result['git'].get('commit')} ({result['git'].get('subject', '')}); relay "
        f"module `{c['relay_module']}`" + (f", tree `{c['tree']}`" if c["tree"] else ""),
        f"- {c['calls']} calls, {c['warm']} warm-up turns, then {c['turns']} turns of "
        f"{c['tokens']} tokens and {c['turns']} of {c['tokens_long']} per call; the fake's tick "
        f"{c['tick']} s",
        "",
        f"| relay | per {c['tokens']}-token turn | per token | per turn, fixed |",
        "|---|--:|--:|--:|",
    ]
    for name, v in r.items():
        out.append(
            f"| {name} | {v['per_turn_short'] / 1000:,.1f}k | {v['per_token'] / 1000:,.1f}k "
            f"| {v['per_turn_fixed'] / 1000:,.1f}k |"
        )
    if result["ratio_per_token"] is None:
        return "\n".join(out) + "\n"
    out += [
        "",
        f"crctl / floor: **{result['ratio_per_turn_short']}×** per {c['tokens']}-token turn, "
        f"{result['ratio_per_token']}× per token.",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--relay-module", default="crctl")
    parser.add_argument("--tree", default=None, help="another commit's packages (git archive)")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--warm", type=int, default=3, help="turns per call before counting")
    parser.add_argument("--turns", type=int, default=6, help="counted turns per call per phase")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--tokens-long", type=int, default=60)
    parser.add_argument("--tick", type=float, default=0.1, help="the fake's tick, s")
    parser.add_argument("--out", default=None, help="results file stem")
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    parser.add_argument("--no-floor", action="store_true", help="count crctl only")
    args = parser.parse_args(argv)
    if args.tree:
        args.tree = Path(args.tree).resolve()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("bench.instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    result = asyncio.run(main_async(args))
    stem = args.out or f"instructions-{datetime.now():%Y-%m-%d}-{socket.gethostname()}"
    write_report(stem, result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
