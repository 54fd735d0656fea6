"""The protocol core's one exception."""


class ProtocolError(ValueError):
    """A frame that is not valid ConversationRelay: not JSON, not an object, a wrong field type,
    too large, or an outbound value Twilio would reject. The message says which."""
