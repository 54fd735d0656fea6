"""crctl: build, run and test voice agents on Twilio ConversationRelay."""

__version__ = "0.1.0"
