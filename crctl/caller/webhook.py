"""The simulated caller's webhooks: signed form requests, as Twilio sends them.

Twilio docs: webhooks, security: ``X-Twilio-Signature``.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import urlencode, urlsplit

import httpx
from twilio.request_validator import RequestValidator

from crctl.caller.outcome import CallError, Outcome, Unreachable
from crctl.caller.twiml import CallPlan, summarize_twiml
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


# ``timeout`` is httpx's, applied to each network operation (connect, read, write); running out
# is an httpx.TimeoutException, reported as "timed out". A deadline at the caller is neither.
async def send_webhook(
    url: str,
    params: dict[str, str],
    headers: dict[str, str],
    method: str,
    timeout: float,  # noqa: ASYNC109
) -> tuple[int, str]:
    """One webhook request; returns (status, body).

    Raises :class:`Unreachable` when nothing answers. A local host is reached directly, never
    through a proxy from the environment.
    """
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


# ``timeout`` is passed on to send_webhook: httpx's, as there.
async def post_action(
    plan: CallPlan,
    outcome: Outcome,
    params: dict[str, str],
    token: str | None,
    timeout: float,  # noqa: ASYNC109
) -> None:
    """Post ``<Connect action>``, signed, as Twilio does when the session ends.

    A GET carries ``params`` in the signed URL. The answer in words goes to ``outcome.action``,
    a failure to ``outcome.action_error``.
    """
    if not plan.action_url or not plan.action_connect_url:
        return
    method = plan.action_method
    signed = plan.action_url
    if method == "GET":  # the parameters travel in the signed URL
        signed = with_query(signed, params)
    headers = signed_headers(token, signed, {} if method == "GET" else params)
    try:
        status, body = await send_webhook(plan.action_connect_url, params, headers, method, timeout)
    except CallError as exc:
        outcome.action_error = str(exc)
        return
    if status == 200:
        outcome.action = summarize_twiml(body)
        outcome.action_twiml = body
    else:
        outcome.action_error = f"{method} {plan.action_url} answered HTTP {status}"


def why_403(signed: str, token: str | None, public_url: str | None) -> str:
    """Why a relay most likely refused a request signed over ``signed``, and what to do."""
    if not token:
        return (
            "it checks X-Twilio-Signature and no auth token was given; set TWILIO_AUTH_TOKEN "
            "or pass --auth-token"
        )
    hint = "check that the auth token is the relay's TWILIO_AUTH_TOKEN"
    if not public_url and is_local(urlsplit(signed).hostname):
        hint += ", and pass the relay's public URL with --public-url (Twilio signs it)"
    return f"the X-Twilio-Signature over {signed} did not match; {hint}"
