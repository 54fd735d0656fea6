"""The socket tokens' replay set in Redis: a token accepted on one replica opens nothing on another.

``crctl:token:<token>`` is ``open <replica>``, ``dropped`` or ``spent``, expiring with the token;
``crctl:tokens:<callSid>`` lists the call's tokens, so ending the call spends them all. The rules
are those of the in-process :class:`~relay_server.socket_tokens.MemoryLedger`, cluster-wide: a
token opens one socket at a time; a socket that dropped may reopen its URL (Twilio's
``applicationReconnect``), on any replica; a hang-up (1000), ``end`` or ``/action`` spends it.
A token held ``open`` by a replica that is no longer alive (its ``crctl:replica:<id>`` key lapsed,
see ``directory``) counts as dropped: that socket died with its replica.

Redis down: sockets are still accepted, checked against this replica's own replay set. A
demanding user keeps taking calls through a Redis outage; what is lost for that time is only
the cluster-wide part of the replay check, for tokens that are bound by their HMAC to one
CallSid, valid for 90 s and signed by Twilio with the URL. The outage is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from relay_server.cluster import Cluster, Outage
from relay_server.socket_tokens import Ticket

log = logging.getLogger("relay_server.cluster")

#: Seconds a socket's upgrade may wait for the shared replay set.
TIMEOUT = 1.0

#: KEYS: token, call's token list; ARGV: this replica, seconds to expiry, alive-key prefix.
_OPEN = """
local v = redis.call('GET', KEYS[1])
if v == 'spent' then return 'spent' end
if v and string.sub(v, 1, 5) == 'open ' then
  local holder = string.sub(v, 6)
  if holder ~= ARGV[1] and redis.call('EXISTS', ARGV[3] .. holder) == 1 then return 'open' end
end
redis.call('SET', KEYS[1], 'open ' .. ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return 'ok'
"""
#: KEYS: token; ARGV: this replica, the new state.
_CLOSE = """
if redis.call('GET', KEYS[1]) == 'open ' .. ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 0
"""
#: KEYS: the call's token list.
_END = """
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', key) == 1 then redis.call('SET', key, 'spent', 'KEEPTTL') end
end
redis.call('DEL', KEYS[1])
return 0
"""

_WHY = {
    "spent": "already used (a replayed handshake?)",
    "open": "already in use by an open socket on another replica",
}


class RedisLedger:
    """The replicas' shared replay set (:class:`~relay_server.socket_tokens.SharedLedger`)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._scripts: dict[str, Any] = {}
        self.outage = Outage(
            cluster, "socket URLs", "sockets are accepted on this replica's own replay check"
        )

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.cluster.redis.register_script(source)
        return script

    async def open(self, ticket: Ticket) -> str | None:
        """Mark the token open on this replica; why it may not open, or ``None``."""
        ttl = max(1, math.ceil(ticket.expires - time.time()))
        keys = [Cluster.key("token", ticket.token), Cluster.key("tokens", ticket.call_sid)]
        args = [self.cluster.replica, ttl, Cluster.key("replica", "")]
        verdict = await self._run(_OPEN, keys, args)
        if verdict is None:
            return None  # Redis away: this replica's own replay set decided (module docstring)
        text = verdict.decode() if isinstance(verdict, bytes) else str(verdict)
        return _WHY.get(text)

    async def close(self, ticket: Ticket, *, reusable: bool) -> None:
        """The token's socket closed here: dropped (``reusable``) or spent."""
        state = "dropped" if reusable else "spent"
        await self._run(_CLOSE, [Cluster.key("token", ticket.token)], [self.cluster.replica, state])

    async def end_call(self, call_sid: str) -> None:
        """Spend every token of the call, on every replica."""
        await self._run(_END, [Cluster.key("tokens", call_sid)], [])

    async def _run(self, source: str, keys: list[str], args: list[Any]) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT):
                result = await self._script(source)(keys=keys, args=args)
        except Exception as exc:  # redis' ConnectionError, TimeoutError, ResponseError…
            self.outage.failed(exc)
            return None
        self.outage.answered()
        return result if result is not None else b""
