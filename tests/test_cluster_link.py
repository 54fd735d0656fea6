"""The replica's link to Redis (relay_server.cluster), against a real redis-server."""

from __future__ import annotations

import pytest

from relay_server.cluster import Cluster, ClusterUnavailable, check_redis, replica_secret
from relay_server.config import RelayConfig
from relay_server.errors import ConfigError
from tests.redis_support import RedisServer, free_port


@pytest.mark.asyncio
async def test_a_replica_reaches_redis_and_signs_what_it_says(redis_server: RedisServer) -> None:
    a = Cluster(redis_server.url, b"k" * 32)
    b = Cluster(redis_server.url, b"k" * 32)
    stranger = Cluster(redis_server.url, b"x" * 32)
    try:
        await a.ping()
        assert a.replica != b.replica
        assert Cluster.key("call", "CA1") == "crctl:call:CA1"
        await a.redis.set(Cluster.key("probe"), b"1")
        assert await b.redis.get(Cluster.key("probe")) == b"1"
        mac = a.sign(b"payload")
        assert b.verify(b"payload", mac)
        assert not stranger.verify(b"payload", mac)
        assert not b.verify(b"payload!", mac)
    finally:
        for c in (a, b, stranger):
            await c.aclose()


@pytest.mark.asyncio
async def test_redis_gone_is_one_readable_fault() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    cluster = Cluster(url, b"k" * 32)
    try:
        with pytest.raises(ClusterUnavailable) as raised:
            await cluster.ping()
    finally:
        await cluster.aclose()
    assert str(raised.value).startswith(f"Redis at {url} is not reachable: ")
    with pytest.raises(ConfigError, match=r"cannot reach Redis at redis://127\.0\.0\.1:\d+/0"):
        check_redis(url, timeout=1.0)


def test_a_password_never_shows_and_replicas_need_a_shared_secret() -> None:
    with pytest.raises(ConfigError, match="CRCTL_SOCKET_SECRET"):
        replica_secret(RelayConfig(redis_url="redis://h:6379/0"))
    same = replica_secret(RelayConfig(socket_secret="s1"))
    assert same == replica_secret(RelayConfig(socket_secret="s1"))
    assert same != replica_secret(RelayConfig(socket_secret="s2"))
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError) as raised:
        check_redis(url, timeout=1.0)
    assert "hunter2" not in str(raised.value) and "user:***@127.0.0.1" in str(raised.value)


async def _until(predicate: object, patience: float = 30.0) -> bool:
    """Poll an async predicate until it holds (a generous bound, never the figure under test)."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while loop.time() < deadline:
        if await predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.asyncio
async def test_the_directory_names_the_replica_of_each_call(redis_server: RedisServer) -> None:
    from relay_server.cluster import stop
    from relay_server.cluster.directory import Directory

    a = Cluster(redis_server.url, b"k" * 32)
    b = Cluster(redis_server.url, b"k" * 32)
    try:
        a.directory = Directory(a, ttl=1.0, beat=0.2)
        a.start()
        a.directory.add("CA1")
        a.directory.add("CA2")

        async def b_sees_both() -> bool:
            return await b.directory.where("CA1") == a.replica == await b.directory.where("CA2")

        assert await _until(b_sees_both)
        assert a.replica in await b.directory.replicas()
        a.directory.remove("CA1")

        async def b_sees_one() -> bool:
            return await b.directory.where("CA1") is None

        assert await _until(b_sees_one)
        assert await b.directory.where("CA2") == a.replica
        # a dies without a word (no final write): its entries expire with its heartbeat
        await stop(a.directory._task)

        async def gone() -> bool:
            return await b.directory.where("CA2") is None

        assert await _until(gone)
        assert a.replica not in await b.directory.replicas()
    finally:
        await b.aclose()
        await a.redis.aclose()


async def test_stop_ends_a_task_that_lost_its_cancellation(monkeypatch) -> None:
    """A cancellation lost inside a client call must not hang the replica's shutdown."""
    import asyncio

    import relay_server.cluster as cluster

    monkeypatch.setattr(cluster, "STOP_PATIENCE", 0.05)
    wake = asyncio.Event()
    swallowed = 0

    async def writer() -> None:  # the shape of the cluster's writer tasks
        nonlocal swallowed
        while True:
            await wake.wait()
            try:
                await asyncio.sleep(3600)  # a Redis call that swallows the first cancel
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 1:
                    raise
            wake.clear()

    task = asyncio.create_task(writer())
    wake.set()
    await asyncio.sleep(0.01)  # the writer is inside its "Redis call"
    await asyncio.wait_for(cluster.stop(task), 30)  # a guard against a hang, not a timing
    assert task.cancelled() and swallowed == 1  # the second cancel found it at its wait
