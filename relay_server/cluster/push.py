"""Pushes across replicas: ``POST /calls/{sid}/messages`` on any replica reaches the call.

A call's socket lives on one replica (the directory says which). A push that arrives
elsewhere is published on the holder's Redis channel ``crctl:push:<replica>`` (pub/sub: a
push is worth nothing once its HTTP client has given up, so nothing is queued). The holder
delivers it to the call as a local push would be, and publishes the result (the HTTP status
and body the API answers) on the sender's channel; the sender waits for it up to
:data:`ACK_SECONDS`.

Every message is signed with the replicas' shared key (:meth:`Cluster.sign`) and carries its
time: a replica drops, and logs, a message whose signature fails (a replica configured with
another secret on the same Redis) or that is older than :data:`MAX_AGE` seconds (a replay).
Redis faults are logged once per outage; the listener subscribes again by itself.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import msgspec

from relay_server import events as ev
from relay_server.calls import CallRegistry
from relay_server.cluster import Cluster, ClusterUnavailable, Outage, stop
from relay_server.protocol import ProtocolError, decode_outbound

log = logging.getLogger("relay_server.cluster")

#: Seconds the sender waits for the holder's answer.
ACK_SECONDS = 5.0
#: Seconds a signed message stays valid (beyond that it is a replay, or a clock far off).
MAX_AGE = 60.0
#: Seconds between two log lines about refused messages (each one is counted).
REFUSALS_LOGGED_EVERY = 10.0

Answer = tuple[dict[str, Any], int]


async def deliver(registry: CallRegistry, bus: ev.EventBus, call_sid: str, body: bytes) -> Answer:
    """Push the outbound frame ``body`` into the call if its socket is here; the API's answer.

    202 with the frame's type, 404 when the call is not live here, 400 for a frame that is
    not one the relay may send (ConversationRelay's outbound messages).
    """
    session = registry.get(call_sid)
    if session is None:
        return {"error": f"no live call {call_sid}"}, 404
    try:
        message = decode_outbound(body)
    except ProtocolError as exc:
        return {"error": str(exc)}, 400
    await session.push(message)
    bus.emit(ev.pushed(call_sid, message))
    return {"sent": type(message).__struct_config__.tag}, 202


class Pushes:
    """This replica's end of the pushes: it sends to the others and serves theirs."""

    def __init__(self, cluster: Cluster, registry: CallRegistry, bus: ev.EventBus) -> None:
        self.cluster = cluster
        self.registry = registry
        self.bus = bus
        self.ack_seconds = ACK_SECONDS
        self._waiting: dict[str, asyncio.Future[Answer]] = {}
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.outage = Outage(cluster, "pushes", "pushes from other replicas wait until it is back")
        self._refused = 0
        self._refusal_logged_at = -REFUSALS_LOGGED_EVERY

    @staticmethod
    def channel(replica: str) -> str:
        """The pub/sub channel replica ``replica`` listens on."""
        return Cluster.key("push", replica)

    # ------------------------------------------------------------------ sending
    async def send(self, replica: str, call_sid: str, body: bytes) -> Answer:
        """Push ``body`` into ``call_sid`` on ``replica``; the holder's answer (or 503/504).

        Raises:
            ClusterUnavailable: Redis did not take the message.
        """
        loop = asyncio.get_running_loop()
        push_id = secrets.token_hex(8)
        answer: asyncio.Future[Answer] = loop.create_future()
        self._waiting[push_id] = answer
        message = {"type": "push", "id": push_id, "call_sid": call_sid, "body": body.decode()}
        try:
            try:
                listeners = await self.cluster.redis.publish(
                    self.channel(replica), self._seal(message)
                )
            except Exception as exc:
                raise ClusterUnavailable(self.cluster.url, exc) from exc
            if not listeners:
                why = f"replica {replica} holds call {call_sid} but is not listening (restarting?)"
                return {"error": f"{why}; try again"}, 503
            try:
                return await asyncio.wait_for(answer, self.ack_seconds)
            except TimeoutError:
                return {
                    "error": f"replica {replica} holds call {call_sid} but did not confirm the "
                    f"push within {self.ack_seconds:g} s (does it share this replica's secret?)"
                }, 504
        finally:
            self._waiting.pop(push_id, None)

    def _seal(self, message: dict[str, Any]) -> bytes:
        """``message`` with the sender and the time, signed: ``<hex mac>.<json>``."""
        payload = msgspec.json.encode({**message, "from": self.cluster.replica, "ts": time.time()})
        return self.cluster.sign(payload).hex().encode() + b"." + payload

    def _open(self, data: bytes) -> dict[str, Any] | None:
        """The message in ``data`` if its signature holds and it is fresh; else ``None``."""
        mac_hex, _, payload = data.partition(b".")
        try:
            mac = bytes.fromhex(mac_hex.decode("ascii"))
            valid = self.cluster.verify(payload, mac)
        except ValueError:
            valid = False
        if not valid:
            self._refuse(
                "its signature does not match this replica's secret (a replica with "
                "another CRCTL_SOCKET_SECRET / TWILIO_AUTH_TOKEN on the same Redis?)"
            )
            return None
        try:
            message = msgspec.json.decode(payload)
            age = abs(time.time() - float(message["ts"]))
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            self._refuse("it is not a push message")
            return None
        if age > MAX_AGE:
            self._refuse(f"it is {age:.0f} s old (a replay, or a clock far off)")
            return None
        return dict(message)

    def _refuse(self, why: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSALS_LOGGED_EVERY:
            self._refusal_logged_at = now
            log.warning(
                "cluster: refused a message on %s (%d so far): %s",
                self.channel(self.cluster.replica),
                self._refused,
                why,
            )

    # ------------------------------------------------------------------ serving
    def start(self) -> None:
        """Start listening on this replica's channel (in the serving loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="pushes")

    async def aclose(self) -> None:
        """Stop listening; pushes waiting for an answer get none."""
        await stop(self._task)
        self._task = None
        for task in list(self._handlers):
            await stop(task)

    async def _listen(self) -> None:
        """Subscribe, serve each message, and subscribe again after a Redis fault."""
        while True:
            pubsub = self.cluster.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.cluster.replica))
                self._up()
                while True:
                    item = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if item is not None and isinstance(item.get("data"), bytes):
                        self._handle(item["data"])
            except Exception as exc:
                self._down(exc)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # the connection is already gone
                    log.debug("cluster: closing the push subscription failed", exc_info=True)
            await asyncio.sleep(1.0)

    def _up(self) -> None:
        self.outage.answered()

    def _down(self, exc: BaseException) -> None:
        self.outage.failed(exc)

    def _handle(self, data: bytes) -> None:
        message = self._open(data)
        if message is None:
            return
        if message.get("type") == "ack":
            answer = self._waiting.get(str(message.get("id")))
            if answer is not None and not answer.done():
                answer.set_result((dict(message.get("body") or {}), int(message["status"])))
        elif message.get("type") == "push":
            task = asyncio.get_running_loop().create_task(self._serve(message))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, message: dict[str, Any]) -> None:
        """Deliver a push to the call here and answer its sender."""
        call_sid = str(message.get("call_sid"))
        body, status = await deliver(
            self.registry, self.bus, call_sid, str(message.get("body", "")).encode()
        )
        reply = {"type": "ack", "id": message.get("id"), "status": status, "body": body}
        try:
            await self.cluster.redis.publish(self.channel(str(message["from"])), self._seal(reply))
        except Exception as exc:
            self._down(exc)
