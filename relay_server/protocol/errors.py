"""The protocol core's one exception, under the relay's root (relay_server/errors.py)."""

from relay_server.errors import RelayError


class ProtocolError(RelayError, ValueError):
    """A frame that is not valid ConversationRelay; the message says which rule it breaks.

    Not JSON, not an object, a wrong field type, too large, or an outbound value Twilio would
    reject.
    """
