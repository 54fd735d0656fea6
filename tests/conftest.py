"""Shared fixtures: the fake LLM (real HTTP) and the relay (real sockets), both on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fakes.fake_llm import FakeLLM
from tests.support import RelayServer, config

pytest_plugins = ["fakes.twilio_fixtures"]


@pytest.fixture(autouse=True)
def _scratch_state(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The crctl state, token file and events database never land in the real home."""
    monkeypatch.setenv("CRCTL_STATE_DIR", str(tmp_path_factory.mktemp("crctl-state")))


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM() as llm:
        yield llm


@pytest.fixture
def relay_factory(fake_llm: FakeLLM) -> Iterator[Callable[..., RelayServer]]:
    """Start a relay wired to the fake LLM: ``relay_factory(agent_factory=None, **config)``.

    Config keys ``agent_*`` and ``llm_*`` go to AgentConfig / LLMConfig.
    """
    started: list[RelayServer] = []

    def make(agent_factory: Any = None, **overrides: Any) -> RelayServer:
        overrides.setdefault("llm_api_key", "sk-test")
        overrides.setdefault("llm_base_url", fake_llm.base_url)
        overrides.setdefault("llm_timeout", 2.0)
        server = RelayServer(config(**overrides), agent=agent_factory).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def relay(relay_factory: Callable[..., RelayServer]) -> RelayServer:
    """The relay with the default (LLM) agent and the test auth token."""
    return relay_factory()


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server on a free port (tests/redis_support.py), stopped after the test."""
    from tests.redis_support import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()
