"""``crctl test``: run a folder of call scenarios against a relay, concurrently, and report.

Each scenario file (the script format of ``crctl call --script``, read by
:func:`crctl.call_script.load_scenario`) is played by its own
:class:`~crctl.caller.SimulatedCaller` (its own call SID) through
:func:`crctl.call_script.run_scenario`; ``-j N`` of them at a time. The relay is ``--url``, or
one started in this process on a free 127.0.0.1 port with the agent settings ``crctl serve``
takes (how ``crctl up --no-tunnel --call`` runs a relay and a caller together).

Every file is loaded before anything runs: bad files are each one line (file, turn, key) and
the exit code is 2. Then a summary (a table on a terminal, a line per scenario otherwise),
``--junit FILE`` (JUnit XML) and ``--json FILE``. Exit 0 only when every run of every scenario
passed, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import os
import signal
import socket
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl import options as opts
from crctl.errors import UsageError

if TYPE_CHECKING:
    from crctl.call_script import RunContext, Scenario, ScenarioResult
    from crctl.settings import Settings

out = Console(highlight=False, soft_wrap=True)

#: The files of a folder that are scenarios.
SUFFIXES = (".yaml", ".yml")


# ------------------------------------------------------------------------------ results


@dataclass
class TurnRecord:
    """One turn of one run, as the reports show it."""

    number: int
    label: str
    passed: bool
    reasons: list[str]
    reply: str | None
    first_token_ms: float | None
    caller_wait_ms: float | None


@dataclass
class RunRecord:
    """One run of a scenario (``--repeat`` runs each several times)."""

    iteration: int
    call_sid: str
    duration_s: float
    turns: list[TurnRecord]
    #: why the run failed: each failed turn's reasons (``turn N: …``), then the scenario's
    reasons: list[str]
    #: the run raised instead of finishing (a bug or a broken relay): JUnit's <error>
    error: str | None = None

    @property
    def passed(self) -> bool:
        """Whether every turn and every scenario-level check held."""
        return not self.reasons and self.error is None

    @property
    def waits(self) -> list[float]:
        """The caller waits measured in this run, in ms."""
        return [t.caller_wait_ms for t in self.turns if t.caller_wait_ms is not None]


@dataclass
class ScenarioSummary:
    """A scenario and all its runs."""

    name: str
    path: Path
    #: the turns the file lists (a simulated caller's scenario may list none)
    listed: int
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def turns(self) -> int:
        """The turns played: the most of any run, else the turns the file lists."""
        return max([len(r.turns) for r in self.runs] + [self.listed])

    @property
    def passed(self) -> bool:
        """Every run passed."""
        return bool(self.runs) and all(r.passed for r in self.runs)

    @property
    def pass_rate(self) -> float:
        """The share of runs that passed, 0 to 1."""
        return sum(r.passed for r in self.runs) / len(self.runs) if self.runs else 0.0

    @property
    def waits(self) -> list[float]:
        """Every caller wait of every run, in ms."""
        return [w for r in self.runs for w in r.waits]

    @property
    def why(self) -> str:
        """Why it failed: the first failed run's reasons (empty when it passed)."""
        for run in self.runs:
            if not run.passed:
                # an error's first line (its traceback is in the JUnit and JSON reports)
                lines = run.reasons + ([run.error.splitlines()[0]] if run.error else [])
                return "; ".join(lines)
        return ""


@dataclass
class SuiteResult:
    """What ``crctl test`` ran and found."""

    scenarios: list[ScenarioSummary]
    jobs: int
    repeat: int
    wall_s: float
    relay_url: str

    @property
    def passed(self) -> bool:
        """Every scenario passed."""
        return all(s.passed for s in self.scenarios)


# ----------------------------------------------------------------------------- loading


