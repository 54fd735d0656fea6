"""What every crctl command reads from outside: the environment and the dotenv files, read once.

One mechanism for the whole CLI: pydantic-settings layers the process environment over
``.env.local`` over ``.env`` (in the working folder), and flags, passed by the command, beat
all three. :class:`crctl.settings.Settings` does the same for the relay's own settings; this
class holds the rest: where crctl keeps its files, the Twilio credentials, the tunnel, and the
two test hooks (a fake Twilio API, a fake tunnel), which are settings like any other instead of
variables read deep inside.

The root group of the CLI resolves it once per command (:func:`resolved`); code that runs
outside a command (a library user, a test calling a function) reads it afresh on each
:func:`current`, so a changed environment is seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from crctl.errors import SettingsError

#: The dotenv files, in rising precedence (the environment itself beats both).
DOTENV_FILES = (".env", ".env.local")


def _var(name: str) -> Any:
    return Field(None, validation_alias=AliasChoices(name))


class Environment(BaseSettings):
    """crctl's settings outside the relay's; each field names its environment variable."""

    model_config = SettingsConfigDict(env_file=DOTENV_FILES, extra="ignore")

    #: crctl's own folder (state file, API token, call history, events database).
    state_dir: Path | None = _var("CRCTL_STATE_DIR")
    twilio_account_sid: str | None = _var("TWILIO_ACCOUNT_SID")
    twilio_auth_token: SecretStr | None = _var("TWILIO_AUTH_TOKEN")
    twilio_api_key: str | None = _var("TWILIO_API_KEY")
    twilio_api_secret: SecretStr | None = _var("TWILIO_API_SECRET")
    #: Where twilio-cli keeps its profiles (``~/.twilio-cli`` unless set).
    twilio_cli_config_dir: Path | None = _var("TWILIO_CLI_CONFIG_DIR")
    #: A testing aid: every Twilio REST call goes to this base URL (a mock such as Prism).
    twilio_api_url: str | None = _var("CRCTL_TWILIO_API_URL")
    ngrok_authtoken: SecretStr | None = _var("NGROK_AUTHTOKEN")
    ngrok_path: str | None = _var("NGROK_PATH")
    #: The number ``crctl up`` points at its tunnel when ``--number`` is not given.
    number: str | None = _var("CRCTL_NUMBER")
    #: A testing aid: ``package.module:Class`` opens the tunnel instead of ngrok.
    tunnel_factory: str | None = _var("CRCTL_TUNNEL_FACTORY")
    #: The call log's database for ``crctl calls`` (``""``: none, memory only).
    events_db: str | None = _var("CRCTL_EVENTS_DB")
    #: The relay ``crctl tail`` follows when ``--url`` is not given.
    url: str | None = _var("CRCTL_URL")
    #: The relay's API token for ``tail`` and ``calls --url`` when ``--token`` is not given.
    api_token: SecretStr | None = _var("CRCTL_API_TOKEN")
    #: The price table ``calls show`` and ``calls stats`` cost tokens with (``--prices``).
    prices: Path | None = _var("CRCTL_PRICES")

    @field_validator(
        "state_dir",
        "twilio_account_sid",
        "twilio_auth_token",
        "twilio_api_key",
        "twilio_api_secret",
        "twilio_cli_config_dir",
        "twilio_api_url",
        "ngrok_authtoken",
        "ngrok_path",
        "tunnel_factory",
        "number",
        "url",
        "api_token",
        "prices",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `export NGROK_AUTHTOKEN=` unsets a value in practice; only events_db gives "" a meaning
        return None if value == "" else value

    @field_validator("twilio_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/") if value else value

    def api_token_value(self) -> str | None:
        """``CRCTL_API_TOKEN`` in clear, or None."""
        return self.api_token.get_secret_value() if self.api_token is not None else None

    def crctl_dir(self) -> Path:
        """The crctl state folder: ``CRCTL_STATE_DIR``, or ``~/.crctl``."""
        return self.state_dir if self.state_dir is not None else Path.home() / ".crctl"

    def twilio_cli_config(self) -> Path:
        """twilio-cli's profiles file (``TWILIO_CLI_CONFIG_DIR``, or ``~/.twilio-cli``)."""
        base = self.twilio_cli_config_dir
        return (base if base is not None else Path.home() / ".twilio-cli") / "config.json"


def load_environment() -> Environment:
    """Read the environment and the dotenv files now.

    Raises:
        SettingsError: a value cannot be parsed (one line naming the variable).
    """
    try:
        return Environment()
    except SourceError as exc:  # a dotenv file cannot be read or parsed
        raise SettingsError(" ".join(str(exc).split())) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"])
        raise SettingsError(
            f"{name}: {error['msg']} (got {error.get('input')!r})", setting=name
        ) from None


_resolved: Environment | None = None


@contextlib.contextmanager
def resolved() -> Iterator[Environment]:
    """Resolve the environment once for the command that runs inside this block."""
    global _resolved
    previous, _resolved = _resolved, load_environment()
    try:
        yield _resolved
    finally:
        _resolved = previous


def current() -> Environment:
    """The environment of the running command, or read now outside a command."""
    return _resolved if _resolved is not None else load_environment()
