r"""Scripted calls for ``crctl call --script``: play a YAML conversation and report.

The script runs through a :class:`~crctl.call.SimulatedCaller`, which checks each reply; a
pass/fail report is printed at the end.

A script is a YAML list of turns::

    - say: What are your opening hours?
      expect:
        contains: [open, monday]        # each, case-insensitive
        matches: "\\d+ ?(am|pm)"        # a Python regex searched in the reply
        max_first_token_ms: 1500
        max_caller_wait_ms: 2500        # clientSpeaking off → agentSpeaking on (caller's clock)
    - dtmf: "12"                         # keys 0-9 * #, one frame per key
      expect: {reply: none}             # the agent must stay silent (settle_ms: 1000)
    - say: Tell me everything about your prices.
      interrupt_after_words: 5          # barge in after 5 words of the reply
    - say: Put me through to a person, please.
      expect:
        handoff: {reason: person}       # true/false, text in handoffData, or JSON subset
        ends_call: true
        judge: offers a person politely # an LLM's verdict on the call so far (crctl.judge)
        tool_called: transfer_to_human  # or {name, arguments: subset}; the relay's stored events
    # also: language: es (a language switch), dtmf_sent: "12#" (the agent's sendDigits)

A scenario (``crctl test``) is such a list or a mapping ``{name, description, caller: {persona,
goal, max_turns}, expect: {…whole-call checks}, turns: […]}`` (:func:`load_scenario`); its
simulated caller is :mod:`crctl.persona`. ``judge`` and ``tool_called`` are checked once the call
is over (:func:`after_call`).

The schema is :class:`Script` (pydantic); a bad script is one line naming the file, the turn,
the key, the value and what is allowed. ``--script example`` plays the example shipped in
``crctl/examples/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from crctl.call_faults import (
    DEFAULT_BAD_FRAME,
    DEFAULT_CONFIDENCE,
    Hangup,
    Noise,
    is_step,
    play_fault,
    transcript,
    utter,
)
from crctl.caller import CallError, Reply, SimulatedCaller, complete_words
from crctl.errors import ConfigurationError
from relay_server.protocol import End
from relay_server.protocol.handoff import HandoffDataError, parse_handoff

#: How long a turn that must *not* end the call waits for a stray ``end``.
_END_GRACE = 0.3
#: How long a ``reply: none`` turn listens for an answer that must not come (``settle_ms``).
DEFAULT_SETTLE_MS = 1000.0
#: ``--script example`` (a name that is not a file) plays this shipped script.
EXAMPLES = {"example": "conversation.yaml", "conversation": "conversation.yaml"}


class ScriptError(ConfigurationError):
    """A malformed script.

    Its message is one line naming the file, the turn, the key, the value and what is allowed.
    """


# --------------------------------------------------------------------------------- schema

#: What each key allows, in words: the ``expected …`` of an error line (and the schema's docs).
ALLOWED = {
    "say": "non-empty text (what the caller says)",
    "dtmf": 'keys 0-9, * and # (quote them: dtmf: "1#")',
    "interrupt_after_words": "a whole number of at least 1 (barge in after that many words)",
    "expect": "a mapping of contains, matches, max_first_token_ms, max_caller_wait_ms, ends_call, "
    "handoff, reply, settle_ms, judge, tool_called, language, dtmf_sent",
    "expect.contains": "text or a non-empty list of texts (each must be in the reply)",
    "expect.matches": "a Python regular expression, as text",
    "expect.max_first_token_ms": "a positive number of milliseconds",
    "expect.max_caller_wait_ms": "a positive number of milliseconds (the caller's wait, from "
    "clientSpeaking off to agentSpeaking on)",
    "expect.ends_call": "true or false",
    "expect.handoff": "true, false, text in handoffData, or a mapping of handoffData keys",
    "expect.reply": "none (the agent must not answer this turn)",
    "expect.settle_ms": f"a positive number of milliseconds (default {DEFAULT_SETTLE_MS:g}), "
    "only with reply: none",
    "expect.judge": "a rubric, as non-empty text (an LLM judges the conversation against it)",
    "expect.tool_called": "a tool's name, a mapping {name: …, arguments: {…}} (a subset of the "
    "call's JSON arguments), or a list of them",
    "expect.language": "a language code the agent switched to (es-ES, or es for any Spanish)",
    "expect.dtmf_sent": 'true, false, or the keys the agent sent (quote them: dtmf_sent: "1#")',
    # fault steps (crctl.call_faults)
    "drop_socket": "true (the WebSocket drops, then Twilio's /action 64105 reconnect)",
    "silence": "a positive number of seconds (the caller says nothing that long)",
    "bad_frame": "true or the raw text of a malformed frame",
    "partials": "true, on a say turn (interim prompt frames before the final)",
    "noise": "true, or a mapping of confidence and garble (a poor transcript)",
    "noise.confidence": f"a number from 0 to 1 (the share of words heard right; default "
    f"{DEFAULT_CONFIDENCE:g})",
    "noise.garble": "true (the other words misheard, the default) or false (lost)",
    "hangup": "true (hang up now), or on a say or dtmf turn {after_words: N} (hang up mid-reply)",
    "hangup.after_words": "a whole number of at least 1 (words of the reply before hanging up)",
}
#: A language code as ``language:`` takes it (BCP-47's shape: es, es-ES, zh-Hant-TW).
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*")
#: How a turn's reason begins when its reply ended before interrupt_after_words.
NO_BARGE_IN = "no barge-in: "
#: The keys that make a turn a fault step, and those that stand alone (not beside say/dtmf).
FAULT_KEYS = ("drop_socket", "silence", "bad_frame", "partials", "noise", "hangup")
_STEP_KEYS = ("drop_socket", "silence", "bad_frame")


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True
    )

    @model_validator(mode="before")
    @classmethod
    def _no_empty_values(cls, data: Any) -> Any:
        # `ends_call:` with nothing after it is a YAML null: a mistake, never "not set"
        if isinstance(data, dict):
            for key, value in data.items():
                if value is None and key in cls.model_fields:
                    raise _KeyError(str(key), None, "an empty value")
        return data


class _KeyError(ValueError):
    """A problem with one key's value, raised where the key name is known."""

    def __init__(self, key: str, value: Any, problem: str, allowed: str | None = None) -> None:
        super().__init__(problem)
        self.key, self.value, self.problem, self.allowed = key, value, problem, allowed


