"""One-time socket URLs (relay_server.socket_tokens): the token format and the replay set.

Also `crctl call` against a real relay: the first handshake opens the call, the same one again opens
nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import replace
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from crctl.caller import CallError, SimulatedCaller
from relay_server.socket_tokens import (
    MemoryLedger,
    SocketTokens,
    Ticket,
    TokenRefused,
    secret_from_auth_token,
)
from relay_server.state import socket_tokens
from tests.support import AUTH_TOKEN, PUBLIC_URL, config

CALL = "CA" + "1" * 32
OTHER = "CA" + "2" * 32
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def query_of(url: str) -> str:
    return urlsplit(url).query


# ---------------------------------------------------------------------------- the token
def test_a_minted_url_carries_the_call_and_a_token_that_checks():
    tokens = SocketTokens(b"secret", clock=Clock())
    url = tokens.url("wss://relay.example.test/ws", CALL)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "wss://relay.example.test/ws"
    params = parse_qs(parts.query)
    assert params["callSid"] == [CALL]
    expires, nonce, mac = params["token"][0].split(".")
    assert int(expires) == NOW + 90
    # the documented construction: HMAC-SHA256 over "<expires>\n<nonce>\n<callSid>"
    digest = hmac.new(b"secret", f"{expires}\n{nonce}\n{CALL}".encode(), hashlib.sha256)
    assert mac == base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    ticket = tokens.check(parts.query)
    assert (ticket.call_sid, ticket.expires) == (CALL, NOW + 90)
    # a query already in the URL is kept
    assert tokens.url("wss://relay.example.test/ws?a=b", CALL).startswith(
        "wss://relay.example.test/ws?a=b&callSid="
    )


def test_every_mint_is_a_new_token():
    tokens = SocketTokens(b"secret", clock=Clock())
    assert tokens.mint(CALL) != tokens.mint(CALL)


@pytest.mark.parametrize(
    "change",
    [
        lambda q: q.replace(CALL, OTHER),  # the token of another call
        lambda q: q[:-1] + ("A" if q[-1] != "A" else "B"),  # the MAC changed
        lambda q: q.replace("token=18", "token=19"),  # the expiry moved
    ],
    ids=["call", "mac", "expiry"],
)
def test_a_changed_token_is_refused(change):
    tokens = SocketTokens(b"secret", clock=Clock())
    query = query_of(tokens.url("wss://r/ws", CALL))
    with pytest.raises(TokenRefused, match="bad socket token"):
        tokens.check(change(query))


def test_another_secret_is_refused_and_the_derived_one_hides_the_auth_token():
    clock = Clock()
    query = query_of(SocketTokens(b"one", clock=clock).url("wss://r/ws", CALL))
    with pytest.raises(TokenRefused, match="CRCTL_SOCKET_SECRET must be the same"):
        SocketTokens(b"two", clock=clock).check(query)
    derived = secret_from_auth_token(AUTH_TOKEN)
    assert AUTH_TOKEN.encode() not in derived and len(derived) == 32


@pytest.mark.parametrize(
    "query",
    ["", f"callSid={CALL}", "token=1.abcdefgh." + "A" * 43, f"callSid={CALL}&token=1.x.y"],
)
def test_missing_or_malformed_tokens_are_refused(query):
    with pytest.raises(TokenRefused):
        SocketTokens(b"secret").check(query)


def test_a_token_expires_after_its_lifetime_and_may_not_claim_a_longer_one():
    clock = Clock()
    tokens = SocketTokens(b"secret", lifetime=60, clock=clock)
    query = query_of(tokens.url("wss://r/ws", CALL))
    clock.now += 59
    tokens.check(query)
    clock.now += 1
    with pytest.raises(TokenRefused, match="expired"):
        tokens.check(query)
    # a minter with a far longer lifetime (same secret) is held to this relay's lifetime
    long = query_of(SocketTokens(b"secret", lifetime=3600, clock=clock).url("wss://r/ws", CALL))
    with pytest.raises(TokenRefused, match="expires too late"):
        tokens.check(long)


# -------------------------------------------------------------------------- replay set
def test_a_token_opens_once_unless_its_socket_dropped():
    tokens = SocketTokens(b"secret", clock=Clock())
    query = query_of(tokens.url("wss://r/ws", CALL))
    ticket = tokens.open(query)
    with pytest.raises(TokenRefused, match="in use by an open socket"):
        tokens.open(query)
    tokens.ledger.close(ticket, reusable=True)  # dropped: applicationReconnect may reopen it
    ticket = tokens.open(query)
    tokens.ledger.close(ticket, reusable=False)  # hang-up or end: spent
    with pytest.raises(TokenRefused, match="already used"):
        tokens.open(query)


def test_a_spent_token_respelt_opens_nothing():
    """The expiry has one spelling, so a leading zero cannot reopen a spent URL.

    A leading zero (same number, same MAC) would otherwise be a new key in the replay set and reopen
    a spent URL.
    """
    tokens = SocketTokens(b"secret", clock=Clock())
    query = query_of(tokens.url("wss://r/ws", CALL))
    tokens.ledger.close(tokens.open(query), reusable=False)
    respelt = query.replace("token=", "token=0", 1)
    with pytest.raises(TokenRefused, match="malformed socket token"):
        tokens.open(respelt)


def test_a_call_sid_that_is_not_letters_and_digits_is_malformed():
    """Nothing but a CallSid's letters and digits reaches the refusal log lines."""
    tokens = SocketTokens(b"secret", clock=Clock())
    forged = "CA1\nrefused WebSocket from 10.0.0.1: forged line"
    query = query_of(tokens.url("wss://r/ws", CALL)).replace(
        f"callSid={CALL}", "callSid=" + quote(forged)
    )
    with pytest.raises(TokenRefused, match=r"^malformed socket token$"):
        tokens.check(query)


