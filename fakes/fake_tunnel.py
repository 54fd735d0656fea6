"""A stand-in for ngrok in ``crctl up`` tests (``CRCTL_TUNNEL_FACTORY``).

It opens nothing: the public URL is a name the test controls (``CRCTL_FAKE_TUNNEL_URL``), and
what happened is appended to ``CRCTL_FAKE_TUNNEL_LOG`` so a test can see the tunnel opened and
closed from another process.
"""

from __future__ import annotations

import os
from pathlib import Path


class FakeTunnel:
    """Behaves like crctl.tunnel.NgrokTunnel for a relay on ``port``."""

    def __init__(self, port: int) -> None:
        self.public_url = os.environ.get(
            "CRCTL_FAKE_TUNNEL_URL", "https://fake-tunnel.example.test"
        )
        self.port = port
        self._log("open")

    def _log(self, what: str) -> None:
        log = os.environ.get("CRCTL_FAKE_TUNNEL_LOG")
        if log:
            with Path(log).open("a", encoding="utf-8") as handle:
                handle.write(f"{what} {self.public_url} {self.port}\n")

    def close(self) -> None:
        self._log("close")
