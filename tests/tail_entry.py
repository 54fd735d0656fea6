"""``crctl tail`` / ``crctl calls`` as a program for subprocess tests, independent of cli.py:
``python -m tests.tail_entry tail --url …`` (the owner wires the same functions into cli.py)."""

from __future__ import annotations

import typer

from crctl.tail import calls_app, tail

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command(name="tail")(tail)
app.add_typer(calls_app, name="calls")

if __name__ == "__main__":
    app()
