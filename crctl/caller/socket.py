"""Opening a ConversationRelay socket as Twilio does.

The handshake carries the headers of a real call (``user-agent: Jetty/11.0.24``,
``x-twilio-signature`` and its duplicate, ``accept-encoding: gzip``), with no subprotocol, no
permessage-deflate and no pings (Twilio docs: ConversationRelay, WebSocket connection security).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from crctl.caller.outcome import CallError
from crctl.caller.twiml import CallPlan
from crctl.caller.webhook import sign
from crctl.hosts import is_local

USER_AGENT = "Jetty/11.0.24"


# ``timeout`` is websockets' handshake timeout (``open_timeout``): it bounds the opening only,
# and ends in the library's own error, reported as "cannot open the WebSocket".
async def open_socket(
    plan: CallPlan,
    auth_token: str | None,
    timeout: float,  # noqa: ASYNC109
    why_403: Callable[[str], str],
) -> ClientConnection:
    """Connect to ``plan.connect_url``, signed over the TwiML's ``url`` as Twilio signs it.

    The query's pairs are signed as parameters. Raises :class:`CallError` with the relay's
    reason, or ``why_403(url)`` for a bare 403.
    """
    headers = {"Accept-Encoding": "gzip"}
    if auth_token:
        parts = urlsplit(plan.ws_url)
        base = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        signature = sign(auth_token, base, dict(parse_qsl(parts.query)))
        headers["X-Twilio-Signature"] = signature
        headers["x-amzn-bedrock-agentcore-runtime-custom-twilio-signature"] = signature
    target = plan.connect_url
    try:
        return await connect(
            target,
            additional_headers=headers,
            user_agent_header=USER_AGENT,
            compression=None,
            subprotocols=None,
            ping_interval=None,
            open_timeout=timeout,
            proxy=None if is_local(urlsplit(target).hostname) else True,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        said = (exc.response.body or b"").decode("utf-8", "replace").strip()
        if status == 403 and said.startswith("forbidden: "):  # the relay says why
            why = said.removeprefix("forbidden: ")
        elif status == 403:
            why = why_403(plan.ws_url)
        else:
            why = "Twilio would report 64102"
        raise CallError(
            f"the relay refused the WebSocket at {target} (HTTP {status}): {why}"
        ) from None
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise CallError(f"cannot open the WebSocket at {target}: {text}") from None
