"""``crctl serve --workers N``: N relay processes on one port, one supervisor.

The supervisor runs N children, each ``crctl serve`` with the same arguments and environment,
marked as workers (:data:`WORKER_ENV`). Each child is a full relay that binds the port with
``SO_REUSEPORT``, so the kernel spreads connections over them; they share calls through Redis
(``--redis-url`` is required). The supervisor forwards SIGTERM (every worker drains) and SIGINT;
a second signal is forwarded as well, and stops the workers at once. A worker that exits on
its own stops the others (drained) and the supervisor exits with its code, so the process
manager above (systemd, Kubernetes) restarts the whole.

Metrics: the supervisor gives the workers a fresh private folder for prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), so any worker's ``/metrics`` shows them all;
it marks a worker that exits as dead there (its live-call gauge leaves the sum) and deletes the
folder when it stops. With ``--metrics-port`` the supervisor serves that port itself, from the
same folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from rich.markup import escape

from crctl.console import err
from crctl.settings import Settings, SettingsError

#: Set in a worker's environment (to the supervisor's pid): it serves instead of supervising.
WORKER_ENV = "CRCTL_WORKER_OF"
#: Seconds between looks at the workers.
POLL = 0.1


def is_worker() -> bool:
    """Whether this process is a worker of a ``--workers`` supervisor."""
    return bool(os.environ.get(WORKER_ENV))


def supervisor_pid() -> int | None:
    """The pid of this worker's supervisor (``None``: not a worker)."""
    value = os.environ.get(WORKER_ENV, "")
    return int(value) if value.isdigit() else None


def _check_port(settings: Settings) -> None:
    """The port can be listened on with SO_REUSEPORT: else one line now, not N failed workers."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((settings.host, settings.port))
        except OSError as exc:
            raise SettingsError(
                f"setting port (CRCTL_PORT): cannot listen on {settings.host}:{settings.port}: "
                f"{exc.strerror}; pick another with --port"
            ) from None


def run_workers(settings: Settings, argv: list[str] | None = None) -> int:
    """Run ``settings.workers`` workers until they stop; returns the exit code.

    ``argv``: the command line after the program (``serve ...``), by default this process's.

    Raises:
        SettingsError: the port cannot be used, or Redis does not answer (one line, exit 2).
    """
    from relay_server.cluster import check_redis

    if settings.redis_url:
        check_redis(settings.redis_url)  # one line and exit 2 when Redis does not answer
    _check_port(settings)
    args = [sys.executable, "-m", "crctl", *(sys.argv[1:] if argv is None else argv)]
    # Fresh and private (0700) for each start: no values of an earlier run are summed in.
    metrics_dir = tempfile.mkdtemp(prefix="crctl-metrics-")
    try:
        return _run(settings, args, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _run(settings: Settings, args: list[str], metrics_dir: str) -> int:
    from crctl.serve import metrics_url, open_metrics_port
    from relay_server.metrics import MULTIPROC_ENV, exposition_registry, mark_process_dead

    env = {**os.environ, WORKER_ENV: str(os.getpid()), MULTIPROC_ENV: metrics_dir}
    server = None
    if settings.metrics_port is not None:
        # One line, exit 2, before any worker starts (SettingsError).
        server = open_metrics_port(settings, exposition_registry(metrics_dir))
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # Own sessions: Ctrl-C at a terminal reaches the supervisor only, which forwards it once.
    workers = [
        subprocess.Popen(args, env=env, start_new_session=True) for _ in range(settings.workers)
    ]
    pids = ", ".join(str(w.pid) for w in workers)
    err.print(
        f"[bold green]crctl serve[/]: {settings.workers} workers on "
        f"{escape(settings.host)}:{settings.port} (pids {pids}); SIGTERM drains them all"
    )
    if server is not None:
        err.print(f"  metrics: {metrics_url(settings)} (no token: keep this port private)")

    def exited(pid: int) -> None:
        mark_process_dead(pid, metrics_dir)

    try:
        return _supervise(workers, signals, exited)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        if server is not None:
            server.shutdown()
            server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(
    workers: list[subprocess.Popen[bytes]],
    signals: list[int],
    exited: Callable[[int], None] = lambda _pid: None,
) -> int:
    """Forward signals to the workers until all have exited; the exit code.

    ``exited(pid)`` is called once for each worker that has exited.
    """
    stopping = False
    failed = 0
    seen: set[int] = set()
    while any(w.poll() is None for w in workers):
        for worker in workers:
            if worker.returncode is not None and worker.pid not in seen:
                seen.add(worker.pid)
                exited(worker.pid)
        while signals:
            signum = signals.pop(0)
            stopping = True
            _send(workers, signum)
        if not stopping:
            gone = next((w for w in workers if w.returncode is not None), None)
            if gone is not None:
                failed = gone.returncode or 1  # it stopped though nobody asked
                err.print(
                    f"[bold red]crctl serve[/]: worker {gone.pid} exited with code "
                    f"{gone.returncode}; draining the other workers and stopping"
                )
                stopping = True
                _send(workers, signal.SIGTERM)
        time.sleep(POLL)
    for worker in workers:
        if worker.pid not in seen:
            exited(worker.pid)
    codes = [_code(w.returncode) for w in workers]
    return _code(failed) or next((c for c in codes if c), 0)


def _code(returncode: int) -> int:
    """A worker's exit code as a shell says it (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _send(workers: list[subprocess.Popen[bytes]], signum: int) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signum)