def discover(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The scenario files named by ``paths`` (folders: their YAML files, sorted) and problems.

    A folder is searched with its subfolders; a file is taken whatever its suffix. Each
    problem is one line.
    """
    files: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                problems.append(f"{path}: no scenario files (*.yaml, *.yml) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    unique = list(dict.fromkeys(files))  # a file named twice runs once
    return unique, problems


def load_all(files: Sequence[Path]) -> tuple[list[Scenario], list[str]]:
    """Every scenario that loads, and one line for each file that does not."""
    from crctl.call_script import load_scenario
    from crctl.errors import ConfigurationError

    scenarios, problems = [], []
    for path in files:
        try:
            scenarios.append(load_scenario(path))
        except ConfigurationError as exc:  # ScriptError: one line naming the file
            problems.append(str(exc))
    return scenarios, problems


def select(scenarios: list[Scenario], pattern: str | None) -> list[Scenario]:
    """The scenarios whose name matches ``-k``: a glob when it has ``* ? [``, else a substring.

    Case-insensitive.
    """
    if not pattern:
        return scenarios
    wanted = pattern.lower()
    if any(c in pattern for c in "*?["):
        return [s for s in scenarios if fnmatch.fnmatchcase(s.name.lower(), wanted)]
    return [s for s in scenarios if wanted in s.name.lower()]


def _names(scenarios: Sequence[Scenario]) -> dict[int, str]:
    """Each scenario's name in reports: its own, or its path when two share a name."""
    counts: dict[str, int] = {}
    for s in scenarios:
        counts[s.name] = counts.get(s.name, 0) + 1
    return {id(s): s.name if counts[s.name] == 1 else str(s.path) for s in scenarios}


# ----------------------------------------------------------------------------- running


@dataclass
class _Plan:
    """How every run calls the relay."""

    url: str
    auth_token: str | None
    public_url: str | None
    timeout: float
    time_scale: float
    max_caller_wait_ms: float | None
    context: RunContext


async def _run_one(plan: _Plan, scenario: Scenario, iteration: int) -> RunRecord:
    """One run of ``scenario`` by a new caller; failures are recorded, never raised.

    Except :class:`~crctl.caller.Unreachable`: nothing answers, which is the suite's problem.
    """
    from crctl.call_script import run_scenario
    from crctl.caller import CallError, SimulatedCaller, Unreachable
    from crctl.caller.speaker import Timing

    caller = SimulatedCaller(
        plan.url,
        auth_token=plan.auth_token,
        public_url=plan.public_url,
        timeout=plan.timeout,
        timing=Timing(time_scale=plan.time_scale),
    )
    started = time.monotonic()

    def record(reasons: list[str], error: str | None = None) -> RunRecord:
        return RunRecord(iteration, caller.call_sid, time.monotonic() - started, [], reasons, error)

    try:
        await caller.connect(await caller.fetch())
    except Unreachable:
        raise
    except CallError as exc:
        await _hang_up(caller)
        return record([f"call: {exc}"])
    try:
        result = await run_scenario(
            caller,
            scenario,
            timeout=plan.timeout,
            context=plan.context,
            max_caller_wait_ms=plan.max_caller_wait_ms,
        )
    except CallError as exc:
        await _hang_up(caller)
        return record([f"call: {exc}"])
    except Exception as exc:  # one broken run must not stop the others: JUnit's <error>
        await _hang_up(caller)
        lines = traceback.format_exception(exc)
        return record([], f"{type(exc).__name__}: {exc}\n{''.join(lines)}".strip())
    return _record(result, caller, iteration, time.monotonic() - started)


async def _hang_up(caller: Any) -> None:
    # already failing: the first reason is the one reported
    with contextlib.suppress(Exception):
        await caller.hangup()


def _record(result: ScenarioResult, caller: Any, iteration: int, duration: float) -> RunRecord:
    turns, reasons = [], []
    for turn in result.turns:
        reply = turn.reply
        turns.append(
            TurnRecord(
                number=turn.turn.number,
                label=turn.turn.label,
                passed=turn.passed,
                reasons=list(turn.reasons),
                reply=reply.text if reply is not None else None,
                first_token_ms=reply.first_token_ms if reply is not None else None,
                caller_wait_ms=caller.caller_wait_ms(reply) if reply is not None else None,
            )
        )
        reasons += [f"turn {turn.turn.number}: {why}" for why in turn.reasons]
    reasons += list(result.reasons)
    return RunRecord(iteration, caller.call_sid, duration, turns, reasons)


async def run_suite(
    plan: _Plan, scenarios: list[Scenario], jobs: int, repeat: int
) -> list[ScenarioSummary]:
    """Every scenario ``repeat`` times, ``jobs`` runs at a time; summaries in file order."""
    from crctl.caller import Unreachable

    names = _names(scenarios)
    summaries = [ScenarioSummary(names[id(s)], s.path, len(s.turns)) for s in scenarios]
    gate = asyncio.Semaphore(jobs)
    unreachable: list[Unreachable] = []

    async def one(index: int, iteration: int) -> tuple[int, RunRecord | None]:
        async with gate:
            if unreachable:  # the relay is not there: do not try the others
                return index, None
            try:
                return index, await _run_one(plan, scenarios[index], iteration)
            except Unreachable as exc:
                unreachable.append(exc)
                return index, None

    # runs interleaved (a, b, c, a, b, c): a flaky scenario's repeats are spread over the run
    work = [one(i, n) for n in range(1, repeat + 1) for i in range(len(scenarios))]
    for index, run in await asyncio.gather(*work):
        if run is not None:
            summaries[index].runs.append(run)
    if unreachable:
        raise unreachable[0]
    for summary in summaries:
        summary.runs.sort(key=lambda r: r.iteration)
    return summaries


# ------------------------------------------------------------------------- in-process relay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_settings(flags: dict[str, Any]) -> Settings:
    """The in-process relay's settings: ``serve``'s, on a free 127.0.0.1 port.

    Its call events are kept in memory unless ``--events-db`` says where. Without a public URL
    nothing but this process reaches it, so signatures are not checked (as ``up --no-tunnel``).
    """
    from crctl.settings import SettingsError, load_settings

    flags = {**flags, "host": "127.0.0.1", "port": _free_port()}
    if flags.get("events_db") is None:
        flags["events_db"] = ""
    settings = load_settings(**flags)
    if settings.public_url is None:
        settings = settings.model_copy(update={"verify_signatures": False})
    problems, _ = settings.startup_problems()
    if problems:
        raise SettingsError(problems[0])
    return settings


# ------------------------------------------------------------------------------ reports


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.0f} ms"


def _wait_text(summary: ScenarioSummary) -> tuple[str, str]:
    from crctl.turns import percentile

    waits = summary.waits
    return _ms(percentile(waits, 50)), _ms(max(waits) if waits else None)


def _verdict(summary: ScenarioSummary, repeat: int) -> str:
    if repeat == 1:
        return "pass" if summary.passed else "FAIL"
    passed = sum(r.passed for r in summary.runs)
    word = "pass" if summary.passed else "FAIL"
    return f"{word} {passed}/{len(summary.runs)} ({summary.pass_rate:.0%})"


def report(console: Console, result: SuiteResult) -> None:
    """The summary: a table on a terminal, one line per scenario otherwise, then the totals."""
    if console.is_terminal:
        table = Table("scenario", "turns", "result", "caller wait p50", "max", "why it failed")
        for s in result.scenarios:
            p50, top = _wait_text(s)
            verdict = _verdict(s, result.repeat)
            style = "green" if s.passed else "red"
            table.add_row(
                escape(s.name), str(s.turns), f"[{style}]{verdict}[/]", p50, top, escape(s.why)
            )
        console.print(table)
    else:
        for s in result.scenarios:
            p50, top = _wait_text(s)
            style = "green" if s.passed else "red"
            wait = f"  caller wait p50 {p50} max {top}" if p50 else ""
            why = f": {escape(s.why)}" if s.why else ""
            console.print(
                f"[{style}]{_verdict(s, result.repeat)}[/] {escape(s.name)}  "
                f"{s.turns} turn{'' if s.turns == 1 else 's'}{wait}{why}",
                soft_wrap=True,
            )
    passed = sum(s.passed for s in result.scenarios)
    total = len(result.scenarios)
    style = "green" if result.passed else "red"
    runs = sum(len(s.runs) for s in result.scenarios)
    console.print(
        f"[bold {style}]{passed} of {total} scenarios passed[/] "
        f"[dim]({runs} run{'' if runs == 1 else 's'}, -j {result.jobs}, {result.wall_s:.1f} s)[/]"
    )


def _s(seconds: float) -> str:
    return f"{seconds:.3f}"


def _transcript(run: RunRecord) -> str:
    lines = []
    for t in run.turns:
        timing = ", ".join(
            f"{name} {ms:.0f} ms"
            for name, ms in (("first token", t.first_token_ms), ("caller wait", t.caller_wait_ms))
            if ms is not None
        )
        shown = "(no reply)" if t.reply is None else repr(t.reply)
        verdict = "pass" if t.passed else "FAIL: " + "; ".join(t.reasons)
        lines.append(
            f"turn {t.number} {t.label} -> {shown}{f' ({timing})' if timing else ''}: {verdict}"
        )
    return "\n".join([f"call {run.call_sid}", *lines])


def junit_xml(result: SuiteResult) -> bytes:
    """The result as JUnit XML: one <testsuite>, a <testcase> per run (``name[2]`` on repeats)."""
    cases = [(s, r) for s in result.scenarios for r in s.runs]
    failures = sum(1 for _, r in cases if r.error is None and not r.passed)
    errors = sum(1 for _, r in cases if r.error is not None)
    total_time = _s(result.wall_s)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors)}
    root = ET.Element("testsuites", {"name": "crctl test", "time": total_time, **counts})
    now = datetime.now(UTC).replace(microsecond=0, tzinfo=None)
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": "crctl test",
            **counts,
            "skipped": "0",
            "time": total_time,
            "timestamp": now.isoformat(),
            "hostname": socket.gethostname(),
        },
    )
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="relay", value=result.relay_url)
    ET.SubElement(props, "property", name="jobs", value=str(result.jobs))
    ET.SubElement(props, "property", name="repeat", value=str(result.repeat))
    for s, run in cases:
        name = s.name if result.repeat == 1 else f"{s.name}[{run.iteration}]"
        case = ET.SubElement(
            suite,
            "testcase",
            name=name,
            classname=_classname(s.path),
            time=_s(run.duration_s),
            file=str(s.path),
        )
        if run.error is not None:
            message = run.error.splitlines()[0]
            ET.SubElement(case, "error", message=message, type="error").text = run.error
        elif not run.passed:
            element = ET.SubElement(case, "failure", message=run.reasons[0], type="failure")
            element.text = "\n".join(run.reasons)
        ET.SubElement(case, "system-out").text = _transcript(run)
    ET.indent(root)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def _classname(path: Path) -> str:
    """The folder of a scenario, dotted, as JUnit's classname (CI groups cases by it)."""
    parts = [p for p in path.parent.parts if p not in ("/", ".", "..")]
    return ".".join(parts[-3:]) or "scenarios"


