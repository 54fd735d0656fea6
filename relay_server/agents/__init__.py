"""Ready-made agents: the LLM agent (default with an API key) and the offline echo agent."""

from relay_server.agents.conversation import ConversationAgent
from relay_server.agents.echo import EchoAgent
from relay_server.agents.llm_agent import LLMAgent

__all__ = ["ConversationAgent", "EchoAgent", "LLMAgent"]
