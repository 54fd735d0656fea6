"""What every call of one relay shares: the chat model, the user's tools, the timers' clock.

:class:`Services` is the typed bundle a session finds in ``link.services`` (it replaced a
string-keyed dict). The relay builds it once per app with :func:`build_services`, opens the chat
model when it starts serving and closes it when it stops; a test builds one directly, with a
:class:`relay_server.testing.FakeChatModel` and a :class:`relay_server.testing.FakeClock`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay_server.chat import ChatModel
from relay_server.config import LLMConfig, RelayConfig
from relay_server.tools import Tool, ToolBox, load_tool_modules


class Timer(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None:
        """Do not run the callback (nothing if it already ran)."""
        ...


class Clock(Protocol):
    """Where a session's timers run: the filler, the silence reminders, the DTMF pause."""

    def time(self) -> float:
        """Seconds on this clock (only differences mean something)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` once, ``delay`` seconds from now."""
        ...


class LoopClock:
    """The running event loop's clock: what the relay uses."""

    def time(self) -> float:
        """The loop's monotonic time."""
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """``loop.call_later``."""
        return asyncio.get_running_loop().call_later(delay, callback)


@dataclass
class Services:
    """The shared services of one relay app."""

    #: The chat model of LLM agents; ``None`` until the relay serves (or with none configured).
    chat: ChatModel | None = None
    #: The ``@tool`` functions of ``--tools`` modules, offered by every LLM agent.
    tools: tuple[Tool, ...] = ()
    #: One :class:`ToolBox` per agent class: building the tools' pydantic models for every call
    #: cost ~45 KiB per call and CPU at each call start (bench/).
    toolboxes: dict[type[Any], ToolBox] = field(default_factory=dict)
    clock: Clock = field(default_factory=LoopClock)

    def open_chat(self, config: LLMConfig) -> None:
        """Create the relay's HTTP chat model unless one was given.

        Call on the serving loop: its connection pool belongs to it.
        """
        if self.chat is None:
            from relay_server.llm import LLMClient  # the one module that imports openai

            self.chat = LLMClient(config)

    async def aclose(self) -> None:
        """Close the chat model."""
        chat, self.chat = self.chat, None
        if chat is not None:
            await chat.aclose()


def build_services(config: RelayConfig) -> Services:
    """The services of an app with ``config``: its tool modules imported, no chat model yet.

    A module that cannot be imported is a :class:`relay_server.errors.ConfigError` of one
    line; :meth:`Services.open_chat` makes the chat model once the relay serves.
    """
    return Services(tools=tuple(load_tool_modules(config.tool_modules, config.app_dir)))