def json_report(result: SuiteResult) -> dict[str, Any]:
    """The result as JSON: totals, then each scenario with its runs and turns."""
    return {
        "passed": result.passed,
        "relay": result.relay_url,
        "jobs": result.jobs,
        "repeat": result.repeat,
        "wall_s": round(result.wall_s, 3),
        "scenarios": [
            {
                "name": s.name,
                "path": str(s.path),
                "turns": s.turns,
                "passed": s.passed,
                "pass_rate": s.pass_rate,
                "why": s.why,
                "runs": [
                    {
                        "iteration": r.iteration,
                        "call_sid": r.call_sid,
                        "passed": r.passed,
                        "duration_s": round(r.duration_s, 3),
                        "reasons": r.reasons,
                        "error": r.error,
                        "turns": [
                            {
                                "number": t.number,
                                "turn": t.label,
                                "passed": t.passed,
                                "reasons": t.reasons,
                                "reply": t.reply,
                                "first_token_ms": t.first_token_ms,
                                "caller_wait_ms": t.caller_wait_ms,
                            }
                            for t in r.turns
                        ],
                    }
                    for r in s.runs
                ],
            }
            for s in result.scenarios
        ],
    }


def _writable(path: Path, option: str) -> None:
    """Check before the run that a report can be written there (its folder is made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None
    if path.is_dir():
        raise UsageError(f"{option} {path}: a folder; expected a file name ({option} out.xml)")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"{option} {path}: cannot write it: permission denied")


def _write(path: Path, data: bytes, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------ command


def suite(
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH",
            help="Scenario files (crctl call's script format), or folders of them (*.yaml, "
            "*.yml, subfolders included, in name order).",
            show_default=False,
        ),
    ],
    url: Annotated[
        Optional[str],
        typer.Option(
            "--url",
            metavar="URL",
            help="A running relay's base URL; without it a relay is started in this process, "
            "on a free 127.0.0.1 port, with the agent flags below.",
        ),
    ] = None,
    public_url: Annotated[
        Optional[str],
        typer.Option(
            "--public-url",
            metavar="URL",
            help="The relay's public URL, which Twilio signs (as crctl call); for a local "
            "http:// --url it defaults to CRCTL_PUBLIC_URL.",
        ),
    ] = None,
    auth_token: Annotated[
        Optional[str],
        typer.Option(
            "--auth-token",
            metavar="TOKEN",
            help="Sign requests as Twilio does. (default: TWILIO_AUTH_TOKEN from the environment, "
            ".env.local or .env)",
        ),
    ] = None,
    jobs: Annotated[
        Optional[int],
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            metavar="N",
            help="Scenarios run at once. (default: the number of CPUs)",
            show_default=False,
        ),
    ] = None,
    keyword: Annotated[
        Optional[str],
        typer.Option(
            "-k",
            metavar="PATTERN",
            help="Only the scenarios whose name (its name:, else the file's stem) contains "
            "PATTERN, or matches it as a glob (* ? [), in any case.",
        ),
    ] = None,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat",
            min=1,
            metavar="N",
            help="Run each scenario N times and report its pass rate (a scenario passes when "
            "every run does).",
        ),
    ] = 1,
    junit: Annotated[
        Optional[Path],
        typer.Option("--junit", metavar="FILE", help="Write the results as JUnit XML (for CI)."),
    ] = None,
    json_file: Annotated[
        Optional[Path],
        typer.Option("--json", metavar="FILE", help="Write the results, every turn, as JSON."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", min=0.1, help="Seconds to wait for the relay and for each reply."
        ),
    ] = 15.0,
    time_scale: Annotated[
        float,
        typer.Option(
            "--time-scale",
            min=0,
            help="Multiply every simulated delay of the callers (speaking, agentSpeaking on, "
            "the greeting, keys), as crctl call: 0 waits for nothing.",
        ),
    ] = 1.0,
    max_caller_wait_ms: Annotated[
        Optional[float],
        typer.Option(
            "--max-caller-wait-ms",
            min=0,
            help="Fail any turn whose caller wait is longer; a turn's expect wins.",
        ),
    ] = None,
    judge_model: Annotated[
        Optional[str],
        typer.Option(
            "--judge-model",
            metavar="NAME",
            envvar="CRCTL_JUDGE_MODEL",
            help="Model of the judge for judge: expectations.",
        ),
    ] = None,
    judge_base_url: Annotated[
        Optional[str],
        typer.Option(
            "--judge-base-url",
            metavar="URL",
            envvar="CRCTL_JUDGE_BASE_URL",
            help="OpenAI-compatible endpoint of the judge and simulated callers (default "
            "OPENAI_BASE_URL; key OPENAI_API_KEY).",
        ),
    ] = None,
    caller_model: Annotated[
        Optional[str],
        typer.Option(
            "--caller-model",
            metavar="NAME",
            envvar="CRCTL_CALLER_MODEL",
            help="Model that plays caller: personas.",
        ),
    ] = None,
    agent: opts.Agent = None,
    app_dir: opts.AppDir = None,
    model: opts.Model = None,
    openai_base_url: opts.OpenAIBaseUrl = None,
    system_prompt: opts.SystemPrompt = None,
    system_prompt_file: opts.SystemPromptFile = None,
    tools: opts.Tools = None,
    twiml_template: opts.TwimlTemplate = None,
    welcome_greeting: opts.WelcomeGreeting = None,
    handoff_number: opts.HandoffNumber = None,
    llm_timeout: opts.LlmTimeout = None,
    llm_usage: opts.LlmUsage = None,
    apology: opts.Apology = None,
    filler_after_ms: opts.FillerAfterMs = None,
    silence_timeout: opts.SilenceTimeout = None,
    dtmf_buffer: opts.DtmfBuffer = None,
    events_db: Annotated[
        Optional[str],
        typer.Option(
            "--events-db",
            metavar="FILE",
            help="The in-process relay's call events in this SQLite file. (default: memory only)",
        ),
    ] = None,
) -> None:
    """Run scenario files against a relay, in parallel: a pass/fail table, JUnit XML and
    JSON for CI.
    """  # noqa: D205 (the first paragraph is the command's line in `crctl --help`: cli.COMMANDS)
    flags = opts.settings_flags(locals())  # the agent flags (and --public-url), as settings
    if auth_token:  # an in-process relay checks the signatures made with it
        flags["twilio_auth_token"] = auth_token
    # 1. everything is read first: every bad file is named before anything runs (exit 2)
    files, problems = discover(paths)
    scenarios, bad = load_all(files)
    problems += bad
    if problems:
        from crctl.console import err

        for line in problems[:-1]:
            err.print(f"[bold red]error:[/] {escape(line)}")
        raise UsageError(problems[-1])
    chosen = select(scenarios, keyword)
    if not chosen:
        names = ", ".join(s.name for s in scenarios)
        raise UsageError(f"-k {keyword}: no scenario matches; the scenarios are {names}")
    for report, option in ((junit, "--junit"), (json_file, "--json")):
        if report is not None:  # known now, not after a long run
            _writable(report, option)
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--url must be the relay's http(s):// address, got {url!r}")
    code = _execute(
        url=url,
        public_url=public_url,
        auth_token=auth_token,
        flags=flags,
        scenarios=chosen,
        jobs=jobs or os.cpu_count() or 1,
        repeat=repeat,
        junit=junit,
        json_file=json_file,
        timeout=timeout,
        time_scale=time_scale,
        max_caller_wait_ms=max_caller_wait_ms,
        judge=(judge_model, judge_base_url, caller_model),
    )
    raise typer.Exit(code)


def _execute(
    *,
    url: str | None,
    public_url: str | None,
    auth_token: str | None,
    flags: dict[str, Any],
    scenarios: list[Scenario],
    jobs: int,
    repeat: int,
    junit: Path | None,
    json_file: Path | None,
    timeout: float,
    time_scale: float,
    max_caller_wait_ms: float | None,
    judge: tuple[str | None, str | None, str | None],
) -> int:
    from crctl.call import _defaults, _start_hint
    from crctl.call_script import RunContext, judge_cache_dir
    from crctl.caller import Unreachable
    from crctl.console import err
    from crctl.paths import read_api_token
    from crctl.serve import (
        _setup_logging,
        bind,
        build_relay,
        event_loop_factory,
        run_relay,
        until_listening,
    )
    from crctl.settings import load_settings

    relay: Any = None
    if url is None:
        # with the caller's --public-url: the relay checks the signatures the caller makes
        settings = _local_settings(flags)
        relay = build_relay(settings)
        sock = bind(settings)
        for warning in relay.warnings:  # the LLM cannot be reached…: every scenario would fail
            err.print(f"[bold yellow]warning:[/] {escape(warning)}")
        _setup_logging("WARNING")
        base = f"http://127.0.0.1:{settings.port}"
        token = settings.twilio_auth_token
        signing = token.get_secret_value() if token is not None else None
        plan_public, api_token = settings.public_url, relay.config.api_token
    else:
        settings = load_settings()
        base = url.rstrip("/")
        signing, plan_public = _defaults(base, auth_token, public_url)
        api_token = _api_token(base, settings, read_api_token)
    judge_model, judge_base_url, caller_model = judge
    key = settings.openai_api_key
    context = RunContext(
        relay_url=base,
        api_token=api_token,
        judge_base_url=judge_base_url or settings.openai_base_url,
        judge_api_key=key.get_secret_value() if key is not None else None,
        judge_model=judge_model,
        caller_model=caller_model,
        cache_dir=judge_cache_dir(),
    )
    plan = _Plan(
        base, signing or None, plan_public, timeout, time_scale, max_caller_wait_ms, context
    )

    async def main() -> list[ScenarioSummary]:
        if relay is None:
            return await run_suite(plan, scenarios, jobs, repeat)
        stop = asyncio.Event()
        serving = asyncio.create_task(run_relay(relay.app, settings, stop=stop, sock=sock))
        try:
            await until_listening(settings.port)
            # Ctrl-C stops the suite (exit 130), not only the relay that took SIGINT
            task = asyncio.current_task()
            if task is not None:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, task.cancel)
            return await run_suite(plan, scenarios, jobs, repeat)
        finally:
            stop.set()
            await serving

    started = time.monotonic()
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            summaries = runner.run(main())
    except Unreachable as exc:
        hint = _start_hint(base) if url is not None else ""  # (its own relay stopped)
        raise Unreachable(f"{exc}{hint}") from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print("[yellow]interrupted: no report was written[/]")
        raise typer.Exit(130) from None
    finally:
        if relay is not None:
            relay.close()
    result = SuiteResult(summaries, jobs, repeat, time.monotonic() - started, base)
    report(out, result)
    if junit is not None:
        _write(junit, junit_xml(result), "--junit")
    if json_file is not None:
        text = json.dumps(json_report(result), indent=2, ensure_ascii=False) + "\n"
        _write(json_file, text.encode(), "--json")
    return 0 if result.passed else 1


def _api_token(url: str, settings: Settings, read: Any) -> str | None:
    """The relay API's token: CRCTL_API_TOKEN, else this machine's token file for a local relay.

    As ``crctl tail``: the token file is never sent to a relay on another machine.
    """
    from crctl.hosts import is_this_machine

    if settings.api_token is not None and settings.api_token.get_secret_value():
        return settings.api_token.get_secret_value()
    host = urlsplit(url).hostname or ""
    token: str | None = read() if is_this_machine(host) else None
    return token
