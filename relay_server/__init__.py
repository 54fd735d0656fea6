"""crctl's ConversationRelay relay: protocol, sessions, agents and the Quart app.

The public names below are imported on first use (PEP 562), so that ``import
relay_server.protocol`` or ``relay_server.config`` (the CLI's settings) does not load Quart,
openai and the rest of the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay_server.agents import ConversationAgent, EchoAgent, LLMAgent
    from relay_server.app import create_app
    from relay_server.chat import ChatModel, ChatReply, LLMError
    from relay_server.config import AgentConfig, LLMConfig, RelayConfig
    from relay_server.errors import ConfigError, RelayError
    from relay_server.events import CallEvent, EventBus
    from relay_server.services import Services
    from relay_server.session import CallSession, SessionLink
    from relay_server.tools import Tool, tool

#: Public name -> the module that defines it.
_SOURCES = {
    "AgentConfig": "relay_server.config",
    "CallEvent": "relay_server.events",
    "CallSession": "relay_server.session",
    "ChatModel": "relay_server.chat",
    "ChatReply": "relay_server.chat",
    "ConfigError": "relay_server.errors",
    "ConversationAgent": "relay_server.agents",
    "EchoAgent": "relay_server.agents",
    "EventBus": "relay_server.events",
    "LLMAgent": "relay_server.agents",
    "LLMConfig": "relay_server.config",
    "LLMError": "relay_server.chat",
    "RelayConfig": "relay_server.config",
    "RelayError": "relay_server.errors",
    "Services": "relay_server.services",
    "SessionLink": "relay_server.session",
    "Tool": "relay_server.tools",
    "create_app": "relay_server.app",
    "tool": "relay_server.tools",
}

__all__ = [
    "AgentConfig",
    "CallEvent",
    "CallSession",
    "ChatModel",
    "ChatReply",
    "ConfigError",
    "ConversationAgent",
    "EchoAgent",
    "EventBus",
    "LLMAgent",
    "LLMConfig",
    "LLMError",
    "RelayConfig",
    "RelayError",
    "Services",
    "SessionLink",
    "Tool",
    "create_app",
    "tool",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'relay_server' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
