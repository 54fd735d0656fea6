"""``crctl twiml``: list, show, render, lint and export ConversationRelay TwiML templates.

A bad template, flag or export folder raises :class:`~twiml_templates.errors.TemplatesError`;
the CLI prints it as one line with exit code 2 (:mod:`crctl.errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl.console import err
from twiml_templates import (
    TemplateError,
    lint,
    load_template,
    preset_names,
    render,
    templates,
    user_templates,
)

# The options render and export share, declared once.
TemplateName = Annotated[
    str, typer.Argument(metavar="TEMPLATE", help="Preset name, ./twiml/ name or .toml path.")
]
RelayUrl = Annotated[
    Optional[str], typer.Option(metavar="URL", help="The relay's wss:// URL (…/ws).")
]
Overrides = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE", help="Attribute override (repeatable)."),
]
Parameters = Annotated[
    Optional[list[str]],
    typer.Option("--param", metavar="NAME=VALUE", help="A <Parameter> (repeatable)."),
]
ConnectAction = Annotated[
    Optional[str],
    typer.Option(metavar="URL", help="<Connect action> URL (https:// or /path)."),
]

app = typer.Typer(help="ConversationRelay TwiML from validated templates.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _pairs(values: Optional[list[str]], flag: str) -> dict[str, str]:
    result = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TemplateError(f"{flag} {item!r}: expected key=value")
        result[key] = value
    return result


@app.command("list")
def list_templates() -> None:
    """The shipped presets and the project's own templates (./twiml/*.toml)."""
    table = Table("name", "from", "description", box=None)
    for name in preset_names():
        try:
            description = load_template(templates.PRESETS / f"{name}.toml").description
        except TemplateError as exc:
            description = f"[red]invalid:[/] {escape(str(exc))}"
        table.add_row(name, "preset", description)
    for path in user_templates():
        try:
            description = load_template(path).description
        except TemplateError as exc:
            description = f"[red]invalid:[/] {escape(str(exc))}"
        table.add_row(path.stem, str(path), description)
    out.print(table)


@app.command("show")
def show(
    name: TemplateName,
) -> None:
    """The effective settings of a template, after inheritance."""
    tpl = load_template(Path(name) if name.endswith(".toml") else name)
    out.print(f"[bold]{tpl.name}[/]  {escape(tpl.description)}")
    out.print("files: " + " <- ".join(str(p) for p in tpl.chain))
    for title, values in (
        ("connect", tpl.connect),
        ("relay", tpl.relay),
        ("parameters", tpl.parameters),
    ):
        if values:
            table = Table(title, "value", box=None, title_justify="left")
            for key, value in values.items():
                table.add_row(key, escape(value))
            out.print(table)
    for i, language in enumerate(tpl.languages):
        out.print(f"language[{i}]: " + ", ".join(f"{k}={v}" for k, v in language.items()))


@app.command("render")
def render_cmd(
    name: TemplateName,
    url: RelayUrl = None,
    set_: Overrides = None,
    param: Parameters = None,
    action: ConnectAction = None,
) -> None:
    """Print the TwiML document (exit 0), or the one error (exit 2)."""
    tpl = load_template(Path(name) if name.endswith(".toml") else name)
    xml = render(
        tpl, url=url, action=action, sets=_pairs(set_, "--set"), params=_pairs(param, "--param")
    )
    typer.echo(xml)


@app.command("lint")
def lint_cmd(file: Path = typer.Argument(..., metavar="FILE", help="A TwiML .xml file.")) -> None:
    """Check an existing TwiML document by the template rules."""
    try:
        document = file.read_bytes()
    except OSError as exc:
        raise TemplateError(f"{file}: cannot read it: {exc.strerror}") from None
    problems = lint(document, file)
    for problem in problems:
        err.print(f"[bold red]error:[/] {escape(problem)}")
    if problems:
        raise typer.Exit(1)
    out.print(f"{file}: ok")


@app.command("export")
def export_cmd(
    name: TemplateName,
    url: RelayUrl = None,
    serverless: Path = typer.Option(
        ..., metavar="DIR", help="Folder of the Twilio Serverless project."
    ),
    set_: Overrides = None,
    param: Parameters = None,
    action: ConnectAction = None,
    force: bool = typer.Option(False, help="Overwrite files you changed since the last export."),
) -> None:
    """Write a Twilio Serverless project whose function answers with this TwiML."""
    from twiml_templates.serverless import export_serverless

    tpl = load_template(Path(name) if name.endswith(".toml") else name)
    xml = render(
        tpl, url=url, action=action, sets=_pairs(set_, "--set"), params=_pairs(param, "--param")
    )
    result = export_serverless(xml, serverless, name=tpl.name, force=force)
    for path in result.written:
        note = " (your changes overwritten: --force)" if path in result.overwritten else ""
        out.print(f"  wrote     {path}{note}")
    for path in result.unchanged:
        out.print(f"  unchanged {path}")
    for path in result.kept:
        out.print(
            f"  [yellow]kept[/]      {path} (you changed it; the new version is {path}.crctl-new; "
            "--force overwrites)"
        )
    stale = [p for p in result.kept if p.startswith("functions/")]
    if stale:
        err.print(
            f"[bold red]error:[/] {', '.join(stale)} still hold the TwiML of the last export "
            "(you changed them): merge the .crctl-new versions, or re-export with --force, "
            "before deploying"
        )
        raise typer.Exit(1)
    out.print(
        f"deploy: cd {serverless} && twilio serverless:deploy, then point the number's voice "
        "webhook at https://<service domain>/conversation-relay-signed (signatures enforced)"
    )
