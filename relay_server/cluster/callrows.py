"""Every replica's calls as ``/calls`` shows them: a Redis hash per call, kept as events come.

``crctl:callrow:<sid>`` holds a call's summary (from, to, started, ended, status, turns,
errors, hand-off, and the stream ids of its first and last event, which bound the reading of
its events); ``crctl:calls`` orders the calls by start time. The writer of the shared stream
updates both after each batch, as the SQLite store's call tracking does: the common events
only touch the last time and the counters, the rare ones (start, hang-up, end, final status)
the rest, in order. Bounded: a row expires ``keep_days`` after its last event, and the index
keeps the newest ``max_calls`` calls.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from relay_server import events as ev
from relay_server.cluster import Cluster
from relay_server.cluster.directory import Directory

#: Calls by start time (score: the Unix time).
INDEX = Cluster.key("calls")

#: Sets ``ended`` to the later of its value and ARGV[1] ('' leaves it), then ``status`` to
#: ARGV[2] ('' leaves it) if it is one of ARGV[3..] (none given: whatever it is).
_END = """
if ARGV[1] ~= '' then
  local ended = tonumber(redis.call('HGET', KEYS[1], 'ended') or '0') or 0
  if tonumber(ARGV[1]) > ended then redis.call('HSET', KEYS[1], 'ended', ARGV[1]) end
end
if ARGV[2] ~= '' then
  local ok = #ARGV == 2
  local status = redis.call('HGET', KEYS[1], 'status')
  for i = 3, #ARGV do if status == ARGV[i] then ok = true end end
  if ok then redis.call('HSET', KEYS[1], 'status', ARGV[2]) end
