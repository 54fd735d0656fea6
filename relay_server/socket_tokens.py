r"""One-time socket URLs: each call gets its own ``/ws`` URL, accepted once.

Twilio's request signature has no nonce (Twilio docs: webhook security), so a captured
handshake of a plain ``/ws`` would open sockets for as long as the auth token lives. ``/twiml``
(and ``/action`` on a reconnect) therefore puts a short-lived token minted for the call's
CallSid into the socket URL's query string, which Twilio signs along with the URL::

    wss://relay.example.com/ws?callSid=CA…&token=<expires>.<nonce>.<mac>

``expires`` is a Unix time in whole seconds, ``nonce`` 16 random base64url characters, ``mac``
the unpadded base64url HMAC-SHA256 of ``"<expires>\n<nonce>\n<callSid>"`` under the socket
secret. Checking it needs nothing but the secret (so any relay replica can); accepting it once
needs a small :class:`TokenLedger` of the tokens seen, whose entries go at their expiry.

The exported Serverless functions (``twiml_templates.serverless``) mint the same tokens with
Node's crypto from ``CRCTL_SOCKET_SECRET``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlencode

from relay_server.errors import RelayError

#: Seconds a minted URL may be used for: Twilio connects within a second or two of fetching the
#: TwiML; the rest is slack for slow networks and clock differences with a Serverless minter.
TOKEN_LIFETIME = 90.0
#: How far in the future an expiry may lie beyond the lifetime (another minter's clock).
CLOCK_SKEW = 30.0
#: Query parameters of the socket URL.
CALL_PARAM, TOKEN_PARAM = "callSid", "token"
#: The replay set refuses new sockets rather than forget unexpired tokens beyond this many.
MAX_LEDGER_ENTRIES = 100_000

#: The expiry has no leading zero: one token, one spelling (the replay set keys on the text).
_CALL_SID = re.compile(r"[A-Za-z0-9]{1,64}")
_TOKEN = re.compile(r"(0|[1-9][0-9]{0,11})\.([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{43})")
_KDF_LABEL = b"crctl socket token v1"


def secret_from_auth_token(auth_token: str) -> bytes:
    """The socket secret derived from Twilio's auth token.

    Used when no ``CRCTL_SOCKET_SECRET`` is set: a token in a URL reveals nothing of the auth
    token.
    """
    return hmac.new(auth_token.encode(), _KDF_LABEL, hashlib.sha256).digest()


def _mac(secret: bytes, expires: int, nonce: str, call_sid: str) -> str:
    digest = hmac.new(secret, f"{expires}\n{nonce}\n{call_sid}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


class TokenRefused(RelayError):
    """Why a socket URL opens nothing (one line, for the log)."""


@dataclass(frozen=True)
class Ticket:
    """A checked token: the call it was minted for, and when it stops being valid."""

    call_sid: str
    token: str
    expires: float


class TokenLedger(Protocol):
    """The replay set: which tokens have opened a socket.

    In process today (:class:`MemoryLedger`); shared state across replicas can take its place.
    """

    def open(self, ticket: Ticket) -> str | None:
        """Mark ``ticket`` in use; ``None`` if it may open a socket, else why not."""

    def close(self, ticket: Ticket, *, reusable: bool) -> None:
        """Its socket is gone.

        ``reusable``: it dropped (not closed by a hang-up or ``end``), so the same URL may
        connect again until the token expires.
        """

    def end_call(self, call_sid: str) -> None:
        """The call's session is over: none of its tokens opens anything any more.

        Called on ``/action``, or when ``/status`` says the call ended.
        """


class SharedLedger(Protocol):
    """The replay set the replicas share (``--redis-url``: ``cluster.ledger.RedisLedger``).

    Consulted after this process's own :class:`TokenLedger`; it contains its own faults (a
    shared set that cannot answer says ``None``: the process's own set decided).
    """

    async def open(self, ticket: Ticket) -> str | None:
        """Mark ``ticket`` in use; ``None`` if it may open a socket, else why not."""

    async def close(self, ticket: Ticket, *, reusable: bool) -> None:
        """Its socket is gone (as :meth:`TokenLedger.close`)."""

    async def end_call(self, call_sid: str) -> None:
        """The call's session is over (as :meth:`TokenLedger.end_call`)."""


class MemoryLedger:
    """:class:`TokenLedger` in this process: bounded, entries dropped at their expiry."""

    _OPEN, _DROPPED, _SPENT = "open", "dropped", "spent"

    def __init__(
        self, max_entries: int = MAX_LEDGER_ENTRIES, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[str, str, float]] = {}  # token: (call, state, expires)

    def __len__(self) -> int:
        return len(self._entries)

    def open(self, ticket: Ticket) -> str | None:
        """Mark the token open; the reason it may not open, or ``None``."""
        entry = self._entries.get(ticket.token)
        if entry is None:
            self._expire()
            if len(self._entries) >= self.max_entries:
                return f"the replay set is full ({self.max_entries} unexpired tokens)"
        elif entry[1] == self._OPEN:
            return "already in use by an open socket"
        elif entry[1] == self._SPENT:
            return "already used (a replayed handshake?)"
        self._entries[ticket.token] = (ticket.call_sid, self._OPEN, ticket.expires)
        return None

    def close(self, ticket: Ticket, *, reusable: bool) -> None:
        """Mark an open token dropped (``reusable``) or spent."""
        entry = self._entries.get(ticket.token)
        if entry is not None and entry[1] == self._OPEN:
            state = self._DROPPED if reusable else self._SPENT
            self._entries[ticket.token] = (entry[0], state, entry[2])

    def end_call(self, call_sid: str) -> None:
        """Spend every token of the call."""
        for token, (sid, _, expires) in list(self._entries.items()):
            if sid == call_sid:
                self._entries[token] = (sid, self._SPENT, expires)

    def _expire(self) -> None:
        now = self.clock()
        for token in [t for t, (_, _, expires) in self._entries.items() if expires <= now]:
            del self._entries[token]


