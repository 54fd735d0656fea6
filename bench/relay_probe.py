"""``crctl serve`` with probes inside the relay's event loop (for ``bench.run --probe``).

Runs the unmodified CLI, but wraps :func:`crctl.serve.run_relay` to add, in the relay process:

* an event-loop lag monitor (how late a 5 ms sleep wakes up: time every other callback waited);
* asyncio's slow-callback report: every callback or task step that held the loop longer than
  ``CRCTL_PROBE_SLOW_MS`` (default 5) ms is counted by its source line (``loop.set_debug``
  gives the location; debug mode itself costs some CPU, so latencies are not comparable with a
  plain run);
* ``gc.callbacks`` timing of every garbage collection, by generation.

On exit (SIGTERM) it writes a JSON summary to ``CRCTL_PROBE_OUT``.

    python -m bench.relay_probe serve --port ... (the same arguments as ``crctl serve``)
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import crctl.serve as serve_mod  # noqa: E402
from crctl.cli import main  # noqa: E402

OUT = os.environ.get("CRCTL_PROBE_OUT", "relay-probe.json")
SLOW_MS = float(os.environ.get("CRCTL_PROBE_SLOW_MS", "5"))
DEBUG = os.environ.get("CRCTL_PROBE_DEBUG", "1") == "1"

lags: list[float] = []
slow: collections.Counter[str] = collections.Counter()
slow_ms: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
gc_times: dict[int, list[float]] = {0: [], 1: [], 2: []}
_gc_start = [0.0]


def _gc_cb(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start[0] = time.perf_counter()
    else:
        gc_times[info["generation"]].append(time.perf_counter() - _gc_start[0])


class _SlowHandler(logging.Handler):
    """Collects asyncio's "Executing <Handle ...> took 0.012 seconds" debug warnings."""

    pattern = re.compile(r"Executing (.*) took ([0-9.]+) seconds")

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if not m:
            return
        what = m[1]
        coro = re.search(r"coro=<(\S+)\(\) running at (\S+?)>", what)
        if coro:  # a task step: the coroutine, and where it stopped after the slow step
            key = f"task {coro[1]} (paused at {coro[2]})"
        else:  # a callback: where it was scheduled
            where = re.findall(r"(?:created at|at) (/[^ >]+:\d+)", what)
            key = where[-1] if where else re.sub(r"0x[0-9a-f]+", "", what)[:160]
        key = re.sub(r"/\S*?site-packages/", "", key.replace(str(REPO) + "/", ""))
        slow[key] += 1
        slow_ms[key].append(float(m[2]) * 1000)


async def _monitor() -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - start - 0.005)


def _pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _write() -> None:
    out = {
        "loop_lag_ms": {
            "n": len(lags),
            **{f"p{p}": round(1000 * (_pct(lags, p) or 0), 3) for p in (50, 95, 99)},
            "max": round(1000 * max(lags, default=0), 3),
            "over_10ms": sum(1 for v in lags if v > 0.010),
            "over_50ms": sum(1 for v in lags if v > 0.050),
        },
        "gc_ms": {
            str(g): {
                "n": len(v),
                "total": round(1000 * sum(v), 1),
                "max": round(1000 * max(v, default=0), 2),
            }
            for g, v in gc_times.items()
        },
        "slow_callbacks_over_ms": SLOW_MS,
        "slow_callbacks": [
            {
                "where": k,
                "count": n,
                "total_ms": round(sum(slow_ms[k]), 1),
                "max_ms": round(max(slow_ms[k]), 1),
            }
            for k, n in sorted(slow.items(), key=lambda kv: -sum(slow_ms[kv[0]]))[:25]
        ],
    }
    Path(OUT).write_text(json.dumps(out, indent=2))


_orig_run_relay = serve_mod.run_relay


async def _probed_run_relay(*args: Any, **kwargs: Any) -> None:
    loop = asyncio.get_running_loop()
    if DEBUG:
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_MS / 1000
        asyncio_log = logging.getLogger("asyncio")
        asyncio_log.addHandler(_SlowHandler())
        asyncio_log.propagate = False
    gc.callbacks.append(_gc_cb)
    task = asyncio.ensure_future(_monitor())
    try:
        await _orig_run_relay(*args, **kwargs)
    finally:
        task.cancel()
        _write()


serve_mod.run_relay = _probed_run_relay  # looked up at call time by serve()

if __name__ == "__main__":
    sys.argv[0] = "crctl"
    main()
