"""crctl's own files (``~/.crctl``, or ``$CRCTL_STATE_DIR``): only the standard library, so
commands that just read them (``crctl calls``, ``crctl tail``) start without the settings
machinery."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """crctl's own directory: ``$CRCTL_STATE_DIR`` or ``~/.crctl``."""
    base = os.environ.get("CRCTL_STATE_DIR")
    return Path(base) if base else Path.home() / ".crctl"


def default_events_db() -> Path:
    """The default SQLite file of call events."""
    return state_dir() / "events.sqlite3"


def api_token_path() -> Path:
    """Where ``crctl serve`` keeps the relay's API token when none is configured."""
    return state_dir() / "api-token"


def read_api_token(path: Path | None = None) -> str | None:
    """The token in the token file, if there is one."""
    try:
        token = (path or api_token_path()).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None
