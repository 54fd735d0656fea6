"""The relay's configuration as plain values.

The relay never reads the environment: ``crctl`` resolves flags, environment and ``.env`` files
and hands a :class:`RelayConfig` to :func:`relay_server.app.create_app`. Tests build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from relay_server.protocol import DEFAULT_MAX_FRAME_BYTES


@dataclass(frozen=True)
class AgentConfig:
    """How the default agents talk, apologise, wait and remind."""

    model: str = "gpt-4o-mini"
    system_prompt: str = (
        "You are a friendly voice assistant on a phone call. Answer in one to three short "
        "spoken sentences, without lists, markdown or emoji."
    )
    temperature: float | None = None
    #: Spoken when the LLM fails (connection error, timeout, 429, 5xx, stream cut).
    apology: str = "Sorry, I'm having trouble answering right now. Could you say that again?"
    #: Spoken (preemptible) when the first token takes longer than this many ms; 0 disables.
    filler_after_ms: int = 1200
    filler: str = "One moment."
    #: Seconds of caller silence after the agent finished before a reminder; 0 disables.
    silence_timeout: float = 15.0
    silence_reminder: str = "Are you still there?"
    silence_max_reminders: int = 2
    silence_goodbye: str = "I haven't heard from you, so I'll hang up now. Goodbye!"
    #: DTMF entry: with the buffer on, digits collect until ``#`` or a pause of this many seconds.
    dtmf_buffer: bool = False
    dtmf_pause: float = 2.0
    #: Tool rounds per turn before the relay stops asking the model.
    max_tool_rounds: int = 5
    #: Turns of history kept (user+assistant pairs); older ones go, the system prompt stays.
    max_history_turns: int = 50
    #: Left on an answering machine (an outbound call with machine detection), then the call
    #: ends; ``None``: the call ends without a word (:meth:`CallSession.on_answered_by`).
    machine_message: str | None = None


@dataclass(frozen=True)
class LLMConfig:
    """Where the OpenAI-compatible endpoint is and how patient to be with it."""

    api_key: str | None = field(default=None, repr=False)
    base_url: str | None = None
    #: Seconds: to connect, and without a token (a content or tool-call delta) from the request
    #: on. Keep-alives (SSE comments, empty or role-only chunks) do not reset it.
    timeout: float = 15.0
    max_retries: int = 0
    #: The longest line of the SSE stream the relay reads, in bytes; a longer one is a fault
    #: (``bad_chunk``) and the stream is closed at once, without reading the rest.
    max_line_bytes: int = 1 << 20
    #: Ask for the token usage at the end of each stream (``stream_options: {"include_usage":
    #: true}``); off for OpenAI-compatible servers that refuse the parameter.
    stream_usage: bool = True


@dataclass(frozen=True)
class TwilioAccount:
    """The Twilio account ``POST /calls`` creates calls with (HTTP Basic auth)."""

    account_sid: str
    #: The account SID with its auth token, or an API key (SK…) with its secret.
    username: str
    password: str = field(repr=False)
    #: Twilio's REST API (a mock's address in tests: CRCTL_TWILIO_API_URL).
    api_url: str = "https://api.twilio.com"


@dataclass(frozen=True)
class RelayConfig:
    """Everything :func:`relay_server.app.create_app` needs."""

    #: The base URL Twilio uses to reach this relay (``https://host``), as configured, never
    #: rebuilt from request headers (Twilio docs: webhook security). ``None``: local only.
    public_url: str | None = None
    #: Twilio's primary auth token; with it every webhook and WS upgrade must be signed.
    auth_token: str | None = field(default=None, repr=False)
    #: Explicit opt-out of signature checks (warned about at start).
    verify_signatures: bool = True
    #: Key of the one-time socket URLs ``/twiml`` mints per call (``relay_server.socket_tokens``);
    #: ``None``: derived from ``auth_token``, or random per process without one.
    socket_secret: str | None = field(default=None, repr=False)
    #: Seconds a minted socket URL stays valid (Twilio connects right after fetching the TwiML).
    socket_token_lifetime: float = 90.0
    #: Bearer token for the relay's own API (``/events``, ``/calls``…); ``None`` disables it.
    api_token: str | None = field(default=None, repr=False)
    #: ``package.module:Class``, ``llm`` or ``echo``; ``None``: ``llm`` with a key or base URL.
    agent: str | None = None
    #: Python modules whose ``@tool`` functions the LLM agent may call.
    tool_modules: tuple[str, ...] = ()
    #: Folder the agent's and the tools' modules are imported from first (put at the front of
    #: ``sys.path``, like uvicorn's ``--app-dir``); ``None``: ``sys.path`` as it is.
    app_dir: str | None = None
    #: The ``twiml_templates`` template ``/twiml`` serves (a preset, ./twiml/ name or .toml path).
    twiml_template: str = "basic"
    #: TOML file of routes: numbers mapped to their own agent, tools, prompt and template
    #: (:mod:`relay_server.routing`); ``None``: every call gets the settings above.
    routes_file: str | None = None
    #: Overrides the template's welcomeGreeting (``None``: the template's).
    welcome_greeting: str | None = None
    #: Spoken when a dropped socket is reconnected through ``/action``.
    reconnect_greeting: str = "Sorry, we were cut off. Where were we?"
    max_reconnects: int = 3
    #: E.164 number or SIP URI ``/action`` dials when the agent hands off to a person.
    handoff_number: str | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    #: Seconds a closed call's history is kept for a reconnect through ``/action``.
    resume_ttl: float = 120.0
    #: SQLite file of the call events (``/events``, ``/calls``); ``None``: kept in memory only.
    events_db: str | None = None
    #: Events older than this many days, or beyond this many rows, are deleted.
    events_keep_days: float = 30.0
    events_max_rows: int = 500_000
    #: ``redis://host:port/db``: replicas of the relay share live calls, conversations, pushes
    #: and call events through it (``relay_server.cluster``); ``None``: this process alone.
    redis_url: str | None = field(default=None, repr=False)
    #: The account outbound calls are made with (``POST /calls``); ``None``: not configured.
    twilio_account: TwilioAccount | None = None
    agent_config: AgentConfig = field(default_factory=AgentConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def public_base(self, fallback: str) -> str:
        """The public base URL without a trailing slash (``fallback`` when none is configured)."""
        return (self.public_url or fallback).rstrip("/")

    def websocket_url(self, fallback: str) -> str:
        """The ``wss://`` URL of ``/ws`` that goes in the TwiML and that Twilio signs."""
        parts = urlsplit(self.public_base(fallback))
        scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))
