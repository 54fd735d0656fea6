"""The LLM responder: a chat model's answer streamed token by token, with tool rounds between.

The token path is two async generators long: the model's reply (for the relay's HTTP client,
:class:`relay_server.llm.ChatStream` reading the socket) and :meth:`LLMResponder.reply`, which
:meth:`ConversationAgent.speak` consumes. Leaving a reply's ``async with``, also when the turn
is cancelled, closes it without draining it.

Each chat request is reported when its stream ends (completed, tool calls, cancelled or
fault), timed from stamps taken once per request and once at its first token, with the
stream's usage report when it has one (``ChatStream.usage``): one that asked for tools as its
own ``llm.request`` event, the one that ended the reply inside its ``agent.reply`` (``llm``).
Each tool run is timed into its ``tool.call`` event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import msgspec

from relay_server import events as ev
from relay_server.agents.conversation import ConversationAgent
from relay_server.agents.filler import Filler
from relay_server.chat import ChatModel, LLMError, ToolCall
from relay_server.timeline import tenths
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
        now = asyncio.get_running_loop().time
        try:
            for round_no in range(settings.max_tool_rounds + 1):
                offer_tools = round_no < settings.max_tool_rounds and not agent.end_requested
                said = []
                if round_no == 0:
                    agent.timeline.llm_request()  # once per turn, before the first request
                # The round's stamps: taken once per request, never per token.
                started, sent = time.time(), now()
                first: float | None = None
                usage: Any = None
                outcome = "cancelled"  # unless the stream ends or fails
                try:
                    async with self.chat.stream(
                        model=settings.model,
                        messages=agent.history,
                        tools=self.toolbox.specs() if offer_tools else None,
                        temperature=settings.temperature,
                    ) as answer:
                        async for token in answer:
                            if first is None:  # the round's first token: once per round
                                first = now()
                                if filler is not None:  # the turn's first token
                                    agent.timeline.llm_first_token()
                                    await filler.stop()
                                    filler = None
                            said.append(token)
                            yield token
                        calls = answer.tool_calls
                        usage = getattr(answer, "usage", None)  # ChatStream's usage report
                    outcome = "tool_calls" if calls else "completed"
                except LLMError:
                    outcome = "fault"
                    raise
                finally:
                    _request_done(agent, round_no, started, sent, first, usage, outcome)
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
            now = asyncio.get_running_loop().time
            for call in calls:
                began = now()
                results[call.id] = await self.toolbox.call(call.name, call.arguments, agent)
                agent.link.events.emit(
                    ev.ToolCall(
                        call_sid=agent.call_sid,
                        name=call.name,
                        arguments=call.arguments,
                        result=results[call.id],
                        duration_ms=_ms(began, now()),
                    )
                )
        finally:
            # Every tool call gets its answer, also when the caller cut in while a tool ran.
            agent.conversation.add_tool_results(calls, results)


def _ms(start: float, end: float) -> float:
    """``end - start`` in ms, to 0.1 ms."""
    return tenths(max(0.0, end - start) * 1000)


def _request_done(
    agent: ConversationAgent,
    round_no: int,
    started: float,
    sent: float,
    first: float | None,
    usage: Any,
    outcome: str,
) -> None:
    """Report one chat request, once its stream ended (:meth:`ConversationAgent.request_ended`).

    ``usage`` is the reply's usage report (``prompt_tokens``, ``completion_tokens``), if the
    model gave one; a cut stream never has one. A request that asked for tools is its own
    ``llm.request`` event; any other ends the reply and rides in its ``agent.reply``.
    """
    end = asyncio.get_running_loop().time()
    reported = outcome in ("completed", "tool_calls") and usage is not None
    agent.request_ended(
        {
            "model": agent.settings.model,
            "round": round_no,
            "started": started,
            "duration_ms": _ms(sent, end),
            "first_token_ms": None if first is None else _ms(sent, first),
            "input_tokens": getattr(usage, "prompt_tokens", None) if reported else None,
            "output_tokens": getattr(usage, "completion_tokens", None) if reported else None,
            "outcome": outcome,
        },
        last=outcome != "tool_calls",
    )


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
