"""Child processes of the benchmark (the relay, the fake LLM) and /proc readings."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
#: The relay's auth token and public URL in the bench: the callers sign their handshakes with
#: them as Twilio would through a tunnel (no request leaves the machine).
AUTH_TOKEN = "bench-auth-token-0123456789abcdef"
PUBLIC_URL = "https://relay.bench.test"
now = time.monotonic


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefix(core: int | None) -> list[str]:
    if core is None:
        return []
    if shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []  # fallback: preexec_fn below


def pin_preexec(core: int | None) -> Any:
    if core is None or shutil.which("taskset"):
        return None
    return lambda: os.sched_setaffinity(0, {core})


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The utime + stime of a process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / _TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class FakeProc:
    """bench/fake_server.py in its own process on the load generator's core."""

    def __init__(self, core: int | None) -> None:
        self.proc = subprocess.Popen(
            [*pin_prefix(core), sys.executable, "-m", "bench.fake_server"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            preexec_fn=pin_preexec(core),
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"fake LLM did not start: {self.base_url!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def dump(self) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("dump\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RelayProc:
    """``crctl serve`` as Twilio would meet it: signatures on, pinned to one core."""

    def __init__(
        self,
        fake_url: str,
        core: int | None,
        log_path: Path,
        profile: Path | None = None,
        probe: Path | None = None,
        probe_slow: bool = False,
        agent: str = "llm",
        pyinstrument: Path | None = None,
        module: str = "crctl",
        redis_url: str | None = None,
        extra_args: tuple[str, ...] = (),
        tree: Path | None = None,
        wrapper: tuple[str, ...] = (),
        start_timeout: float = 30.0,
    ) -> None:
        """``crctl serve`` started, pinned, with the load generator's settings.

        ``redis_url``: ``--redis-url`` (a replica of a cluster); ``extra_args``: more flags;
        ``tree``: a folder with another commit's packages, first on ``PYTHONPATH``;
        ``wrapper``: a command the interpreter runs under (valgrind, bench/instructions.py).
        """
        self.port = free_port()
        self.probe = probe
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        env = {
            **os.environ,
            "OPENAI_API_KEY": "x",
            "OPENAI_BASE_URL": fake_url,
            "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(tree) if tree else "", str(REPO), os.environ.get("PYTHONPATH")])
            ),
        }
        for var in list(env):
            if var.startswith("CRCTL_") or var.lower() in (
                "http_proxy",
                "https_proxy",
                "all_proxy",
            ):
                del env[var]  # no stray setting; the relay reaches the fake directly on loopback
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        # The relay's default event store (SQLite) stays on, in a scratch folder: the figures
        # include it, and nothing lands in the real home.
        env["CRCTL_STATE_DIR"] = tempfile.mkdtemp(prefix="crctl-bench-state-")
        runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
        if pyinstrument is not None:  # sampling profiler (pip install pyinstrument; not a dep)
            runner = ["-m", "pyinstrument", "-i", "0.001", "-r", "text", "--show-all",
                      "-o", str(pyinstrument)]  # fmt: skip
        if probe is not None:  # bench/relay_probe.py: loop lag, GC pauses, slow callbacks
            module = "bench.relay_probe"
            env["CRCTL_PROBE_OUT"] = str(probe)
            env["CRCTL_PROBE_DEBUG"] = "1" if probe_slow else "0"
        args = [
            *pin_prefix(core), *wrapper, sys.executable, *runner, "-m", module, "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--public-url", PUBLIC_URL, "--agent", agent,
            "--silence-timeout", "0", "--filler-after-ms", "0", "--llm-timeout", "30",
            *(["--redis-url", redis_url] if redis_url else []), *extra_args,
        ]  # fmt: skip
        self.cwd = tempfile.mkdtemp(prefix="crctl-bench-")  # no stray .env is read
        self.log = open(log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, env=env, cwd=self.cwd, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=pin_preexec(core),
        )  # fmt: skip
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited ({self.proc.returncode}); see {log_path}")
            with contextlib.suppress(OSError):
                if self.health() is not None:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"relay did not start in {start_timeout:.0f} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict[str, Any] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            return json.loads(resp.read()) if resp.status == 200 else None  # type: ignore[no-any-return]
        finally:
            conn.close()

    # "Did the relay count n calls within t?" is an answer (False), not an error (ASYNC109).
    async def wait_calls(self, n: int, timeout: float = 20.0) -> bool:  # noqa: ASYNC109
        deadline = now() + timeout
        while now() < deadline:
            h = await asyncio.to_thread(self.health)
            if h is not None and h.get("calls") == n:
                return True
            await asyncio.sleep(0.1)
        return False

    def stop(self) -> None:
        end_relay(self.proc, self.log, self.cwd)


def end_relay(proc: subprocess.Popen[Any], log: IO[Any], folder: str | Path) -> None:
    """Stop a relay process as a deploy would (SIGTERM, then SIGKILL after 15 s); clean up.

    ``log`` is the file its output went to, ``folder`` its scratch folder (removed).
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------- machine-wide load
def core_times() -> dict[int, dict[str, float]]:
    """Per-core CPU seconds from /proc/stat.

    Per core: task time (user+nice+system), irq+softirq, steal, and the total of all columns.
    """
    out: dict[int, dict[str, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *cols = line.split()
            v = [int(c) / _TICK for c in cols]
            out[int(name[3:])] = {
                "task": v[0] + v[1] + v[2],
                "irq": v[5] + v[6],
                "steal": v[7] if len(v) > 7 else 0.0,
                "total": sum(v[:8]),
            }
    return out


def core_load(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]],
              wall: float) -> dict[int, dict[str, float]]:  # fmt: skip
    """Percent of each core's wall time spent on tasks, irq/softirq and steal."""
    return {
        c: {
            k: round(100 * (after[c][k] - before[c][k]) / wall, 1) for k in ("task", "irq", "steal")
        }
        for c in after
        if c in before
    }


async def wait_quiet(max_wait: float = 30.0, busy_pct: float = 10.0) -> dict[str, Any]:
    """Wait (at most ``max_wait`` s) until no core is busier than ``busy_pct`` % over 0.5 s.

    So another job on the machine (a test suite, a build) does not skew a level.
    """
    start = now()
    while True:
        t0, w0 = core_times(), now()
        await asyncio.sleep(0.5)
        load = core_load(t0, core_times(), now() - w0)
        busiest = max(v["task"] + v["irq"] + v["steal"] for v in load.values())
        if busiest <= busy_pct or now() - start >= max_wait:
            return {"waited_s": round(now() - start, 1), "busiest_core_pct": busiest,
                    "quiet": busiest <= busy_pct}  # fmt: skip
