"""``/readyz``: whether this relay takes new calls (a load balancer's readiness probe).

200 while it serves; 503 from the moment it starts draining (SIGTERM), while its live calls
go on. ``/healthz`` (liveness) stays 200 until the process stops.
"""

from __future__ import annotations

import os
from typing import Any

from quart import Blueprint

from relay_server.state import current_state

health = Blueprint("health", __name__)


@health.get("/readyz")
async def readyz() -> Any:
    """Readiness: 200 ``ready``, or 503 ``draining``; with this process's id and live calls."""
    state = current_state()
    body = {
        "status": "draining" if state.drain.active else "ready",
        "pid": os.getpid(),
        "calls": len(state.drain),
    }
    if state.cluster is not None:
        body["replica"] = state.cluster.replica
    return body, 503 if state.drain.active else 200
