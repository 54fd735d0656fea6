"""The LLM judge of ``judge: "<rubric>"`` expectations, and the transcript it reads.

Any OpenAI-compatible endpoint (``RunContext.judge_base_url``, ``judge_api_key``,
``judge_model``), through the official ``openai`` SDK, at temperature 0 and with structured
output (``response_format`` json_schema ``{passed: bool, reason: str}``). Verdicts are cached in
``RunContext.cache_dir`` under a hash of (model, rubric, transcript): an unchanged run asks the
model nothing.

``openai`` is imported when a request is made, so a script without ``judge:`` never loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crctl.caller import Reply

if TYPE_CHECKING:
    from crctl.call_script import RunContext

#: The setting a judge needs, as the one line of a check that cannot run without it.
NO_JUDGE_MODEL = "judge: no judge model: pass --judge-model or set CRCTL_JUDGE_MODEL"
#: The verdict's JSON schema (``response_format``), strict: both keys, nothing else.
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "passed": {"type": "boolean"},
        "reason": {"type": "string"},
    },
    "required": ["passed", "reason"],
    "additionalProperties": False,
}
_SYSTEM = (
    "You judge a phone conversation between a caller and a voice agent against a rubric. "
    "Read the transcript and decide whether the agent's behaviour meets the rubric. Answer with "
    "passed (true or false) and a one-sentence reason that quotes what decided it."
)
#: What to do about an endpoint's refusal, by HTTP status.
_FIXES = {
    401: " (check OPENAI_API_KEY)",
    404: " (check the model's name: --judge-model / CRCTL_JUDGE_MODEL, and the base URL)",
}
#: How long one request may take, in seconds.
TIMEOUT = 60.0


class JudgeError(Exception):
    """The judge could not answer: one line saying why (it becomes the check's reason)."""


@dataclass(frozen=True)
class Verdict:
    """The judge's answer: whether the rubric holds, and why."""

    passed: bool
    reason: str


def transcript(
    replies: Sequence[Reply],
    *,
    greeting: str | None = None,
    ended: str | None = None,
) -> str:
    """The conversation as the judge reads it: one ``Caller:`` / ``Agent:`` line per step.

    ``replies``: the call's replies in order (solicited ones carry the caller's input);
    ``greeting``: the welcome greeting; ``ended``: how the agent ended the call, if it did.
    """
    lines: list[str] = []
    if greeting:
        lines.append(f"Agent: {greeting}")
    for reply in replies:
        if reply.solicited and reply.input:
            said = reply.input
            lines.append(
                f"Caller: (presses key {said[5:]})"
                if said.startswith("dtmf ")
                else f"Caller: {said}"
            )
        parts = [reply.text.strip()]
        parts += [f"(plays {source})" for source in reply.plays]
        parts += [f"(sends keys {digits})" for digits in reply.digits]
        for switch in reply.languages:
            parts.append(f"(switches language to {', '.join(switch.values())})")
        if reply.interrupted:
            parts.append("(the caller cut in here)")
        said = " ".join(p for p in parts if p)
        if said:
            lines.append(f"Agent: {said}")
    if ended:
        lines.append(f"Agent: ({ended})")
    return "\n".join(lines)


def cache_key(model: str, rubric: str, text: str) -> str:
    """The verdict cache's key: a hash of what the verdict depends on."""
    # the instructions too: a crctl whose judge reads differently asks again
    blob = json.dumps([_SYSTEM, model, rubric, text], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def client(context: RunContext, timeout: float = TIMEOUT) -> Any:
    """An ``openai.AsyncOpenAI`` on the judge's endpoint (the SDK's defaults where unset)."""
    import openai

    return openai.AsyncOpenAI(
        api_key=context.judge_api_key or os.environ.get("OPENAI_API_KEY") or "unset",
        base_url=context.judge_base_url or None,
        timeout=timeout,
        max_retries=1,
    )


async def structured(
    context: RunContext,
    model: str,
    messages: list[dict[str, str]],
    name: str,
    schema: dict[str, Any],
) -> dict[str, Any]:
    """One chat completion at temperature 0 whose answer is JSON of ``schema``.

    Raises :class:`JudgeError` (one line) when the endpoint fails or answers something else.
    """
    import openai

    where = context.judge_base_url or "the OpenAI API"
    llm = client(context)
    try:
        completion = await llm.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name, "strict": True, "schema": schema},
            },
        )
    except openai.APIStatusError as exc:
        fix = _FIXES.get(exc.status_code, "")
        raise JudgeError(
            f"{model} at {where} answered HTTP {exc.status_code}: {_message(exc)}{fix}"
        ) from None
    except openai.APIError as exc:
        raise JudgeError(f"cannot reach {model} at {where}: {_message(exc)}") from None
    finally:
        await llm.close()
    content = completion.choices[0].message.content if completion.choices else None
    try:
        answer = json.loads(content or "")
    except ValueError:
        raise JudgeError(f"{model} answered no JSON: {_short(content)}") from None
    missing = [
        key for key in schema["required"] if not isinstance(answer, dict) or key not in answer
    ]
    if missing:
        raise JudgeError(f"{model} answered without {', '.join(missing)}: {_short(content)}")
    return dict(answer)


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return _short(body["message"].strip().splitlines()[0])
    text = str(getattr(exc, "message", None) or exc).strip()
    return _short(text.splitlines()[0] if text else type(exc).__name__)


def _short(text: str | None, width: int = 120) -> str:
    text = repr(text) if text is None else text
    return text if len(text) <= width else text[: width - 1] + "…"


class Judge:
    """Judges transcripts against rubrics with ``context``'s model, through its cache."""

    def __init__(self, context: RunContext) -> None:
        self.context = context
        #: How many verdicts came from the model (not from the cache).
        self.requests = 0

    def _cached(self, key: str) -> Path | None:
        folder = self.context.cache_dir
        return folder / "judge" / f"{key}.json" if folder is not None else None

    async def verdict(self, rubric: str, text: str) -> Verdict:
        """The model's verdict on ``text`` against ``rubric``; raises :class:`JudgeError`."""
        model = self.context.judge_model
        if not model:
            raise JudgeError(NO_JUDGE_MODEL)
        key = cache_key(model, rubric, text)
        path = self._cached(key)
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                return Verdict(bool(data["passed"]), str(data["reason"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a broken entry: ask again, and overwrite it
        messages = [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"Rubric: {rubric}\n\nTranscript:\n{text}"},
        ]
        self.requests += 1
        answer = await structured(self.context, model, messages, "verdict", VERDICT_SCHEMA)
        passed, reason = answer["passed"], answer["reason"]
        if not isinstance(passed, bool) or not isinstance(reason, str):
            raise JudgeError(f"{model} answered a verdict of the wrong types: {answer}")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{id(self)}.tmp")
            tmp.write_text(json.dumps({"passed": passed, "reason": reason}), encoding="utf-8")
            tmp.replace(path)
        return Verdict(passed, reason)

    async def check(self, rubric: str, text: str, what: str = "judge") -> list[str]:
        """The reasons ``text`` fails ``rubric`` (empty: it passed), as a check's lines."""
        try:
            verdict = await self.verdict(rubric, text)
        except JudgeError as exc:
            line = str(exc)
            return [line if line.startswith("judge:") else f"{what}: {line}"]
        if verdict.passed:
            return []
        return [f"{what}: {rubric!r} not met: {verdict.reason}"]
