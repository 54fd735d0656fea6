"""The default agent: an OpenAI-compatible model streamed token by token, with tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from relay_server.agents.conversation import ConversationAgent
from relay_server.agents.responder import LLMResponder
from relay_server.chat import ChatModel
from relay_server.protocol import Setup
from relay_server.services import Services
from relay_server.session import SessionLink
from relay_server.tools import ToolBox
from twiml_templates import schema


# ------------------------------------------------------------------ built-in relay actions
# Each docstring below is the tool description the model reads (relay_server.tools): it is
# prompt text, so a lint rule is no reason to change what the model is told (noqa: D205).
async def end_call(session: ConversationAgent, reason: str = "") -> str:
    """End the phone call. Use it when the caller says goodbye or asks to hang up; say a short
    goodbye in the same answer.
    """  # noqa: D205
    session.request_end(None, reason)
    return "The call will end right after your goodbye."


async def transfer_to_human(session: ConversationAgent, reason: str, summary: str = "") -> str:
    """Hand the caller over to a human agent. Use it when the caller asks for a person or you
    cannot help. Tell the caller you are transferring them.
    """  # noqa: D205
    session.request_end(
        {"reasonCode": "live-agent-handoff", "reason": reason, "summary": summary}, reason
    )
    return "The caller will be transferred after your last sentence."


async def send_dtmf(session: ConversationAgent, digits: str) -> str:
    """Press keys on the phone line (for example to navigate another phone menu).
    Digits 0-9, * and #; w is a half-second pause.
    """  # noqa: D205
    await session.send_digits(digits)
    return f"sent {digits}"


async def switch_language(session: ConversationAgent, language: str) -> str:
    """Switch the language you speak and listen in, as a BCP-47 code such as es-ES or fr-FR.
    Then answer in that language.
    """  # noqa: D205
    try:
        language = schema.language(multi=True)(language)
    except ValueError:
        return f"error: {language!r} is not a BCP-47 language code such as es-ES"
    await session.set_language(tts=language, transcription=language)
    return f"switched to {language}"


BUILTIN_TOOLS: tuple[Callable[..., Any], ...] = (
    end_call,
    transfer_to_human,
    send_dtmf,
    switch_language,
)


class LLMAgent(ConversationAgent):
    """Streams an LLM's answer to every caller turn; runs its tool calls in between.

    An :class:`~relay_server.agents.responder.LLMResponder` over the relay's chat model.

    Subclass and set :attr:`tools` to offer your own functions (see :mod:`relay_server.tools`).
    """

    #: Extra tools of a subclass (functions or :class:`relay_server.tools.Tool`).
    tools: ClassVar[list[Any]] = []

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        super().__init__(link, setup)
        chat = link.services.chat
        if chat is None:
            raise RuntimeError("LLMAgent needs a chat model: the relay has none (not serving?)")
        self.llm: ChatModel = chat
        self.toolbox = _toolbox(type(self), link.services)
        self.responder = LLMResponder(chat, self.toolbox)


def _toolbox(cls: type[LLMAgent], services: Services) -> ToolBox:
    """One ToolBox per agent class and app (see :attr:`Services.toolboxes`)."""
    box = services.toolboxes.get(cls)
    if box is None:
        box = services.toolboxes[cls] = ToolBox([*BUILTIN_TOOLS, *services.tools, *cls.tools])
    return box
