"""Twilio credentials: flags > environment (``.env.local``, ``.env``) > twilio-cli profile.

People who already use twilio-cli set up nothing new: its ``~/.twilio-cli/config.json`` holds
``profiles: {id: {accountSid, apiKey, apiSecret}}`` and ``activeProject`` (twilio-cli-core's
config.js). Profiles of old twilio-cli versions kept their secret in the system keychain, which
crctl cannot read; it says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from crctl.environment import Environment, current
from crctl.errors import CredentialsError as CredentialsError  # raised here, caught by callers

_SID_PREFIX = "AC"


@dataclass(frozen=True)
class Credentials:
    """Who crctl talks to Twilio as. ``username``/``password`` go into HTTP Basic auth."""

    account_sid: str
    username: str
    password: str = field(repr=False)
    #: Where they came from: "flags", "environment" or "twilio-cli profile NAME".
    source: str
    #: The primary auth token, when that is what was given (signature checks need it).
    auth_token: str | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        """What the credentials are, for messages: "auth token" or "API key SK…"."""
        return "auth token" if self.username == self.account_sid else f"API key {self.username}"


def redact(secret: str | None) -> str:
    """``abcd…wxyz`` style, enough to tell two secrets apart and no more."""
    if not secret:
        return "(none)"
    return "*" * 8 if len(secret) < 12 else f"{secret[:2]}…{secret[-2:]}"


def twilio_cli_config() -> Path:
    """Where twilio-cli keeps its profiles (``TWILIO_CLI_CONFIG_DIR`` or ``~/.twilio-cli``)."""
    return current().twilio_cli_config()


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def resolve(
    *,
    account_sid: str | None = None,
    auth_token: str | None = None,
    api_key: str | None = None,
    api_secret: str | None = None,
    profile: str | None = None,
    environment: Environment | None = None,
) -> Credentials:
    """The credentials to use.

    A named ``profile`` is used as asked; otherwise flags, then the environment
    (``TWILIO_ACCOUNT_SID`` with ``TWILIO_AUTH_TOKEN``, or with ``TWILIO_API_KEY`` +
    ``TWILIO_API_SECRET``; ``.env.local`` and ``.env`` count as the environment), then
    twilio-cli's active profile. ``environment``: the resolved one (default: the command's).
    """
    env = environment if environment is not None else current()
    if profile is None:
        given = _pair(account_sid, auth_token, api_key, api_secret, "flags")
        if given is not None:
            return given
        from_env = _pair(
            env.twilio_account_sid,
            _secret(env.twilio_auth_token),
            env.twilio_api_key,
            _secret(env.twilio_api_secret),
            "environment",
        )
        if from_env is not None:
            return from_env
    return _from_profile(profile, env.twilio_cli_config())


def _pair(
    sid: str | None, token: str | None, key: str | None, secret: str | None, source: str
) -> Credentials | None:
    if not (sid or token or key or secret):
        return None
    where = "--account-sid" if source == "flags" else "TWILIO_ACCOUNT_SID"
    if not sid:
        raise CredentialsError(f"{where} is missing ({source} give a secret but no account)")
    if not sid.startswith(_SID_PREFIX) or len(sid) != 34:
        raise CredentialsError(f"{where}: {sid!r} is not an account SID (AC + 32 characters)")
    if key or secret:
        if not (key and secret):
            missing = "API secret" if key else "API key"
            raise CredentialsError(f"the {missing} is missing ({source}): give both or neither")
        if not key.startswith("SK"):
            raise CredentialsError(f"API key {key!r} does not start with SK")
        return Credentials(sid, key, secret, source, auth_token=token)
    if not token:
        raise CredentialsError(
            f"{source} give the account but no secret: set TWILIO_AUTH_TOKEN, or "
            "TWILIO_API_KEY and TWILIO_API_SECRET"
        )
    return Credentials(sid, sid, token, source, auth_token=token)


def _from_profile(name: str | None, path: Path) -> Credentials:
    hint = (
        "set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN (or TWILIO_API_KEY + TWILIO_API_SECRET), "
        "or log in with twilio-cli (`twilio login`)"
    )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if name:
            raise CredentialsError(
                f"no twilio-cli profile {name!r}: {path} does not exist"
            ) from None
        raise CredentialsError(f"no Twilio credentials: {hint}") from None
    except (OSError, ValueError) as exc:
        raise CredentialsError(f"cannot read {path}: {exc}") from exc
    profiles = config.get("profiles") or {}
    chosen = name or config.get("activeProject") or next(iter(profiles), None)
    legacy = {p.get("id") for p in config.get("projects") or [] if isinstance(p, dict)}
    entry = profiles.get(chosen) if chosen else None
    if entry is None:
        if chosen in legacy:
            raise CredentialsError(
                f"twilio-cli profile {chosen!r} keeps its secret in the system keychain, which "
                f"crctl cannot read: run `twilio profiles:create` again, or {hint.split(', or')[0]}"
            )
        known = ", ".join(sorted(profiles)) or "none"
        if name:
            raise CredentialsError(f"no twilio-cli profile {name!r} in {path} (profiles: {known})")
        raise CredentialsError(f"no Twilio credentials: {hint}")
    sid, key, secret = entry.get("accountSid"), entry.get("apiKey"), entry.get("apiSecret")
    if not (sid and key and secret):
        raise CredentialsError(
            f"twilio-cli profile {chosen!r} in {path} lacks accountSid/apiKey/apiSecret"
        )
    source = f"twilio-cli profile {chosen}"
    if key == sid:  # a profile made from an auth token stores it as the "key"/"secret" pair
        return Credentials(sid, sid, secret, source, auth_token=secret)
    return Credentials(sid, key, secret, source)
