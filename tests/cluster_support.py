"""Replicas of the relay for the scale-out tests: ``crctl serve`` processes sharing one Redis.

Each replica is started the way the acceptance checks start one::

    crctl serve --host 127.0.0.1 --port P --public-url https://relay.example.test \
        --redis-url redis://127.0.0.1:R/0

with the same ``TWILIO_AUTH_TOKEN`` and ``CRCTL_API_TOKEN``, its own ``HOME`` (and state folder),
and the fake LLM as its model. :class:`tests.support.TwilioCaller` talks to a replica as to any
relay: ``TwilioCaller(replica, call_sid).connect()`` fetches the socket URL from that replica's
``/twiml`` (signed as Twilio signs it) and opens the socket there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import AUTH_TOKEN, PUBLIC_URL, fetch_socket_url, free_port

ROOT = Path(__file__).resolve().parents[1]
API_TOKEN = "test-api-token-shared-by-replicas"
#: The outer bound of waiting for a replica to start or stop: generous, never a figure under test.
PATIENCE = 60.0


class Replica:
    """One ``crctl serve`` process of the cluster."""

    def __init__(
        self,
        redis_url: str,
        llm_url: str,
        *,
        name: str = "a",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        auth_token: str = AUTH_TOKEN,
        api_token: str = API_TOKEN,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.auth_token = auth_token
        self.api_token = api_token
        self.home = Path(tempfile.mkdtemp(prefix=f"crctl-replica-{name}-"))
        self.log_path = self.home / "relay.log"
        self.args = [
            sys.executable, "-m", "crctl", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--public-url", PUBLIC_URL, "--redis-url", redis_url,
            "--silence-timeout", "0", "--filler-after-ms", "0",
            *extra_args,
        ]  # fmt: skip
        base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CRCTL_", "OPENAI_", "TWILIO_"))
            and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
        }
        self.env = {
            **base_env,
            "HOME": str(self.home),
            "CRCTL_STATE_DIR": str(self.home / ".crctl"),
            "TWILIO_AUTH_TOKEN": auth_token,
            "CRCTL_API_TOKEN": api_token,
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": llm_url,
            "CRCTL_MODEL": "fake-llm",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            # this checkout first: a worktree's tests run its own code
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process holds it)
        self.proc = subprocess.Popen(
            self.args, env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited: {self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"replica {self.name} did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the replica dies mid-call, as a crashed pod does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(PATIENCE)

    def terminate(self, timeout: float = PATIENCE) -> int:
        """SIGTERM, then wait for the exit (the graceful drain); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.kill()

    # ------------------------------------------------------------------ as Twilio and a user
    async def socket_url(self, call_sid: str) -> str:
        """The ``<ConversationRelay url>`` this replica's ``/twiml`` gives ``call_sid``."""
        return await fetch_socket_url(
            self.base_url, call_sid, token=self.auth_token, public_url=PUBLIC_URL
        )

    def api(self, method: str, path: str, body: Any = None) -> httpx.Response:
        """The relay's own API (``/calls``, ``/events``…) with the shared API token."""
        headers = {"Authorization": f"Bearer {self.api_token}"}
        content = json.dumps(body).encode() if body is not None else None
        if content is not None:
            headers["Content-Type"] = "application/json"
        return httpx.request(
            method, self.base_url + path, headers=headers, content=content, timeout=PATIENCE
        )


@contextlib.contextmanager
def replicas(
    redis_url: str, llm_url: str, count: int = 2, **kwargs: Any
) -> Iterator[list[Replica]]:
    """``count`` replicas (``a``, ``b``, ``c``…) started on one Redis; all killed at the end."""
    started: list[Replica] = []
    try:
        for i in range(count):
            started.append(Replica(redis_url, llm_url, name="abcdefgh"[i], **kwargs).start())
        yield started
    finally:
        for replica in started:
            replica.close()
