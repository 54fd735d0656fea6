"""The call log under abuse (issue 9).

An ``/events`` client that never reads, a relay that crashed with calls open, a read-only database,
huge partial transcripts. Real sockets on 127.0.0.1 and real HTTP; the relays that must die or
refuse to start are real subprocesses.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from crctl.console import CallLog
from relay_server import events as ev
from relay_server.state import relay_state
from relay_server.store import PARTIAL_MAX_CHARS, STREAM_BUDGET, EventStore
from tests.events_support import REPO, TOKEN, client, collect, subprocess_env
from tests.support import RelayServer, free_port

CA1, CA2 = "CA" + "1" * 32, "CA" + "2" * 32
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.sqlite3"


def publish(relay: RelayServer, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Publish on the relay's own bus, on its loop (as its calls do)."""
    relay.call_on_loop(lambda: [relay.bus.publish(kind, sid, **data) for kind, sid, data in events])


async def stored_up_to(relay: RelayServer, last_id: int) -> None:
    store: EventStore = relay_state(relay.app).store
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(store.max_id) < last_id:
        assert time.monotonic() < deadline, "the events were not stored"
        await asyncio.sleep(0.02)


def dechunk(raw: bytes) -> bytes:
    """The body of a ``Transfer-Encoding: chunked`` response, which must be complete."""
    body, rest = b"", raw
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


# ------------------------------------------------------- item 4: a subscriber that never reads
async def test_a_subscriber_that_never_reads_is_cut_off_and_resumes_without_loss(
    relay_factory, db, caplog
):
    """A client that stops reading is held to a byte budget (1 MiB), not 1,000 batches.

    Its stream ends after the last event it was sent, and resuming with ``after`` gives every event
    after that one, from the store.
    """
    caplog.set_level(logging.WARNING, "relay_server.store")
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel holds little for it
    sock.connect(("127.0.0.1", relay.port))
    sock.sendall(
        b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
    )
    raw = b""
    while b"\nid: " not in raw:  # headers, retry, and the id it would resume from: it is live
        raw += await asyncio.to_thread(sock.recv, 4096)
    first = int(re.search(rb"\nid: (\d+)", raw).group(1))

    # ~24 MiB of events, far more than the budget plus what the kernel buffers (tcp_wmem's
    # largest send buffer here is 4 MiB), in batches the writer stores one by one.
    n, text = 400, "x" * (60 << 10)
    for _ in range(0, n, 20):
        publish(
            relay,
            [(ev.AGENT_PUSHED, CA1, {"type": "text", "text": f"{i}:{text}"}) for i in range(20)],
        )
        await asyncio.sleep(0.06)
    last = first + n
    await stored_up_to(relay, last)

    sock.settimeout(60)  # a guard only: a stream that is never ended sends keep-alives

    def read_all() -> bytes:
        """Until the relay ends the stream (EOF), or it has sent every event (no cut)."""
        data = b""
        while chunk := sock.recv(1 << 20):
            data += chunk
            if b"\nid: %d\n" % last in data[-(200 << 10) :]:
                break
        return data

    try:
        raw += await asyncio.to_thread(read_all)
    finally:
        sock.close()
    assert raw.endswith(b"\r\n0\r\n\r\n"), "a client megabytes behind was never cut off"
    body = dechunk(raw.partition(b"\r\n\r\n")[2])
    got = [int(i) for i in re.findall(rb"^id: (\d+)\ndata: ", body, re.M)]
    assert got, "it was sent nothing at all"
    assert got == list(range(first + 1, got[-1] + 1)), "no gap before its last event"
    assert got[-1] < last, "it was cut off, not sent everything"
    assert any("fell" in r.message and "behind" in r.message for r in caplog.records)
    assert STREAM_BUDGET == 1 << 20

    async with client(relay) as http:  # what crctl tail does: resume with the last id
        resumed = await collect(http, {"after": str(got[-1])}, lambda e: e[-1]["id"] >= last, 30)
    assert [e["id"] for e in resumed] == list(range(got[-1] + 1, last + 1))
    assert all(e["data"]["text"].endswith(text) for e in resumed)


