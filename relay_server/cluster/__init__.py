"""Replicas of the relay as one, through Redis (``crctl serve --redis-url``).

Without a Redis URL none of this is used: one process, in-process state, SQLite. With one,
every replica opens a :class:`Cluster`: its own id, one ``redis.asyncio`` client (the official
``redis`` package's asyncio API) and the key that signs what replicas tell each other. The
shared parts live in this package, one module each:

* ``directory``: which replica holds each live call's socket (heartbeats, a TTL);
* ``conversations``: each call's resumable conversation, written at turn boundaries;
* ``push``: ``POST /calls/{sid}/messages`` on any replica reaches the socket's replica;
* ``events``: the call events of every replica in one Redis stream.

Keys are ``crctl:<what>:<id>`` (:meth:`Cluster.key`). Redis faults are the callers' to
contain: a call in progress never depends on Redis to go on talking.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from relay_server.config import RelayConfig
from relay_server.errors import ConfigError

log = logging.getLogger("relay_server.cluster")

#: Seconds the start-up check waits for Redis.
CHECK_TIMEOUT = 3.0
#: Seconds a Redis command may take before it is a fault (the relay's loop never waits longer).
COMMAND_TIMEOUT = 2.0
#: The prefix of every key the relay writes.
PREFIX = "crctl"
_KDF_LABEL = b"crctl replicas v1"


def shown_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def replica_secret(config: RelayConfig) -> bytes:
    """The key that signs messages between replicas.

    Derived from ``CRCTL_SOCKET_SECRET``, else from Twilio's auth token, else the API token:
    replicas configured with different secrets refuse each other's messages.

    Raises:
        ConfigError: none of the three is set (replicas could not tell each other from a
            stranger on the same Redis).
    """
    for value in (config.socket_secret, config.auth_token, config.api_token):
        if value:
            return hmac.new(value.encode(), _KDF_LABEL, hashlib.sha256).digest()
    raise ConfigError(
        "setting redis_url: replicas sign what they tell each other with a shared secret; "
        "set CRCTL_SOCKET_SECRET (or TWILIO_AUTH_TOKEN) to the same value on every replica"
    )


def new_replica_id() -> str:
    """This process's id among the replicas: host, pid and a random part (unique per start)."""
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Cluster:
    """This replica's link to the others: its id, its Redis client and the shared key."""

    def __init__(self, url: str, secret: bytes, replica_id: str | None = None) -> None:
        import redis.asyncio as aioredis  # only with --redis-url

        from relay_server.cluster.directory import Directory

        self.url = url
        self.secret = secret
        self.replica = replica_id or new_replica_id()
        self.redis: Any = aioredis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            health_check_interval=10,
            decode_responses=False,
        )
        #: Which replica holds each live call's socket.
        self.directory = Directory(self)

    @staticmethod
    def key(*parts: str) -> str:
        """The Redis key ``crctl:<part>:<part>…``."""
        return ":".join((PREFIX, *parts))

    def sign(self, payload: bytes) -> bytes:
        """The HMAC-SHA256 of ``payload`` under the replicas' shared key."""
        return hmac.new(self.secret, payload, hashlib.sha256).digest()

    def verify(self, payload: bytes, mac: bytes) -> bool:
        """Whether ``mac`` is this cluster's signature of ``payload``."""
        return hmac.compare_digest(self.sign(payload), mac)

    async def ping(self) -> None:
        """Raise :class:`ClusterUnavailable` unless Redis answers."""
        try:
            await self.redis.ping()
        except Exception as exc:  # redis raises its own ConnectionError, TimeoutError, OSError…
            raise ClusterUnavailable(self.url, exc) from exc

    def start(self) -> None:
        """Start the replica's background work (in the serving loop): the directory's beat."""
        self.directory.start()

    async def aclose(self) -> None:
        """Leave the directory and close the client's connections."""
        await self.directory.aclose()
        await self.redis.aclose()


class Outage:
    """One part's view of Redis: an outage is said once when it starts, once when it ends.

    ``part`` names what is affected (``pushes``, ``conversations``…) and ``meanwhile`` what
    happens until Redis is back, so each log line says what to expect.
    """

    def __init__(self, cluster: Cluster, part: str, meanwhile: str) -> None:
        self.cluster = cluster
        self.part = part
        self.meanwhile = meanwhile
        self.healthy = True

    def failed(self, exc: BaseException) -> bool:
        """Redis failed this part: logged if an outage starts here. Returns whether it did."""
        if not self.healthy:
            return False
        self.healthy = False
        log.warning(
            "cluster: %s: Redis at %s failed (%s); %s",
            self.part,
            shown_url(self.cluster.url),
            str(exc) or type(exc).__name__,
            self.meanwhile,
        )
        return True

    def answered(self, also: str = "") -> bool:
        """Redis answered this part: logged if an outage ends here. Returns whether it did."""
        if self.healthy:
            return False
        self.healthy = True
        log.warning(
            "cluster: %s: Redis at %s answers again%s", self.part, shown_url(self.cluster.url), also
        )
        return True


class ClusterUnavailable(Exception):
    """Redis did not answer; the message is one line naming the URL and what to do."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url = url
        reason = str(cause) or type(cause).__name__
        super().__init__(f"Redis at {shown_url(url)} is not reachable: {reason}")


def check_redis(url: str, timeout: float = CHECK_TIMEOUT) -> None:
    """Ask Redis for a PING once, at start (from synchronous code).

    Raises:
        ConfigError: Redis does not answer within ``timeout`` s; one line with the URL and what
            to do (the CLI exits 2).
    """
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        raise ConfigError(
            f"cannot reach Redis at {shown_url(url)} ({reason}): start it, or correct "
            "--redis-url (CRCTL_REDIS_URL)"
        ) from None


def open_cluster(config: RelayConfig) -> Cluster | None:
    """The replica's :class:`Cluster` for ``config.redis_url``, or ``None`` without one."""
    if not config.redis_url:
        return None
    return Cluster(config.redis_url, replica_secret(config))


#: Seconds :func:`stop` waits for a cancelled task before cancelling it again.
STOP_PATIENCE = 1.0


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task of the cluster and wait until it has ended.

    A cancellation can be lost inside the Redis client (the task then loops back to its wait:
    a worker hung at shutdown under load, found by tests/test_metrics.py): the task is
    cancelled again every :data:`STOP_PATIENCE` seconds until it ends.
    """
    if task is None or task.done():
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_PATIENCE)
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.result()  # retrieved: no "exception was never retrieved" at exit
