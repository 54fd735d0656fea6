"""The offline agent: repeats what the caller said, so the whole path works with no account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from relay_server.agents.conversation import ConversationAgent
from relay_server.protocol import Setup
from relay_server.session import SessionLink


class EchoResponder:
    """Answers "You said: …", streamed word by word like an LLM would."""

    def __init__(self, word_delay: float) -> None:
        self.word_delay = word_delay

    async def reply(self, agent: ConversationAgent, user_text: str) -> AsyncGenerator[str, None]:
        """``"You said:"`` then each word of ``user_text``, ``word_delay`` seconds apart."""
        yield "You said:"
        for word in user_text.split():
            await asyncio.sleep(self.word_delay)
            yield " " + word


class EchoAgent(ConversationAgent):
    """The conversation agent with an :class:`EchoResponder`."""

    #: Pause between words, so barge-in and streaming behave as with a real model.
    word_delay = 0.02

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        super().__init__(link, setup)
        self.responder = EchoResponder(self.word_delay)
