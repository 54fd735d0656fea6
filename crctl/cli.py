"""The ``crctl`` command: a Typer app whose commands are imported only when one is run.

Each command lives in its own module (``crctl.serve`` imports uvicorn and Quart, ``crctl.call``
websockets, ``crctl.numbers`` the twilio REST client…). Importing them all to print ``crctl
--help`` took ~1.7 s, so the root group is lazy (click's documented LazyGroup pattern): it
knows every command's name and one-line help, and imports a command's module when that command
is run or its own ``--help`` is asked for. ``tests/test_startup.py`` checks that the help lines
below are the commands' own, and which modules a command may import.

Known failures are caught here once, for every command (:meth:`LazyGroup.invoke`, which
``CliRunner`` tests pass through too), and printed as one line with the exit code of the rule in
:mod:`crctl.errors`; nobody sees a traceback for them. An unexpected exception keeps its
traceback: it is a bug. The environment is resolved there once as well
(:func:`crctl.environment.resolved`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperGroup

from crctl import __version__
from crctl.helptext import HELP_OPTION_NAMES, polish


@dataclass(frozen=True)
class LazyCommand:
    """Where a command is defined, and the help line ``crctl --help`` shows for it."""

    module: str
    #: a command function, or a ``typer.Typer`` of subcommands
    attribute: str
    #: the first paragraph of the command's help, exactly (checked by tests/test_startup.py)
    help: str

    def load(self, name: str) -> Any:
        """The click command, built by Typer from the real function or sub-app."""
        target = getattr(importlib.import_module(self.module), self.attribute)
        command: Any
        if isinstance(target, typer.Typer):
            command = typer.main.get_group(target)  # as add_typer: no completion options
        else:
            single = typer.Typer(add_completion=False)
            single.command(name=name)(target)
            command = typer.main.get_command(single)
        command.name = name
        return polish(command)


#: In ``crctl --help`` order: commands, then groups of commands.
COMMANDS: dict[str, LazyCommand] = {
    "serve": LazyCommand(
        "crctl.serve", "serve", "Run the relay: /twiml, /ws, /action, /status, /healthz, /readyz."
    ),
    "whoami": LazyCommand(
        "crctl.numbers",
        "whoami",
        "The Twilio account crctl uses and where the credentials came from (secrets redacted).",
    ),
    "provision-number": LazyCommand(
        "crctl.numbers",
        "provision_number",
        "Get a number ringing the relay: buy one (or use --number), create or reuse a TwiML App\n"
        "whose voice URL is the relay's /twiml, and point the number at it. A second run changes\n"
        "nothing.",
    ),
    "up": LazyCommand(
        "crctl.up",
        "up",
        "Tunnel + relay + your number pointed at it + live call log; Ctrl-C puts it all back.",
    ),
    "call": LazyCommand(
        "crctl.call",
        "call",
        "Call the relay as Twilio would, without a phone: type what the caller says, or play\n"
        "and check a --script.",
    ),
    "test": LazyCommand(
        "crctl.suite",
        "suite",
        "Run scenario files against a relay, in parallel: a pass/fail table, JUnit XML and\n"
        "JSON for CI.",
    ),
    "dial": LazyCommand(
        "crctl.dial",
        "dial",
        "Call a number and connect it to the relay; show the call live until it ends.",
    ),
    "tail": LazyCommand(
        "crctl.tail",
        "tail",
        "Follow the relay's calls live: a transcript per call, latency, errors with the fix.",
    ),
    "twiml": LazyCommand("crctl.twiml", "app", "ConversationRelay TwiML from validated templates."),
    "numbers": LazyCommand(
        "crctl.numbers", "numbers_app", "The account's phone numbers and where they point."
    ),
    "app": LazyCommand("crctl.numbers", "apps_app", "TwiML Applications."),
    "calls": LazyCommand(
        "crctl.tail",
        "calls_app",
        "Stored calls and their transcripts: from the events database (works while the relay "
        "is down), or from a running relay with --url.",
    ),
}


class _Commands(MutableMapping[str, Any]):
    """The root group's commands by name: all of :data:`COMMANDS`, each built on first access.

    So Typer's own lookups and "did you mean" suggestions see every name.
    """

    def __init__(self, loaded: MutableMapping[str, Any]) -> None:
        self._loaded = dict(loaded)

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = COMMANDS[name].load(name)  # KeyError: no such command
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        yield from COMMANDS
        yield from (name for name in self._loaded if name not in COMMANDS)

    def __len__(self) -> int:
        return len(set(COMMANDS) | set(self._loaded))


class LazyGroup(TyperGroup):
    """The root group: commands from :data:`COMMANDS`, each imported when it is used.

    While the group's own help is rendered, :meth:`get_command` returns a stand-in carrying
    only the name and help line, so ``crctl --help`` imports no command module.
    """

    _listing = False

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _Commands(self.commands)
        polish(self, subcommands=False)  # each command is polished as it is loaded

    def list_commands(self, ctx: Any) -> list[str]:
        """Every command name, without building a command."""
        return list(self.commands)  # the names only: TyperGroup's would build every command

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        """The command ``cmd_name``: a name-and-help stand-in while the group's help is listed."""
        lazy = COMMANDS.get(cmd_name)
        if self._listing and lazy is not None:
            return typer.core.TyperCommand(name=cmd_name, help=lazy.help)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: Any) -> Any:
        """Run the command with the environment resolved once.

        A known failure (module docstring) becomes one ``error:`` line and its exit code.
        """
        from crctl.environment import resolved
        from crctl.errors import exit_code

        try:
            with resolved():
                return super().invoke(ctx)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise  # a bug: the traceback is the report
            from crctl.console import fail

            raise fail(exc, code) from None

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Render the group's help from the stand-ins, so listing imports no command module."""
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False


app = typer.Typer(
    context_settings={"help_option_names": HELP_OPTION_NAMES},
    cls=LazyGroup,
    name="crctl",
    help="Build, run and test voice AI agents on Twilio ConversationRelay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Build, run and test voice AI agents on Twilio ConversationRelay."""


def main() -> None:
    """Console-script entry point."""
    app()
