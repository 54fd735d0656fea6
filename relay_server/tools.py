"""Tools the LLM agent may call: plain Python functions, described to the model by their
signature and docstring.

The JSON schema and the argument checking come from pydantic: a function's annotated
parameters become a model, the model's JSON schema is what the LLM sees, and the model
validates the arguments the LLM streams back. A parameter named ``session`` is not shown to
the model; the calling :class:`CallSession` is passed in.

A tool that fails, an unknown tool and bad arguments all become a text result for the model
("error: …"): the model can recover or apologise, and the call goes on.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
import pydantic

_TOOL_ATTR = "__crctl_tool__"


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Mark a function as a tool (usable bare, ``@tool``, or with a name, ``@tool(name=…)``)."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, _TOOL_ATTR, name or func.__name__)
        return func

    return mark(fn) if fn is not None else mark


class Tool:
    """One callable tool with its schema."""

    def __init__(self, func: Callable[..., Any], name: str | None = None) -> None:
        self.func = func
        self.name = name or getattr(func, _TOOL_ATTR, None) or func.__name__
        doc = inspect.getdoc(func) or ""
        self.description = doc.strip() or self.name.replace("_", " ")
        signature = inspect.signature(func)
        self.wants_session = "session" in signature.parameters
        fields: dict[str, Any] = {}
        for param in signature.parameters.values():
            if param.name == "session":
                continue
            annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (annotation, default)
        self._model = pydantic.create_model(f"{self.name}_args", **fields)
        schema = self._model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        self.parameters = schema

    def spec(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry for this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    async def call(self, arguments: str, session: Any) -> str:
        """Run the tool with the model's JSON ``arguments``; the result as text for the model."""
        try:
            raw = msgspec.json.decode(arguments or "{}")
            if not isinstance(raw, dict):
                return f"error: arguments must be a JSON object, got {arguments!r}"
            values = dict(self._model.model_validate(raw))
        except (msgspec.DecodeError, pydantic.ValidationError) as exc:
            return f"error: bad arguments for {self.name}: {_one_line(exc)}"
        if self.wants_session:
            values["session"] = session
        try:
            if inspect.iscoroutinefunction(self.func):
                result = await self.func(**values)
            else:
                result = await asyncio.to_thread(self.func, **values)
            if result is None:
                return "done"
            if isinstance(result, str):
                return result
            return msgspec.json.encode(result).decode()
        except Exception as exc:
            return f"error: {self.name} failed: {type(exc).__name__}: {exc}"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


class ToolBox:
    """The tools one agent offers, by name."""

    def __init__(self, tools: Iterable[Tool | Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._specs: list[dict[str, Any]] | None = None
        for item in tools:
            self.add(item)

    def add(self, item: Tool | Callable[..., Any]) -> None:
        """Add a tool (a :class:`Tool` or a function)."""
        t = item if isinstance(item, Tool) else Tool(item)
        self._tools[t.name] = t
        self._specs = None

    def specs(self) -> list[dict[str, Any]]:
        """The OpenAI ``tools`` list (built once; do not modify it)."""
        if self._specs is None:
            self._specs = [t.spec() for t in self._tools.values()]
        return self._specs

    async def call(self, name: str, arguments: str, session: Any) -> str:
        """Run a tool by name; an unknown name is reported to the model, not raised."""
        found = self._tools.get(name)
        if found is None:
            known = ", ".join(sorted(self._tools)) or "none"
            return f"error: there is no tool named {name!r}; available tools: {known}"
        return await found.call(arguments, session)


def load_tool_modules(modules: Iterable[str]) -> list[Tool]:
    """Import modules and collect their ``@tool`` functions. Raises what the import raises
    (``ImportError`` naming the module, or the module's own error)."""
    found: list[Tool] = []
    for name in modules:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if callable(value) and hasattr(value, _TOOL_ATTR):
                found.append(Tool(value))
    return found
