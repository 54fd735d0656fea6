"""``crctl serve`` as a real subprocess, driven like Twilio over real sockets on 127.0.0.1.

Each test starts ``python -m crctl serve`` in an empty temporary directory (no ``.env`` leaks
in) with an explicit environment stripped of CRCTL_/OPENAI_/TWILIO_ variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from fakes.fake_llm import FakeLLM
from relay_server.protocol import Outbound, Text
from tests.support import TwilioCaller, free_port, setup_message, sign

TOKEN = "twilio-tok-Zq81xW7yV6uT5sR4"
KEY = "sk-fake-Kp93mN2bL1vC0xZ8aQ7w"
CALL = "CA" + "7" * 32
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _env(**extra: str) -> dict[str, str]:
    """os.environ minus anything that configures crctl, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    # the token file and the events database go to a scratch folder, never the real home
    env["CRCTL_STATE_DIR"] = tempfile.mkdtemp(prefix="crctl-state-")
    env.update(extra)
    return env


def _http(
    method: str, url: str, data: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(status, content type, body) of one request; 4xx/5xx are returned, not raised."""
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with _NO_PROXY.open(request, timeout=5) as response:
            return (
                response.status,
                response.headers.get("Content-Type", ""),
                response.read().decode(),
            )
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


class Relay:
    """A running ``crctl serve`` subprocess with its output in files."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, out: Path, err: Path) -> None:
        self.proc, self.port, self._out, self._err = proc, port, out, err
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/ws"

    @property
    def stdout(self) -> str:
        return self._out.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.read_text(encoding="utf-8", errors="replace")

    def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"crctl serve exited with {self.proc.returncode}:\n{self.stderr}")
            try:
                status, _, body = _http("GET", self.base + "/healthz")
                if status == 200 and json.loads(body)["status"] == "ok":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        pytest.fail(f"crctl serve not healthy after {timeout} s:\n{self.stderr}")

    def terminate(self, timeout: float = 5.0, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``), and the exit code (fails the test if it takes longer)."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"crctl serve still running {timeout} s after SIGTERM:\n{self.stderr}")


@contextmanager
def serve(tmp_path: Path, args: Sequence[str], env: dict[str, str]) -> Iterator[Relay]:
    """Start ``crctl serve --port <free> *args``, wait for /healthz, always kill at the end."""
    port = free_port()
    if "--port" in args:
        port = int(args[list(args).index("--port") + 1])
    else:
        args = ["--port", str(port), *args]
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as out_f, err.open("wb") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crctl", "serve", *args],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_f,
            stderr=err_f,
        )
    relay = Relay(proc, port, out, err)
    try:
        relay.wait_healthy()
        yield relay
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _connect(relay: Relay, signed: tuple[str, str] | None) -> Any:
    """The socket at the one-time URL the relay's /twiml gives CALL.

    ``signed``: the URL and auth token to sign the handshake with (as Twilio does, the URL's query
    as params).
    """
    form = {"CallSid": CALL}
    twiml_signature = sign(f"https://127.0.0.1:{relay.port}/twiml", form, token=TOKEN)
    status, _, body = _http(
        "POST", relay.base + "/twiml", form, {"X-Twilio-Signature": twiml_signature}
    )
    assert status == 200, body
    element = ET.fromstring(body).find("Connect/ConversationRelay")
    assert element is not None, body
    query = urllib.parse.urlsplit(element.attrib["url"]).query
    headers = {}
    if signed is not None:
        params = dict(urllib.parse.parse_qsl(query))
        headers["X-Twilio-Signature"] = sign(signed[0], params, token=signed[1])
    return websockets.connect(
        relay.ws_url + "?" + query,
        additional_headers=headers,
        user_agent_header="Jetty/11.0.24",
        open_timeout=5,
    )


async def _open(ws: Any, **setup: Any) -> TwilioCaller:
    """Twilio's side of a call on a socket :func:`_connect` opened: the setup message sent."""
    caller = TwilioCaller.over(ws, CALL)
    await caller.send(setup_message(CALL, **setup))
    return caller


# The timeout turns a hang into a failure that lists the frames so far (ASYNC109).
async def _turn(caller: TwilioCaller, text: str, timeout: float = 5.0) -> list[Outbound]:  # noqa: ASYNC109
    """Send a final prompt; the messages up to and including the text with ``last`` true."""
    await caller.prompt(text, lang="en-US", last=True)
    frames: list[Outbound] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no last:true text frame in {timeout} s; got {frames}"
        frame = await caller.recv(left)
        frames.append(frame)
        if isinstance(frame, Text) and frame.last is True:
            return frames


