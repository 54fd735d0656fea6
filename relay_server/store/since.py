"""``since=``: how far back a reader wants events, as a Unix time."""

from __future__ import annotations

import re
import time
from datetime import datetime

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """``since=`` as a Unix time.

    Args:
        value: ``600`` (seconds ago), ``10m`` / ``2h`` / ``30s`` / ``1d``, a Unix timestamp,
            or an ISO 8601 time (without a zone: local time); ``None`` or blank: no bound.
        now: the present, for tests.

    Raises:
        ValueError: the value is none of those.
    """
    if value is None or not value.strip():
        return None
    now = time.time() if now is None else now
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if number < 0:
            raise ValueError(f"since: must not be negative, got {value!r}")
        return number if number >= 1e9 else now - number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since: expected seconds (600), a duration (30s, 10m, 2h, 1d) or an ISO time "
            f"(2026-11-21T14:00), got {value!r}"
        ) from None
    return moment.timestamp()  # a naive time is taken as local time
