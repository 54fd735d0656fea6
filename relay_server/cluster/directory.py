"""The live-call directory: which replica holds each call's socket.

``crctl:call:<callSid>`` holds the id of the replica whose socket serves the call, and
``crctl:replica:<id>`` says that replica is alive. Both expire after :data:`TTL` seconds unless
the replica's heartbeat (every :data:`BEAT` seconds) renews them, so the calls of a replica that
died (SIGKILL, a lost host) leave the directory by themselves.

The call path never waits for Redis: :meth:`Directory.add` and :meth:`Directory.remove` only
note the change and wake the heartbeat task, which writes it. A Redis fault is logged once
(and once more when Redis is back); the calls go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from relay_server.cluster import Cluster, ClusterUnavailable, Outage, stop

log = logging.getLogger("relay_server.cluster")

#: Seconds a directory entry lives without a heartbeat.
TTL = 15.0
#: Seconds between heartbeats.
BEAT = 5.0

#: Writes this replica's part of the directory in one call. ARGV: this replica's id, the TTL,
#: its replica key, the call key prefix, the calls whose socket closed here and the calls whose
#: socket is open here (each a MessagePack array of callSids), and '1' when the replica stops.
#: A closed call's entry is deleted only while it still names this replica (a socket of the
#: same call may already be open on another one). The calls go as one argument each: a SET per
#: call through the client cost the relay more than Redis' own work (bench/cluster.py).
_WRITE = """
local me, ttl, replica, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local live, final = cmsgpack.unpack(ARGV[6]), ARGV[7] == '1'
local function delete_if_mine(sid)
  local key = prefix .. sid
  if redis.call('GET', key) == me then redis.call('DEL', key) end
end
for _, sid in ipairs(cmsgpack.unpack(ARGV[5])) do delete_if_mine(sid) end
if final then
  redis.call('DEL', replica)
  for _, sid in ipairs(live) do delete_if_mine(sid) end
else
  redis.call('SET', replica, '1', 'EX', ttl)
  for _, sid in ipairs(live) do redis.call('SET', prefix .. sid, me, 'EX', ttl) end
end
return #live
"""

_pack = msgspec.msgpack.Encoder().encode


class Directory:
    """This replica's entries in the shared directory, and lookups of the others'."""

    def __init__(self, cluster: Cluster, ttl: float = TTL, beat: float = BEAT) -> None:
        self.cluster = cluster
        self.ttl = ttl
        self.beat = beat
        #: Calls whose socket is open here.
        self.calls: set[str] = set()
        self._gone: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.outage = Outage(
            cluster, "directory", "calls go on here, the directory catches up when it is back"
        )
        self._script: Any = None

    @staticmethod
    def call_key(call_sid: str) -> str:
        """The key of a call's entry."""
        return Cluster.key("call", call_sid)

    def replica_key(self, replica: str | None = None) -> str:
        """The key that says replica ``replica`` (this one by default) is alive."""
        return Cluster.key("replica", replica or self.cluster.replica)

    # ------------------------------------------------------------------ the call path
    def add(self, call_sid: str) -> None:
        """A socket for ``call_sid`` opened here (written by the heartbeat task at once)."""
        self.calls.add(call_sid)
        self._gone.discard(call_sid)
        self._wake.set()

    def remove(self, call_sid: str) -> None:
        """The socket of ``call_sid`` closed here."""
        self.calls.discard(call_sid)
        self._gone.add(call_sid)
        self._wake.set()

    # ------------------------------------------------------------------ lookups
    async def where(self, call_sid: str) -> str | None:
        """The replica holding ``call_sid``'s socket, if a live one does.

        Raises:
            ClusterUnavailable: Redis did not answer.
        """
        if call_sid in self.calls:
            return self.cluster.replica
        try:
            value = await self.cluster.redis.get(self.call_key(call_sid))
            if value is None:
                return None
            replica = value.decode()
            if not await self.cluster.redis.exists(self.replica_key(replica)):
                return None  # its replica stopped beating: the socket is gone with it
            return str(replica)
        except Exception as exc:
            raise ClusterUnavailable(self.cluster.url, exc) from exc

    async def replicas(self) -> list[str]:
        """The ids of the replicas alive now."""
        pattern = Cluster.key("replica", "*")
        prefix = len(Cluster.key("replica", ""))
        found = [key async for key in self.cluster.redis.scan_iter(match=pattern, count=200)]
        return sorted(key.decode()[prefix:] for key in found)

    # ------------------------------------------------------------------ the heartbeat
    def start(self) -> None:
        """Start the heartbeat task (in the serving loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="directory")

    async def aclose(self) -> None:
        """Stop beating and take this replica and its calls out of the directory."""
        await stop(self._task)
        self._task = None
        try:
            await self._write(final=True)
        except Exception as exc:
            log.warning("cluster: could not leave the directory at stop: %s", exc)

    async def _run(self) -> None:
        """Write on every change, and renew everything every :attr:`beat` seconds."""
        loop = asyncio.get_running_loop()
        next_beat = loop.time()
        while True:
            self._wake.clear()
            try:
                await self._write()
                self.outage.answered()
            except Exception as exc:
                self.outage.failed(exc)
            now = loop.time()
            if now >= next_beat:
                next_beat = now + self.beat
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), next_beat - now)

    async def _write(self, *, final: bool = False) -> None:
        redis = self.cluster.redis
        if self._script is None:
            self._script = redis.register_script(_WRITE)
        gone, self._gone = self._gone, set()
        try:
            await self._script(
                args=[
                    self.cluster.replica,
                    max(1, round(self.ttl)),
                    self.replica_key(),
                    self.call_key(""),
                    _pack(sorted(gone)),
                    _pack(sorted(self.calls)),
                    "1" if final else "0",
                ]
            )
        except BaseException:
            self._gone |= gone  # written at the next beat
            raise
