"""Tools the LLM agent may call: plain Python functions.

They are described to the model by their signature and docstring.

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
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pydantic

from relay_server.errors import ConfigError

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


def load_tool_modules(modules: Iterable[str], app_dir: str | None = None) -> list[Tool]:
    """Import modules and collect their ``@tool`` functions.

    Modules come from ``app_dir`` first, see :func:`import_user_module`. Raises
    :class:`ConfigError` (one line) when a module cannot be imported, has no ``@tool``
    function, or has one whose signature cannot be described.
    """
    found: list[Tool] = []
    for name in modules:
        what = f"tools {name!r}"
        module = import_user_module(name, app_dir, what)
        marked = [v for v in vars(module).values() if callable(v) and hasattr(v, _TOOL_ATTR)]
        if not marked:
            raise ConfigError(
                f"{what}: {name} ({module_file(module)}) has no @tool function; mark the "
                "functions the model may call with @tool (from relay_server import tool)"
            )
        for func in marked:
            try:
                found.append(Tool(func))
            except Exception as exc:  # pydantic cannot make a schema of its parameters
                raise ConfigError(
                    f"{what}: the @tool {getattr(func, '__name__', func)!r} cannot be described "
                    f"to the model: {type(exc).__name__}: {_one_line(exc)}"
                ) from None
    return found


# ------------------------------------------------------------------------- the user's code
def import_user_module(name: str, app_dir: str | None, what: str) -> ModuleType:
    """Import the user's module ``name`` (of ``--agent module:Class`` or ``--tools module``).

    ``app_dir`` (resolved) goes to the front of ``sys.path`` first and stays there, as uvicorn
    does with its ``--app-dir``: the module may import its neighbours later, from inside a
    function. It is only added when a module of the user's is imported.

    Every failure is a :class:`ConfigError` of one line starting with ``what``: a module that is
    not there says where it was looked for and what to do; an error raised while the module
    runs (a missing dependency of its own, a syntax error…) is reported as that, with the file
    and line.
    """
    folder = None
    if app_dir is not None:
        folder = str(Path(app_dir).expanduser().resolve())
        if not Path(folder).is_dir():
            raise ConfigError(
                f"{what}: the app dir {folder} is not a folder; pass --app-dir DIR "
                "(env CRCTL_APP_DIR), the folder that holds your module"
            )
        if sys.path[:1] != [folder]:
            sys.path.insert(0, folder)
        importlib.invalidate_caches()  # a file written a moment ago is seen
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            where = f"in {folder} (the app dir)" if folder else "on sys.path"
            file = name.replace(".", "/") + ".py"
            raise ConfigError(
                f"{what}: no module named {missing!r} {where} or in the installed packages; "
                f"run crctl from the folder that holds {file}, or pass --app-dir DIR "
                "(env CRCTL_APP_DIR)"
            ) from None
        raise ConfigError(
            f"{_failed(name, exc, what)} ({name} imports {missing or 'a module'}, which is not "
            f"installed in the Python crctl runs with, {sys.prefix}: install it there)"
        ) from None
    except (Exception, SystemExit) as exc:  # the module's own error, while it runs
        raise ConfigError(_failed(name, exc, what)) from None


def module_file(module: ModuleType) -> str:
    """Where a module was loaded from, for messages."""
    return getattr(module, "__file__", None) or "built-in"


def _failed(name: str, exc: BaseException, what: str) -> str:
    """``what: importing NAME failed at FILE:LINE: Type: message`` (one line)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        place = f"{exc.filename}:{exc.lineno}"
        message = exc.msg
    else:
        place = ""
        tb = exc.__traceback__
        while tb is not None:  # the last frame of the user's code, not of importlib
            if not tb.tb_frame.f_code.co_filename.startswith("<"):
                place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
            tb = tb.tb_next
        message = str(exc)
    at = f" at {place}" if place else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return f"{what}: importing {name} failed{at}: {' '.join(text.split())[:300]}"
