"""The ``crctl`` command: a Typer app composed of one sub-app per command module.

Known failures are caught here once and printed as one line; nobody sees a traceback for them.
"""

from __future__ import annotations

import sys

import typer

from crctl import __version__
from crctl.call import call
from crctl.console import fail
from crctl.errors import CrctlError
from crctl.numbers import apps_app, numbers_app, provision_number, whoami
from crctl.serve import serve
from crctl.tail import calls_app, tail
from crctl.twiml import app as twiml_app
from crctl.up import up
from relay_server.errors import RelayError

app = typer.Typer(
    name="crctl",
    help="Build, run and test voice AI agents on Twilio ConversationRelay.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command(name="serve")(serve)
app.add_typer(twiml_app, name="twiml")
app.command(name="whoami")(whoami)
app.command(name="provision-number")(provision_number)
app.add_typer(numbers_app, name="numbers")
app.add_typer(apps_app, name="app")
app.command(name="up")(up)
app.command(name="call")(call)
app.command(name="tail")(tail)
app.add_typer(calls_app, name="calls")


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
    try:
        app()
    except (CrctlError, RelayError) as exc:
        fail(exc)
        sys.exit(2)
