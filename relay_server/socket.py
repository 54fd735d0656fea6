"""The ConversationRelay socket (``/ws``) as a lean ASGI handler inside the Quart app.

The HTTP endpoints are Quart routes; the call socket is mounted in front of them as ASGI
middleware of the same app (``app.asgi_app``, Quart's documented hook). Quart's own WebSocket
layer gives every socket two extra tasks, a queue, a request context and a signal per frame:
at 200 calls that was ~10 KiB per idle call and a large share of the per-token CPU (bench/).
This handler does only what the relay needs: check the signature, accept, move frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from relay_server.calls import CallConnection
from relay_server.protocol import ProtocolError, Setup, decode
from relay_server.session import SessionLink
from relay_server.socket_tokens import Ticket, TokenRefused
from relay_server.state import RelayState

log = logging.getLogger("relay_server.socket")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

#: Seconds from the upgrade to the ``setup`` message: Twilio sends it at once (Twilio docs:
#: WebSocket messages); a socket still without one is closed (code 1008), or idle sockets
#: would hold a descriptor and memory each, for ever.
SETUP_TIMEOUT = 10.0
SETUP_TIMEOUT_CODE = 1008  # policy violation (RFC 6455)


class RelaySocket:
    """ASGI middleware: ``/ws`` WebSocket scopes go to the relay, everything else to ``app``."""

    #: Seconds a socket may stay open without sending ``setup`` (read at each upgrade).
    setup_timeout: float = SETUP_TIMEOUT

    def __init__(self, app: ASGIApp, state: RelayState, *, path: str = "/ws") -> None:
        self.app = app
        self.state = state
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve a ConversationRelay socket at ``path``; pass any other scope to ``app``."""
        if scope["type"] != "websocket" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        peer = (scope.get("client") or ("?",))[0]
        if self.state.drain.active:
            log.info("refused WebSocket from %s: this relay is draining (stopping)", peer)
            await _refuse(scope, send, b"draining: this relay is stopping\n", status=503)
            return
        if _from_browser(scope, peer) or not self._signed(scope, peer):
            await _refuse(scope, send)
            return
        ticket = await self._ticket(scope, peer)
        if ticket is None:
            await _refuse(scope, send, _SPENT_URL)
            return
        await send({"type": "websocket.accept"})
        # The upgrade's headers are checked and read by nothing else on this socket: the
        # server's copy would stay for the whole call (about 1 KiB per idle call, bench/).
        scope["headers"] = []
        # Until setup, frames pass the gate (the call's setup must match the token); after it,
        # the frame loop reads the socket directly.
        gate = _CallGate(ticket, receive, send, peer, self.state.config.max_frame_bytes)

        def send_frame(frame: str) -> Awaitable[None]:
            # A plain function handing back the server's own awaitable: no coroutine of its
            # own per token.
            return send({"type": "websocket.send", "text": frame})

        state = self.state
        link = SessionLink(send_frame, state.bus, state.config, state.services)
        conn = CallConnection(state.registry, state.agent, link, peer)
        code: int | None = None
        state.drain.track(conn, send)
        try:
            if not await self._until_setup(conn, gate, send, peer):
                return
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    await conn.receive(text if text is not None else message.get("bytes") or b"")
                elif kind == "websocket.disconnect":
                    code = message.get("code")
                    break
        finally:  # hang-up, server shutdown or cancellation: the session always closes
            # 1000: Twilio closes so on hang-up and after `end` (Twilio docs: WebSocket
            # messages): the session is over and its URL opens nothing more.
            try:
                await conn.close(code)
            finally:  # (after the conversation is kept: a reopened URL finds it)
                state.drain.untrack(conn)
                reusable = gate.reusable and code != 1000
                await self.state.tokens.release(ticket, reusable=reusable)

    async def _until_setup(
        self, conn: CallConnection, receive: Receive, send: Send, peer: str
    ) -> bool:
        """Frames up to ``setup``, within :attr:`setup_timeout` of the upgrade.

        Frames before it do not extend it. False: the socket closed, or was closed for want of
        a setup.
        """
        deadline = asyncio.get_running_loop().time() + self.setup_timeout
        while not conn.started:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                log.warning(
                    "closed WebSocket from %s: no setup message within %g s of the upgrade "
                    "(Twilio sends it at once; a client that sends nothing is not Twilio)",
                    peer,
                    self.setup_timeout,
                )
                reason = f"no setup message within {self.setup_timeout:g} s"
                await send(
                    {"type": "websocket.close", "code": SETUP_TIMEOUT_CODE, "reason": reason}
                )
                return False
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                await conn.receive(text if text is not None else message.get("bytes") or b"")
            elif kind == "websocket.disconnect":
                return False
        return True

    async def _ticket(self, scope: Scope, peer: str) -> Ticket | None:
        """The call's one-time token from the URL, claimed; ``None`` (logged) if refused.

        Claimed in the replicas' shared replay set too, with ``--redis-url``.
        """
        query = (scope.get("query_string") or b"").decode("latin-1")
        try:
            return await self.state.tokens.claim(query)
        except TokenRefused as exc:
            log.warning("refused WebSocket from %s: %s", peer, exc)
            return None

    def _signed(self, scope: Scope, peer: str) -> bool:
        checker = self.state.checker
        if checker is None:
            return True
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"localhost").decode("latin-1")
        signed_url = self.state.config.websocket_url(f"http://{host}")
        query = scope.get("query_string") or b""
        if query:
            signed_url += "?" + query.decode("latin-1")
        signature = headers.get(b"x-twilio-signature", b"").decode("latin-1") or None
        if checker.websocket_ok(signed_url, signature):
            return True
        log.warning(
            "refused WebSocket from %s: bad or missing X-Twilio-Signature (checked %s)",
            peer,
            signed_url,
        )
        return False


