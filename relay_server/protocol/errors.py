"""The protocol core's one exception, under the relay's root (relay_server/errors.py)."""

from relay_server.errors import RelayError


class ProtocolError(RelayError, ValueError):
    """A frame that is not valid ConversationRelay: not JSON, not an object, a wrong field type,
    too large, or an outbound value Twilio would reject. The message says which.
    """
