"""The public tunnel to the relay: the one place pyngrok is imported.

The setting ``tunnel_factory`` (``CRCTL_TUNNEL_FACTORY=package.module:Class``) replaces ngrok
with another implementation of :class:`Tunnel` (a testing aid, like ``CRCTL_TWILIO_API_URL``;
the test suite's fake tunnel). The ngrok token and binary are settings too
(:class:`crctl.environment.Environment`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pydantic import ImportString, TypeAdapter, ValidationError

from crctl.environment import Environment, current
from crctl.errors import TunnelError as TunnelError  # raised here, caught by callers


class Tunnel(Protocol):
    """An open tunnel: Twilio reaches the local relay through ``public_url`` (https)."""

    public_url: str

    def close(self) -> None:
        """Close the tunnel (idempotent)."""


class NgrokTunnel:
    """An ngrok tunnel opened with pyngrok to ``127.0.0.1:port``."""

    def __init__(self, port: int, environment: Environment | None = None) -> None:
        from pyngrok import conf, ngrok
        from pyngrok.exception import PyngrokError

        env = environment if environment is not None else current()
        token = env.ngrok_authtoken.get_secret_value() if env.ngrok_authtoken else None
        if not token:
            raise TunnelError(
                "no NGROK_AUTHTOKEN: get one at https://dashboard.ngrok.com/get-started/your-"
                "authtoken and `export NGROK_AUTHTOKEN=…`, or bring your own tunnel with "
                "--public-url, or run local-only with --no-tunnel"
            )
        path = env.ngrok_path or shutil.which("ngrok") or conf.get_default().ngrok_path
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
        """Close the tunnel and stop ngrok; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._ngrok.disconnect(self.public_url, pyngrok_config=self._config)
        finally:
            self._ngrok.kill(pyngrok_config=self._config)


#: ``package.module:Class`` to the class, by pydantic (the import is the setting's validation).
_FACTORY: TypeAdapter[Callable[[int], Tunnel]] = TypeAdapter(ImportString)


def open_tunnel(port: int, environment: Environment | None = None) -> Tunnel:
    """Open the tunnel to the relay on ``port``: ngrok, or the ``tunnel_factory`` setting's."""
    env = environment if environment is not None else current()
    if env.tunnel_factory:
        try:
            factory = _FACTORY.validate_python(env.tunnel_factory)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            raise TunnelError(
                f"CRCTL_TUNNEL_FACTORY={env.tunnel_factory!r} cannot be loaded: {reason}"
            ) from None
        return factory(port)
    return NgrokTunnel(port, env)
