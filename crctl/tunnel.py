"""The public tunnel to the relay: the one place pyngrok is imported.

``CRCTL_TUNNEL_FACTORY=package.module:Class`` replaces ngrok with another implementation of
:class:`Tunnel` (a testing aid, like ``CRCTL_TWILIO_API_URL``; the test suite's fake tunnel).
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Protocol

from crctl.errors import CrctlError


class TunnelError(CrctlError):
    """No tunnel could be opened; the message says what is missing and how to fix it."""


class Tunnel(Protocol):
    """An open tunnel: Twilio reaches the local relay through ``public_url`` (https)."""

    public_url: str

    def close(self) -> None:
        """Close the tunnel (idempotent)."""


class NgrokTunnel:
    """An ngrok tunnel opened with pyngrok to ``127.0.0.1:port``."""

    def __init__(self, port: int) -> None:
        from pyngrok import conf, ngrok
        from pyngrok.exception import PyngrokError

        token = os.environ.get("NGROK_AUTHTOKEN")
        if not token:
            raise TunnelError(
                "no NGROK_AUTHTOKEN: get one at https://dashboard.ngrok.com/get-started/your-"
                "authtoken and `export NGROK_AUTHTOKEN=…`, or bring your own tunnel with "
                "--public-url, or run local-only with --no-tunnel"
            )
        path = (
            os.environ.get("NGROK_PATH") or shutil.which("ngrok") or conf.get_default().ngrok_path
        )
        if not Path(path).exists():
            raise TunnelError(
                f"the ngrok binary is not installed ({path}): install it (https://ngrok.com/"
                "download) or set NGROK_PATH; pyngrok can also fetch it once with "
                "`python -m pyngrok install` on a machine with internet"
            )
        self._ngrok = ngrok
        self._config = conf.PyngrokConfig(ngrok_path=path, auth_token=token, startup_timeout=10)
        try:
            tunnel = ngrok.connect(str(port), "http", pyngrok_config=self._config)
        except PyngrokError as exc:
            raise TunnelError(
                f"ngrok could not open a tunnel: {' '.join(str(exc).split())}"
            ) from exc
        public = str(tunnel.public_url or "")
        self.public_url = "https://" + public.split("://", 1)[-1] if public else public
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._ngrok.disconnect(self.public_url, pyngrok_config=self._config)
        finally:
            self._ngrok.kill(pyngrok_config=self._config)


def open_tunnel(port: int) -> Tunnel:
    """Open the tunnel to the relay on ``port`` (ngrok, or ``CRCTL_TUNNEL_FACTORY``)."""
    factory = os.environ.get("CRCTL_TUNNEL_FACTORY")
    if factory:
        module, _, name = factory.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise TunnelError(f"CRCTL_TUNNEL_FACTORY={factory!r} cannot be loaded: {exc}") from exc
        tunnel: Tunnel = cls(port)
        return tunnel
    return NgrokTunnel(port)
