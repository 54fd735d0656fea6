"""Ready-made agents: the LLM agent (default with an API key) and the offline echo agent.

Imported on first use (PEP 562): the echo agent needs no LLM client, so ``EchoAgent`` does not
load openai.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay_server.agents.conversation import ConversationAgent
    from relay_server.agents.echo import EchoAgent
    from relay_server.agents.llm_agent import LLMAgent

_SOURCES = {
    "ConversationAgent": "relay_server.agents.conversation",
    "EchoAgent": "relay_server.agents.echo",
    "LLMAgent": "relay_server.agents.llm_agent",
}

__all__ = ["ConversationAgent", "EchoAgent", "LLMAgent"]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'relay_server.agents' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
