"""Each call's resumable conversation in Redis, so a reconnect resumes it on any replica.

``crctl:conv:<callSid>`` holds the JSON of the session's ``resume_state()``, written at turn
boundaries (a reply ended or was cut, the socket closed), never per token, and expiring after
``resume_ttl`` seconds. ``crctl:reconnects:<callSid>`` counts the reconnects ``/action`` granted
(``max_reconnects`` holds across replicas), ``crctl:resume:<callSid>`` says one was granted.

The call path never waits for a write: :meth:`Conversations.save` serialises the state and wakes
the writer task. A Redis fault is logged once per outage; what could not be written is written
when Redis answers again (only the newest state of each call is kept meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import msgspec

from relay_server.cluster import Cluster, Outage, stop

log = logging.getLogger("relay_server.cluster")

_encode = msgspec.json.Encoder().encode

#: SET each key to its value, expiring after ARGV[1] seconds; ARGV[2]: a MessagePack array of
#: [key, value] (one argument encoded in C: the client packs each argument in Python).
_SET_ALL = """
local pairs_ = cmsgpack.unpack(ARGV[2])
for _, kv in ipairs(pairs_) do redis.call('SET', kv[1], kv[2], 'EX', ARGV[1]) end
return #pairs_
"""

_pack = msgspec.msgpack.Encoder().encode

#: Seconds between write attempts while Redis fails.
RETRY = 1.0
#: Seconds the writer gathers the states of turn boundaries before one script call writes
#: them all: at 200 calls, 50 ms put a replica at 1.087x the CPU per token of a relay without
#: Redis, 250 ms at 1.059x (bench/cluster.py). A socket's close is written at once (``now``),
#: and a reconnect granted here writes its call's state first (``claim``); a replica killed
#: outright loses at most this much of its calls' last turns.
GATHER = 0.25
#: Seconds a new socket's setup may wait for its conversation before it starts afresh.
LOOKUP_TIMEOUT = 1.0

#: Grants a reconnect when the call's conversation is kept and the count allows it.
#: KEYS: conv, reconnects, resume; ARGV: max reconnects, ttl seconds.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if n > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Conversations:
    """This replica's writer of conversations, and reader for sockets that resume one."""

    def __init__(self, cluster: Cluster, ttl: float) -> None:
        self.cluster = cluster
        self.ttl = max(1, round(ttl))
        #: callSid -> JSON to write, or ``None`` to delete (the call is over).
        #: Calls whose state waits for the writer (``None``: forget the call).
        self._pending: dict[str, Any] = {}
        self._wake = asyncio.Event()
        #: Set by a state to write at once: the gathering ends.
        self._urgent = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.outage = Outage(
            cluster,
            "conversations",
            "calls go on here, conversations are kept again when it is back",
        )
        self._claim: Any = None
        self._set_all: Any = None
        #: Writes done (for tests and ``/healthz``-style checks).
        self.written = 0

    @staticmethod
    def keys(call_sid: str) -> tuple[str, str, str]:
        """The call's conversation, reconnect count and granted-resume keys."""
        return (
            Cluster.key("conv", call_sid),
            Cluster.key("reconnects", call_sid),
            Cluster.key("resume", call_sid),
        )

    # ------------------------------------------------------------------ the call path
    def save(self, call_sid: str, state: Any, *, now: bool = False) -> None:
        """Keep ``state`` (a session's ``resume_state()``) as the call's conversation.

        Encoded by the writer, once per call and batch: the newest state of a call wins.
        ``now``: written without waiting for the batch (the socket closed: a reconnect may
        follow on another replica).
        """
        if state is None:
            return
        self._pending[call_sid] = state
        self._wake.set()
        if now:
            self._urgent.set()

    def forget(self, call_sid: str) -> None:
        """The call is over: its conversation and counters go."""
        self._pending[call_sid] = None
        self._wake.set()

    # ------------------------------------------------------------------ reconnects
    async def claim(self, call_sid: str, max_reconnects: int) -> bool | None:
        """Grant a reconnect of ``call_sid`` (``/action``, SessionStatus failed, 64105).

        Returns:
            True: granted (counted in Redis); False: no conversation kept, or over the limit;
            None: Redis did not answer (the caller decides in-process).
        """
        conv, count, resume = self.keys(call_sid)
        try:
            if self._claim is None:
                self._claim = self.cluster.redis.register_script(_CLAIM)
            await self._flush_one(call_sid)  # a state still queued here is written first
            async with asyncio.timeout(LOOKUP_TIMEOUT * 2):
                granted = await self._claim(
                    keys=[conv, count, resume], args=[max_reconnects, self.ttl]
                )
        except Exception as exc:
            self._fault(exc)
            return None
        return int(granted) == 1

    async def take(self, call_sid: str) -> tuple[Any, bool] | None:
        """The conversation a new socket of ``call_sid`` resumes, or ``None``.

        One is resumed when ``/action`` granted a reconnect, or when no live replica holds the
        call's socket (Twilio's ``applicationReconnect``: the app's socket came back after an
        unexpected drop). Redis slow or down: ``None`` (the call starts afresh).

        Returns:
            The state, and whether it is an ``applicationReconnect`` (no reconnect granted).
        """
        if not self.outage.healthy:
            return None  # an outage: do not make every new call wait for the timeout
        conv, _, resume = self.keys(call_sid)
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                pipe = self.cluster.redis.pipeline(transaction=False)
                pipe.get(conv)
                pipe.getdel(resume)
                raw, granted = await pipe.execute()
                if raw is None:
                    return None
                if granted is None:
                    holder = await self.cluster.directory.where(call_sid)
                    if holder not in (None, self.cluster.replica):
                        log.warning(
                            "call %s: a new socket while replica %s still holds the call; "
                            "it starts afresh",
                            call_sid,
                            holder,
                        )
                        return None
        except Exception as exc:  # ClusterUnavailable, redis' own errors, TimeoutError
            self._fault(exc)
            return None
        try:
            return json.loads(raw), granted is None
        except ValueError:
            log.warning("call %s: its kept conversation is not JSON; starting afresh", call_sid)
            return None

    # ------------------------------------------------------------------ the writer
    def start(self) -> None:
        """Start the writer task (in the serving loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="conversations")

    async def aclose(self) -> None:
        """Stop the writer after one last attempt to write what is queued."""
        await stop(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LOOKUP_TIMEOUT * 2):
                await self._write()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._urgent.wait(), GATHER)
            self._urgent.clear()
            self._wake.clear()
            try:
                await self._write()
                if not self.outage.healthy:
                    await self.cluster.redis.ping()  # faults seen by lookups: is it back?
            except Exception as exc:
                self._fault(exc)
                await asyncio.sleep(RETRY)
                self._wake.set()  # try again: nothing is lost while Redis is away
                continue
            self.outage.answered("; conversations are kept again")

    async def _flush_one(self, call_sid: str) -> None:
        if call_sid in self._pending:
            await self._write({call_sid: self._pending.pop(call_sid)})

    async def _write(self, batch: dict[str, Any] | None = None) -> None:
        if batch is None:
            batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            kept: list[tuple[str, str]] = []
            gone: list[str] = []
            for call_sid, state in batch.items():
                if state is None:
                    gone += self.keys(call_sid)
                    continue
                try:
                    # As text: Redis' cmsgpack reads no MessagePack bin values.
                    kept.append((Cluster.key("conv", call_sid), _encode(state).decode()))
                except (TypeError, msgspec.EncodeError) as exc:
                    log.warning("call %s: conversation not kept in Redis (%s)", call_sid, exc)
            if kept:
                # One script call for the batch: a SET per call through the client cost the
                # relay more than the rest of the cluster's work together (bench/cluster.py).
                if self._set_all is None:
                    self._set_all = self.cluster.redis.register_script(_SET_ALL)
                await self._set_all(args=[max(1, round(self.ttl)), _pack(kept)])
            if gone:
                await self.cluster.redis.delete(*gone)
            self.written += len(batch)
        except BaseException:
            for call_sid, data in batch.items():
                self._pending.setdefault(call_sid, data)  # a newer state queued since wins
            raise

    def _fault(self, exc: BaseException) -> None:
        if self.outage.failed(exc):
            self._wake.set()  # the writer probes until Redis answers
