"""pytest fixtures for Twilio REST tests: the stateful fake, Prism, the environment, a check.

The check holds requests to the contract. Load with
``pytest_plugins = ["fakes.twilio_fixtures"]``.

- ``fake_twilio``: a fresh :class:`FakeTwilio` per test (account :data:`ACCOUNT_SID`, token
  :data:`AUTH_TOKEN`, API key :data:`API_KEY`/:data:`API_SECRET`, a full account).
- ``prism``: one :class:`Prism` for the session (about 2 s to start).
- ``twilio_env``: the environment crctl reads pointed at the fake (``CRCTL_TWILIO_API_URL``,
  ``TWILIO_ACCOUNT_SID``, ``TWILIO_AUTH_TOKEN``), ``HOME`` in a temp dir (no real
  ~/.twilio-cli or ~/.crctl), no API key, region, edge or proxy from the outside.
- ``contract``: at teardown, every request the test made to ``fake_twilio`` is replayed
  against Prism; any contract violation fails the test (reported as a teardown error, with
  the list). ``contract.exclude(*requests)`` leaves out requests a test makes wrong on
  purpose; ``contract.violations()`` checks now.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fakes.fake_twilio import FakeTwilio, RecordedRequest
from fakes.prism import Prism

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
API_KEY = "SK" + "fedcba9876543210" * 2
API_SECRET = "fake-api-secret-for-tests"

#: Variables that must not leak in from the developer's shell or CI.
_CLEARED = (
    "TWILIO_API_KEY",
    "TWILIO_API_SECRET",
    "TWILIO_REGION",
    "TWILIO_EDGE",
    "TWILIO_PROFILE",
    "TWILIO_CLI_CONFIG_DIR",
    "XDG_CONFIG_HOME",
    "XDG_STATE_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


@dataclass(frozen=True)
class TwilioEnv:
    """What ``twilio_env`` set."""

    base_url: str
    account_sid: str
    auth_token: str
    home: Path


@dataclass
class ContractCheck:
    """The ``contract`` fixture: the fake's requests, checked against Prism."""

    fake: FakeTwilio
    prism: Prism
    _excluded: set[int] = field(default_factory=set)

    def exclude(self, *requests: RecordedRequest) -> None:
        """Leave these requests (deliberately wrong ones) out of the check."""
        self._excluded.update(id(r) for r in requests)

    def violations(self) -> list[str]:
        requests = [r for r in list(self.fake.requests) if id(r) not in self._excluded]
        return self.prism.validate(requests)


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN, API_KEY, API_SECRET) as fake:
        yield fake


@pytest.fixture(scope="session")
def prism() -> Iterator[Prism]:
    with Prism() as server:
        yield server


@pytest.fixture
def twilio_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fake_twilio: FakeTwilio
) -> TwilioEnv:
    home = tmp_path / "home"
    home.mkdir()
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("CRCTL_TWILIO_API_URL", fake_twilio.base_url)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", fake_twilio.account_sid)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", fake_twilio.auth_token)
    return TwilioEnv(fake_twilio.base_url, fake_twilio.account_sid, fake_twilio.auth_token, home)


@pytest.fixture
def contract(fake_twilio: FakeTwilio, prism: Prism) -> Iterator[ContractCheck]:
    check = ContractCheck(fake_twilio, prism)
    yield check
    problems = check.violations()
    if problems:
        listing = "\n  ".join(problems)
        pytest.fail(
            f"{len(problems)} request(s) break Twilio's OpenAPI contract:\n  {listing}",
            pytrace=False,
        )
