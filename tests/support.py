"""Test harness: the relay on a free loopback port, and a caller that behaves like Twilio.

The relay runs under uvicorn (as in ``crctl serve``) in a thread with its own event loop, so
tests talk to it over real sockets exactly as Twilio would. :class:`TwilioCaller` signs its
WebSocket handshake with the auth token over the *public* ``wss://`` URL (as Twilio does
through a tunnel) while connecting to the local address; the URL's one-time query (the call's
socket token) comes from the relay's own ``/twiml``, as Twilio gets it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import select
import socket
import struct
import subprocess
import termios
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import websockets
from twilio.request_validator import RequestValidator

from crctl.serve import run_relay
from crctl.settings import Settings
from relay_server import CallEvent, EventBus, RelayConfig, create_app
from relay_server.calls import CallRegistry
from relay_server.protocol import (
    Inbound,
    Outbound,
    SentSetup,
    Text,
    as_fields,
    decode_outbound,
)
from relay_server.protocol.replies import Invalid
from relay_server.protocol.twilio_side import CLOSE_REASON, TwilioSide
from relay_server.state import relay_state

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
PUBLIC_URL = "https://relay.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayServer:
    """The relay app under uvicorn in a background thread, on 127.0.0.1:<free port>."""

    def __init__(self, config: RelayConfig, agent: Any = None, chat: Any = None) -> None:
        self.config = config
        self.events: list[CallEvent] = []
        self.bus = EventBus()
        self.bus.subscribe(self.events.append)
        self.app = create_app(config, events=self.bus, agent=agent, chat=chat)
        self.registry: CallRegistry = relay_state(self.app).registry
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        settings = Settings(host="127.0.0.1", port=self.port)
        self._loop.run_until_complete(run_relay(self.app, settings, self._stop))

    def start(self) -> RelayServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("relay did not start")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call_on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the relay's loop and return its result (inspect sessions safely)."""
        done = threading.Event()
        box: list[Any] = []
        self._loop.call_soon_threadsafe(lambda: (box.append(fn()), done.set()))
        done.wait(5)
        return box[0]

    async def socket_url(self, call_sid: str) -> str:
        """The ``<ConversationRelay url>`` the relay's ``/twiml`` gives ``call_sid``.

        POSTed as Twilio posts it, signed with the relay's own auth token over its public URL.
        """
        token = self.config.auth_token if self.config.verify_signatures else None
        public = self.config.public_url or self.base_url
        return await fetch_socket_url(self.base_url, call_sid, token=token, public_url=public)

    def kinds(self, call_sid: str | None = None) -> list[str]:
        return [e.kind for e in list(self.events) if call_sid is None or e.call_sid == call_sid]


async def fetch_socket_url(
    base_url: str, call_sid: str, *, token: str | None = None, public_url: str | None = None
) -> str:
    """The ``<ConversationRelay url>`` from ``POST base_url/twiml`` for ``call_sid``.

    Signed with ``token`` over ``public_url``, if given.
    """
    form = {"CallSid": call_sid, "CallStatus": "ringing", "AccountSid": "AC" + "0" * 32}
    headers = {}
    if token:
        headers["X-Twilio-Signature"] = sign((public_url or base_url) + "/twiml", form, token)
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(base_url + "/twiml", data=form, headers=headers)
    assert response.status_code == 200, response.text
    relay = ET.fromstring(response.text).find("Connect/ConversationRelay")
    assert relay is not None, response.text
    return relay.attrib["url"]


def sign(url: str, params: dict[str, str] | None = None, token: str = AUTH_TOKEN) -> str:
    """X-Twilio-Signature for ``url`` and form ``params``, computed as Twilio does."""
    return str(RequestValidator(token).compute_signature(url, params or {}))


def setup_message(call_sid: str, **overrides: Any) -> SentSetup:
    """A setup message shaped like the captured one (Twilio docs: WebSocket messages).

    It is what the protocol's Twilio side sends; ``overrides`` replace fields by their Python name
    (``custom_parameters={...}``, ``call_status="IN_PROGRESS"``).
    """
    return SentSetup.inbound(call_sid, **overrides)


