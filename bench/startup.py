"""Start-up time of the everyday crctl commands, each in a fresh process.

One command, from the repository root (about half a minute on 2 cores)::

    .venv/bin/python -m bench.startup              # or: .venv/bin/python bench/startup.py
    .venv/bin/python -m bench.startup --compare 518e993   # also the tree of another commit

Runs each command N times (``-n``, default 15), round-robin so a burst of load elsewhere hits
every command alike, and reports the median and minimum wall time, with ``python -c pass`` in
the same run as the floor. Writes ``bench/results/startup-<date>-<hostname>.json`` and ``.md``.
Exit status 0 when ``crctl --help``'s median is under the target (``--target``, 0.4 s).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/startup.py`
    sys.path.insert(0, str(REPO))

from bench.run import git_state, machine  # noqa: E402

RESULTS = REPO / "bench" / "results"
TARGET_S = 0.4
#: The console script `pip install .` makes, beside the interpreter.
CRCTL = Path(sys.executable).parent / "crctl"
#: name -> argv after the interpreter / console script
COMMANDS: dict[str, list[str]] = {
    "python -c pass": ["python", "-c", "pass"],
    "crctl --help": ["crctl", "--help"],
    "crctl twiml list": ["crctl", "twiml", "list"],
    "crctl calls list": ["crctl", "calls", "list"],
    "crctl numbers --help": ["crctl", "numbers", "--help"],
    "import relay_server.protocol": ["python", "-c", "import relay_server.protocol"],
}


def argv(command: list[str]) -> list[str]:
    program = sys.executable if command[0] == "python" else str(CRCTL)
    return [program, *command[1:]]


@contextlib.contextmanager
def tree_at(ref: str) -> Iterator[Path]:
    """The product's packages as they were at ``ref``, to put first on PYTHONPATH.

    A git archive into a scratch folder: the same venv runs the other commit's code.
    """
    with tempfile.TemporaryDirectory(prefix="crctl-startup-") as folder:
        archive = subprocess.run(
            ["git", "archive", ref, "crctl", "relay_server", "twiml_templates"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
        yield Path(folder)


def environment(scratch: Path, pythonpath: Path | None) -> dict[str, str]:
    """An environment with no crctl or Python settings from outside.

    State goes in a scratch folder with an empty call log (``calls list`` reads it).
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_", "PYTHON"))
    }
    env["CRCTL_STATE_DIR"] = str(scratch / "state")
    env["HOME"] = str(scratch / "home")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def empty_call_log(state: Path) -> None:
    from relay_server.store import EventStore

    state.mkdir(parents=True, exist_ok=True)
    EventStore(str(state / "events.sqlite3")).close()


def time_once(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        argv(command), env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {done.returncode}: {done.stderr.decode()[-500:]}"
        )
    return elapsed


def measure(n: int, trees: dict[str, Path | None]) -> dict[str, dict[str, Any]]:
    """Figures by tree label, then command, measured round-robin over trees and commands."""
    samples: dict[str, dict[str, list[float]]] = {t: {c: [] for c in COMMANDS} for t in trees}
    with tempfile.TemporaryDirectory(prefix="crctl-startup-run-") as scratch_dir:
        scratch = Path(scratch_dir)
        (scratch / "home").mkdir()
        (scratch / "cwd").mkdir()
        empty_call_log(scratch / "state")
        envs = {label: environment(scratch, path) for label, path in trees.items()}
        for label in trees:  # warm-up: bytecode caches, the page cache
            for command in COMMANDS.values():
                time_once(command, envs[label], scratch / "cwd")
        for _ in range(n):
            for label in trees:
                for name, command in COMMANDS.items():
                    samples[label][name].append(time_once(command, envs[label], scratch / "cwd"))
    figures: dict[str, dict[str, Any]] = {}
    for label, by_command in samples.items():
        floor = statistics.median(by_command["python -c pass"])
        figures[label] = {
            name: {
                "median_s": round(statistics.median(times), 4),
                "min_s": round(min(times), 4),
                "max_s": round(max(times), 4),
                "median_over_floor_s": round(statistics.median(times) - floor, 4),
                "runs": len(times),
            }
            for name, times in by_command.items()
        }
    return figures


def markdown(result: dict[str, Any]) -> str:
    m, git = result["machine"], result["git"]
    labels = list(result["figures"])
    lines = [
        f"# crctl start-up, {result['started']}",
        "",
        f"- Machine: {m['hostname']}, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory']}, "
        f"CPython {m['python']}, Linux {m['kernel']}.",
        f"- Code: commit {git['commit']} ({git['subject']})"
        + (", with uncommitted changes" if git["product_dirty"] else "")
        + "".join(f"; `{label}`: the tree of commit {label}" for label in labels[1:])
        + ".",
        f"- Each command {result['runs']} times in a fresh process (after one warm-up run), "
        "round-robin; wall time of the whole process, output discarded.",
        "",
        "## Target",
        "",
    ]
    help_median = result["figures"][labels[0]]["crctl --help"]["median_s"]
    verdict = "PASS" if help_median < result["target_s"] else "FAIL"
    lines += [
        f"- **{verdict}** `crctl --help` median under {result['target_s']} s: {help_median:.3f} s",
        "",
        "## Figures (seconds)",
        "",
    ]
    head = "| command |" + "".join(f" {label} median | {label} min |" for label in labels)
    lines += [head, "|---|" + "---:|---:|" * len(labels)]
    for name in COMMANDS:
        row = f"| `{name}` |"
        for label in labels:
            f = result["figures"][label][name]
            row += f" {f['median_s']:.3f} | {f['min_s']:.3f} |"
        lines.append(row)
    lines.append("")
    return "\n".join(lines)


def main(argv_: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=15, help="runs per command (default 15)")
    parser.add_argument(
        "--compare", metavar="REV", action="append", default=[], help="also measure this commit"
    )
    parser.add_argument("--target", type=float, default=TARGET_S, help="seconds, crctl --help")
    parser.add_argument("--out", help="results file name without extension")
    args = parser.parse_args(argv_)
    started = datetime.now()
    with contextlib.ExitStack() as stack:
        trees: dict[str, Path | None] = {"this tree": None}
        for ref in args.compare:
            trees[ref] = stack.enter_context(tree_at(ref))
        figures = measure(args.n, trees)
    result = {
        "started": f"{started:%Y-%m-%dT%H:%M:%S}",
        "machine": machine(),
        "git": git_state(),
        "runs": args.n,
        "target_s": args.target,
        "figures": figures,
    }
    md = markdown(result)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"startup-{started:%Y-%m-%d}-{socket.gethostname()}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(md)
    print(f"wrote {RESULTS / stem}.json and {stem}.md")
    return 0 if figures["this tree"]["crctl --help"]["median_s"] < args.target else 1


if __name__ == "__main__":
    sys.exit(main())
