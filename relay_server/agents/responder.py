"""The LLM responder: a chat model's answer streamed token by token, with tool rounds between.

The token path is two async generators long: the model's reply (for the relay's HTTP client,
:class:`relay_server.llm.ChatStream` reading the socket) and :meth:`LLMResponder.reply`, which
:meth:`ConversationAgent.speak` consumes. Leaving a reply's ``async with``, also when the turn
is cancelled, closes it without draining it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import msgspec

from relay_server import events as ev
from relay_server.agents.conversation import ConversationAgent
from relay_server.agents.filler import Filler
from relay_server.chat import ChatModel, LLMError, ToolCall
from relay_server.tools import ToolBox


class LLMResponder:
    """Answers with ``chat``, offering the tools of ``toolbox``."""

    def __init__(self, chat: ChatModel, toolbox: ToolBox) -> None:
        self.chat = chat
        self.toolbox = toolbox

    async def reply(self, agent: ConversationAgent, user_text: str) -> AsyncGenerator[str, None]:
        """Stream the model's answer; run the tool calls it asks for and ask it again.

        At most ``max_tool_rounds`` times; an LLM fault ends the answer with the apology.
        """
        settings = agent.settings
        filler: Filler | None = Filler(
            agent, agent.link.services.clock, settings.filler_after_ms / 1000, settings.filler
        )
        said: list[str] = []
        try:
            for round_no in range(settings.max_tool_rounds + 1):
                offer_tools = round_no < settings.max_tool_rounds and not agent.end_requested
                said = []
                if round_no == 0:
                    agent.timeline.llm_request()  # once per turn, before the first request
                async with self.chat.stream(
                    model=settings.model,
                    messages=agent.history,
                    tools=self.toolbox.specs() if offer_tools else None,
                    temperature=settings.temperature,
                ) as answer:
                    async for token in answer:
                        if filler is not None:  # the turn's first token: once per turn
                            agent.timeline.llm_first_token()
                            await filler.stop()
                            filler = None
                        said.append(token)
                        yield token
                    calls = answer.tool_calls
                if filler is not None:
                    await filler.stop()  # only the first round may need a filler
                    filler = None
                if not calls:
                    return
                await self._run_tools(agent, calls)
                if agent.end_requested and "".join(said).strip():
                    return  # the goodbye was said with the tool call: end now
        except LLMError as exc:
            if filler is not None:
                await filler.stop()
                filler = None
            _report(agent, exc)
            gap = " " if said and not said[-1].endswith(" ") else ""
            yield gap + settings.apology
        finally:
            if filler is not None:
                filler.cancel()

    async def _run_tools(self, agent: ConversationAgent, calls: Sequence[ToolCall]) -> None:
        agent.conversation.add_tool_calls(calls)
        results: dict[str, str] = {}
        try:
            for call in calls:
                results[call.id] = await self.toolbox.call(call.name, call.arguments, agent)
                agent.link.events.emit(
                    ev.ToolCall(
                        call_sid=agent.call_sid,
                        name=call.name,
                        arguments=call.arguments,
                        result=results[call.id],
                    )
                )
        finally:
            # Every tool call gets its answer, also when the caller cut in while a tool ran.
            agent.conversation.add_tool_results(calls, results)


def _report(agent: ConversationAgent, exc: LLMError) -> None:
    """One line in the relay's log, and the event.

    `crctl up` and `tail` show the event instead of the log line: ``call_event`` marks a
    record said by an event.
    """
    # (The session's LoggerAdapter would replace ``extra``: log on its logger.)
    agent.log.logger.warning(
        "call %s: LLM fault (%s): %s",
        agent.call_sid,
        exc.kind,
        exc.detail,
        extra=ev.said_by(ev.LLM_FAULT, agent.call_sid),
    )
    agent.link.events.emit(
        ev.LlmFault(
            call_sid=agent.call_sid,
            fault=exc.kind,
            detail=exc.detail,
            fix=exc.fix if exc.fix else msgspec.UNSET,
        )
    )
