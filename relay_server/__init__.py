"""crctl's ConversationRelay relay: protocol, sessions, agents and the Quart app."""

from relay_server.agents import ConversationAgent, EchoAgent, LLMAgent
from relay_server.app import create_app
from relay_server.config import AgentConfig, LLMConfig, RelayConfig
from relay_server.errors import ConfigError, RelayError
from relay_server.events import CallEvent, EventBus
from relay_server.session import CallSession, SessionLink
from relay_server.tools import Tool, tool

__all__ = [
    "AgentConfig",
    "CallEvent",
    "CallSession",
    "ConfigError",
    "ConversationAgent",
    "EchoAgent",
    "EventBus",
    "LLMAgent",
    "LLMConfig",
    "RelayConfig",
    "RelayError",
    "SessionLink",
    "Tool",
    "create_app",
    "tool",
]
