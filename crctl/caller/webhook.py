"""The simulated caller's webhooks: signed form requests, as Twilio sends them (Twilio docs:
webhooks, security: ``X-Twilio-Signature``)."""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlencode, urlsplit

import httpx
from twilio.request_validator import RequestValidator

from crctl.caller.outcome import Unreachable
from crctl.hosts import is_local

#: The User-Agent Twilio's webhooks carry.
WEBHOOK_USER_AGENT = "TwilioProxy/1.1"
API_VERSION = "2010-04-01"


def new_sid(prefix: str) -> str:
    """A Twilio-shaped SID: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


def sign(token: str, url: str, params: dict[str, str]) -> str:
    """``X-Twilio-Signature`` for ``url`` and form ``params``, computed as Twilio does."""
    return str(RequestValidator(token).compute_signature(url, params))


def signed_headers(token: str | None, url: str, params: dict[str, str]) -> dict[str, str]:
    """A webhook's headers, signed over ``url`` (as Twilio requested it) when there is a token."""
    headers = {"User-Agent": WEBHOOK_USER_AGENT, "Accept": "*/*"}
    if token:
        headers["X-Twilio-Signature"] = sign(token, url, params)
    return headers


def with_query(url: str, params: dict[str, str]) -> str:
    """``url`` with ``params`` appended to its query (a GET webhook's parameters)."""
    return url + ("&" if urlsplit(url).query else "?") + urlencode(params)


async def send_webhook(
    url: str, params: dict[str, str], headers: dict[str, str], method: str, timeout: float
) -> tuple[int, str]:
    """One webhook request; returns (status, body). Raises :class:`Unreachable` when nothing
    answers. A local host is reached directly, never through a proxy from the environment."""
    direct = is_local(urlsplit(url).hostname)
    try:
        async with httpx.AsyncClient(trust_env=not direct, timeout=timeout) as client:
            if method == "GET":
                response = await client.get(with_query(url, params), headers=headers)
            else:
                response = await client.post(url, data=params, headers=headers)
    except httpx.HTTPError as exc:
        raise Unreachable(f"cannot reach {url.split('?')[0]}: {_why(exc)}") from None
    return response.status_code, response.text


def _why(exc: BaseException) -> str:
    """The root cause in words ("connection refused"), as the operating system says it."""
    seen: BaseException | None = exc
    while seen is not None:
        errno = seen.errno if isinstance(seen, OSError) else None
        if errno is not None and errno > 0:
            # asyncio words a refused connect "Connect call failed (...)": say it as the OS does
            return os.strerror(errno).lower()
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror.lower()
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return (str(exc) or type(exc).__name__).lower()
