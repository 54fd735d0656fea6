"""The prologue every Twilio webhook shares: a bounded body, then the ``X-Twilio-Signature``.

Request bodies are bounded for the whole app (:func:`bound_bodies`): Twilio's webhooks are a
few KiB, and a 10 MiB unsigned POST parsed whole would stall the event loop for seconds, so a
larger body gets 413 before it is read (issue 9). :func:`twilio_webhook` then checks the
signature over the configured public URL (Twilio docs: webhook security) and hands the route
its form fields.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quart import Quart, Response, current_app, request
from werkzeug.datastructures import MultiDict

from relay_server.state import RelayState, current_state

log = logging.getLogger("relay_server.webhooks")

#: The largest request body the relay reads (Twilio's webhooks are a few KiB; a pushed message
#: may be as large as a frame, ``max_frame_bytes``): larger gets 413 before it is read whole,
#: also without a Content-Length (chunked).
BODY_MAX_BYTES = 64 << 10
#: Seconds a client has to send a request's body once the handler reads it (then 408).
BODY_TIMEOUT_SECONDS = 10

#: A webhook's fields: the POST form, or the query of a GET.
Fields = MultiDict[str, str]
R = TypeVar("R")


def bound_bodies(app: Quart, max_frame_bytes: int) -> None:
    """Bound every request body of ``app``.

    At most :data:`BODY_MAX_BYTES` (or a frame, if larger), sent within
    :data:`BODY_TIMEOUT_SECONDS`; a larger one is refused with 413 and one log line.
    """
    # Quart checks Content-Length before reading and counts a chunked body as it arrives.
    app.config["MAX_CONTENT_LENGTH"] = max(BODY_MAX_BYTES, max_frame_bytes)
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_SECONDS
    app.register_error_handler(413, _too_large)


async def _too_large(_: Exception) -> Any:
    limit = int(current_app.config["MAX_CONTENT_LENGTH"])
    log.warning(
        "refused %s %s: body larger than %d KiB (Content-Length %s)",
        request.method,
        request.path,
        limit >> 10,
        request.content_length if request.content_length is not None else "none: chunked",
    )
    return {"error": f"request body too large: at most {limit} bytes"}, 413


def twilio_webhook(
    handler: Callable[[Fields], Awaitable[R]],
) -> Callable[[], Awaitable[R | Response]]:
    """Decorate a webhook route: 403 unless Twilio signed it.

    A signed request calls ``handler`` with its fields (the form of a POST, the query of a
    GET).

    The signature is checked over the configured public URL plus the route's path and the raw
    query string, with the POST form as its parameters. The form is read within the app's body
    bound (:func:`bound_bodies`). Without signature checks every request passes.
    """

    @functools.wraps(handler)
    async def checked() -> R | Response:
        state = current_state()
        post = request.method == "POST"
        if state.checker is not None and not _signed(state, await request.form if post else {}):
            return Response("forbidden\n", 403)
        fields: Fields = await request.form if post else request.args
        return await handler(fields)

    return checked


def public_base(state: RelayState) -> str:
    """The relay's public base URL (the request's host when none is configured)."""
    return state.config.public_base(request.host_url)


def _signed(state: RelayState, params: Any) -> bool:
    """Whether the request carries Twilio's signature of its public URL (+ raw query)."""
    assert state.checker is not None
    # The route's own path, not one rebuilt from headers (webhooks have no path parameters).
    path = request.url_rule.rule if request.url_rule is not None else request.path
    url = public_base(state) + path
    if request.query_string:
        url += "?" + request.query_string.decode()
    if state.checker.http_ok(url, params, request.headers.get("X-Twilio-Signature")):
        return True
    log.warning(
        "refused %s %s: bad or missing X-Twilio-Signature (checked %s)",
        request.method,
        path,
        url,
    )
    return False
