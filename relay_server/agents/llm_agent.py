"""The default agent: an OpenAI-compatible model streamed token by token, with tools."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, ClassVar

from relay_server import events as ev
from relay_server.agents.conversation import ConversationAgent
from relay_server.llm import ChatStream, LLMClient, LLMError
from relay_server.protocol import Setup
from relay_server.session import SessionLink
from relay_server.tools import ToolBox
from twiml_templates import schema


# ------------------------------------------------------------------ built-in relay actions
async def end_call(session: LLMAgent, reason: str = "") -> str:
    """End the phone call. Use it when the caller says goodbye or asks to hang up; say a short
    goodbye in the same answer."""
    session.request_end(None, reason)
    return "The call will end right after your goodbye."


async def transfer_to_human(session: LLMAgent, reason: str, summary: str = "") -> str:
    """Hand the caller over to a human agent. Use it when the caller asks for a person or you
    cannot help. Tell the caller you are transferring them."""
    session.request_end(
        {"reasonCode": "live-agent-handoff", "reason": reason, "summary": summary}, reason
    )
    return "The caller will be transferred after your last sentence."


async def send_dtmf(session: LLMAgent, digits: str) -> str:
    """Press keys on the phone line (for example to navigate another phone menu).
    Digits 0-9, * and #; w is a half-second pause."""
    await session.send_digits(digits)
    return f"sent {digits}"


async def switch_language(session: LLMAgent, language: str) -> str:
    """Switch the language you speak and listen in, as a BCP-47 code such as es-ES or fr-FR.
    Then answer in that language."""
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

    Subclass and set :attr:`tools` to offer your own functions (see :mod:`relay_server.tools`).
    """

    #: Extra tools of a subclass (functions or :class:`relay_server.tools.Tool`).
    tools: ClassVar[list[Any]] = []

    def __init__(self, link: SessionLink, setup: Setup) -> None:
        super().__init__(link, setup)
        self.llm: LLMClient = link.services["llm"]
        self.toolbox = _toolbox(type(self), link.services)
        self._end_request: tuple[dict[str, Any] | None] | None = None

    def request_end(self, handoff: dict[str, Any] | None, reason: str = "") -> None:
        """Ask for ``end`` once the current reply has been spoken to its last token."""
        self._end_request = (handoff,)
        self.log.info("agent asked to %s: %s", "hand off" if handoff else "end the call", reason)

    async def _respond(self, user_text: str) -> None:
        self._end_request = None
        await super()._respond(user_text)
        if self._end_request is not None:
            await self.end(self._end_request[0])

    async def reply(self, user_text: str) -> AsyncGenerator[str, None]:
        settings = self.settings
        for round_no in range(settings.max_tool_rounds + 1):
            offer_tools = round_no < settings.max_tool_rounds and self._end_request is None
            stream = self.llm.stream(
                model=settings.model,
                messages=self.history,
                tools=self.toolbox.specs() if offer_tools else None,
                temperature=settings.temperature,
            )
            said: list[str] = []
            try:
                tokens = _tokens(stream)
                if round_no == 0:
                    tokens = self._with_filler(tokens)
                async with aclosing(tokens):
                    async for token in tokens:
                        said.append(token)
                        yield token
            except LLMError as exc:
                # One line in the relay's log, and the event (which `crctl up` and `tail` show
                # instead of the log line: ``call_event`` marks a record said by an event).
                # (The session's LoggerAdapter would replace ``extra``: log on its logger.)
                self.log.logger.warning(
                    "call %s: LLM fault (%s): %s",
                    self.call_sid,
                    exc.kind,
                    exc.detail,
                    extra=ev.said_by(ev.LLM_FAULT, self.call_sid),
                )
                fix = {"fix": exc.fix} if exc.fix else {}
                self.link.events.publish(
                    ev.LLM_FAULT, self.call_sid, kind=exc.kind, detail=exc.detail, **fix
                )
                gap = " " if said and not said[-1].endswith(" ") else ""
                yield gap + settings.apology
                return
            if not stream.tool_calls:
                return
            await self._run_tools(stream)
            if self._end_request is not None and "".join(said).strip():
                return  # the goodbye was said with the tool call: end now

    async def _run_tools(self, stream: ChatStream) -> None:
        self._flush_message()  # the next request sends what was said with the tool calls
        message = self._message
        if message is None:
            message = {"role": "assistant", "content": None}
            self.history.append(message)
        calls = stream.tool_calls
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
        results: dict[str, str] = {}
        try:
            for call in calls:
                results[call.id] = await self.toolbox.call(call.name, call.arguments, self)
                self.link.events.publish(
                    ev.TOOL_CALL,
                    self.call_sid,
                    name=call.name,
                    arguments=call.arguments,
                    result=results[call.id],
                )
        finally:
            # Every tool call gets its answer, also when the caller cut in while a tool ran:
            # the API refuses a history with an unanswered tool call (HTTP 400) ever after.
            for call in calls:
                self.history.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.id,
                        "content": results.get(call.id, "cancelled: the caller interrupted"),
                    }
                )
            self._close_message()  # what the model says next is a new assistant message

    async def _with_filler(self, tokens: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        """Pass ``tokens`` through; if the first one is slower than ``filler_after_ms``, say the
        filler first as its own preemptible talk cycle, which the real answer then cuts (Twilio
        docs: WebSocket messages)."""
        delay = self.settings.filler_after_ms / 1000
        iterator = tokens
        async with aclosing(iterator):
            if delay > 0:
                first = asyncio.ensure_future(anext(iterator))
                try:
                    done, _ = await asyncio.wait({first}, timeout=delay)
                    if not done:
                        await self.send_text(self.settings.filler, last=True, preemptible=True)
                    token = await first
                except StopAsyncIteration:
                    return
                finally:
                    if not first.done():
                        first.cancel()
                        await asyncio.wait({first})
                yield token
            async for token in iterator:
                yield token


def _toolbox(cls: type[LLMAgent], services: dict[str, Any]) -> ToolBox:
    """One ToolBox per agent class and app: building the tools' pydantic models for every
    call cost ~45 KiB per call and CPU at each call start (bench/)."""
    boxes: dict[type[LLMAgent], ToolBox] = services.setdefault("toolboxes", {})
    box = boxes.get(cls)
    if box is None:
        box = boxes[cls] = ToolBox([*BUILTIN_TOOLS, *services.get("tools", ()), *cls.tools])
    return box


async def _tokens(stream: ChatStream) -> AsyncGenerator[str, None]:
    async with stream:
        async for token in stream:
            yield token
