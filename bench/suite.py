r"""``crctl test`` in parallel: one suite of scenarios with ``-j 8`` against ``-j 1``, in one run.

Generates ``--scenarios`` scenario files (``--turns`` turns each) into a scratch folder, starts
the fake LLM (``fakes.fake_llm``'s CLI: every reply ``--tokens`` tokens, the first after
``--ttft`` s, then one every ``--delay`` s) and ``crctl serve`` against it (bench/procs.py's
RelayProc: signatures on, as Twilio meets it), then runs the same command line with each
``-j`` of ``--jobs`` (default ``1,8``), alternating the order over ``--rounds``::

    crctl test DIR --url http://127.0.0.1:P --public-url https://relay.bench.test -j N \
        --time-scale S --json FILE

and reports each one's wall time (the whole ``crctl test`` process), the ratio to ``-j 1``,
and the callers' waits from the JSON (does running in parallel slow each call down?). Writes
``bench/results/suite-<date>.md`` and ``.json``; exit 1 when a run did not pass every scenario.

    .venv/bin/python -m bench.suite            # about two minutes on the 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python bench/suite.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import AUTH_TOKEN, PUBLIC_URL, REPO, RelayProc
from bench.report import write_report
from bench.run import git_state, machine
from crctl.turns import percentile


def write_scenarios(folder: Path, scenarios: int, turns: int) -> None:
    """``scenarios`` files of ``turns`` turns; the fake answers " tok1 tok2 …" to each."""
    for n in range(1, scenarios + 1):
        lines = []
        for t in range(1, turns + 1):
            lines += [f"- say: Scenario {n}, question {t}, please answer", "  expect:"]
            lines += ["    contains: tok1", "    max_first_token_ms: 5000"]
        (folder / f"scenario-{n:02d}.yaml").write_text("\n".join(lines) + "\n")


class FakeLLMProc:
    """``python -m fakes.fake_llm`` (every reply the same tokens) in its own process."""

    def __init__(self, ttft: float, delay: float, tokens: int) -> None:
        args = ["--port", "0", "--ttft", str(ttft), "--delay", str(delay), "--tokens", str(tokens)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fakes.fake_llm", *args],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"fake LLM did not start: {self.base_url!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_suite(
    folder: Path, relay: RelayProc, jobs: int, time_scale: float, scratch: Path
) -> dict[str, Any]:
    """One ``crctl test`` process; its wall time and what its JSON says."""
    out = scratch / f"j{jobs}-{time.monotonic_ns()}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CRCTL_", "OPENAI_"))}
    env.update(
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        CRCTL_STATE_DIR=str(scratch / "state"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        NO_PROXY="127.0.0.1,localhost",
    )
    command = [
        sys.executable, "-m", "crctl", "test", str(folder),
        "--url", f"http://127.0.0.1:{relay.port}", "--public-url", PUBLIC_URL,
        "-j", str(jobs), "--time-scale", str(time_scale), "--json", str(out),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, env=env, cwd=scratch, capture_output=True, text=True)
    wall = time.monotonic() - started
    if not out.exists():
        raise RuntimeError(f"crctl test -j {jobs} wrote no JSON:\n{done.stdout}{done.stderr}")
    data = json.loads(out.read_text())
    waits = [
        t["caller_wait_ms"]
        for s in data["scenarios"]
        for r in s["runs"]
        for t in r["turns"]
        if t["caller_wait_ms"] is not None
    ]
    first = [
        t["first_token_ms"]
        for s in data["scenarios"]
        for r in s["runs"]
        for t in r["turns"]
        if t["first_token_ms"] is not None
    ]
    return {
        "jobs": jobs,
        "exit_code": done.returncode,
        "wall_s": round(wall, 3),
        "suite_wall_s": data["wall_s"],
        "scenarios_passed": sum(s["passed"] for s in data["scenarios"]),
        "scenarios": len(data["scenarios"]),
        "caller_wait_p50_ms": percentile(waits, 50),
        "caller_wait_max_ms": max(waits) if waits else None,
        "first_token_p50_ms": percentile(first, 50),
        "first_token_max_ms": max(first) if first else None,
    }


def markdown(result: dict[str, Any]) -> str:
    m, git, a = result["machine"], result["git"], result["args"]
    lines = [
        f"# crctl test, -j against -j 1, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"CPython {m['python']}, Linux {m['kernel']}.",
        f"- Code: commit {git['commit']} ({git['subject']})"
        + (", with uncommitted changes" if git["product_dirty"] else "")
        + ".",
        f"- Suite: {a['scenarios']} scenarios of {a['turns']} turns (each its own simulated "
        f"call), against `crctl serve` (LLM agent) and the fake LLM (first token after "
        f"{a['ttft']} s, then {a['tokens']} tokens {a['delay']} s apart); callers at "
        f"`--time-scale {a['time_scale']}` (speaking, agentSpeaking delay, greeting).",
        f"- Each `-j` {a['rounds']} time(s), the order alternating; wall time of the whole "
        "`crctl test` process (start-up included). Median of the rounds below.",
        "",
        "| -j | wall s (median) | speed-up over the first | scenarios passed "
        "| caller wait p50 / max ms | first token p50 / max ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['jobs']} | {row['wall_s']:.2f} | {row['speedup']:.2f}× "
            f"| {row['scenarios_passed']}/{row['scenarios']} "
            f"| {_ms(row['caller_wait_p50_ms'])} / {_ms(row['caller_wait_max_ms'])} "
            f"| {_ms(row['first_token_p50_ms'])} / {_ms(row['first_token_max_ms'])} |"
        )
    lines += ["", "Every run:", ""]
    for run in result["runs"]:
        lines.append(
            f"- `-j {run['jobs']}`: {run['wall_s']:.2f} s, exit {run['exit_code']}, "
            f"{run['scenarios_passed']}/{run['scenarios']} passed"
        )
    lines.append("")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=int, default=20, help="scenario files (default 20)")
    parser.add_argument("--turns", type=int, default=3, help="turns a scenario (default 3)")
    parser.add_argument("--jobs", default="1,8", help="-j values to compare (default 1,8)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each -j (default 1)")
    parser.add_argument("--ttft", type=float, default=0.3, help="fake LLM's first token, s")
    parser.add_argument("--delay", type=float, default=0.02, help="s between tokens")
    parser.add_argument("--tokens", type=int, default=12, help="tokens a reply")
    parser.add_argument(
        "--time-scale", type=float, default=0.2, help="crctl test --time-scale (default 0.2)"
    )
    parser.add_argument("--out", help="results file name without extension")
    args = parser.parse_args(argv)
    jobs = [int(j) for j in args.jobs.split(",")]
    started = datetime.now()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="crctl-bench-suite-") as tmp:
        scratch = Path(tmp)
        folder = scratch / "scenarios"
        folder.mkdir()
        write_scenarios(folder, args.scenarios, args.turns)
        fake = FakeLLMProc(args.ttft, args.delay, args.tokens)
        try:
            relay = RelayProc(fake.base_url, None, scratch / "relay.log")
            try:
                for n in range(args.rounds):
                    for j in jobs if n % 2 == 0 else list(reversed(jobs)):
                        print(f"crctl test -j {j} (round {n + 1})…", flush=True)
                        runs.append(run_suite(folder, relay, j, args.time_scale, scratch))
            finally:
                relay.stop()
        finally:
            fake.stop()
    summary = []
    base: float | None = None
    for j in jobs:
        mine = sorted((r for r in runs if r["jobs"] == j), key=lambda r: r["wall_s"])
        row = dict(mine[len(mine) // 2])
        base = row["wall_s"] if base is None else base
        row["speedup"] = base / row["wall_s"]
        summary.append(row)
    result = {
        "started": f"{started:%Y-%m-%dT%H:%M:%S}",
        "machine": machine(),
        "git": git_state(),
        "args": vars(args),
        "runs": runs,
        "summary": summary,
    }
    write_report(args.out or f"suite-{started:%Y-%m-%d}", result, markdown(result))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
