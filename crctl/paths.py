"""crctl's own files (``~/.crctl``, or ``$CRCTL_STATE_DIR``), all under :func:`state_dir`.

The folder is resolved in one place, :class:`crctl.environment.Environment`; it is imported
when a path is asked for, so importing this module stays cheap for ``crctl --help``.
"""

from __future__ import annotations

from pathlib import Path


def state_dir() -> Path:
    """The crctl state directory: ``$CRCTL_STATE_DIR`` or ``~/.crctl``."""
    from crctl.environment import current

    return current().crctl_dir()


def default_events_db() -> Path:
    """The default SQLite file of call events."""
    return state_dir() / "events.sqlite3"


def api_token_path() -> Path:
    """Where ``crctl serve`` keeps the relay's API token when none is configured."""
    return state_dir() / "api-token"


def state_file() -> Path:
    """The state file: what crctl changed on Twilio (:mod:`crctl.state`)."""
    return state_dir() / "state.json"


def read_api_token(path: Path | None = None) -> str | None:
    """The token in the token file, if there is one."""
    try:
        token = (path or api_token_path()).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None
