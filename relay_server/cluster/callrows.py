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
from typing import Any

from relay_server import events as ev
from relay_server.cluster import Cluster

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


def row_key(call_sid: str) -> str:
    """The key of a call's summary."""
    return Cluster.key("callrow", call_sid)


class CallRows:
    """The calls' summaries in Redis (module docstring)."""

    def __init__(self, cluster: Cluster, *, keep_days: float, max_calls: int) -> None:
        self.cluster = cluster
        self.keep_seconds = max(60, int(keep_days * 86400))
        self.max_calls = max_calls

    async def update(self, written: list[tuple[ev.CallEvent, bytes]]) -> None:
        """Fold events just added to the stream (with their stream ids) into their calls' rows."""
        seen: dict[
            str, list[Any]
        ] = {}  # sid -> [first ts, first id, last ts, last id, turns, errors]
        rare: list[ev.CallEvent] = []
        for event, entry_id in written:
            sid = event.call_sid
            if not sid:
                continue
            row = seen.get(sid)
            if row is None:
                row = seen[sid] = [event.ts, entry_id, 0.0, b"", 0, 0]
            row[2], row[3] = event.ts, entry_id
            if isinstance(event, ev.AgentReply):
                row[4] += 1
            elif isinstance(event, ev.Error | ev.LlmFault):
                row[5] += 1
            elif isinstance(event, _RARE):
                rare.append(event)
        if not seen:
            return
        pipe = self.cluster.redis.pipeline(transaction=False)
        for sid, (first_ts, first_id, last_ts, last_id, turns, errors) in seen.items():
            key = row_key(sid)
            pipe.hsetnx(key, "started", repr(first_ts))
            pipe.hsetnx(key, "first_id", first_id)
            pipe.hsetnx(key, "status", "live")
            pipe.hset(key, mapping={"last_ts": repr(last_ts), "last_id": last_id})
            if turns:
                pipe.hincrby(key, "turns", turns)
            if errors:
                pipe.hincrby(key, "errors", errors)
            pipe.expire(key, self.keep_seconds)
            pipe.zadd(INDEX, {sid: first_ts}, nx=True)
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
        return [_shown(sid, fields) for sid, fields in zip(sids, rows, strict=True) if fields]

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
        return _shown(sid, fields), fields[b"first_id"].decode(), fields[b"last_id"].decode()


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
    }
