"""The offline agent: repeats what the caller said, so the whole path works with no account."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from relay_server.agents.conversation import ConversationAgent


class EchoAgent(ConversationAgent):
    """Answers "You said: …", streamed word by word like an LLM would."""

    #: Pause between words, so barge-in and streaming behave as with a real model.
    word_delay = 0.02

    async def reply(self, user_text: str) -> AsyncGenerator[str, None]:
        words = user_text.split()
        yield "You said:"
        for word in words:
            await asyncio.sleep(self.word_delay)
            yield " " + word
