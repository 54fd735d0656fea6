"""The relay package's exceptions: one root, :class:`RelayError`.

The tree (the module that raises each error is named)::

    RelayError
    ├── ConfigError          a setting is missing or wrong (start-up stops)
    ├── LLMError             relay_server.chat: the LLM could not answer (``.kind``, ``.status``)
    ├── TokenRefused         relay_server.socket_tokens: a socket URL opens nothing
    └── ProtocolError        relay_server.protocol: a frame that is not valid ConversationRelay
                             (also a ``ValueError``)

The relay never decides an exit code: ``crctl`` maps a :class:`ConfigError` to 2 and any other
:class:`RelayError` to 1 (``crctl.errors``).
"""


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """A setting is missing or wrong; the message names it and says what to do."""