@dataclass(frozen=True)
class RelayAddress:
    """A relay known by its socket address only (for :meth:`TwilioCaller.at`)."""

    ws_url: str


class TwilioCaller:
    """A WebSocket client that talks ConversationRelay like Twilio does.

    It drives the protocol's I/O-free :class:`TwilioSide`, so every frame the relay sends is checked
    as Twilio checks it (a frame Twilio would reject with 64107 fails the test).
    """

    def __init__(
        self,
        relay: RelayServer,
        call_sid: str = "CA" + "1" * 32,
        public_url: str | None = PUBLIC_URL,
        token: str | None = AUTH_TOKEN,
    ) -> None:
        self.relay = relay
        self.call_sid = call_sid
        self.public_url = public_url
        self.token = token
        self.ws: Any = None
        self.side = TwilioSide()
        #: Every message received from the relay, in order.
        self.received: list[Outbound] = []
        #: The socket URL's query (``callSid=…&token=…``) of the last :meth:`connect`.
        self.query: str | None = None

    @classmethod
    def at(cls, base_url: str, call_sid: str = "CA" + "1" * 32) -> TwilioCaller:
        """A caller for a relay known only by its address.

        Such a relay is a ``crctl`` process with no auth token: nothing to sign. :meth:`connect`
        asks its ``/twiml`` for the socket URL.
        """
        address = RelayAddress("ws" + base_url.removeprefix("http") + "/ws")
        return cls(address, call_sid, public_url=None, token=None)  # type: ignore[arg-type]

    @classmethod
    def over(cls, ws: Any, call_sid: str = "CA" + "1" * 32) -> TwilioCaller:
        """A caller on a socket the test opened itself (a test of the handshake).

        From here on it speaks and checks frames like any other.
        """
        caller = cls(None, call_sid, public_url=None, token=None)  # type: ignore[arg-type]
        caller.ws = ws
        return caller

    async def connect(
        self,
        *,
        signature: str | None = None,
        setup: bool = True,
        query: str | None = None,
        **setup_overrides: Any,
    ) -> TwilioCaller:
        """Open the socket the relay's ``/twiml`` gives this call, then send the setup message.

        With ``query``, the socket URL carries that query instead: ``""`` for none, or a URL's query
        seen before, to replay it. The setup message carries ``setup_overrides`` (see
        :func:`setup_message`) and is not sent if ``setup`` is False.
        """
        if query is None and hasattr(self.relay, "socket_url"):
            query = urlsplit(await self.relay.socket_url(self.call_sid)).query
        elif query is None:  # a relay known by its ws_url only (no signatures): ask its /twiml
            base = "http" + self.relay.ws_url.removeprefix("ws").removesuffix("/ws")
            query = urlsplit(await fetch_socket_url(base, self.call_sid)).query
        self.query = query
        headers = {}
        if signature is not None:
            headers["X-Twilio-Signature"] = signature
        elif self.token and self.public_url:
            # Twilio's convention: the query's pairs signed as params (Twilio docs: webhook
            # security); the relay accepts the query kept in the URL as well.
            signed = self.public_url.replace("https://", "wss://") + "/ws"
            headers["X-Twilio-Signature"] = sign(signed, dict(parse_qsl(query)), token=self.token)
        self.ws = await websockets.connect(
            self.relay.ws_url + ("?" + query if query else ""),
            additional_headers=headers,
            user_agent_header="Jetty/11.0.24",
            max_size=None,
            open_timeout=5,
        )
        if setup:
            await self.send(setup_message(self.call_sid, **setup_overrides))
        return self

    async def send(self, frame: Inbound | str | bytes) -> None:
        """Send a message as Twilio encodes it, or a raw frame exactly as given.

        A raw frame is a test's own malformed or unknown frame: the raw wire is its point.
        """
        if isinstance(frame, (str, bytes)):
            await self.ws.send(frame)
            return
        self.side.send(frame)
        await self._flush()

    async def _flush(self) -> None:
        for data in self.side.data_to_send():
            await self.ws.send(data)

    async def prompt(self, text: str, last: bool = True, lang: str = "en-US") -> None:
        self.side.send_prompt(text, last=last, lang=lang)
        await self._flush()

    async def dtmf(self, digit: str) -> None:
        self.side.send_dtmf(digit)
        await self._flush()

    async def interrupt(self, heard: str, duration_ms: int | str = 500) -> None:
        self.side.send_interrupt(heard, duration_ms)
        await self._flush()

    async def info(self, name: str, value: str) -> None:
        self.side.send_info(name, value)
        await self._flush()

    # ``timeout`` in recv, recv_turn and reply_text: a bound on each frame, so a hang fails the
    # test at the frame it waited for (ASYNC109).
    async def recv(self, timeout: float = 5.0) -> Outbound:  # noqa: ASYNC109
        """The next message from the relay, as the relay's own type, checked as Twilio checks it.

        A frame Twilio would reject fails the test, and a ``text`` must carry ``last``, which the
        relay always sends though Twilio would default it.
        """
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        self.side.receive_data(frame)
        invalid = [e.reason for e in self.side.events_received() if isinstance(e, Invalid)]
        self.side.data_to_send()  # Twilio's 64107 answer: the failure below says it instead
        assert not invalid, f"Twilio would reject this frame (64107): {invalid[0]}"
        (accepted,) = self.side.messages_received()
        message = decode_outbound(frame)
        assert as_fields(message) == as_fields(accepted), frame  # the two readings agree
        self.received.append(message)
        return message

    async def recv_turn(self, timeout: float = 5.0) -> list[Outbound]:  # noqa: ASYNC109
        """Messages up to and including the text with ``last`` true."""
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if isinstance(frame, Text) and frame.last:
                return frames

    async def reply_text(self, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        """The text of the next talk cycle."""
        return "".join(f.token for f in await self.recv_turn(timeout) if isinstance(f, Text))

    async def quiet(self, seconds: float) -> list[Outbound]:
        """Frames arriving within ``seconds`` (expected to be none, usually)."""
        frames = []
        deadline = asyncio.get_running_loop().time() + seconds
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                frames.append(await self.recv(left))
            except TimeoutError:
                break
        return frames

    async def hangup(self) -> None:
        await self.ws.close(1000, CLOSE_REASON)


def config(**overrides: Any) -> RelayConfig:
    """A RelayConfig for tests: signatures on with the test token, silence reminders off."""
    base = RelayConfig(public_url=PUBLIC_URL, auth_token=AUTH_TOKEN)
    agent_over = {k[6:]: overrides.pop(k) for k in list(overrides) if k.startswith("agent_")}
    llm_over = {k[4:]: overrides.pop(k) for k in list(overrides) if k.startswith("llm_")}
    agent_cfg = replace(base.agent_config, silence_timeout=0, filler_after_ms=0)
    agent_cfg = replace(agent_cfg, **agent_over)
    llm_cfg = replace(base.llm, **llm_over)
    return replace(base, agent_config=agent_cfg, llm=llm_cfg, **overrides)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Pty:
    """A program whose stdin, stdout and stderr are a pseudo-terminal of ``size`` (rows, columns).

    What it prints is collected (:attr:`raw`) and passed to :meth:`received`.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], cwd: Any, size: tuple[int, int] = (30, 100)
    ) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True
        )
        os.close(slave)
        self.master = master
        self.raw = ""
        self.lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def received(self, text: str) -> None:
        """Called under :attr:`lock` with each chunk printed (subclasses interpret it)."""

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the program exited: EIO
                    return
                if not chunk:
                    return
                with self.lock:
                    text = chunk.decode("utf-8", "replace")
                    self.raw += text
                    self.received(text)
            elif self.proc.poll() is not None:
                return

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(2)
        os.close(self.master)
