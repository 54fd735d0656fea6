"""The numbers a ``crctl up`` pointed at its tunnel, kept in the state file until put back.

The record is ``{number sid: {pid, started, account, phone, previous, pointed_at}}``.

A session whose process is gone (SIGKILL, a crash) is repaired by the next ``crctl up`` or by
``crctl numbers restore`` -- but only while the number still points where that run put it, so a
fix made by hand in the meantime is never overwritten.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil

from crctl.errors import CrctlError
from crctl.provisioning import ProvisioningError, Twilio, voice_of
from crctl.state import State

SESSIONS = "up_sessions"


#: Twilio's error code for a resource that does not exist (Twilio docs: error 20404).
NOT_FOUND = 20404


def process_started(pid: int) -> str | None:
    """When ``pid`` started (psutil, any platform), to tell a live run from a reused pid.

    Returns:
        The start time as a string (seconds since the epoch), or ``None`` when there is no
        such process or it cannot be inspected.
    """
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):  # ValueError: a negative pid
        return None


def alive(entry: dict[str, Any]) -> bool:
    """Whether the run that wrote ``entry`` is still running.

    A record from an older crctl holds a start time it read from /proc (clock ticks, not
    seconds); that one can only say "a process has this pid".
    """
    pid = int(entry.get("pid", 0))
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # it has exited; only its parent has not collected it yet
        started = repr(process.create_time())
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied: someone else's process holds the pid
        return True
    recorded = entry.get("process_started")
    return recorded is None or "." not in str(recorded) or recorded == started


def claim(twilio: Twilio, state: State, number: Any, url: str) -> None:
    """Record ``number``'s settings for this run (before it is pointed at ``url``)."""
    with state.change() as data:
        sessions = data.setdefault(SESSIONS, {})
        other = sessions.get(number.sid)
        if other is not None and other.get("pid") != os.getpid() and alive(other):
            raise CrctlError(
                f"another crctl up (pid {other['pid']}) is using {number.phone_number}: stop "
                "it first"
            )
        previous = other["previous"] if other is not None else voice_of(number)
        sessions[number.sid] = {
            "pid": os.getpid(),
            "process_started": process_started(os.getpid()),
            "account": twilio.account_sid,
            "phone": number.phone_number,
            # a dead run's record is taken over: its "previous" is still the real one
            "previous": previous,
            "pointed_at": url,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def put_back(twilio: Twilio, state: State, sid: str, *, dead_only: bool) -> str | None:
    """Restore one session's number; what happened, in words (``None``: no session)."""
    entry = state.reload().get(SESSIONS, {}).get(sid)
    if entry is None or (dead_only and alive(entry)):
        return None
    try:
        number = twilio.number(sid)
    except ProvisioningError as exc:
        if exc.code == NOT_FOUND:
            _drop(state, sid)
            return f"{entry['phone']} is no longer in this account: its up record is dropped"
        raise
    if number.voice_url != entry.get("pointed_at"):
        _drop(state, sid)
        return (
            f"{entry['phone']} was changed since crctl up (pid {entry['pid']}) pointed it at "
            f"{entry.get('pointed_at')}: left as it is ({number.voice_url or 'no webhook'})"
        )
    twilio.put_back(number, entry["previous"])
    _drop(state, sid)
    previous = entry["previous"]
    where = previous.get("voice_application_sid") or previous.get("voice_url") or "no webhook"
    return f"{entry['phone']} points at {where} again"


def _drop(state: State, sid: str) -> None:
    with state.change() as data:
        data.setdefault(SESSIONS, {}).pop(sid, None)


def repair(twilio: Twilio, state: State) -> tuple[list[str], list[str]]:
    """Put back numbers left pointed by ``crctl up`` runs that died: (done, warnings).

    One entry that cannot be repaired never stops the others, nor this run.
    """
    done: list[str] = []
    warnings: list[str] = []
    for sid, entry in list(state.reload().get(SESSIONS, {}).items()):
        if alive(entry):
            continue
        if entry.get("account") != twilio.account_sid:
            warnings.append(
                f"{entry['phone']} (account {entry.get('account')}) is still pointed at a dead "
                f"crctl up's tunnel; run crctl up or `crctl numbers restore {entry['phone']}` "
                "with that account's credentials"
            )
            continue
        try:
            result = put_back(twilio, state, sid, dead_only=True)
        except CrctlError as exc:
            warnings.append(f"could not repair {entry['phone']}: {exc}")
            continue
        if result is not None:
            done.append(f"repaired after a crctl up that died (pid {entry['pid']}): {result}")
    return done, warnings