class SocketTokens:
    """Mints and checks the per-call socket tokens for one secret."""

    def __init__(
        self,
        secret: bytes,
        *,
        lifetime: float = TOKEN_LIFETIME,
        ledger: TokenLedger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret
        self.lifetime = lifetime
        self.ledger: TokenLedger = ledger if ledger is not None else MemoryLedger(clock=clock)
        #: The replicas' shared replay set, if any (set by the app with ``--redis-url``).
        self.shared: SharedLedger | None = None
        self.clock = clock

    @classmethod
    def random(cls, **kwargs: object) -> SocketTokens:
        """With a secret of this process only (tokens die with it)."""
        return cls(secrets.token_bytes(32), **kwargs)  # type: ignore[arg-type]

    def mint(self, call_sid: str) -> str:
        """A new token for ``call_sid``, valid for :attr:`lifetime` seconds."""
        expires = int(self.clock() + self.lifetime + 0.999)
        nonce = secrets.token_urlsafe(12)
        return f"{expires}.{nonce}.{_mac(self._secret, expires, nonce, call_sid)}"

    def url(self, ws_url: str, call_sid: str) -> str:
        """``ws_url`` with this call's one-time query (``callSid`` and ``token``)."""
        query = urlencode({CALL_PARAM: call_sid, TOKEN_PARAM: self.mint(call_sid)})
        return f"{ws_url}{'&' if '?' in ws_url else '?'}{query}"

    def check(self, query: str) -> Ticket:
        """The :class:`Ticket` of a socket URL's query string; raises :class:`TokenRefused`.

        Checks the token only: :meth:`open` claims it.
        """
        params = dict(parse_qsl(query, keep_blank_values=True))
        call_sid, token = params.get(CALL_PARAM), params.get(TOKEN_PARAM)
        if not token or not call_sid:
            raise TokenRefused(
                "no socket token in the URL (use the URL in the TwiML from /twiml: each call "
                "gets its own)"
            )
        match = _TOKEN.fullmatch(token)
        if match is None or _CALL_SID.fullmatch(call_sid) is None:
            # (a CallSid is letters and digits: nothing else reaches the log lines below)
            raise TokenRefused("malformed socket token")
        expires, nonce, mac = int(match[1]), match[2], match[3]
        if not hmac.compare_digest(mac, _mac(self._secret, expires, nonce, call_sid)):
            raise TokenRefused(
                f"bad socket token for call {call_sid} (minted with another secret: "
                "CRCTL_SOCKET_SECRET must be the same wherever the TwiML is made)"
            )
        now = self.clock()
        if expires <= now:
            raise TokenRefused(f"socket token of call {call_sid} expired {now - expires:.0f} s ago")
        if expires > now + self.lifetime + CLOCK_SKEW:
            raise TokenRefused(
                f"socket token of call {call_sid} expires too late "
                f"({expires - now:.0f} s from now; at most {self.lifetime:.0f} s)"
            )
        return Ticket(call_sid, token, float(expires))

    def open(self, query: str) -> Ticket:
        """:meth:`check`, then claim the token in the replay set.

        Raises :class:`TokenRefused` if it is in use or used.
        """
        ticket = self.check(query)
        why = self.ledger.open(ticket)
        if why is not None:
            raise TokenRefused(f"socket token of call {ticket.call_sid}: {why}")
        return ticket

    async def claim(self, query: str) -> Ticket:
        """:meth:`open`, then claim the token in the replicas' shared replay set, if any.

        Raises :class:`TokenRefused` if it is in use or used here or on another replica.
        """
        ticket = self.open(query)
        if self.shared is not None:
            why = await self.shared.open(ticket)
            if why is not None:
                self.ledger.close(ticket, reusable="in use" in why)  # undo the local claim
                raise TokenRefused(f"socket token of call {ticket.call_sid}: {why}")
        return ticket

    async def release(self, ticket: Ticket, *, reusable: bool) -> None:
        """The ticket's socket closed: tell the replay set(s) (see :meth:`TokenLedger.close`)."""
        self.ledger.close(ticket, reusable=reusable)
        if self.shared is not None:
            await self.shared.close(ticket, reusable=reusable)

    async def end_call(self, call_sid: str) -> None:
        """The call's session is over: none of its tokens opens anything, on any replica."""
        self.ledger.end_call(call_sid)
        if self.shared is not None:
            await self.shared.end_call(call_sid)
