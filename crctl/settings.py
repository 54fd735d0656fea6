"""Configuration: flags > environment > ``.env.local`` > ``.env``, resolved once at the CLI edge.

pydantic-settings does the layering (init values beat the environment, which beats the dotenv
files, of which the later one wins). Secrets are ``SecretStr``: their repr is ``'**********'``,
so a logged or printed settings object never shows them.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

from crctl.environment import DOTENV_FILES
from crctl.errors import SettingsError as SettingsError  # raised here; callers catch it here
from crctl.hosts import is_this_machine

# Re-exported: crctl's files are looked up through settings by serve, up and the tests.
from crctl.paths import api_token_path as api_token_path
from crctl.paths import default_events_db as default_events_db
from crctl.paths import read_api_token as read_api_token
from crctl.paths import state_dir as state_dir
from relay_server.config import AgentConfig, LLMConfig, RelayConfig, TwilioAccount


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Every setting of ``crctl serve``; environment names are ``CRCTL_<FIELD>`` unless noted."""

    model_config = SettingsConfigDict(
        env_prefix="CRCTL_",
        env_file=DOTENV_FILES,
        extra="ignore",
        populate_by_name=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    public_url: str | None = None
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("OPENAI_API_KEY"))
    openai_base_url: str | None = Field(None, validation_alias=_env("OPENAI_BASE_URL"))
    twilio_auth_token: SecretStr | None = Field(None, validation_alias=_env("TWILIO_AUTH_TOKEN"))
    #: The account ``POST /calls`` calls with: the SID with the auth token, or an API key.
    twilio_account_sid: str | None = Field(None, validation_alias=_env("TWILIO_ACCOUNT_SID"))
    twilio_api_key: str | None = Field(None, validation_alias=_env("TWILIO_API_KEY"))
    twilio_api_secret: SecretStr | None = Field(None, validation_alias=_env("TWILIO_API_SECRET"))
    #: A testing aid: Twilio's REST API elsewhere (a mock), for ``POST /calls``.
    twilio_api_url: str | None = None
    api_token: SecretStr | None = None
    #: Key of the per-call socket URLs; the same one in a Serverless export's environment.
    socket_secret: SecretStr | None = None
    verify_signatures: bool = True
    agent: str | None = None
    #: Where ``--agent module:Class`` and ``--tools module`` are imported from (as uvicorn's
    #: ``--app-dir``): the current folder unless set.
    app_dir: Path = Path(".")
    #: Comma-separated in the environment: ``CRCTL_TOOLS=pkg.tools,other.tools``.
    tools: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: ``None``: not chosen; the official API gets ``AgentConfig.model``, and with only
    #: OPENAI_BASE_URL the relay asks the server for its one model at start.
    model: str | None = None
    system_prompt: str | None = None
    system_prompt_file: Path | None = None
    welcome_greeting: str | None = None
    twiml_template: str = RelayConfig.twiml_template
    #: TOML file of routes (``relay_server.routing``): numbers mapped to their own agents.
    routes: Path | None = None
    handoff_number: str | None = None
    llm_timeout: float = Field(LLMConfig.timeout, gt=0)
    llm_retries: int = Field(LLMConfig.max_retries, ge=0, le=5)
    #: Ask the LLM for each stream's token usage (off for servers refusing ``stream_options``).
    llm_usage: bool = LLMConfig.stream_usage
    apology: str = AgentConfig.apology
    #: Left on an answering machine by an outbound call with machine detection, then hang up.
    machine_message: str | None = None
    filler: str = AgentConfig.filler
    filler_after_ms: int = Field(AgentConfig.filler_after_ms, ge=0)
    silence_timeout: float = Field(AgentConfig.silence_timeout, ge=0)
    silence_reminders: int = Field(AgentConfig.silence_max_reminders, ge=0)
    dtmf_buffer: bool = AgentConfig.dtmf_buffer
    dtmf_pause: float = Field(AgentConfig.dtmf_pause, gt=0)
    max_frame_bytes: int = Field(RelayConfig.max_frame_bytes, ge=1024)
    #: SQLite file of call events; ``None``: ``~/.crctl/events.sqlite3``; ``""``: memory only.
    events_db: str | None = None
    events_keep_days: float = Field(RelayConfig.events_keep_days, gt=0)
    events_max_rows: int = Field(RelayConfig.events_max_rows, ge=100)
    #: ``redis://host:port/db``: replicas share live calls, conversations, pushes and events.
    redis_url: str | None = None
    #: Seconds a relay told to stop (SIGTERM) lets its live calls go on before it closes them.
    drain_timeout: float = Field(300.0, ge=0)
    #: Processes serving one port (SO_REUSEPORT), each a full relay; more than 1 needs redis_url.
    workers: int = Field(1, ge=1, le=64)
    #: A plain HTTP port on ``host`` serving only ``/metrics``, without the API token (keep it
    #: private); ``None``: ``/metrics`` only on the relay's port, behind the token.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    log_level: str = "INFO"

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.netloc or parts.path):
            raise ValueError("must be a redis://host:port/db (or rediss://, unix://) URL")
        return value

    @field_validator("public_url", "openai_base_url", "twilio_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s):// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        if parts.scheme == "https" and parts.port == 443:
            # Twilio's signature check fails on wss URLs with an explicit :443 (Twilio docs: webhook
            # security).
            host = parts.netloc.rsplit(":", 1)[0]
            value = urlunsplit((parts.scheme, host, parts.path, "", ""))
        return value.rstrip("/")

    @field_validator("routes", mode="before")
    @classmethod
    def _no_routes(cls, value: Any) -> Any:
        return None if value == "" else value  # CRCTL_ROUTES= (empty): none

    @field_validator("tools", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    def relay_config(self) -> RelayConfig:
        """The relay's view of these settings."""
        secret = _reveal
        prompt = self.system_prompt
        if self.system_prompt_file is not None:
            try:
                prompt = self.system_prompt_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(
                    f"setting system_prompt_file: cannot read {self.system_prompt_file}: "
                    f"{exc.strerror}"
                ) from exc
        agent_kwargs: dict[str, Any] = {
            "model": self.model or AgentConfig.model,
            "apology": self.apology,
            "filler": self.filler,
            "filler_after_ms": self.filler_after_ms,
            "silence_timeout": self.silence_timeout,
            "silence_max_reminders": self.silence_reminders,
            "dtmf_buffer": self.dtmf_buffer,
            "dtmf_pause": self.dtmf_pause,
            "machine_message": self.machine_message or None,
        }
        if prompt:
            agent_kwargs["system_prompt"] = prompt
        return RelayConfig(
            public_url=self.public_url,
            auth_token=secret(self.twilio_auth_token),
            verify_signatures=self.verify_signatures,
            api_token=secret(self.api_token),
            socket_secret=secret(self.socket_secret),
            agent=self.agent,
            tool_modules=tuple(self.tools),
            app_dir=str(self.app_dir.expanduser().resolve()),
            welcome_greeting=self.welcome_greeting or None,
            twiml_template=self.twiml_template,
            routes_file=str(self.routes.expanduser()) if self.routes else None,
            handoff_number=self.handoff_number,
            max_frame_bytes=self.max_frame_bytes,
            events_db=self.events_db_path(),
            events_keep_days=self.events_keep_days,
            events_max_rows=self.events_max_rows,
            redis_url=self.redis_url or None,
            twilio_account=self.twilio_account(),
            agent_config=AgentConfig(**agent_kwargs),
            llm=LLMConfig(
                api_key=secret(self.openai_api_key),
                base_url=self.openai_base_url,
                timeout=self.llm_timeout,
                max_retries=self.llm_retries,
                stream_usage=self.llm_usage,
            ),
        )

    def twilio_account(self) -> TwilioAccount | None:
        """The account ``POST /calls`` creates calls with, if credentials are configured."""
        sid = self.twilio_account_sid
        if not sid:
            return None
        api_url = self.twilio_api_url or TwilioAccount.api_url
        key, secret = self.twilio_api_key, _reveal(self.twilio_api_secret)
        if key and secret:
            return TwilioAccount(sid, key, secret, api_url)
        token = _reveal(self.twilio_auth_token)
        return TwilioAccount(sid, sid, token, api_url) if token else None

    def events_db_path(self) -> str | None:
        """Where call events are stored (``None``: in memory only)."""
        if self.events_db is None:
            return str(default_events_db())
        return str(Path(self.events_db).expanduser()) if self.events_db else None

    def startup_problems(self) -> tuple[list[str], list[str]]:
        """Cross-setting checks: (errors that stop start-up, warnings to print)."""
        errors: list[str] = []
        warnings: list[str] = []
        loopback = is_this_machine(self.host)
        if self.twilio_auth_token and self.verify_signatures and not self.public_url:
            errors.append(
                "setting public_url (CRCTL_PUBLIC_URL): required with TWILIO_AUTH_TOKEN, because "
                "Twilio signs the public URL it calls; pass --public-url https://your-host"
            )
        if not self.verify_signatures:
            warnings.append(
                "signature checks are OFF (--no-verify-signatures): anyone who finds this URL "
                "can drive calls through it"
            )
        elif not self.twilio_auth_token:
            if not loopback:
                errors.append(
                    f"setting twilio_auth_token (TWILIO_AUTH_TOKEN): required to serve on "
                    f"{self.host}, so that only Twilio can reach the relay; set it, or pass "
                    "--no-verify-signatures to run unprotected"
                )
            else:
                warnings.append(
                    "no TWILIO_AUTH_TOKEN: requests are not signature-checked (fine on "
                    "127.0.0.1; set it before exposing the relay)"
                )
        if self.metrics_port is not None and self.metrics_port == self.port:
            errors.append(
                f"setting metrics_port (CRCTL_METRICS_PORT): {self.metrics_port} is the relay's "
                "own port; pick another"
            )
        if self.workers > 1 and not self.redis_url:
            errors.append(
                f"setting workers (CRCTL_WORKERS): {self.workers} workers share calls through "
                "Redis; pass --redis-url redis://host:port/0, or run one worker"
            )
        return errors, warnings


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None and value.get_secret_value() else None


def load_settings(**flags: Any) -> Settings:
    """Settings from flags (``None`` means "not given"), the environment and dotenv files.

    Raises :class:`SettingsError` with one line naming the first bad setting.
    """
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return Settings(**given)
    except SourceError as exc:  # a value in the environment or a dotenv file cannot be parsed
        raise SettingsError(" ".join(str(exc).split())) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        # Values from the environment are reported under their alias (OPENAI_BASE_URL…).
        name = _FIELD_OF_ENV.get(name, name)
        value = error.get("input")
        shown = "" if name in _SECRET_FIELDS or isinstance(value, dict) else f" (got {value!r})"
        env = _ENV_NAMES.get(name, f"CRCTL_{name.upper()}")
        raise SettingsError(f"setting {name} ({env}): {error['msg']}{shown}", setting=name) from exc


_SECRET_FIELDS = {
    "openai_api_key",
    "twilio_auth_token",
    "twilio_api_secret",
    "api_token",
    "socket_secret",
}
_ENV_NAMES = {
    "openai_api_key": "OPENAI_API_KEY",
    "openai_base_url": "OPENAI_BASE_URL",
    "twilio_auth_token": "TWILIO_AUTH_TOKEN",
    "twilio_account_sid": "TWILIO_ACCOUNT_SID",
    "twilio_api_key": "TWILIO_API_KEY",
    "twilio_api_secret": "TWILIO_API_SECRET",
}
_FIELD_OF_ENV = {env: name for name, env in _ENV_NAMES.items()}


def env_names(field: str) -> list[str]:
    """The environment variable(s) that set ``field`` (as in errors and ``--help``)."""
    if field not in Settings.model_fields:
        raise KeyError(field)
    return [_ENV_NAMES.get(field, f"CRCTL_{field.upper()}")]


# ------------------------------------------------------------------ files in ~/.crctl
def ensure_api_token(path: Path | None = None) -> str:
    """The local API token: the token file's, or a new random one written there first.

    The file is created readable by its owner only (0600), atomically, so two relays started at
    once agree on one token; later starts reuse it, so a running ``crctl tail`` keeps working
    across relay restarts. The token itself is never printed or logged.
    """
    path = path or api_token_path()
    token = read_api_token(path)
    if token is not None:
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        return token
    from twiml_templates.files import write_atomic

    try:
        # replace=False: if another process was first, its token stays and this one is unused
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600, replace=False)
    except OSError as exc:
        raise SettingsError(
            f"setting api_token (CRCTL_API_TOKEN): none is set and {path} cannot be written "
            f"({exc.strerror or exc}); set CRCTL_API_TOKEN or CRCTL_STATE_DIR"
        ) from None
    token = read_api_token(path)
    if token is None:
        raise SettingsError(f"setting api_token (CRCTL_API_TOKEN): {path} is empty; delete it")
    return token
