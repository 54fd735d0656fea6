"""crctl.hosts: "is this host out of the internet's reach" and "is it this machine"."""

from __future__ import annotations

import pytest

from crctl.hosts import is_local, is_this_machine


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


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "relay.localhost", "127.0.0.1", "127.8.0.1", "::1", "[::1]"]
)
def test_this_machine(host: str) -> None:
    assert is_this_machine(host)


@pytest.mark.parametrize(
    "host", ["10.1.2.3", "192.168.0.10", "printer.local", "intranet", "relay.example.com", "", None]
)
def test_not_this_machine(host: str | None) -> None:
    # the local network is local, yet not this machine: it never gets this machine's API token
    assert not is_this_machine(host)
