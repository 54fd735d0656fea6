"""X-Twilio-Signature checks with the twilio SDK's RequestValidator (Twilio docs: webhook security).

URLs are always rebuilt from the *configured* public URL, never from request headers: behind
ngrok or a load balancer the relay sees ``http``, an internal host or a stripped prefix, and a
signature computed by Twilio over the public URL would never match (Twilio docs: webhook security).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from twilio.request_validator import RequestValidator


class SignatureChecker:
    """Checks Twilio's signatures for one auth token."""

    def __init__(self, auth_token: str) -> None:
        self._validator = RequestValidator(auth_token)

    def http_ok(self, url: str, params: Mapping[str, str], signature: str | None) -> bool:
        """Whether a webhook is signed.

        ``url`` as Twilio requested it (query included); ``params`` the POST form (pass ``{}``
        for GET).
        """
        if not signature:
            return False
        # A MultiDict goes in as it is: the SDK signs every value of a repeated key.
        return bool(self._validator.validate(url, params, signature))

    def websocket_ok(self, signed_url: str, signature: str | None) -> bool:
        """A WebSocket upgrade: ``signed_url`` is the ``wss://`` URL as written in the TwiML.

        Twilio's own servers (TAC) sign ``wss://host/path`` with the query pairs as params;
        a query kept in the URL is accepted too (Twilio docs: webhook security: which one Twilio
        uses is not settled).
        """
        if not signature:
            return False
        parts = urlsplit(signed_url)
        base = f"{parts.scheme}://{parts.netloc}{parts.path}"
        return bool(
            self._validator.validate(base, dict(parse_qsl(parts.query)), signature)
            or (parts.query and self._validator.validate(signed_url, {}, signature))
        )


def bearer_ok(expected: str | None, header: str | None) -> bool:
    """``Authorization: Bearer <token>`` against the relay's API token (constant time).

    The scheme is matched in any case (auth schemes are case-insensitive, RFC 9110 11.1).
    """
    scheme, _, credentials = (header or "").strip().partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip().encode(), expected.encode())
