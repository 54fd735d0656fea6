"""Is a host this machine, or the local network? One answer each for every part of crctl."""

from __future__ import annotations

import ipaddress

#: Name suffixes that only resolve inside a machine or a local network (RFC 6761, RFC 6762).
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan")


def is_local(host: str | None) -> bool:
    """Whether ``host`` names this machine or the local network, out of the internet's reach.

    ``localhost`` and its subdomains, mDNS and intranet suffixes (``.local``, ``.internal``,
    ``.lan``), a bare name without a dot, and any IP address that is not globally routable
    (loopback, private, link-local…). Twilio cannot call such a host (provisioning refuses it)
    and a proxy should not be asked for it (the simulated caller's webhooks go direct).
    """
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(_LOCAL_SUFFIXES):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host  # a bare intranet name
    return not address.is_global


def is_this_machine(host: str | None) -> bool:
    """Whether ``host`` is a loopback name or address: this machine and nothing else.

    What may see this machine's secrets (``crctl tail`` sends the local API token only there)
    and what a relay bound without a token may listen on.
    """
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
