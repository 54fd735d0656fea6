"""The local record of what crctl changed on Twilio, so nothing is ever lost.

Before crctl changes a phone number's or an application's voice settings it records the values
it found, once: a second change keeps the first record, so ``crctl numbers restore`` always goes
back to what was there before crctl touched it. The file is JSON in ``~/.crctl/state.json``
(``CRCTL_STATE_DIR`` to move it), written atomically.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from crctl.errors import StateError as StateError  # raised here, caught by callers
from crctl.paths import state_file
from twiml_templates.files import write_atomic

#: The voice settings crctl records and restores.
VOICE_FIELDS = (
    "voice_url",
    "voice_method",
    "voice_fallback_url",
    "voice_fallback_method",
    "voice_application_sid",
    "status_callback",
    "status_callback_method",
)

#: Seconds to wait for another crctl process's change of the file (each lasts milliseconds).
LOCK_TIMEOUT = 30.0


def state_path() -> Path:
    """Where the state file lives."""
    return state_file()


class State:
    """Recorded previous voice settings, by account and resource sid.

    Every change is a locked read-modify-write of the file (``state.lock`` beside it), so two
    crctl processes (two ``crctl up``, or ``numbers point`` during an ``up``) never write back
    a stale copy over each other's records.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or state_path()
        self.data: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": 1, "accounts": {}}
        except (OSError, ValueError) as exc:
            raise StateError(
                f"cannot read crctl's state file {self.path}: {exc}; fix or move it (it holds "
                "the voice settings crctl replaced, for `crctl numbers restore`)"
            ) from exc
        if not isinstance(data, dict):
            return {"version": 1, "accounts": {}}
        data.setdefault("accounts", {})
        return data

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        """Lock the file, re-read it, let the caller change the data, write it back."""
        lock = FileLock(self.path.parent / "state.lock", timeout=LOCK_TIMEOUT)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except Timeout:
            raise StateError(
                f"crctl's state file {self.path} stayed locked for {LOCK_TIMEOUT:g} s: another "
                f"crctl is stuck changing it; stop it, or delete {lock.lock_file}"
            ) from None
        except OSError as exc:
            raise StateError(f"cannot lock crctl's state file {self.path}: {exc.strerror}") from exc
        try:
            self.data = self._load()
            yield self.data
            self._write()
        finally:
            lock.release()

    def reload(self) -> dict[str, Any]:
        """The file's current content (another process may have changed it)."""
        self.data = self._load()
        return self.data

    def _account(self, data: dict[str, Any], account_sid: str) -> dict[str, Any]:
        account: dict[str, Any] = data["accounts"].setdefault(account_sid, {})
        account.setdefault("numbers", {})
        account.setdefault("applications", {})
        return account

    def record(
        self, account_sid: str, kind: str, sid: str, label: str, previous: dict[str, Any], why: str
    ) -> bool:
        """Record ``previous`` voice settings of a number or application, unless recorded.

        Returns True when a new record was written.
        """
        with self.change() as data:
            entries = self._account(data, account_sid)[kind]
            if sid in entries:
                return False
            entries[sid] = {
                "label": label,
                "previous": {k: previous.get(k) for k in VOICE_FIELDS if k in previous},
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "by": why,
            }
            return True

    def get(self, account_sid: str, kind: str, sid: str) -> dict[str, Any] | None:
        """The record of one resource, if any."""
        entry: dict[str, Any] | None = self._account(self.reload(), account_sid)[kind].get(sid)
        return entry

    def entries(self, account_sid: str, kind: str) -> dict[str, Any]:
        """Every record of one kind ("numbers" or "applications") for an account."""
        return dict(self._account(self.reload(), account_sid)[kind])

    def forget(self, account_sid: str, kind: str, sid: str) -> None:
        """Drop a record (after a restore or a release)."""
        with self.change() as data:
            self._account(data, account_sid)[kind].pop(sid, None)

    def _write(self) -> None:
        """Write atomically (a crash never leaves a half-written file)."""
        text = json.dumps(self.data, indent=2, sort_keys=True)
        try:
            write_atomic(self.path, text.encode(), mode=0o600)
        except OSError as exc:
            raise StateError(
                f"cannot write crctl's state file {self.path}: {exc.strerror}"
            ) from exc