# --------------------------------------------------------- item 7: calls left open by a crash
async def test_calls_left_open_by_a_killed_relay_are_lost_at_the_next_start(
    relay_factory, tmp_path, db
):
    env = subprocess_env(tmp_path / "state", CRCTL_API_TOKEN=TOKEN)
    port = free_port()
    # Popen only starts the relay, a separate process this loop watches with poll(); the waits
    # below come once this loop has nothing left to serve.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "crctl", "serve", "--port", str(port), "--events-db", str(db)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with client(RelayAt(port)) as http:  # type: ignore[arg-type]
            deadline = time.monotonic() + 15
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "relay did not start"
                await asyncio.sleep(0.05)
            # Twilio's status callback for a call in progress (unsigned: no auth token here)
            status = {"CallSid": CA1, "CallStatus": "in-progress"}
            assert (await http.post("/status", data=status)).status_code == 204
            call = (await http.get(f"/calls/{CA1}")).json()
            assert call["status"] == "live"
        proc.send_signal(signal.SIGKILL)  # a crash: no clean stop, nothing written at exit
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stderr.close()  # type: ignore[union-attr]

    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    async with client(relay) as http:
        call = (await http.get(f"/calls/{CA1}")).json()
        calls = (await http.get("/calls")).json()["calls"]
        assert call["status"] == "lost", call
        streamed = await collect(http, {"since": "10m"}, lambda e: e[-1]["kind"] == "call.lost")
    lost = call["events"][-1]
    assert lost["kind"] == "call.lost"
    assert lost["data"]["last_seen"] == call["ended"] >= call["started"]
    assert f"pid {proc.pid}" in lost["data"]["reason"] and "gone" in lost["data"]["reason"]
    assert [c["status"] for c in calls if c["call_sid"] == CA1] == ["lost"]
    assert streamed[-1]["id"] == lost["id"]  # crctl tail gets it like any event

    # crctl calls list / show (from the file) and tail's rendering say it
    relay.stop()
    shown = {}
    for args in (["list"], ["show", CA1]):
        done = await asyncio.to_thread(  # the event loop stays free while the CLI runs
            subprocess.run,
            [sys.executable, "-m", "crctl", "calls", *args, "--db", str(db)],
            env=subprocess_env(tmp_path / "state", COLUMNS="200"),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        shown[args[0]] = done.stdout
    assert re.search(rf"{CA1}.*\blost\b", shown["list"]), shown["list"]
    assert "call lost: relay last seen" in shown["show"] and "status lost" in shown["show"]

    console = Console(width=200, record=True, force_terminal=False)
    CallLog(console).add(lost | {"call_sid": CA1})
    rendered = console.export_text()
    assert "lost" in rendered and "relay last seen" in rendered


async def test_a_relay_that_runs_keeps_its_calls_live(relay_factory, db):
    """A second relay on the same file does not take the first one's open calls for lost."""
    first = relay_factory(api_token=TOKEN, events_db=str(db))
    publish(first, [(ev.CALL_STATUS, CA2, {"status": "in-progress", "duration": None})])
    async with client(first) as http:
        assert (await http.get(f"/calls/{CA2}")).json()["status"] == "live"
    second = relay_factory(api_token=TOKEN, events_db=str(db))
    async with client(second) as http:
        assert (await http.get(f"/calls/{CA2}")).json()["status"] == "live"
    first.stop()  # a clean stop with the call still open: the next start says it is lost
    third = relay_factory(api_token=TOKEN, events_db=str(db))
    async with client(third) as http:
        call = (await http.get(f"/calls/{CA2}")).json()
    assert call["status"] == "lost" and "stopped" in call["events"][-1]["data"]["reason"]


class RelayAt:
    """Enough of a RelayServer for :func:`client`: a relay at 127.0.0.1:``port``."""

    def __init__(self, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"


# ------------------------------------------------------------- item 8: a read-only database
def _without_dac_override() -> None:
    """In the child: drop the DAC override capabilities from the bounding set before exec.

    With CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped (prctl PR_CAPBSET_DROP), even root is held
    to file modes.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_a_read_only_database_stops_start_up_with_one_line(tmp_path):
    db = tmp_path / "ro" / "events.sqlite3"
    EventStore(db).close()
    for path in db.parent.iterdir():
        path.chmod(0o444)
    root = os.geteuid() == 0
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "crctl",
            "serve",
            "--port",
            str(free_port()),
            "--events-db",
            str(db),
        ],
        cwd=tmp_path,
        env=subprocess_env(tmp_path / "state"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_without_dac_override if root else None,
    )
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:  # it started serving, and would lose every event
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"crctl serve started on a read-only events database:\n{err[-2000:]}")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(db) in lines[0] and "read-only" in lines[0] and "--events-db" in lines[0]


# --------------------------------------------------------- item 12b: partials stored bounded
async def test_partials_are_stored_bounded_and_the_final_prompt_whole(relay_factory, db):
    relay = relay_factory(api_token=TOKEN, events_db=str(db))
    start = await asyncio.to_thread(relay_state(relay.app).store.max_id)
    words = "word " * (12 << 10)  # 60 KiB
    n = 300
    for i in range(0, n, 50):
        publish(
            relay,
            [
                (ev.CALLER_SPEECH, CA1, {"text": f"{words}{i + j}", "last": False})
                for j in range(50)
            ],
        )
    publish(relay, [(ev.CALLER_SPEECH, CA1, {"text": words + "the end", "last": True})])
    await stored_up_to(relay, start + n + 1)
    async with client(relay) as http:
        call = (await http.get(f"/calls/{CA1}")).json()
    speech = [e["data"] for e in call["events"] if e["kind"] == "caller.speech"]
    assert len(speech) == n + 1
    partials, final = speech[:-1], speech[-1]
    assert all(len(p["text"]) <= PARTIAL_MAX_CHARS for p in partials)
    assert all(p["text"].startswith("…") and p["chars"] > 60_000 for p in partials)
    assert partials[-1]["text"].endswith(f"word {n - 1}")  # the newest words are kept
    assert final == {"text": words + "the end", "last": True}
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
    assert size < 4 << 20, f"{size >> 20} MiB for {n} partials"  # 18 MiB if stored whole


def test_a_stored_partial_is_json_like_any_event(db):
    store = EventStore(db)
    try:
        store.append(ev.CallerSpeech(call_sid=CA1, text="é" * 5000, last=False))
        (row,) = store.query(call_sid=CA1)
    finally:
        store.close()
    assert row["data"] == {
        "text": "…" + "é" * (PARTIAL_MAX_CHARS - 1),
        "last": False,
        "chars": 5000,
    }
    assert json.loads(json.dumps(row)) == row
