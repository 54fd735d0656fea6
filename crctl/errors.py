"""crctl's exceptions: one root, :class:`CrctlError`, and the exit-code rule.

Every failure crctl expects is a :class:`CrctlError` (or the relay's
:class:`relay_server.errors.RelayError`, or the templates'
:class:`twiml_templates.errors.TemplatesError`). The root group of the CLI
(:class:`crctl.cli.LazyGroup`) catches them once, for every command, and prints one line: what
happened and the next step. Anything else is a bug and keeps its traceback.

Exit codes:

* ``0``: done.
* ``1``: the operation failed (Twilio refused, the relay is unreachable, a scripted turn failed).
* ``2``: usage or configuration: a bad flag or argument, a bad settings, template or script
  file, missing credentials. Fix the command line or the configuration, then run it again.
* ``130``: interrupted (Ctrl-C).

The tree (``exit_code`` is a class attribute; the module that raises each error is named)::

    CrctlError                    exit 1
    ├── ConfigurationError        exit 2
    │   ├── UsageError            a bad flag value or combination of flags
    │   ├── SettingsError         crctl.settings: a setting or the dotenv files
    │   ├── CredentialsError      crctl.credentials: no usable Twilio credentials
    │   └── ScriptError           crctl.call_script: a malformed call script
    ├── ProvisioningError         crctl.provisioning: Twilio refused (``.code``, ``.status``)
    ├── StateError                crctl.state: the state file cannot be read or written
    ├── TunnelError               crctl.tunnel: no tunnel could be opened
    ├── TailError                 crctl.tail: the relay refused a call-log request
    └── CallError                 crctl.caller: the simulated call went wrong
        └── Unreachable           crctl.caller: nothing answers at the relay's address

    RelayError                    exit 1 (relay_server.errors)
    └── ConfigError               exit 2
    TemplatesError                exit 2 (twiml_templates.errors)
"""

from __future__ import annotations

from typing import ClassVar


class CrctlError(Exception):
    """A failure with a message fit for the user: what happened and what to do next."""

    #: The process's exit code when this error ends a command (module docstring).
    exit_code: ClassVar[int] = 1


class ConfigurationError(CrctlError):
    """The command line or the configuration is wrong: fixing it, not retrying, helps."""

    exit_code: ClassVar[int] = 2


class UsageError(ConfigurationError):
    """A flag's value, or a combination of flags, that the command cannot use."""


class SettingsError(ConfigurationError):
    """One line naming the setting that stops start-up and what is wrong with it.

    Attributes:
        setting: the setting's name (``port``) or environment variable (``CRCTL_STATE_DIR``),
            when one setting is to blame.
    """

    def __init__(self, message: str, *, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


class CredentialsError(ConfigurationError):
    """No usable Twilio credentials; the message says where crctl looked and what to set."""


class ProvisioningError(CrctlError):
    """A Twilio operation failed; the message is one line with the next step.

    Attributes:
        code: Twilio's error code (for instance 20404, not found), when Twilio gave one.
        status: the HTTP status of Twilio's answer, when there was an answer.
        action: what crctl was doing (``"looking up +15551234567"``), when it was Twilio's call.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        status: int | None = None,
        action: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.action = action


class StateError(CrctlError):
    """The state file cannot be read or written."""


class TunnelError(CrctlError):
    """No tunnel could be opened; the message says what is missing and how to fix it."""


def exit_code(exc: BaseException) -> int | None:
    """The exit code for a known failure, or ``None`` for an unexpected exception (a bug).

    The relay's and the templates' errors know nothing of a command line, so their codes are
    decided here: a configuration error of theirs is a ``2``, any other a ``1``.
    """
    if isinstance(exc, CrctlError):
        return exc.exit_code
    # Imported only when such an error happened: the module is loaded already.
    module = type(exc).__module__
    if module.startswith("relay_server"):
        from relay_server.errors import ConfigError, RelayError

        if isinstance(exc, RelayError):
            return 2 if isinstance(exc, ConfigError) else 1
    if module.startswith("twiml_templates"):
        from twiml_templates.errors import TemplatesError

        if isinstance(exc, TemplatesError):
            return 2
    return None