def _from_browser(scope: Scope, peer: str) -> bool:
    """Whether the upgrade carries an ``Origin`` header, i.e. a web page opened it.

    Browsers always send ``Origin`` on a WebSocket upgrade and Twilio's handshake has none (what
    real calls show). Without signature checks (the 127.0.0.1 mode) any page the developer
    opens could otherwise reach /ws and spend the LLM key. Refused with signature checks on as
    well: one rule, said plainly in the log, that costs Twilio nothing.
    """
    for name, value in scope.get("headers") or ():
        if name == b"origin":
            log.warning(
                "refused WebSocket from %s: it has an Origin header (%r), so a web page opened "
                "it; Twilio sends none and /ws is for Twilio only. To call the relay yourself "
                "use `crctl call`, or a client that sends no Origin header",
                peer,
                value.decode("latin-1")[:200],
            )
            return True
    return False


class _CallGate:
    """The socket's ``receive`` until ``setup``, bound to the call its token was minted for.

    A ``setup`` for another callSid closes the socket (1008) and reads as a disconnect.
    Remembers whether the socket may reopen its URL, for the replay set.
    """

    __slots__ = ("_receive", "_send", "max_bytes", "peer", "reusable", "ticket")

    def __init__(
        self, ticket: Ticket, receive: Receive, send: Send, peer: str, max_bytes: int
    ) -> None:
        self.ticket, self._receive, self._send = ticket, receive, send
        self.peer, self.max_bytes = peer, max_bytes
        self.reusable = True  # not closed with 1000 before setup, nor for another call

    async def __call__(self) -> MutableMapping[str, Any]:
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.reusable = self.reusable and message.get("code") != 1000
        elif message["type"] == "websocket.receive":
            text = message.get("text")
            raw = text if text is not None else message.get("bytes") or b""
            try:
                frame = decode(raw, max_bytes=self.max_bytes)
            except ProtocolError:
                return message  # the frame loop says what is wrong with it
            if isinstance(frame, Setup) and frame.call_sid != self.ticket.call_sid:
                return await self._mismatch(frame.call_sid)
        return message

    async def _mismatch(self, call_sid: str) -> MutableMapping[str, Any]:
        log.warning(
            "closed WebSocket from %s: its setup is for call %s but the socket URL was minted "
            "for call %s",
            self.peer,
            call_sid if call_sid.isalnum() else repr(call_sid[:64]),  # no forged log lines
            self.ticket.call_sid,
        )
        self.reusable = False
        reason = "setup callSid does not match the socket URL"
        await self._send({"type": "websocket.close", "code": 1008, "reason": reason})
        return {"type": "websocket.disconnect", "code": 1008}


_SPENT_URL = (
    b"forbidden: this socket URL is used, expired or not minted for a call "
    b"(each call gets its own from /twiml)\n"
)


async def _refuse(
    scope: Scope, send: Send, body: bytes = b"forbidden\n", status: int = 403
) -> None:
    """Refuse the upgrade with HTTP ``status`` where the server can (else close unaccepted)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})