end
return 0
"""


#: Adds a batch of events to the stream and folds them into their calls' rows, in one call:
#: a pipeline of a few commands per event and call cost the relay about a quarter of its CPU
#: per token at 200 calls (bench/cluster.py); one script per batch costs next to nothing, and
#: the batch as one MessagePack argument (encoded in C) less than six arguments per event that
#: the client packs one by one. KEYS: the stream, the index. ARGV: MAXLEN, the rows' TTL, the
#: row key prefix, the events: an array of [ts, callSid, kind, data, turns added, errors
#: added]. Returns how many entries it added.
_WRITE = """
local maxlen, keep, prefix = ARGV[1], ARGV[2], ARGV[3]
local events = cmsgpack.unpack(ARGV[4])
local rows, order = {}, {}
for _, e in ipairs(events) do
  local ts, sid = e[1], e[2]
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
    'ts', ts, 'sid', sid, 'kind', e[3], 'data', e[4])
  if sid ~= '' then
    local r = rows[sid]
    if not r then
      r = {ts, id, ts, id, 0, 0}
      rows[sid] = r
      order[#order + 1] = sid
    end
    r[3], r[4] = ts, id
    r[5] = r[5] + e[5]
    r[6] = r[6] + e[6]
  end
end
for _, sid in ipairs(order) do
  local r, key = rows[sid], prefix .. sid
  redis.call('HSETNX', key, 'started', r[1])
  redis.call('HSETNX', key, 'first_id', r[2])
  redis.call('HSETNX', key, 'status', 'live')
  redis.call('HSET', key, 'last_ts', r[3], 'last_id', r[4])
  if r[5] > 0 then redis.call('HINCRBY', key, 'turns', r[5]) end
  if r[6] > 0 then redis.call('HINCRBY', key, 'errors', r[6]) end
  redis.call('EXPIRE', key, keep)
  redis.call('ZADD', KEYS[2], 'NX', r[1], sid)
end
return #events
"""

_pack = msgspec.msgpack.Encoder().encode


def row_key(call_sid: str) -> str:
    """The key of a call's summary."""
    return Cluster.key("callrow", call_sid)


class CallRows:
    """The calls' summaries in Redis (module docstring)."""

    def __init__(self, cluster: Cluster, *, keep_days: float, max_calls: int) -> None:
        self.cluster = cluster
        self.keep_seconds = max(60, int(keep_days * 86400))
        self._write: Any = None
        self.max_calls = max_calls

    async def write(self, stream: str, maxlen: int, batch: list[ev.CallEvent]) -> None:
        """Add ``batch`` (events as stored) to ``stream`` and fold it into the calls' rows.

        One script call for the batch (see ``_WRITE``); the rare events' updates follow in one
        pipeline when the batch has any.
        """
        if self._write is None:
            self._write = self.cluster.redis.register_script(_WRITE)
        # The data as text: Redis' cmsgpack reads no MessagePack bin values.
        events: list[tuple[str, str, str, str, int, int]] = []
        rare: list[ev.CallEvent] = []
        for event in batch:
            turns = 1 if isinstance(event, ev.AgentReply) else 0
            errors = 1 if isinstance(event, ev.Error | ev.LlmFault) else 0
            events.append(
                (
                    repr(event.ts),
                    event.call_sid,
                    event.kind,
                    ev.encode_data(event).decode(),
                    turns,
                    errors,
                )
            )
            if event.call_sid and isinstance(event, _RARE):
                rare.append(event)
        await self._write(
            keys=[stream, INDEX], args=[maxlen, self.keep_seconds, row_key(""), _pack(events)]
        )
        if rare:
            pipe = self.cluster.redis.pipeline(transaction=False)
            for event in rare:
                _rare(pipe, event)
            await pipe.execute()

    async def trim(self, cutoff: float) -> None:
        """Forget calls started before ``cutoff`` and beyond the newest ``max_calls``."""
        pipe = self.cluster.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(INDEX, "-inf", f"({cutoff}")
        pipe.zremrangebyrank(INDEX, 0, -(self.max_calls + 1))
        await pipe.execute()

    async def latest(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` calls, newest first (as ``/calls`` serves them)."""
        sids = [sid.decode() for sid in await self.cluster.redis.zrevrange(INDEX, 0, limit - 1)]
        pipe = self.cluster.redis.pipeline(transaction=False)
        for sid in sids:
            pipe.hgetall(row_key(sid))
        rows = await pipe.execute() if sids else []
        shown = [_shown(sid, fields) for sid, fields in zip(sids, rows, strict=True) if fields]
        return await self._lost(shown)

    async def _lost(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Show as ``lost`` the live calls no live replica holds any more.

        A replica killed mid-call never writes its calls' end: once its directory entries have
        expired (and the call has been quiet as long), the call is ``lost``, as the SQLite
        store says of the calls a dead relay left open. Nothing is written: a reconnect on
        another replica makes the call live again.
        """
        live = [row for row in rows if row["status"] == "live"]
        if not live:
            return rows
        pipe = self.cluster.redis.pipeline(transaction=False)
        for row in live:
            pipe.exists(Directory.call_key(row["call_sid"]))
        held = await pipe.execute()
        now = time.time()
        for row, is_held in zip(live, held, strict=True):
            if not is_held and now - row.pop("_last_ts", now) > self.cluster.directory.ttl:
                row["status"] = "lost"
        for row in rows:
            row.pop("_last_ts", None)
        return rows

    async def find(self, sid: str) -> tuple[dict[str, Any], str, str] | None:
        """The call ``sid`` (or the one whose SID starts so, 6+ characters) and its id bounds."""
        redis = self.cluster.redis
        fields = await redis.hgetall(row_key(sid))
        if not fields and len(sid) >= 6:
            pattern = "".join(f"[{c}]" if c in "*?[]\\" else c for c in sid) + "*"
            found = [m async for m, _ in redis.zscan_iter(INDEX, match=pattern, count=500)]
            if len(found) == 1:
                sid = found[0].decode()
                fields = await redis.hgetall(row_key(sid))
        if not fields or b"first_id" not in fields:
            return None
        (row,) = await self._lost([_shown(sid, fields)])
        return row, fields[b"first_id"].decode(), fields[b"last_id"].decode()


def _rare(pipe: Any, event: ev.CallEvent) -> None:
    """Queue the update of a rare event on its call's row."""
    key, ts = row_key(event.call_sid), repr(event.ts)
    match event:
        case ev.CallStarted():
            fields = {
                "status": "live",
                "custom_parameters": json.dumps(event.custom_parameters or {}, default=str),
            }
            if event.from_:
                fields["from"] = event.from_
            if event.to:
                fields["to"] = event.to
            pipe.hset(key, mapping=fields)
            pipe.hdel(key, "ended")
        case ev.SocketClosed():
            pipe.eval(_END, 1, key, ts, "hung up", "live")
        case ev.SessionEnd():
            status = str(event.status or "ended")
            if event.error_code:
                status += f" ({event.error_code})"
            pipe.eval(_END, 1, key, ts, status)
            if event.handoff_data:
                pipe.hset(key, "handoff", event.handoff_data)
        case ev.CallStatus(status=status) if status in ev.CALL_OVER:
            pipe.eval(_END, 1, key, ts, status, "live", "hung up")


#: Events that change more of a call's row than its last time and counters.
_RARE = (ev.CallStarted, ev.SocketClosed, ev.SessionEnd, ev.CallStatus)


def _shown(sid: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A row as ``/calls`` serves it (the SQLite store's shape)."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    params = text.get("custom_parameters")
    return {
        "call_sid": sid,
        "from": text.get("from"),
        "to": text.get("to"),
        "custom_parameters": json.loads(params) if params else {},
        "started": float(text.get("started", 0)),
        "ended": float(text["ended"]) if text.get("ended") else None,
        "status": text.get("status", "live"),
        "turns": int(text.get("turns", 0)),
        "errors": int(text.get("errors", 0)),
        "handoff": text.get("handoff"),
        "_last_ts": float(text.get("last_ts", 0)),  # for _lost, taken out before serving
    }