def _spoken(frames: list[Outbound]) -> str:
    assert all(isinstance(f, Text) for f in frames), frames
    assert all(f.last is False for f in frames[:-1]), frames
    return "".join(f.token for f in frames)


async def _assert_refused(relay: Relay, signed: tuple[str, str] | None) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with _connect(relay, signed):
            pass
    assert info.value.response.status_code == 403


# --------------------------------------------------------------------- (a) acceptance


async def test_acceptance_command_line(tmp_path: Path, fake_llm: FakeLLM) -> None:
    port = free_port()
    public = f"https://127.0.0.1:{port}"
    env = _env(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake_llm.base_url, TWILIO_AUTH_TOKEN=TOKEN)
    args = ["--host", "127.0.0.1", "--port", str(port), "--public-url", public]
    with serve(tmp_path, args, env) as relay:
        # what Twilio signs: the TwiML url= (Twilio docs: webhook security)
        signed_ws = f"wss://127.0.0.1:{port}/ws"

        # A signed call gets the (fake) LLM's streamed answer, closed by last:true.
        async with _connect(relay, (signed_ws, TOKEN)) as ws:
            frames = await _turn(await _open(ws), "hello there")
        assert _spoken(frames) == "You said: hello there"
        assert frames[-1].last is True
        assert len(fake_llm.records) == 1  # the LLM agent, not the offline echo agent
        user = [m for m in fake_llm.records[0].body["messages"] if m["role"] == "user"]
        assert user[-1]["content"] == "hello there"

        # Unsigned, wrong token, and signed over https:// instead of wss://.
        await _assert_refused(relay, None)
        await _assert_refused(relay, (signed_ws, "not-the-token"))
        await _assert_refused(relay, (f"https://127.0.0.1:{port}/ws", TOKEN))

        # The voice webhook: unsigned 403, signed over the public https URL + form params 200.
        form = {"CallSid": CALL, "From": "+15550100001", "To": "+15550100002"}
        status, _, _ = _http("POST", relay.base + "/twiml", form)
        assert status == 403
        tampered = sign(public + "/twiml", {**form, "From": "+15559999999"}, token=TOKEN)
        status, _, _ = _http("POST", relay.base + "/twiml", form, {"X-Twilio-Signature": tampered})
        assert status == 403
        signature = sign(public + "/twiml", form, token=TOKEN)
        status, ctype, body = _http(
            "POST", relay.base + "/twiml", form, {"X-Twilio-Signature": signature}
        )
        assert status == 200, body
        assert "xml" in ctype
        assert f'url="wss://127.0.0.1:{port}/ws?callSid={CALL}&amp;token=' in body
        assert "<ConversationRelay" in body

        assert relay.terminate() == 0


# ------------------------------------------------------------------- (b) no accounts


async def test_no_accounts_uses_echo_agent_unsigned_on_loopback(tmp_path: Path) -> None:
    with serve(tmp_path, [], _env()) as relay:
        banner = relay.stderr
        echo_lines = [line for line in banner.splitlines() if "agent: echo" in line]
        assert len(echo_lines) == 1, banner
        assert "OPENAI_API_KEY" in echo_lines[0]
        assert "warning:" in banner and "TWILIO_AUTH_TOKEN" in banner

        async with _connect(relay, None) as ws:  # no token on 127.0.0.1: no signature needed
            caller = await _open(ws)
            assert _spoken(await _turn(caller, "testing one two")) == "You said: testing one two"
            assert _spoken(await _turn(caller, "and again")) == "You said: and again"
        assert relay.terminate() == 0
    assert "Traceback" not in relay.stderr, relay.stderr


async def test_ctrl_c_during_a_live_call_shuts_down_cleanly(tmp_path: Path) -> None:
    # Ctrl-C (SIGINT) while a call is connected: the socket is closed, the process exits 0
    # within 5 s, and nothing is logged as a crash. (SIGTERM drains first: tests/test_drain.py.)
    with serve(tmp_path, [], _env()) as relay:
        async with _connect(relay, None) as ws:
            assert _spoken(await _turn(await _open(ws), "hello")) == "You said: hello"
            stopping = asyncio.create_task(asyncio.to_thread(relay.terminate, 5.0, signal.SIGINT))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 6)
            assert await stopping == 0
    assert "Traceback" not in relay.stderr, relay.stderr
    assert " ERROR " not in relay.stderr, relay.stderr


# ------------------------------------------------------------------- (c) bad config

