"""The relay package's root exception."""


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing or wrong; the message names it and says what to do."""
