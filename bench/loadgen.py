"""The load generator: Twilio-like callers over loopback WebSockets (asyncio + websockets).

Each :class:`Caller` is one ConversationRelay socket, signed like Twilio's handshake. The
scenarios record raw timings (``time.monotonic()``, CLOCK_MONOTONIC, comparable with the fake
LLM's stamps in another process); bench/run.py turns them into figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from crctl import turns
from relay_server.protocol import Outbound, SentSetup, Text, encode
from relay_server.protocol.twilio_side import CLOSE_REASON, TwilioSide

#: A token as written by bench/fake_server.py: " c<call>t<turn>w<k>@<monotonic ns>".
TOKEN_RE = re.compile(r"c(\d+)t(\d+)w(\d+)@(\d+)")

now = time.monotonic


percentile = turns.percentile  # nearest rank, as crctl calls stats reports


def summary(values: list[float], scale: float = 1000.0, digits: int = 3) -> dict[str, Any]:
    """n, p50, p95, p99, max (and min) of ``values`` (seconds) in ms (``scale`` 1000)."""
    if not values:
        return {"n": 0}
    out: dict[str, Any] = {"n": len(values)}
    for name, p in (("p50", 50), ("p95", 95), ("p99", 99)):
        out[name] = round(percentile(values, p) * scale, digits)  # type: ignore[operator]
    out["max"] = round(max(values) * scale, digits)
    out["min"] = round(min(values) * scale, digits)
    return out


class LoopLag:
    """Measures the load generator's own event-loop lag (how late a 5 ms sleep wakes up).

    A large lag means the client's receive stamps are late: the measurement is the bottleneck.
    """

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = now()
            await asyncio.sleep(self.period)
            self.lags.append(now() - start - self.period)

    def start(self) -> None:
        self.lags = []
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return summary(self.lags)


class StampedConnection(ClientConnection):
    """A client connection that stamps each message when its bytes arrive.

    The stamp is taken in ``data_received`` (when the loop hands the socket's bytes to the
    protocol), not when the caller's task gets to ``recv()``: in the burst profile a hundred
    frames arrive in the same instant, and the task that reads the hundredth runs after the
    ninety-nine others were decoded; that wait is the load generator's, not the relay's.
    Every ConversationRelay message is one frame, so the stamps pair with ``recv()`` in order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrivals: deque[float] = deque()
        self._at = 0.0

    def data_received(self, data: bytes) -> None:
        self._at = now()
        super().data_received(data)

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.fin and event.opcode in _DATA:
            self.arrivals.append(self._at)
        super().process_event(event)


_DATA = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


@dataclass
class TurnResult:
    call: int
    turn: int
    tag: str
    sent_at: float  # just before the final prompt was handed to the socket
    first_at: float | None = None  # first non-empty text frame received
    last_at: float | None = None  # the closing {"token":"","last":true} received
    tokens: int = 0
    token_delays: list[float] = field(default_factory=list)  # recv - fake write stamp (s)
    wrong: int = 0  # tokens of another call/turn (cross-talk), should be 0
    error: str | None = None


@dataclass
class BargeResult:
    call: int
    turn: int
    tag: str
    sent_at: float
    int_before: float = 0.0  # just before ws.send(interrupt)
    int_after: float = 0.0  # ws.send returned: on loopback the frame is in the relay's socket
    tokens_before: int = 0  # tokens received before the interrupt was sent
    last_at: float | None = None
    # (received at, fake write time, k) of every non-empty token received after int_before
    late: list[tuple[float, float, int]] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # frames after last:true (quiet window)
    max_k_before: int = -1
    error: str | None = None


