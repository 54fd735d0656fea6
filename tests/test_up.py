"""``crctl up`` end to end, as a real process.

A fake tunnel, the fake Twilio API (contract-checked) and the relay; the number pointed, then
restored on SIGINT, and repaired after the process was killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port, sign, wait_until

ROOT = Path(__file__).resolve().parent.parent
TUNNEL = "https://fake-tunnel.example.test"
OLD = "https://yesterday.example.com/voice"
#: How long a step of `crctl up` may take before the test fails: generous, because three
#: processes starting at once on a loaded CI machine are slow; a guard, never a measure.
PATIENCE = 60
pytestmark = pytest.mark.usefixtures("contract")


class Up:
    """``crctl up`` in its own process group, its output collected in a file."""

    def __init__(self, tmp_path: Path, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.log = tmp_path / f"up-{self.port}.log"
        # the child keeps its own copy of the file: ours is closed once it started
        with self.log.open("w") as handle:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "crctl", "up", "--port", str(self.port), *args],
                cwd=tmp_path,
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def healthy(self) -> bool:
        try:
            return (
                httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=0.5).status_code == 200
            )
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 8.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def up_env(twilio_env: Any, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "NGROK_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        CRCTL_STATE_DIR=str(tmp_path / "state"),
        CRCTL_TUNNEL_FACTORY="fakes.fake_tunnel:FakeTunnel",
        CRCTL_FAKE_TUNNEL_URL=TUNNEL,
        CRCTL_FAKE_TUNNEL_LOG=str(tmp_path / "tunnel.log"),
        CRCTL_EVENTS_DB=str(tmp_path / "events.sqlite3"),
    )
    return env


def voice_url(fake: Any, sid: str) -> str | None:
    return fake.numbers[sid]["voice_url"]  # type: ignore[no-any-return]


def test_up_points_the_number_and_restores_it_on_sigint(
    fake_twilio: Any, up_env: dict[str, str], tmp_path: Path
) -> None:
    owned = fake_twilio.add_number("+15005550020", voice_url=OLD, voice_method="GET")
    up = Up(tmp_path, up_env, "--number", "+15005550020")
    try:
        assert wait_until(
            lambda: voice_url(fake_twilio, owned["sid"]) == TUNNEL + "/twiml", PATIENCE
        ), up.output
        assert wait_until(up.healthy, PATIENCE), up.output
        # signatures are checked against the tunnel's URL, as Twilio signs it
        unsigned = httpx.get(f"http://127.0.0.1:{up.port}/twiml", timeout=2)
        assert unsigned.status_code == 403
        signature = sign(TUNNEL + "/twiml", token=fake_twilio.auth_token)
        twiml = httpx.get(
            f"http://127.0.0.1:{up.port}/twiml",
            timeout=2,
            headers={"X-Twilio-Signature": signature},
        )
        assert twiml.status_code == 200 and "wss://fake-tunnel.example.test/ws" in twiml.text
        assert "+15005550020" in up.output and TUNNEL in up.output
        assert up.stop(signal.SIGINT) == 0, up.output  # (stop() fails a hang)
    finally:
        if up.proc.poll() is None:
            up.stop(signal.SIGKILL)
    number = fake_twilio.numbers[owned["sid"]]
    assert (number["voice_url"], number["voice_method"]) == (OLD, "GET")
    assert "restored" in up.output
    assert (tmp_path / "tunnel.log").read_text().split()[::3] == ["open", "close"]
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state.get("up_sessions") == {}


def test_up_after_sigkill_repairs_the_number(
    fake_twilio: Any, up_env: dict[str, str], tmp_path: Path
) -> None:
    owned = fake_twilio.add_number("+15005550021", voice_url=OLD)
    first = Up(tmp_path, up_env, "--number", "+15005550021")
    assert wait_until(lambda: voice_url(fake_twilio, owned["sid"]) == TUNNEL + "/twiml", PATIENCE)
    first.stop(signal.SIGKILL)  # dies without restoring: "it just rings" tomorrow
    assert voice_url(fake_twilio, owned["sid"]) == TUNNEL + "/twiml"
    second = Up(tmp_path, up_env, "--number", "+15005550021")
    try:
        assert wait_until(lambda: "repaired" in second.output, PATIENCE), second.output
        assert wait_until(second.healthy, PATIENCE), second.output
        assert voice_url(fake_twilio, owned["sid"]) == TUNNEL + "/twiml"
        assert second.stop(signal.SIGTERM) == 0, second.output
    finally:
        if second.proc.poll() is None:
            second.stop(signal.SIGKILL)
    assert voice_url(fake_twilio, owned["sid"]) == OLD  # the original, not the dead run's tunnel


def test_up_with_pieces_missing_says_what_and_runs_locally(
    up_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(up_env)
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "CRCTL_TUNNEL_FACTORY"):
        env.pop(name, None)
    env["COLUMNS"] = "40"  # narrower than the hint: it must still come out on one line
    up = Up(tmp_path, env)
    try:
        assert wait_until(up.healthy, PATIENCE), up.output
        assert wait_until(lambda: "Ctrl-C" in up.output, PATIENCE), up.output
        out = up.output
        assert "NGROK_AUTHTOKEN" in out and "Twilio not configured" in out
        assert "echo" in out
        # the hint runs as printed: crctl from a checkout's .venv is not on PATH
        hint = re.search(rf"try it: (\S+) call http://127\.0\.0\.1:{up.port}", out)
        assert hint, out
        assert (tmp_path / hint.group(1)).resolve() == ROOT / "scripts" / "dev.sh"
        local = httpx.get(f"http://127.0.0.1:{up.port}/twiml", timeout=2)
        assert local.status_code == 200 and f"ws://127.0.0.1:{up.port}/ws" in local.text
        assert up.stop(signal.SIGTERM) == 0, up.output
    finally:
        if up.proc.poll() is None:
            up.stop(signal.SIGKILL)


def test_up_with_a_call_script_runs_the_whole_stack_and_stops(
    up_env: dict[str, str], tmp_path: Path
) -> None:
    """The README's main command: no accounts, a simulated conversation through it all."""
    env = dict(up_env)
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        env.pop(name, None)
    up = Up(tmp_path, env, "--no-tunnel", "--call", "example")  # the script crctl ships
    assert up.proc.wait(60) == 0, up.output
    assert "4 of 4 turns passed" in up.output
    assert "barge-in" in up.output and "caller" in up.output  # the live call log
    # the caller plays Twilio's clock: agentSpeaking on 300 ms after the first text
    waits = [int(ms) for ms in re.findall(r"caller wait (\d+) ms", up.output)]
    assert len(waits) == 4 and all(ms >= 300 for ms in waits), up.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("- say: hello\n  expect:\n    contains: something the echo never says\n")
    failing = Up(tmp_path, env, "--no-tunnel", "--call", str(bad))
    assert failing.proc.wait(60) == 1, failing.output
    assert "something the echo never says" in failing.output