def test_the_end_of_a_call_spends_all_its_tokens_only():
    tokens = SocketTokens(b"secret", clock=Clock())
    mine, other = (query_of(tokens.url("wss://r/ws", sid)) for sid in (CALL, OTHER))
    for query in (mine, other):
        tokens.ledger.close(tokens.open(query), reusable=True)
    tokens.ledger.end_call(CALL)
    with pytest.raises(TokenRefused, match="already used"):
        tokens.open(mine)
    tokens.open(other)


def test_the_replay_set_is_bounded_and_forgets_at_expiry():
    clock = Clock()
    ledger = MemoryLedger(max_entries=2, clock=clock)

    def ticket(n: int, lifetime: float) -> Ticket:
        return Ticket(CALL, f"token-{n}", clock.now + lifetime)

    assert ledger.open(ticket(1, 10)) is None
    assert ledger.open(ticket(2, 20)) is None
    # full of unexpired tokens: a new socket is refused rather than an old token forgotten
    assert "replay set is full" in (ledger.open(ticket(3, 20)) or "")
    clock.now += 10  # the first expires (its token no longer checks either)
    assert ledger.open(ticket(3, 20)) is None
    assert len(ledger) == 2
    clock.now += 30
    assert ledger.open(ticket(4, 20)) is None
    assert len(ledger) == 1


def test_the_relays_key_is_the_socket_secret_else_derived_else_per_process():
    base = config()
    clock_query = query_of(SocketTokens(b"dedicated").url("wss://r/ws", CALL))
    socket_tokens(replace(base, socket_secret="dedicated")).check(clock_query)
    derived = query_of(SocketTokens(secret_from_auth_token(AUTH_TOKEN)).url("wss://r/ws", CALL))
    socket_tokens(base).check(derived)
    unsigned = replace(base, auth_token=None)
    with pytest.raises(TokenRefused, match="bad socket token"):
        socket_tokens(unsigned).check(derived)
    own = socket_tokens(unsigned)
    own.check(query_of(own.url("wss://r/ws", CALL)))


# ----------------------------------------------------------------- crctl call, for real
async def said(caller: SimulatedCaller, text: str) -> str:
    reply = await caller.say(text)
    assert reply is not None
    assert await caller.finished(reply, 10)  # a guard against a hang, not a measure
    return reply.text


async def test_crctl_call_is_accepted_once_and_its_replayed_handshake_refused(relay_factory):
    relay = relay_factory(agent="echo")
    caller = SimulatedCaller(relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    plan = await caller.fetch()  # /twiml, then the socket URL it names, signed over it
    await caller.connect(plan)
    assert query_of(plan.ws_url).startswith(f"callSid={caller.call_sid}&token=")
    assert query_of(plan.connect_url) == query_of(plan.ws_url)
    assert await said(caller, "hello") == "You said: hello"

    # The same handshake again (same URL, same signature): while the call is up...
    replay = SimulatedCaller(relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    replay.call_sid = caller.call_sid
    with pytest.raises(CallError, match=r"HTTP 403\): this socket URL is used"):
        await replay.connect(plan)
    # ... and after it
    await caller.hangup()
    with pytest.raises(CallError, match=r"HTTP 403\): this socket URL is used"):
        await replay.connect(plan)
    # a new call gets a new URL and is accepted
    fresh = SimulatedCaller(relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL)
    await fresh.connect(await fresh.fetch())
    assert await said(fresh, "again") == "You said: again"
    await fresh.hangup()
