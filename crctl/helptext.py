"""One voice for every command's ``--help``, applied once to each command as it is built.

Typer prints Python types as metavars (``<str>``, ``<list[str]>``, ``<bool>``), adds its own
``[env var: …]`` and ``[default: …]`` brackets beside the text our options already carry, and
leaves a flag's type column saying ``<bool>``. :func:`polish` rewrites every parameter of a
command (and of its subcommands) the same way:

- a flag shows no metavar; any other parameter shows its declared metavar, else its name in
  capitals (``--limit LIMIT``, ``SID``);
- an environment name and a default are shown once, as ``(env NAME; default VALUE)`` at the end
  of the text, whether the option declared them (``envvar=``, a default) or wrote them into its
  help already;
- ``-h`` works wherever ``--help`` does.

``tests/test_help.py`` walks every command and holds them to this.
"""

from __future__ import annotations

import re
from typing import Any

from typer.core import TyperOption

HELP_OPTION_NAMES = ["-h", "--help"]
_ENV_IN_TEXT = re.compile(r"\benv\s+([A-Z][A-Z0-9_]+)")


def _shown(value: Any) -> str | None:
    """A default as help shows it; ``None`` when there is nothing worth saying."""
    if value is None or value == () or value == [] or value is False:
        return None
    if isinstance(value, bool):
        return "on"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(getattr(value, "value", value))


def _polish_param(param: Any) -> None:
    if isinstance(param, TyperOption) and (param.is_flag or param.count):
        param.metavar = ""
        # A --x/--no-x flag's default is one of its names; a plain flag defaults to off.
        if param.secondary_opts and param.default is not None and param.show_default:
            side = param.opts[0] if param.default else param.secondary_opts[0]
            _append(param, f"default {side}")
        param.show_default = False
        return
    if param.metavar is None or param.metavar.startswith("<"):
        # The long option's own name (--from: FROM), else the parameter's.
        longs = [opt for opt in param.opts if opt.startswith("--")]
        name = longs[0][2:] if longs else (param.name or "value")
        param.metavar = name.strip("_").replace("-", "_").upper()
    text = param.help or ""
    notes: list[str] = []
    if isinstance(param, TyperOption):
        envvar = param.envvar if isinstance(param.envvar, str) else None
        if envvar and param.show_envvar and envvar not in text:
            notes.append(f"env {envvar}")
        param.show_envvar = False
    else:
        # An argument's name column already shows its metavar: no type column beside it.
        param.display_type_rich = lambda ctx: None
    if param.show_default is not False:
        default = _shown(param.default) if not callable(param.default) else None
        if default is not None and "default" not in text:
            notes.append(f"default {default}")
    param.show_default = False
    if notes:
        _append(param, "; ".join(notes))


def _append(param: Any, note: str) -> None:
    """Add ``note`` to the text, inside its closing ``(env …)`` parenthesis if it has one."""
    text = (param.help or "").rstrip()
    match = re.search(r"\((env [^()]*)\)$", text)
    if match:
        param.help = f"{text[: match.start()]}({match.group(1)}; {note})"
    else:
        param.help = f"{text} ({note})".strip()


def polish(command: Any, *, subcommands: bool = True) -> Any:
    """Apply the house style to ``command`` and (unless told not to) every subcommand.

    Returns ``command``.
    """
    command.context_settings.setdefault("help_option_names", HELP_OPTION_NAMES)
    for param in command.params:
        _polish_param(param)
    # The help option is made on first use, outside ``params``: style it as it is made.
    make_help_option = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option
    for sub in getattr(command, "commands", {}).values() if subcommands else ():
        polish(sub)
    return command


def env_names_in(text: str) -> list[str]:
    """The environment names a help text mentions (for the tests)."""
    return _ENV_IN_TEXT.findall(text)
