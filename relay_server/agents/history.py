"""One call's chat history, holding only what the caller heard. No I/O, no event loop.

A reply cut by a barge-in is shortened to Twilio's ``utteranceUntilInterrupt`` (Twilio docs:
WebSocket messages, "interrupt"); a tool call always gets its answer, since the API refuses a
history with an unanswered tool call (HTTP 400) for the rest of the call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from relay_server.chat import Message, ToolCall


class Conversation:
    """The messages an LLM agent sends with every request, and the reply being spoken.

    It also keeps the bookkeeping of that reply.
    """

    # One per call, alive as long as the call: no instance dict (memory per idle call, bench/).
    __slots__ = ("_from", "_message", "_parts", "messages", "reply_start")

    def __init__(self, system_prompt: str) -> None:
        self.messages: list[Message] = [{"role": "system", "content": system_prompt}]
        #: Index in ``messages`` where the current (or last) reply's messages start.
        self.reply_start = len(self.messages)
        #: The spoken tokens of the reply (all its rounds), appended by its speaker
        #: (:meth:`begin_reply`); the open assistant message holds those from ``_from`` on. They
        #: become its ``content`` in one join when the reply (or a tool round) ends:
        #: ``content += token`` re-copied the whole reply per token (quadratic: 140 µs per
        #: token at 60,000 tokens).
        self._parts: list[str] = []
        self._from = 0
        #: The open assistant message, made when its first tokens are flushed (``None``: none).
        self._message: Message | None = None

    # ------------------------------------------------------------------------ caller side
    def add_user(self, text: str, max_turns: int) -> None:
        """The caller said ``text``; keep at most ``max_turns`` user+assistant pairs."""
        self.flush()  # tokens spoken before it come before it
        self.messages.append({"role": "user", "content": text})
        limit = max_turns * 2
        body = self.messages[1:]
        if len(body) > limit:
            cut = len(body) - limit
            while cut < len(body) and body[cut].get("role") != "user":
                cut += 1  # never start with a tool result orphaned from its call
            self.messages[1:] = body[cut:]

    def keep_heard(self, heard: str) -> None:
        """Shorten the last reply's assistant text to what the caller heard."""
        self.flush()
        remaining = heard
        start = self.reply_start
        for message in self.messages[start:]:
            if message.get("role") != "assistant" or not isinstance(message.get("content"), str):
                continue
            content = message["content"]
            kept, remaining = remaining[: len(content)], remaining[len(content) :]
            message["content"] = kept
        self.messages[start:] = [m for m in self.messages[start:] if not _empty_assistant(m)]

    # ------------------------------------------------------------------------- agent side
    def add_greeting(self, text: str | None) -> None:
        """The greeting Twilio speaks from the TwiML, recorded as the latest "reply".

        So a barge-in on it shortens it, and nothing said before it does (a resumed call).
        """
        self.reply_start = len(self.messages)
        if text:
            self.messages.append({"role": "assistant", "content": text})

    def begin_reply(self) -> list[str]:
        """A recorded reply starts: a barge-in shortens what follows.

        Returns the list its speaker appends each spoken token to (the reply's history, with
        no call per token); :meth:`add_token` appends to it too.
        """
        self.close_message()
        self.reply_start = len(self.messages)
        self._parts, self._from = [], 0
        return self._parts

    def add_token(self, token: str) -> None:
        """One spoken token of the reply."""
        self._parts.append(token)

    def add_tool_calls(self, calls: Sequence[ToolCall]) -> None:
        """The model asked for ``calls`` (with what it said so far, if anything)."""
        self.flush()  # the next request sends what was said with the tool calls
        message = self._message
        if message is None:
            message = {"role": "assistant", "content": None}
            self.messages.append(message)
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]

    def add_tool_results(self, calls: Sequence[ToolCall], results: Mapping[str, str]) -> None:
        """Answer every call of :meth:`add_tool_calls`.

        Each gets its result, or "cancelled" when the caller cut in while it ran.
        """
        for call in calls:
            self.messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.id,
                    "content": results.get(call.id, "cancelled: the caller interrupted"),
                }
            )
        self.close_message()  # what the model says next is a new assistant message

    def flush(self) -> None:
        """Write the tokens spoken so far into the open assistant message's ``content``.

        The message is added to ``messages`` at its first flush with tokens.
        """
        parts, start = self._parts, self._from
        if len(parts) > start:
            message = self._message
            if message is None:
                message = self._message = {"role": "assistant", "content": ""}
                self.messages.append(message)
            message["content"] = "".join(parts[start:] if start else parts)

    def close_message(self) -> None:
        """Flush the open assistant message; the next token starts a new one."""
        self.flush()
        self._message = None
        self._from = len(self._parts)

    def end_reply(self) -> None:
        """The reply is over: flush it and let go of its tokens (an idle call keeps none)."""
        self.close_message()
        self._parts, self._from = [], 0


def _empty_assistant(message: Message) -> bool:
    return (
        message.get("role") == "assistant"
        and not message.get("content")
        and not message.get("tool_calls")
    )