class Caller:
    """One call: a signed WebSocket to the relay that speaks ConversationRelay.

    It speaks through the protocol's Twilio side (frames encoded and checked as Twilio would).
    """

    def __init__(self, index: int, ws_url: str, signature: str, deflate: bool = False) -> None:
        self.index = index
        self.call_sid = f"CA{index:032d}"
        self.ws_url = ws_url
        self.signature = signature
        self.deflate = deflate
        self.ws: Any = None
        self.side = TwilioSide()

    async def connect(self) -> None:
        self.ws = await websockets.connect(
            self.ws_url,
            additional_headers={"X-Twilio-Signature": self.signature},
            user_agent_header="Jetty/11.0.24",
            compression="deflate" if self.deflate else None,
            proxy=None,
            open_timeout=15,
            ping_interval=None,
            max_size=None,
            max_queue=None,
            create_connection=StampedConnection,
        )
        self.side.send_setup(setup_for(self.call_sid))
        await self.flush()

    async def flush(self) -> None:
        """Write what the Twilio side queued."""
        for frame in self.side.data_to_send():
            await self.ws.send(frame)

    # ``timeout`` in recv, turn and barge_in: a timeout is a measured outcome, recorded in the
    # result while the run goes on, not an error to cancel from outside (ASYNC109).
    async def recv(self, timeout: float) -> tuple[float, Outbound]:  # noqa: ASYNC109
        """The next valid frame and when its bytes arrived (see :class:`StampedConnection`)."""
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            at = self.ws.arrivals.popleft()
            self.side.receive_data(raw)
            self.side.events_received()
            self.side.data_to_send()  # a 64107 answer would skew the relay's figures: not sent
            messages = self.side.messages_received()
            if messages:
                return at, messages[0]

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(1000, CLOSE_REASON), 5)

    # ------------------------------------------------------------------------- scenarios
    async def turn(self, turn: int, tag: str, timeout: float = 15.0) -> TurnResult:  # noqa: ASYNC109
        """Send a final prompt; read the reply up to last:true."""
        res = TurnResult(self.index, turn, tag, now())
        self.side.send_prompt(tag)
        await self.flush()
        try:
            while True:
                at, frame = await self.recv(timeout)
                if not isinstance(frame, Text):
                    continue
                token = frame.token
                if token:
                    if res.first_at is None:
                        res.first_at = at
                    # a frame may carry several tokens (a relay forwards one network read
                    # whole): each counts, and each is checked and timed
                    marks = list(TOKEN_RE.finditer(token))
                    res.tokens += max(1, len(marks))
                    for m in marks:
                        if int(m[1]) != self.index or int(m[2]) != turn:
                            res.wrong += 1
                        res.token_delays.append(at - int(m[4]) / 1e9)
                if frame.last:
                    res.last_at = at
                    return res
        except Exception as exc:  # timeout or socket closed: recorded, the run goes on
            res.error = f"{type(exc).__name__}: {exc}"
            return res

    async def barge_in(
        self,
        turn: int,
        tag: str,
        after_tokens: int,
        quiet: float,
        timeout: float = 15.0,  # noqa: ASYNC109
    ) -> BargeResult:
        """Send a prompt for a long reply and interrupt it after ``after_tokens`` tokens.

        Then read to last:true, and listen ``quiet`` s for anything more.
        """
        res = BargeResult(self.index, turn, tag, now())
        self.side.send_prompt(tag)
        await self.flush()
        heard: list[str] = []
        try:
            while res.tokens_before < after_tokens:
                at, frame = await self.recv(timeout)
                is_text = isinstance(frame, Text)
                token = frame.token if isinstance(frame, Text) else ""
                if token:
                    marks = list(TOKEN_RE.finditer(token))
                    res.tokens_before += max(1, len(marks))
                    heard.append(token)
                    if marks:
                        res.max_k_before = int(marks[-1][3])
                if is_text and frame.last:  # type: ignore[union-attr]
                    res.error = "reply ended before the interrupt"
                    return res
            self.side.send_interrupt("".join(heard[: max(1, len(heard) // 2)]), 500)
            (data,) = self.side.data_to_send()
            res.int_before = now()
            await self.ws.send(data)
            res.int_after = now()
            while True:
                at, frame = await self.recv(timeout)
                if not isinstance(frame, Text):
                    continue
                token = frame.token
                if token:
                    marks = list(TOKEN_RE.finditer(token))  # every token of the frame
                    for m in marks:
                        res.late.append((at, int(m[4]) / 1e9, int(m[3])))
                    if not marks:
                        res.late.append((at, float("nan"), -1))
                if frame.last:
                    res.last_at = at
                    break
            deadline = now() + quiet
            while (left := deadline - now()) > 0:
                try:
                    _, stray = await self.recv(left)
                except TimeoutError:
                    break
                res.stray.append(encode(stray)[:200])
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        return res


def setup_for(call_sid: str) -> SentSetup:
    """A setup frame shaped like the captured one (Twilio docs: WebSocket messages)."""
    return SentSetup.inbound(call_sid)


def bench_tag(
    call: int,
    turn: int,
    n: int,
    rng: random.Random,
    ttft: tuple[float, float],
    delay: tuple[float, float],
    tick: float = 0.0,
) -> str:
    """The prompt text that scripts the fake LLM's reply (see bench/fake_server.py).

    ``tick`` > 0: the fake writes every token on its shared clock (the burst profile).
    """
    tag = f"bench c={call} t={turn} n={n} ttft={rng.uniform(*ttft):.4f} d={rng.uniform(*delay):.4f}"
    return f"{tag} tick={tick:.4f}" if tick > 0 else tag
