"""The relay's command-line options, declared once for ``crctl serve`` and ``crctl up``.

Each option is an ``Annotated`` type whose help text ends with the setting's environment name
and default, both read from :class:`crctl.settings.Settings` (the one place that declares them),
so ``--help`` can never disagree with what the relay does. Every option defaults to ``None``:
"not given", so the environment and dotenv files still apply (flags > env > .env.local > .env).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic_core import PydanticUndefined

from crctl.settings import Settings, env_names

#: Settings whose default is not a constant, in words.
_DEFAULT_TEXT = {
    "agent": "llm with OPENAI_API_KEY or OPENAI_BASE_URL, else echo",
    "app_dir": "the current folder",
    "events_db": "~/.crctl/events.sqlite3",
    "model": "gpt-4o-mini; with only OPENAI_BASE_URL, the server's one model",
}


def default_text(field: str) -> str | None:
    """The default of setting ``field`` as help shows it (``None``: no default worth saying)."""
    if field in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[field]
    info = Settings.model_fields[field]
    value: Any = info.default
    if value is PydanticUndefined or value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def settings_flags(values: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a command that are settings, for :func:`crctl.settings.load_settings`.

    They are named as the setting. Pass the command's ``locals()`` first thing.
    """
    return {name: value for name, value in values.items() if name in Settings.model_fields}


def setting_option(field: str, metavar: str, text: str, *names: str) -> Any:
    """A ``typer.Option`` for setting ``field``: ``text``, then ``(env …; default …)``."""
    extra = [f"env {', '.join(env_names(field))}"]
    default = default_text(field)
    if default is not None:
        extra.append(f"default {default}")
    return typer.Option(
        *names, metavar=metavar, help=f"{text} ({'; '.join(extra)})", show_default=False
    )


# ---------------------------------------------------------------- where the relay listens
Host = Annotated[Optional[str], setting_option("host", "ADDRESS", "Address to bind.")]
Port = Annotated[Optional[int], setting_option("port", "PORT", "Port of the relay.")]
PublicUrl = Annotated[
    Optional[str],
    setting_option(
        "public_url",
        "URL",
        "Public https:// base URL Twilio calls; signatures are checked against it.",
    ),
]
VerifySignatures = Annotated[
    Optional[bool],
    setting_option(
        "verify_signatures",
        "",
        "Check X-Twilio-Signature on every webhook and the WebSocket upgrade "
        "(turning it off prints a warning).",
        "--verify-signatures/--no-verify-signatures",
    ),
]
LogLevel = Annotated[
    Optional[str], setting_option("log_level", "LEVEL", "DEBUG, INFO, WARNING or ERROR.")
]

# ---------------------------------------------------------------- the agent
Agent = Annotated[
    Optional[str],
    setting_option("agent", "AGENT", "llm, echo, or module:Class (a CallSession subclass)."),
]
AppDir = Annotated[
    Optional[Path],
    setting_option("app_dir", "DIR", "Folder that --agent and --tools modules are imported from."),
]
Model = Annotated[Optional[str], setting_option("model", "NAME", "LLM model.")]
OpenAIBaseUrl = Annotated[
    Optional[str],
    setting_option("openai_base_url", "URL", "OpenAI-compatible endpoint (Ollama, vLLM, Groq…)."),
]
SystemPrompt = Annotated[
    Optional[str], setting_option("system_prompt", "TEXT", "System prompt of the LLM agent.")
]
SystemPromptFile = Annotated[
    Optional[Path],
    setting_option("system_prompt_file", "FILE", "Read the system prompt from this file."),
]
Tools = Annotated[
    Optional[list[str]],
    setting_option(
        "tools",
        "MODULE",
        "Module whose @tool functions the LLM may call (repeatable; comma-separated in env).",
        "--tools",
    ),
]
TwimlTemplate = Annotated[
    Optional[str],
    setting_option(
        "twiml_template", "TEMPLATE", "TwiML template /twiml serves (crctl twiml list)."
    ),
]
Routes = Annotated[
    Optional[Path],
    setting_option(
        "routes",
        "FILE",
        "TOML file of [[route]]s: numbers mapped to their own agent, tools, prompt, model and "
        "template (a call matching none gets the settings above).",
    ),
]
WelcomeGreeting = Annotated[
    Optional[str],
    setting_option(
        "welcome_greeting", "TEXT", "Spoken when the call connects (overrides the template's)."
    ),
]
HandoffNumber = Annotated[
    Optional[str],
    setting_option(
        "handoff_number", "NUMBER", "Number or SIP URI dialled when the agent hands off."
    ),
]
LlmTimeout = Annotated[
    Optional[float],
    setting_option(
        "llm_timeout", "SECONDS", "Wait this long for the LLM to connect and for each token."
    ),
]
LlmUsage = Annotated[
    Optional[bool],
    setting_option(
        "llm_usage",
        "",
        "Ask the LLM for each reply's token usage (stream_options.include_usage); turn it off "
        "for an OpenAI-compatible server that refuses the parameter.",
        "--llm-usage/--no-llm-usage",
    ),
]
MachineMessage = Annotated[
    Optional[str],
    setting_option(
        "machine_message",
        "TEXT",
        "Left on an answering machine (outbound calls with machine detection), then hang up.",
    ),
]
Apology = Annotated[Optional[str], setting_option("apology", "TEXT", "Spoken when the LLM fails.")]
FillerAfterMs = Annotated[
    Optional[int],
    setting_option(
        "filler_after_ms", "MS", "Say a preemptible filler when the first token is slower (0: off)."
    ),
]
SilenceTimeout = Annotated[
    Optional[float],
    setting_option("silence_timeout", "SECONDS", "Caller silence before a reminder (0: off)."),
]
DtmfBuffer = Annotated[
    Optional[bool],
    setting_option(
        "dtmf_buffer",
        "",
        "Collect digits until # or a pause instead of one turn per key.",
        "--dtmf-buffer/--no-dtmf-buffer",
    ),
]

# ---------------------------------------------------------------- the call log
EventsDb = Annotated[
    Optional[str],
    setting_option(
        "events_db", "FILE", "SQLite file of call events ('' keeps them in memory only)."
    ),
]
RedisUrl = Annotated[
    Optional[str],
    setting_option(
        "redis_url",
        "URL",
        "Redis shared by the relay's replicas (redis://host:port/db): live calls, "
        "conversations, pushes and call events; none: this process alone.",
    ),
]
DrainTimeout = Annotated[
    Optional[float],
    setting_option(
        "drain_timeout",
        "SECONDS",
        "On SIGTERM, how long live calls may go on before they are closed (new ones are "
        "refused at once; a second signal stops at once).",
    ),
]
Workers = Annotated[
    Optional[int],
    setting_option(
        "workers",
        "N",
        "Relay processes sharing the port (SO_REUSEPORT); more than 1 needs --redis-url.",
    ),
]
MetricsPort = Annotated[
    Optional[int],
    setting_option(
        "metrics_port",
        "PORT",
        "Also serve GET /metrics (Prometheus) on this port of the same address, plain HTTP and "
        "without the API token: keep it private (on the relay's port it needs the token).",
    ),
]
EventsKeepDays = Annotated[
    Optional[float],
    setting_option("events_keep_days", "DAYS", "Delete call events older than this."),
]
EventsMaxRows = Annotated[
    Optional[int], setting_option("events_max_rows", "ROWS", "Keep at most this many call events.")
]