BAD_CONFIGS: dict[str, tuple[list[str], dict[str, str], str]] = {
    "port-0": (["--port", "0"], {}, "port"),
    "ftp-public-url": (["--public-url", "ftp://x"], {}, "public_url"),
    "open-host-no-token": (["--host", "0.0.0.0"], {}, "TWILIO_AUTH_TOKEN"),
    "bad-agent": (["--agent", "nope.module:X"], {}, "nope.module:X"),
    "missing-prompt-file": (["--system-prompt-file", "missing.txt"], {}, "missing.txt"),
    "token-no-public-url": ([], {"TWILIO_AUTH_TOKEN": TOKEN}, "public_url"),
    "env-port": ([], {"CRCTL_PORT": "abc"}, "CRCTL_PORT"),
    "env-tools-comma-list": ([], {"CRCTL_TOOLS": "nosuch_mod_a,nosuch_mod_b"}, "tools"),
    # User text in an error must be printed as it is, not parsed as rich markup.
    "agent-with-brackets": (["--agent", "x[/b]:Y"], {}, "x[/b]:Y"),
    # Issue 12: Redis unreachable at start is one line naming the URL (exit 2)
    "redis-unreachable": (
        ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
        {},
        "cannot reach Redis at redis://127.0.0.1:",
    ),
    "redis-not-a-redis-url": (["--redis-url", "http://cache:6379"], {}, "redis_url"),
}


#: (exit code, or None if it started serving instead; stdout; stderr)
Refusal = tuple[int | None, str, str]


def serve_refusals(cases: dict[str, tuple[list[str], dict[str, str], Path]]) -> dict[str, Refusal]:
    """``crctl serve ARGS`` of every case at once (env, cwd), each left to refuse: case -> result.

    They are independent, so they run together; one that starts serving instead is killed once
    the deadline passes.
    """
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for case, (args, env, cwd) in cases.items():
            procs[case] = subprocess.Popen(
                [sys.executable, "-m", "crctl", "serve", *args],
                cwd=cwd,
                env=_env(**env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        # Generous: a refusal comes in ~2 s; only a relay that started serving waits it out.
        deadline = time.monotonic() + 60
        results: dict[str, Refusal] = {}
        for case, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # it started serving instead of refusing
                proc.kill()
                out, err = proc.communicate()
                results[case] = (None, out, err)
            else:
                results[case] = (proc.returncode, out, err)
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def bad_config_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Refusal]:
    """Run every BAD_CONFIGS case at once (they are independent): id -> (code, out, err)."""
    cases: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    for case, (args, env, _needle) in BAD_CONFIGS.items():
        if "--port" not in args and "CRCTL_PORT" not in env:
            args = ["--port", str(free_port()), *args]
        cases[case] = (args, env, tmp_path_factory.mktemp(case))
    return serve_refusals(cases)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_exits_with_one_error_line(
    bad_config_runs: dict[str, tuple[int | None, str, str]], case: str
) -> None:
    needle = BAD_CONFIGS[case][2]
    code, out, err = bad_config_runs[case]
    assert code is not None, f"did not exit within 60 s: it should refuse to start\n{err}"
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert needle in lines[0]
    for secret in (TOKEN, KEY):
        assert secret not in err + out


# -------------------------------------------------------------- (d) secrets in logs


async def test_secrets_never_reach_the_logs(tmp_path: Path, fake_llm: FakeLLM) -> None:
    port = free_port()
    public = f"https://127.0.0.1:{port}"
    env = _env(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake_llm.base_url, TWILIO_AUTH_TOKEN=TOKEN)
    args = ["--port", str(port), "--public-url", public, "--log-level", "DEBUG"]
    with serve(tmp_path, args, env) as relay:
        signed_ws = f"wss://127.0.0.1:{port}/ws"
        async with _connect(relay, (signed_ws, TOKEN)) as ws:
            caller = await _open(ws, custom_parameters={"customerId": "42"})
            frames = await _turn(caller, "what is my balance")
            assert _spoken(frames) == "You said: what is my balance"
            await caller.dtmf("5")
            await caller.send("this is not json")  # raw on purpose: logged as a bad frame
            await _turn(caller, "thanks")
        await _assert_refused(relay, (signed_ws, "wrong"))  # logged as refused
        form = {"CallSid": CALL, "SessionStatus": "completed", "CallStatus": "completed"}
        headers = {"X-Twilio-Signature": sign(public + "/action", form, token=TOKEN)}
        status, _, _ = _http("POST", relay.base + "/action", form, headers)
        assert status == 200
        assert relay.terminate() == 0

    logs = relay.stdout + relay.stderr
    assert " DEBUG " in logs, "DEBUG logging was not on: the check below would prove nothing"
    assert "refused" in logs
    for secret in (TOKEN, KEY):
        assert secret not in logs
        assert secret[-12:] not in logs  # no partial/truncated echo either