def test_two_ups_keep_each_others_records_and_a_hand_fix_is_never_overwritten(
    fake_twilio: Any, up_env: dict[str, str], tmp_path: Path
) -> None:
    a_num = fake_twilio.add_number("+15005550031", voice_url=OLD)
    b_num = fake_twilio.add_number("+15005550032", voice_url=OLD)
    c_num = fake_twilio.add_number("+15005550033", voice_url=OLD)
    a = Up(tmp_path, up_env, "--number", "+15005550031")
    b = Up(tmp_path, up_env, "--number", "+15005550032")
    c = Up(tmp_path, up_env, "--number", "+15005550033")
    try:
        for num in (a_num, b_num, c_num):
            assert wait_until(
                lambda n=num: voice_url(fake_twilio, n["sid"]) == TUNNEL + "/twiml", 20
            ), (a.output, b.output, c.output)
        for run in (a, b, c):
            assert wait_until(run.healthy, PATIENCE), run.output
        assert a.stop(signal.SIGINT) == 0, a.output  # A's restore must not drop B's or C's record
        assert voice_url(fake_twilio, a_num["sid"]) == OLD
        b.stop(signal.SIGKILL)
        c.stop(signal.SIGKILL)
    finally:
        for run in (a, b, c):
            if run.proc.poll() is None:
                run.stop(signal.SIGKILL)
    fake_twilio.numbers[c_num["sid"]]["voice_url"] = "https://fixed-by-hand.example.com/x"
    # `crctl numbers restore` also repairs a dead run's number
    restored = subprocess.run(
        [sys.executable, "-m", "crctl", "numbers", "restore", "+15005550032"],
        cwd=tmp_path,
        env=up_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert restored.returncode == 0, restored.stderr
    assert voice_url(fake_twilio, b_num["sid"]) == OLD
    again = Up(tmp_path, up_env, "--no-tunnel")
    try:
        assert wait_until(lambda: "changed since" in again.output, PATIENCE), again.output
        assert wait_until(again.healthy, PATIENCE), again.output
        assert again.stop(signal.SIGINT) == 0
    finally:
        if again.proc.poll() is None:
            again.stop(signal.SIGKILL)
    assert voice_url(fake_twilio, c_num["sid"]) == "https://fixed-by-hand.example.com/x"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["up_sessions"] == {}


def test_up_with_the_llm_and_a_scripted_call(
    fake_twilio: Any, fake_llm: Any, up_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(up_env, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_llm.base_url)
    fake_twilio.add_number("+15005550040", voice_url=OLD)
    script = tmp_path / "llm.yaml"
    script.write_text("- say: book a table\n  expect:\n    contains: book a table\n")
    up = Up(tmp_path, env, "--number", "+15005550040", "--call", str(script))
    assert up.proc.wait(60) == 0, up.output
    assert "LLMAgent" in up.output and "1 of 1 turns passed" in up.output
    assert (
        fake_llm.records and fake_llm.records[-1].body["messages"][-1]["content"] == "book a table"
    )
    number = fake_twilio.number_by_phone("+15005550040")
    assert number is not None and number["voice_url"] == OLD  # put back when the script ended
