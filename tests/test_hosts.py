"""crctl.hosts.is_local: the one answer to "is this host out of the internet's reach"."""

from __future__ import annotations

import pytest

from crctl.hosts import is_local


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "relay.localhost",
        "printer.local",
        "db.internal",
        "nas.lan",
        "intranet",  # a bare name
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.10",
        "169.254.1.1",
        "::1",
        "[::1]",
        "LOCALHOST",
    ],
)
def test_local_hosts(host: str) -> None:
    assert is_local(host)


@pytest.mark.parametrize("host", ["relay.example.com", "8.8.8.8", "2001:4860::8888", "", None])
def test_hosts_on_the_internet_or_none(host: str | None) -> None:
    assert not is_local(host)