class Expect(_Strict):
    """What a turn's reply (and the call) must look like; every key optional."""

    contains: tuple[str, ...] = Field((), description=ALLOWED["expect.contains"])
    matches: Optional[re.Pattern[str]] = Field(None, description=ALLOWED["expect.matches"])
    max_first_token_ms: Optional[float] = Field(
        None, gt=0, description=ALLOWED["expect.max_first_token_ms"]
    )
    max_caller_wait_ms: Optional[float] = Field(
        None, gt=0, description=ALLOWED["expect.max_caller_wait_ms"]
    )
    ends_call: Optional[bool] = Field(None, description=ALLOWED["expect.ends_call"])
    handoff: Optional[Union[bool, str, dict[str, Any]]] = Field(
        None, description=ALLOWED["expect.handoff"]
    )
    reply: Optional[Literal["none"]] = Field(None, description=ALLOWED["expect.reply"])
    settle_ms: Optional[float] = Field(None, gt=0, description=ALLOWED["expect.settle_ms"])
    judge: Optional[str] = Field(None, description=ALLOWED["expect.judge"])
    #: each wanted call: (name, argument subset)
    tool_called: tuple[tuple[str, dict[str, Any]], ...] = Field(
        (), description=ALLOWED["expect.tool_called"]
    )
    language: Optional[str] = Field(None, description=ALLOWED["expect.language"])
    dtmf_sent: Optional[Union[bool, str]] = Field(None, description=ALLOWED["expect.dtmf_sent"])

    @field_validator("judge", mode="before")
    @classmethod
    def _judge(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("")
        return value.strip()

    @field_validator("tool_called", mode="before")
    @classmethod
    def _tool_called(cls, value: Any) -> Any:
        return parse_tool_called(value)

    @field_validator("language", mode="before")
    @classmethod
    def _language(cls, value: Any) -> Any:
        if not isinstance(value, str) or not _LANGUAGE.fullmatch(value):
            raise ValueError("")
        return value

    @field_validator("dtmf_sent", mode="before")
    @classmethod
    def _dtmf_sent(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)  # dtmf_sent: 12
        if isinstance(value, bool):
            return value
        if not isinstance(value, str) or not value or set(value) - set("0123456789*#w"):
            raise ValueError("")
        return value

    @field_validator("contains", mode="before")
    @classmethod
    def _contains(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:  # [] would check nothing
            raise ValueError("")
        if not all(isinstance(c, str) and c for c in value):
            raise ValueError("every item must be non-empty text")
        return tuple(value)

    @field_validator("matches", mode="before")
    @classmethod
    def _matches(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("")
        try:
            return re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None

    @model_validator(mode="after")
    def _reply_none_alone(self) -> Expect:
        if self.reply == "none":
            checks = ("contains", "matches", "max_first_token_ms", "max_caller_wait_ms")
            clash = [k for k in checks if _given(self, k)]
            if clash:
                raise _KeyError(
                    "reply",
                    "none",
                    f"together with {', '.join(clash)}, which check a reply that must not come",
                    "reply: none alone, or checks of a reply without reply: none",
                )
        elif self.settle_ms is not None:
            raise _KeyError("settle_ms", self.settle_ms, "without reply: none")
        return self

    @property
    def wants_end(self) -> bool:
        """Whether the turn expects the call to end after it (``ends_call`` or a ``handoff``)."""
        return bool(self.ends_call) or (self.handoff is not None and self.handoff is not False)

    @property
    def silent(self) -> bool:
        """``reply: none``: the agent must say nothing to this turn."""
        return self.reply == "none"

    @property
    def settle(self) -> float:
        """Seconds a ``reply: none`` turn listens before it is judged."""
        return (self.settle_ms or DEFAULT_SETTLE_MS) / 1000


def parse_tool_called(value: Any) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``tool_called:``'s value as (name, argument subset) pairs; ValueError says what is wrong."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("")
    wanted: list[tuple[str, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, str) and item.strip():
            wanted.append((item.strip(), {}))
            continue
        if not isinstance(item, dict):
            raise ValueError("")
        extra = sorted(set(item) - {"name", "arguments"})
        if extra:
            hint = difflib.get_close_matches(str(extra[0]), ["name", "arguments"], n=1)
            mean = f", did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown key {extra[0]!r}{mean}")
        name, arguments = item.get("name"), item.get("arguments", {})
        if not isinstance(name, str) or not name.strip():
            raise ValueError("no name")
        if not isinstance(arguments, dict):
            raise ValueError("arguments is not a mapping")
        wanted.append((name.strip(), arguments))
    return tuple(wanted)


def _given(model: BaseModel, key: str) -> bool:
    return key in model.model_fields_set


class Turn(_Strict):
    """One thing the caller does: ``say`` or ``dtmf``, and what to ``expect`` of the reply.

    Or a fault step (:mod:`crctl.call_faults`): ``drop_socket``, ``silence``, ``bad_frame``,
    ``noise`` or ``hangup`` alone, or ``partials``, ``noise``, ``hangup: {after_words}`` on a
    ``say``.
    """

    say: Optional[str] = Field(None, description=ALLOWED["say"])
    dtmf: Optional[str] = Field(None, description=ALLOWED["dtmf"])
    interrupt_after_words: Optional[int] = Field(
        None, ge=1, description=ALLOWED["interrupt_after_words"]
    )
    expect: Expect = Field(Expect.model_validate({}), description=ALLOWED["expect"])
    drop_socket: Optional[Literal[True]] = Field(None, description=ALLOWED["drop_socket"])
    silence: Optional[float] = Field(None, gt=0, description=ALLOWED["silence"])
    bad_frame: Optional[Union[Literal[True], str]] = Field(None, description=ALLOWED["bad_frame"])
    partials: Optional[Literal[True]] = Field(None, description=ALLOWED["partials"])
    noise: Optional[Noise] = Field(None, description=ALLOWED["noise"])
    hangup: Optional[Hangup] = Field(None, description=ALLOWED["hangup"])
    _number: int = PrivateAttr(0)

    @field_validator("bad_frame", mode="before")
    @classmethod
    def _bad_frame(cls, value: Any) -> Any:
        if value is not True and (not isinstance(value, str) or not value):
            raise ValueError("")
        return value

    @field_validator("noise", mode="before")
    @classmethod
    def _noise(cls, value: Any) -> Any:
        if value is True:
            return Noise()
        if not isinstance(value, dict):
            raise ValueError("")
        _known_keys("noise", value, ("confidence", "garble"))
        confidence = value.get("confidence", DEFAULT_CONFIDENCE)
        number = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
        if not number or not 0 <= confidence <= 1:
            raise _KeyError("confidence", confidence, "out of range" if number else "not a number")
        garble = value.get("garble", True)
        if not isinstance(garble, bool):
            raise _KeyError("garble", garble, "not true or false")
        return Noise(float(confidence), garble)

    @field_validator("hangup", mode="before")
    @classmethod
    def _hangup(cls, value: Any) -> Any:
        if value is True:
            return Hangup()
        if not isinstance(value, dict):
            raise ValueError("")
        _known_keys("hangup", value, ("after_words",))
        words = value.get("after_words")
        if "after_words" not in value:
            raise _KeyError("after_words", None, "missing")
        if isinstance(words, bool) or not isinstance(words, int):
            raise _KeyError("after_words", words, "not a whole number")
        if words < 1:
            raise _KeyError("after_words", words, "too small")
        return Hangup(words)

    @field_validator("say", mode="before")
    @classmethod
    def _say(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("")
        return value

    @field_validator("dtmf", mode="before")
    @classmethod
    def _dtmf(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)  # dtmf: 1
        if not isinstance(value, str) or not value or set(value) - set("0123456789*#"):
            raise ValueError("")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> Turn:
        steps = [key for key in _STEP_KEYS if _given(self, key)]
        if self.hangup is not None and self.hangup.after_words is None:
            steps.append("hangup")
        if self.noise is not None and self.say is None and self.dtmf is None:
            steps.append("noise")
        inputs = [key for key in ("say", "dtmf") if _given(self, key)]
        if steps and (inputs or len(steps) > 1):
            raise _KeyError(
                steps[0],
                getattr(self, steps[0]) if steps[0] != "hangup" else True,
                f"together with {', '.join(k for k in [*inputs, *steps] if k != steps[0])}",
                f"{steps[0]} as a turn of its own (- {steps[0]}: …)",
            )
        if steps:
            self._fault_alone()
            return self
        for key in ("hangup", "partials"):
            if _given(self, key) and not inputs:
                value = {"after_words": self.hangup.after_words} if self.hangup else True
                raise _KeyError(
                    key,
                    value,
                    "without say" + (" or dtmf" if key == "hangup" else ""),
                    ALLOWED[key],
                )
        if (self.say is None) == (self.dtmf is None):
            got = (self.say, self.dtmf) if self.say is not None else None
            raise _KeyError("say/dtmf", got, "both" if got else "neither")
        for key in ("partials", "noise"):
            if _given(self, key) and self.say is None:
                raise _KeyError(key, self.dtmf, "on a dtmf turn", ALLOWED[key])
        if self.hangup is not None and self.interrupt_after_words is not None:
            raise _KeyError(
                "interrupt_after_words",
                self.interrupt_after_words,
                "with hangup, which ends the reply itself",
                "one of interrupt_after_words (barge in) or hangup: {after_words: N}",
            )
        if self.expect.silent and self.interrupt_after_words is not None:
            raise _KeyError(
                "interrupt_after_words",
                self.interrupt_after_words,
                "on a turn whose expect has reply: none, so there is nothing to barge in on",
                "no interrupt_after_words with reply: none",
            )
        return self

    def _fault_alone(self) -> None:
        """A fault step of its own: what may go with it (``expect`` on silence and noise)."""
        step = self.fault
        for key in ("interrupt_after_words", "partials"):
            if _given(self, key):
                raise _KeyError(key, getattr(self, key), f"on a {step} step", ALLOWED[key])
        if _given(self, "expect") and step not in ("silence", "noise"):
            raise _KeyError(
                "expect",
                sorted(self.expect.model_fields_set),
                f"on a {step} step, which has no reply to check",
                "expect only on say, dtmf, silence and noise turns (check the next turn)",
            )

    @property
    def fault(self) -> str | None:
        """The turn's fault key (``drop_socket``, ``silence``…), None for plain speech or keys."""
        return next((key for key in FAULT_KEYS if getattr(self, key) is not None), None)

    @classmethod
    def numbered(cls, number: int, **keys: Any) -> Turn:
        """A turn built in code (tests, other tools), numbered as in a script."""
        turn = cls.model_validate(keys)
        turn._number = number
        return turn

    @property
    def number(self) -> int:
        """The turn's position in its script, from 1."""
        return self._number

    @property
    def label(self) -> str:
        """The turn as a report names it: what it says, quoted, or its DTMF keys (and faults)."""
        said = repr(self.say) if self.say is not None else f"dtmf {self.dtmf}"
        if self.silence is not None:
            return f"silence {self.silence:g} s"
        if self.bad_frame is not None:
            frame = DEFAULT_BAD_FRAME if self.bad_frame is True else self.bad_frame
            return f"bad_frame {_value(frame, 40)}"
        if self.drop_socket:
            return "drop_socket"
        if self.noise is not None:
            heard = repr(transcript(self))
            said = f"noise {heard}" if self.say is None else f"{said} heard as {heard}"
        if self.partials:
            said += " (partials)"
        if self.hangup is not None:
            after = self.hangup.after_words
            said = "hangup" if after is None else f"{said} (hangup after {after} words)"
        return said


class Script(RootModel[list[Turn]]):
    """A call script: a non-empty YAML list of turns (the one schema of ``--script``)."""

    root: list[Turn] = Field(min_length=1)

    @model_validator(mode="after")
    def _number(self) -> Script:
        for number, turn in enumerate(self.root, 1):
            turn._number = number
        return self


_TURN_KEYS = tuple(Turn.model_fields)
_EXPECT_KEYS = tuple(Expect.model_fields)


def _known_keys(parent: str, value: dict[Any, Any], keys: tuple[str, ...]) -> None:
    """A mapping under ``parent`` (``noise: {…}``) has only ``keys``, or says which it has."""
    for key in value:
        if key not in keys:
            match = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
            hint = f", did you mean {match[0]!r}?" if match else ""
            raise _KeyError(
                str(key), value[key], f"unknown key{hint}", f"{parent} takes {', '.join(keys)}"
            )


@dataclass
class TurnResult:
    """One turn's outcome: the reply it got and why it failed (no reasons: it passed)."""

    turn: Turn
    reply: Reply | None
    reasons: list[str]

    @property
    def passed(self) -> bool:
        """Whether every check of the turn held."""
        return not self.reasons


def example_path(name: str = "example") -> Path:
    """The shipped example script called ``name`` (``example``)."""
    folder = resources.files("crctl") / "examples"
    return Path(str(folder / EXAMPLES.get(name, f"{name}.yaml")))


def resolve_script(path: Path) -> Path:
    """``path``, or for a bare name that is not a file (``example``) the shipped script."""
    if path.exists() or path.parent != Path(".") or path.suffix:
        return path
    shipped = example_path(path.name)
    return shipped if path.name in EXAMPLES and shipped.is_file() else path


def load_script(path: Path) -> list[Turn]:
    """Read and check a script (``example`` is the shipped one).

    Raises :class:`ScriptError` naming the file, the turn, the key and the value.
    """
    path = resolve_script(path)
    return parse_turns(_read_yaml(path), path)


def _read_yaml(path: Path) -> Any:
    """The YAML document in ``path``; raises :class:`ScriptError` (one line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read the script: {exc.strerror}{_hint(path)}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScriptError(f"{path}: not valid YAML{where}: {problem}") from None


def _hint(path: Path) -> str:
    if path.exists():
        return ""
    from crctl.console import crctl_command

    crctl = crctl_command()
    return (
        f"; `{crctl} call --script example` plays the shipped example, "
        f"`{crctl} call --example > my-agent.yaml` copies it to edit"
    )


def parse_turns(data: Any, source: Path | str = "<script>") -> list[Turn]:
    """The turns of a parsed YAML document; raises :class:`ScriptError` (one line)."""
    if not isinstance(data, list) or not data:
        scenario = isinstance(data, dict) and bool(set(data) & {"turns", "caller", "name"})
        hint = "; a scenario mapping (name:, caller:, turns:…) runs with `crctl test`"
        hint = hint if scenario else ""
        raise ScriptError(
            f"{source}: a script is a non-empty YAML list of turns (- say: … / - dtmf: …), "
            f"got {_value(data)}{hint}"
        )
    try:
        return Script.model_validate(data).root
    except ValidationError as exc:
        raise ScriptError(f"{source}: {_explain(exc, data)}") from None


# ----------------------------------------------------------------------- error lines


def _value(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _suggest(key: str, level: str) -> str:
    """``did you mean …?`` for a misspelt key, also one put at the wrong level."""

    def norm(name: str) -> str:
        return name.lower().replace("-", "_").replace(" ", "_")

    here, there = (_TURN_KEYS, _EXPECT_KEYS) if level == "turn" else (_EXPECT_KEYS, _TURN_KEYS)
    candidates = {norm(k): k for k in here}
    elsewhere = {norm(k): k for k in there if norm(k) not in candidates}
    match = difflib.get_close_matches(norm(key), [*candidates, *elsewhere], n=1, cutoff=0.6)
    if not match:
        return ""
    if match[0] in candidates:
        return f", did you mean {candidates[match[0]]!r}?"
    name = elsewhere[match[0]]
    if level == "turn":
        return f", did you mean {name!r} under expect: (expect: {{{name}: …}})?"
    return f", did you mean {name!r}, a key of the turn (beside expect:)?"


def _explain(exc: ValidationError, data: list[Any]) -> str:
    """The first problem of a script as one line: turn, key, value and what is allowed."""
    errors = exc.errors(include_url=False)
    # a misspelt key explains everything else wrong with its turn: report it first
    errors.sort(key=lambda e: (e["loc"][:1], e["type"] != "extra_forbidden"))
    error = errors[0]
    loc = error["loc"]
    if not loc or not isinstance(loc[0], int):
        return f"a script is a non-empty YAML list of turns, got {_value(data)}"
    where = f"turn {loc[0] + 1}"
    names = [str(part) for part in loc[1:] if part in _TURN_KEYS or part in _EXPECT_KEYS]
    if error["type"] == "extra_forbidden":
        key, level = str(loc[-1]), "expect" if loc[1:2] == ("expect",) else "turn"
        parent = "expect." if level == "expect" else ""
        keys = _EXPECT_KEYS if level == "expect" else _TURN_KEYS
        suggestion = _suggest(key, level)
        return (
            f"{where}: unknown key {parent + key!r} (value {_value(error['input'])})"
            f"{suggestion or ';'} {'expect' if level == 'expect' else 'a turn'} takes "
            f"{', '.join(keys)}"
        )
    if error["type"] in ("model_type", "model_attributes_type", "dict_type") and len(names) < 2:
        what = "expect" if names == ["expect"] else "the turn"
        allowed = ALLOWED["expect"] if names == ["expect"] else "a mapping with say: or dtmf:"
        return f"{where}: {what}: got {_value(error['input'])}; expected {allowed}"
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyError):
        key = ".".join([*names, cause.key]) if names else cause.key
        if key == "say/dtmf":
            got = "neither"
            if cause.value:
                got = f"both, say {_value(cause.value[0])} and dtmf {_value(cause.value[1])}"
            return (
                f"{where}: say/dtmf: got {got}; expected exactly one of say: (what the caller "
                "says) or dtmf: (keys to press), or a fault step (drop_socket, silence, "
                "bad_frame, noise, hangup)"
            )
        allowed = cause.allowed or ALLOWED.get(key, "")
        return f"{where}: {key}: got {_value(cause.value)} ({cause.problem}); expected {allowed}"
    key = ".".join(names)
    problem = str(cause) if isinstance(cause, ValueError) else ""  # "": the allowed says it
    if error["type"] in ("greater_than", "greater_than_equal"):
        problem = "too small"
    if isinstance(error["input"], bool) and key == "expect.reply":
        problem = "YAML reads an unquoted no, off or false as false"
    detail = f" ({problem})" if problem else ""
    return f"{where}: {key}: got {_value(error['input'])}{detail}; expected {ALLOWED.get(key, '')}"


# ------------------------------------------------------------------------------- running


async def run_script(
    caller: SimulatedCaller,
    turns: list[Turn],
    timeout: float,  # noqa: ASYNC109 (each reply's own wait, --timeout; not a deadline for the run)
    max_caller_wait_ms: float | None = None,
) -> list[TurnResult]:
    """Play ``turns`` on a connected caller, waiting for each reply; returns the results.

    ``max_caller_wait_ms`` bounds every turn's caller wait (a turn's own ``expect`` wins).
    """
    results: list[TurnResult] = []
    for turn in turns:
        # the caller waits for the agent to finish speaking (the greeting, an unsolicited
        # reply): talking over it is a barge-in, which only interrupt_after_words asks for
        await caller.quiet(timeout)
        if caller.closed.is_set() or caller.end_frame is not None:
            last = results[-1].turn.number if results else 0
            results.append(
                TurnResult(turn, None, [f"not played: the call was over after turn {last}"])
            )
            continue
        if is_step(turn):  # drop_socket, silence, bad_frame, hangup: played on their own
            results.append(await play_fault(caller, turn, timeout))
            continue
        before = len(caller.replies)
        try:
            reply = await utter(caller, turn)  # partials and noise applied
        except CallError as exc:  # the call ended while the input was being sent
            results.append(TurnResult(turn, None, [str(exc)]))
            continue
        if reply is None:
            results.append(TurnResult(turn, None, [caller.last_drop or "input not sent"]))
            continue
        reasons = await check_reply(caller, turn, reply, before, timeout, max_caller_wait_ms)
        results.append(TurnResult(turn, reply, reasons))
    return results


async def check_reply(
    caller: SimulatedCaller,
    turn: Turn,
    reply: Reply,
    before: int,
    timeout: float,  # noqa: ASYNC109 (the reply's own wait, as in run_script)
    max_caller_wait_ms: float | None,
) -> list[str]:
    """Wait for ``reply`` (of ``turn``, or what the agent said in a silence) and check it.

    ``before``: how many of the call's replies came before the turn (a ``reply: none`` turn
    fails on any of the later ones).
    """
    if turn.expect.silent:
        # no answer must come: judged once it has had settle_ms to arrive
        async with _at_most(turn.expect.settle):
            await caller.closed.wait()
        window = f"within {turn.expect.settle * 1000:g} ms"
        reasons = check_silence(caller.replies[before:], window)
    else:
        done = await caller.finished(reply, timeout)
        reasons = _reply_faults(reply, done, timeout)
    if turn.interrupt_after_words and not reply.interrupted and not reasons:
        reasons.append(
            f"{NO_BARGE_IN}the reply ended after {complete_words(reply.text)} words, before "
            f"interrupt_after_words: {turn.interrupt_after_words}"
        )
    if turn.expect.wants_end:
        async with _at_most(timeout):
            await caller.closed.wait()
    elif turn.expect.ends_call is False or turn.expect.handoff is False:
        async with _at_most(_END_GRACE):
            await caller.closed.wait()
    reasons += check(turn.expect, reply, caller)
    if reply.solicited:  # what the agent said on its own (in a silence) kept nobody waiting
        reasons += _check_wait(turn.expect, reply, caller, max_caller_wait_ms)
    return reasons


@contextlib.asynccontextmanager
async def _at_most(seconds: float) -> AsyncIterator[None]:
    """Let the block run ``seconds`` at most; running out of time is not an error."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            yield


def _reply_faults(reply: Reply, done: bool, timeout: float) -> list[str]:
    """Why a reply waited on for ``timeout`` s fails before any check (``done``: it ended)."""
    if not done:
        got = f" (so far: {reply.received!r})" if reply.received else ""
        return [f"no complete reply within {timeout:g} s{got}"]
    if reply.error:
        # also after some text: a reply cut by a dropped socket is a failure, whatever it said
        return [reply.error]
    return []


def check(expect: Expect, reply: Reply, caller: SimulatedCaller) -> list[str]:
    """Why ``reply`` (and the call's end) does not meet ``expect``; empty: it does."""
    reasons: list[str] = []
    text = reply.text
    for wanted in expect.contains:
        if wanted.lower() not in text.lower():
            reasons.append(f"reply does not contain {wanted!r}")
    if expect.matches is not None and not expect.matches.search(text):
        reasons.append(f"reply does not match /{expect.matches.pattern}/")
    if expect.max_first_token_ms is not None:
        ms = reply.first_token_ms
        if ms is None:
            reasons.append("no first token: no text arrived")
        elif ms > expect.max_first_token_ms:
            reasons.append(
                f"first token {ms:.0f} ms, over max_first_token_ms {expect.max_first_token_ms:g}"
            )
    end = caller.end_frame
    if expect.ends_call is True and end is None:
        reasons.append("the agent did not end the call (no end message)")
    if expect.ends_call is False and end is not None:
        reasons.append("the agent ended the call (end)")
    if expect.handoff is not None:
        reasons += _check_handoff(expect.handoff, end)
    if expect.language is not None or expect.dtmf_sent is not None:
        later = replies_since(caller, reply)
        if expect.language is not None:
            reasons += check_language(expect.language, later)
        if expect.dtmf_sent is not None:
            reasons += check_dtmf_sent(expect.dtmf_sent, later)
    return reasons


def replies_since(caller: SimulatedCaller, reply: Reply) -> list[Reply]:
    """``reply`` and every reply after it (a key's reply, an unsolicited one): the turn's."""
    for index, seen in enumerate(caller.replies):
        if seen is reply:
            return caller.replies[index:]
    return [reply]


def check_language(wanted: str, replies: list[Reply]) -> list[str]:
    """``language``: the agent sent a ``language`` frame switching to ``wanted``.

    ``es`` matches any Spanish (``es-ES``, ``es-MX``); the TTS or the transcription language.
    """
    switched = [code for r in replies for switch in r.languages for code in switch.values()]
    want = wanted.lower()
    if any(code.lower() == want or code.lower().startswith(want + "-") for code in switched):
        return []
    if not switched:
        return [
            f"language: the agent did not switch language (no language message), expected {wanted}"
        ]
    return [f"language: the agent switched to {', '.join(switched)}, expected {wanted}"]


def check_dtmf_sent(wanted: bool | str, replies: list[Reply]) -> list[str]:
    """``dtmf_sent``: the agent's ``sendDigits`` (any, none, or these keys)."""
    sent = "".join(digits for r in replies for digits in r.digits)
    if wanted is True:
        return [] if sent else ["dtmf_sent: the agent sent no keys (no sendDigits)"]
    if wanted is False:
        return [f"dtmf_sent: the agent sent keys {sent!r} (sendDigits)"] if sent else []
    if wanted in sent:
        return []
    got = f"sent {sent!r}" if sent else "sent no keys (no sendDigits)"
    return [f"dtmf_sent: expected keys {wanted!r}, the agent {got}"]


def _check_wait(
    expect: Expect, reply: Reply, caller: SimulatedCaller, script_max: float | None
) -> list[str]:
    """``max_caller_wait_ms`` (the turn's, else the script's): the caller's wait, measured."""
    limit = expect.max_caller_wait_ms if expect.max_caller_wait_ms is not None else script_max
    if limit is None or expect.silent:
        return []
    ms = caller.caller_wait_ms(reply)
    if ms is None:
        if reply.interrupted and reply.tokens == 0:
            return []
        why = (
            "the TwiML asks for no speaker-events"
            if "speaker-events" not in (caller.plan.events if caller.plan else ())
            else "the agent never started speaking"
        )
        return [f"caller wait: expected at most {limit:g} ms, got none ({why})"]
    if ms > limit:
        return [f"caller wait: expected at most {limit:g} ms (max_caller_wait_ms), got {ms:.0f} ms"]
    return []


def check_silence(replies: list[Reply], window: str) -> list[str]:
    """``reply: none``: what the agent sent in ``window`` (``within 1000 ms``), if anything.

    ``replies``: every reply opened since the turn's input, one per key of a ``dtmf`` turn.
    """
    came = []
    for reply in replies:
        if reply.received.strip():
            came.append(f"said {reply.received.strip()!r}")
        came += [f"played {source!r}" for source in reply.plays]
        came += [f"sent digits {digits!r}" for digits in reply.digits]
    if not came:
        return []
    return [f"expected no reply {window} (reply: none), but the agent {', '.join(came)}"]


def _check_handoff(wanted: bool | str | dict[str, Any], end: End | None) -> list[str]:
    data = end.handoff_data if end is not None else None
    if wanted is False:
        return [f"unexpected hand-off: handoffData {data}"] if data else []
    if end is None:
        return ["no hand-off: the agent did not end the call"]
    if not data:
        return ["no hand-off: end came without handoffData"]
    if wanted is True:
        return []
    if isinstance(wanted, str):
        return [] if wanted.lower() in data.lower() else [f"handoffData lacks {wanted!r}: {data}"]
    try:
        parsed = parse_handoff(data).fields
    except HandoffDataError as exc:
        kind = "not JSON" if exc.not_json else "not a JSON object"
        return [f"handoffData is {kind}: {data}"]
    reasons = []
    for key, value in wanted.items():
        if key not in parsed:
            reasons.append(f"handoffData has no {key!r}: {data}")
        elif isinstance(value, str) and isinstance(parsed[key], str):
            if value.lower() not in parsed[key].lower():
                reasons.append(f"handoffData {key} is {parsed[key]!r}, expected {value!r}")
        elif parsed[key] != value:
            reasons.append(f"handoffData {key} is {parsed[key]!r}, expected {value!r}")
    return reasons


# ------------------------------------------------------------------------------- report


def _shown(reply: Reply | None) -> str:
    if reply is None:
        return ""
    parts = [escape(reply.text.strip())]
    parts += [f"[dim]\\[play {escape(s)}][/]" for s in reply.plays]
    parts += [f"[dim]\\[sendDigits {escape(d)}][/]" for d in reply.digits]
    if reply.interrupted:
        parts.append("[yellow]\\[barged in][/]")
    return " ".join(p for p in parts if p)


def report(out: Console, results: list[TurnResult], caller: SimulatedCaller) -> bool:
    """Print the results and the call's end; True when every turn passed.

    The results are a table on a terminal, one line per turn in a log.
    """
    if out.is_terminal:
        table = Table("#", "caller", "agent", "first token", "caller wait", "result")
        for result in results:
            ms = result.reply.first_token_ms if result.reply else None
            wait = caller.caller_wait_ms(result.reply) if result.reply else None
            verdict = (
                "[green]pass[/]"
                if result.passed
                else "[red]FAIL[/]: " + escape("; ".join(result.reasons))
            )
            table.add_row(
                str(result.turn.number),
                escape(result.turn.label),
                _shown(result.reply),
                "" if ms is None else f"{ms:.0f} ms",
                "" if wait is None else f"{wait:.0f} ms",
                verdict,
            )
        out.print(table)
    else:
        for result in results:
            ms = result.reply.first_token_ms if result.reply else None
            wait = caller.caller_wait_ms(result.reply) if result.reply else None
            timing = "" if ms is None else f"  [dim]first token {ms:.0f} ms[/]"
            timing += "" if wait is None else f"  [dim]caller wait {wait:.0f} ms[/]"
            verdict = "[green]pass[/]" if result.passed else "[red]FAIL[/]"
            why = "" if result.passed else ": " + escape("; ".join(result.reasons))
            out.print(
                f"turn {result.turn.number} {verdict}  {escape(result.turn.label)} → "
                f"{_shown(result.reply) or '(no reply)'}{timing}{why}",
                soft_wrap=True,
            )
    passed = sum(r.passed for r in results)
    failed_call = caller.outcome is not None and caller.outcome.status == "failed"
    if caller.outcome is not None:
        verdict = "[red]FAIL[/]: " if failed_call else ""
        out.print(f"call: {verdict}{escape(caller.outcome.describe())}", soft_wrap=True)
    ok = passed == len(results) and not failed_call
    style = "green" if ok else "red"
    out.print(f"[bold {style}]{passed} of {len(results)} turns passed[/]")
    return ok


async def play_script(
    caller: SimulatedCaller,
    turns: list[Turn],
    out: Console,
    *,
    max_caller_wait_ms: float | None = None,
    context: RunContext | None = None,
) -> int:
    """Run the script on a dialled caller, hang up and print the report.

    The caller hangs up unless the agent ended the call. Returns the exit code: 0 when every
    turn passed, else 1. ``judge`` and ``tool_called`` are checked once the call is over, with
    ``context`` (default: :meth:`RunContext.from_env`).
    """
    try:
        results = await run_script(caller, turns, caller.timeout, max_caller_wait_ms)
    finally:
        await caller.hangup()
    if any(r.turn.expect.judge or r.turn.expect.tool_called for r in results):
        await after_call(results, caller, context or RunContext.from_env(caller.url))
    return 0 if report(out, results, caller) else 1


# -------------------------------------------------------------------------- scenarios
# A scenario is what `crctl test` runs: a script (the list form above) or a mapping with a
# name, scenario-level expectations and a simulated caller. These are the seams the suite
# runner uses.

#: A simulated caller's turns when its ``max_turns`` is not given.
DEFAULT_MAX_TURNS = 6
#: What each key of a scenario mapping allows (the ``expected …`` of its error lines).
SCENARIO_ALLOWED = {
    "name": "non-empty text (the scenario's name in reports; default the file's name)",
    "description": "text (what the scenario is about)",
    "caller": "a mapping of persona, goal and max_turns (an LLM plays the caller)",
    "caller.persona": "non-empty text (who calls, and how they speak)",
    "caller.goal": "non-empty text (what the caller wants; a judge decides whether it was met)",
    "caller.max_turns": f"a whole number of at least 1 (default {DEFAULT_MAX_TURNS})",
    "expect": "a mapping of judge, tool_called, ends_call, handoff, language, dtmf_sent, "
    "max_first_token_ms, max_caller_wait_ms (checked over the whole call)",
    "turns": "a non-empty list of turns (- say: … / - dtmf: …)",
}
_SCENARIO_KEYS = ("name", "description", "caller", "expect", "turns")
_CALLER_KEYS = ("persona", "goal", "max_turns")
#: The expectations that make sense for a whole call.
SCENARIO_EXPECT_KEYS = (
    "judge",
    "tool_called",
    "ends_call",
    "handoff",
    "language",
    "dtmf_sent",
    "max_first_token_ms",
    "max_caller_wait_ms",
)


def judge_cache_dir() -> Path:
    """Where verdicts are kept (``crctl test`` and ``crctl call --script`` alike)."""
    from crctl.paths import state_dir

    return state_dir() / "judge-cache"


@dataclass
class RunContext:
    """What a scenario run may need besides the caller: the judge, the relay's API."""

    #: the relay's base URL and API token, to read the call's stored events (tool calls…)
    relay_url: str | None = None
    api_token: str | None = None
    #: OpenAI-compatible endpoint and model for `judge:` and simulated callers (None: unset)
    judge_base_url: str | None = None
    judge_api_key: str | None = None
    judge_model: str | None = None
    caller_model: str | None = None
    #: folder for the judge's verdict cache (None: no cache)
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls, relay_url: str | None = None, api_token: str | None = None) -> RunContext:
        """A context as ``crctl test`` builds one, from the environment (``crctl call --script``).

        ``CRCTL_JUDGE_MODEL``, ``CRCTL_CALLER_MODEL``, ``CRCTL_JUDGE_BASE_URL`` (else
        ``OPENAI_BASE_URL``), the key ``OPENAI_API_KEY`` (also from the dotenv files), and the
        relay's API token as ``crctl tail`` finds it.
        """
        import os

        from crctl.settings import SettingsError, load_settings

        if relay_url is not None:  # as SimulatedCaller takes it: "host:port", ".../twiml"
            relay_url = relay_url.rstrip("/").removesuffix("/twiml")
            relay_url = relay_url if "://" in relay_url else "http://" + relay_url
        token = api_token
        if token is None and relay_url is not None:
            from crctl.tail import _token

            token = _token(None, relay_url)
        try:
            settings = load_settings()
            key, base = settings.openai_api_key, settings.openai_base_url
        except SettingsError:  # a bad unrelated setting: the SDK reads its own variables
            key, base = None, None
        env = os.environ.get
        return cls(
            relay_url=relay_url,
            api_token=token,
            judge_base_url=env("CRCTL_JUDGE_BASE_URL") or base,
            judge_api_key=key.get_secret_value() if key is not None else None,
            judge_model=env("CRCTL_JUDGE_MODEL") or None,
            caller_model=env("CRCTL_CALLER_MODEL") or None,
            cache_dir=judge_cache_dir(),
        )


class CallerSpec(_Strict):
    """``caller:``: an LLM plays a caller with this persona until the goal or ``max_turns``."""

    persona: str = Field(description=SCENARIO_ALLOWED["caller.persona"])
    goal: str = Field(description=SCENARIO_ALLOWED["caller.goal"])
    max_turns: int = Field(
        DEFAULT_MAX_TURNS, ge=1, description=SCENARIO_ALLOWED["caller.max_turns"]
    )

    @field_validator("persona", "goal", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise ValueError("")
        return value.strip()


@dataclass
class Scenario:
    """One scenario file: its name (the file's stem unless given) and its turns."""

    name: str
    path: Path
    turns: list[Turn]
    description: str = ""
    #: the simulated caller, played after ``turns``
    caller: CallerSpec | None = None
    #: the scenario-level expectations (keys of :data:`SCENARIO_EXPECT_KEYS`)
    expect: Expect | None = None


@dataclass
class ScenarioResult:
    """A scenario's outcome: every turn's result and the scenario-level reasons."""

    scenario: Scenario
    turns: list[TurnResult]
    #: scenario-level failures (the call failed, a scenario-level expectation…)
    reasons: list[str]

    @property
    def passed(self) -> bool:
        """Whether every turn and every scenario-level check held."""
        return not self.reasons and all(t.passed for t in self.turns)


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file; raises :class:`ScriptError` (one line)."""
    path = resolve_script(path)
    return parse_scenario(_read_yaml(path), path)


def parse_scenario(data: Any, path: Path) -> Scenario:
    """A scenario from a parsed YAML document: a list of turns, or a mapping (module docs)."""
    if isinstance(data, list):
        return Scenario(name=path.stem, path=path, turns=parse_turns(data, path))
    if not isinstance(data, dict) or not data:
        raise ScriptError(
            f"{path}: a scenario is a YAML list of turns (- say: … / - dtmf: …) or a mapping of "
            f"{', '.join(_SCENARIO_KEYS)}; got {_value(data)}"
        )
    for key in data:
        if key not in _SCENARIO_KEYS:
            raise ScriptError(f"{path}: {_unknown_scenario_key(str(key), data[key])}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip():
        raise ScriptError(_bad(path, "name", name))
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ScriptError(_bad(path, "description", description))
    turns: list[Turn] = []
    if "turns" in data:
        if not isinstance(data["turns"], list) or not data["turns"]:
            raise ScriptError(_bad(path, "turns", data["turns"]))
        turns = parse_turns(data["turns"], path)
    caller = _parse_caller(data["caller"], path) if "caller" in data else None
    expect = _parse_scenario_expect(data["expect"], path) if "expect" in data else None
    if not turns and caller is None:
        raise ScriptError(
            f"{path}: the scenario has neither turns: nor caller:; expected turns: (a list of "
            "say:/dtmf: turns), caller: (persona, goal, max_turns) or both"
        )
    return Scenario(name.strip(), path, turns, description, caller, expect)


def _bad(path: Path, key: str, value: Any, problem: str = "") -> str:
    detail = f" ({problem})" if problem else ""
    return f"{path}: {key}: got {_value(value)}{detail}; expected {SCENARIO_ALLOWED.get(key, '')}"


def _unknown_scenario_key(key: str, value: Any) -> str:
    """The line of an unknown top-level key, also one that belongs one level down."""
    if key in _CALLER_KEYS:
        place = f"under caller: (caller: {{{key}: …}})"
    elif key in SCENARIO_EXPECT_KEYS:
        place = f"under expect: (expect: {{{key}: …}})"
    elif key in _TURN_KEYS:
        place = f"in a turn under turns: (turns: [{{{key}: …}}])"
    else:
        return _unknown(key, value, "", _SCENARIO_KEYS)
    return (
        f"unknown key {key!r} (value {_value(value)}), did you mean {key!r} {place}? a scenario "
        f"takes {', '.join(_SCENARIO_KEYS)}"
    )


def _unknown(key: str, value: Any, parent: str, keys: tuple[str, ...]) -> str:
    """``unknown key …, did you mean …?; <parent> takes …`` for a mapping of ``keys``."""
    match = difflib.get_close_matches(key.lower().replace("-", "_"), keys, n=1, cutoff=0.6)
    hint = f", did you mean {match[0]!r}?" if match else ";"
    owner = {"": "a scenario", "caller.": "caller", "expect.": "the scenario's expect"}[parent]
    return (
        f"unknown key {parent + key!r} (value {_value(value)}){hint} {owner} takes "
        f"{', '.join(keys)}"
    )


def _parse_caller(data: Any, path: Path) -> CallerSpec:
    if not isinstance(data, dict):
        raise ScriptError(_bad(path, "caller", data))
    for key in data:
        if key not in _CALLER_KEYS:
            raise ScriptError(f"{path}: {_unknown(str(key), data[key], 'caller.', _CALLER_KEYS)}")
    for key in ("persona", "goal"):
        if key not in data:
            raise ScriptError(_bad(path, f"caller.{key}", None, "missing"))
    try:
        return CallerSpec.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = "caller." + ".".join(str(p) for p in error["loc"])
        problem = "too small" if error["type"] == "greater_than_equal" else ""
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyError):
            problem = cause.problem
        raise ScriptError(_bad(path, key, error["input"], problem)) from None


def _parse_scenario_expect(data: Any, path: Path) -> Expect:
    if not isinstance(data, dict):
        raise ScriptError(_bad(path, "expect", data))
    for key in data:
        if key in _EXPECT_KEYS and key not in SCENARIO_EXPECT_KEYS:
            raise ScriptError(
                f"{path}: expect.{key}: checks one reply, not the whole call; put it under a "
                f"turn's expect:, or use one of {', '.join(SCENARIO_EXPECT_KEYS)}"
            )
        if key not in SCENARIO_EXPECT_KEYS:
            keys = SCENARIO_EXPECT_KEYS
            raise ScriptError(f"{path}: {_unknown(str(key), data[key], 'expect.', keys)}")
    try:
        return Expect.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = "expect." + ".".join(str(p) for p in error["loc"][:1])
        cause = (error.get("ctx") or {}).get("error")
        problem = str(cause) if isinstance(cause, ValueError) else ""
        if isinstance(cause, _KeyError):
            key, problem = f"expect.{cause.key}", cause.problem
        if error["type"] in ("greater_than", "greater_than_equal"):
            problem = "too small"
        value = error["input"]
        if key == "expect" and isinstance(value, dict):
            value = data
        allowed = ALLOWED.get(key, "")
        detail = f" ({problem})" if problem else ""
        raise ScriptError(
            f"{path}: {key}: got {_value(value)}{detail}; expected {allowed}"
        ) from None


async def run_scenario(
    caller: SimulatedCaller,
    scenario: Scenario,
    *,
    timeout: float,  # noqa: ASYNC109 (each reply's own wait)
    context: RunContext | None = None,
    max_caller_wait_ms: float | None = None,
) -> ScenarioResult:
    """Play ``scenario`` on a connected caller and hang up; never raises for a failed check.

    The scripted turns first, then the simulated caller (``caller:``); once the call is over,
    the checks that need it whole: ``judge``, ``tool_called`` and the scenario's ``expect``.
    """
    context = context or RunContext()
    expect = scenario.expect
    if expect is not None and expect.max_caller_wait_ms is not None:
        # the scenario's own budget wins over --max-caller-wait-ms, as a turn's own wins over it
        max_caller_wait_ms = expect.max_caller_wait_ms
    reasons: list[str] = []
    try:
        results = await run_script(caller, scenario.turns, timeout, max_caller_wait_ms)
        if scenario.caller is not None:
            from crctl.persona import play_persona

            played, why = await play_persona(
                caller,
                scenario.caller,
                context,
                timeout=timeout,
                first=len(results) + 1,
                max_caller_wait_ms=max_caller_wait_ms,
            )
            results += played
            reasons += why
    finally:
        await caller.hangup()
    if caller.outcome is not None and caller.outcome.status == "failed":
        reasons.insert(0, f"call: {caller.outcome.describe()}")
    reasons += await after_call(results, caller, context, expect)
    if scenario.caller is not None and context.caller_model:
        from crctl.persona import judge_goal

        reasons += await judge_goal(caller, scenario.caller, context)
    return ScenarioResult(scenario, results, reasons)


# --------------------------------------------------------------- checks after the call


def _spans(results: list[TurnResult], caller: SimulatedCaller) -> list[tuple[int, int] | None]:
    """Each turn's replies as a slice of ``caller.replies`` (None: the turn got no reply)."""
    index = {id(reply): i for i, reply in enumerate(caller.replies)}
    starts = [index.get(id(r.reply)) if r.reply is not None else None for r in results]
    spans: list[tuple[int, int] | None] = []
    for n, start in enumerate(starts):
        if start is None:
            spans.append(None)
            continue
        later = [s for s in starts[n + 1 :] if s is not None]
        spans.append((start, later[0] if later else len(caller.replies)))
    return spans


def call_transcript(caller: SimulatedCaller, upto: int | None = None) -> str:
    """The call's transcript as the judge reads it, up to reply ``upto`` (None: all of it)."""
    from crctl.judge import transcript

    replies = caller.replies if upto is None else caller.replies[:upto]
    end = caller.end_frame
    ended = None
    if end is not None and (upto is None or upto >= len(caller.replies)):
        ended = "ends the call" + (f", handoffData {end.handoff_data}" if end.handoff_data else "")
    greeting = caller.plan.welcome_greeting if caller.plan is not None else None
    return transcript(replies, greeting=greeting, ended=ended)


async def after_call(
    results: list[TurnResult],
    caller: SimulatedCaller,
    context: RunContext,
    expect: Expect | None = None,
) -> list[str]:
    """The checks that need the call over: each turn's ``judge`` and ``tool_called`` (added to
    its reasons) and the scenario's ``expect``; returns the scenario-level reasons.
    """  # noqa: D205
    from crctl.judge import Judge

    judge = Judge(context)
    spans = _spans(results, caller)
    wants_tools = bool(expect is not None and expect.tool_called) or any(
        r.turn.expect.tool_called for r in results
    )
    tools: list[dict[str, Any]] | str = []
    if wants_tools:
        tools = await stored_tool_calls(context, caller.call_sid)
    offset = time.time() - time.monotonic()  # the replies' clock → the relay's events' clock
    for result, span in zip(results, spans, strict=True):
        wanted = result.turn.expect
        if span is None or not (wanted.judge or wanted.tool_called):
            continue
        start, stop = span
        if wanted.tool_called:
            begin = caller.replies[start].sent_at + offset
            until = caller.replies[stop].sent_at + offset if stop < len(caller.replies) else None
            window = tools if isinstance(tools, str) else _between(tools, begin, until)
            result.reasons += check_tool_called(wanted.tool_called, window)
        if wanted.judge:
            result.reasons += await judge.check(wanted.judge, call_transcript(caller, stop))
    if expect is None:
        return []
    reasons: list[str] = []
    if expect.judge:
        reasons += await judge.check(expect.judge, call_transcript(caller))
    if expect.tool_called:
        reasons += check_tool_called(expect.tool_called, tools)
    end = caller.end_frame
    if expect.ends_call is True and end is None:
        reasons.append("the agent did not end the call (no end message)")
    if expect.ends_call is False and end is not None:
        reasons.append("the agent ended the call (end)")
    if expect.handoff is not None:
        reasons += _check_handoff(expect.handoff, end)
    if expect.language is not None:
        reasons += check_language(expect.language, caller.replies)
    if expect.dtmf_sent is not None:
        reasons += check_dtmf_sent(expect.dtmf_sent, caller.replies)
    if expect.max_first_token_ms is not None:
        limit = expect.max_first_token_ms
        for result in results:
            if result.turn.expect.max_first_token_ms is not None:
                continue  # the turn's own budget wins (checked with the turn)
            ms = result.reply.first_token_ms if result.reply is not None else None
            if ms is not None and ms > limit:
                reasons.append(
                    f"turn {result.turn.number}: first token {ms:.0f} ms, over the scenario's "
                    f"max_first_token_ms {limit:g}"
                )
    return reasons


def _between(
    tools: list[dict[str, Any]], begin: float, until: float | None
) -> list[dict[str, Any]]:
    return [t for t in tools if t["ts"] >= begin and (until is None or t["ts"] < until)]


async def stored_tool_calls(context: RunContext, call_sid: str) -> list[dict[str, Any]] | str:
    """The call's ``tool.call`` events from the relay's ``GET /calls/{sid}`` (``ts``, ``name``,
    ``arguments`` as sent, ``values`` decoded), or the one line saying why they cannot be read.
    """  # noqa: D205
    import httpx

    from crctl.turns import tool_arguments
    from relay_server.events import TOOL_CALL

    if not context.relay_url:
        return "tool_called: no relay URL to read the call's tool calls from"
    url = context.relay_url.rstrip("/") + f"/calls/{call_sid}"
    headers = {"Authorization": f"Bearer {context.api_token}"} if context.api_token else {}
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return f"tool_called: cannot read the call's events at {url}: {exc}"
    if response.status_code == 401:
        fix = "pass --token or set CRCTL_API_TOKEN" if not context.api_token else "check it"
        return f"tool_called: the relay refused the API token (HTTP 401) at {url}: {fix}"
    if response.status_code == 404:
        return f"tool_called: the relay has no stored events of call {call_sid} ({url})"
    if response.status_code != 200:
        return f"tool_called: {url} answered HTTP {response.status_code}"
    try:
        events = response.json()["events"]
        return [
            {
                "ts": float(e["ts"]),
                "name": e["data"].get("name", ""),
                "arguments": e["data"].get("arguments"),
                "values": tool_arguments(e["data"].get("arguments")),
            }
            for e in events
            if e["kind"] == TOOL_CALL
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"tool_called: {url} answered something other than a stored call"


def check_tool_called(
    wanted: tuple[tuple[str, dict[str, Any]], ...], calls: list[dict[str, Any]] | str
) -> list[str]:
    """``tool_called``: each wanted tool was called, with arguments holding the wanted subset."""
    if isinstance(calls, str):
        return [calls]
    reasons = []
    for name, subset in wanted:
        named = [c for c in calls if c["name"] == name]
        if not named:
            made = ", ".join(sorted({c["name"] for c in calls})) or "none"
            reasons.append(f"tool_called: {name} was not called (tools called: {made})")
            continue
        if not subset:
            continue
        if not any(_holds(subset, c["values"]) for c in named):
            shown = "; ".join(str(c["arguments"]) for c in named)
            reasons.append(f"tool_called: {name} was called without arguments {subset}: {shown}")
    return reasons


def _holds(subset: Any, value: Any) -> bool:
    """``subset`` is within ``value``: mappings key by key, text case-insensitively contained."""
    if isinstance(subset, dict):
        return isinstance(value, dict) and all(
            k in value and _holds(v, value[k]) for k, v in subset.items()
        )
    if isinstance(subset, str) and isinstance(value, str):
        return subset.lower() in value.lower()
    if isinstance(subset, (int, float)) and not isinstance(subset, bool):
        return not isinstance(value, bool) and value == subset
    return bool(subset == value)
