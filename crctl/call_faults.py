"""Fault steps of a call script: the things real calls do to an agent.

A turn of ``crctl call --script`` (and so of ``crctl test``) may be a fault instead of plain
speech or keys:

- ``drop_socket: true``: the WebSocket drops as a network drops it (no close frame); Twilio
  then posts the ``<Connect action>`` callback with ``SessionStatus=failed`` and error 64105,
  and follows the TwiML it answers. The step passes when that is a new
  ``<Connect><ConversationRelay>`` and the new session opens (the next turn shows that the
  conversation goes on).
- ``silence: SECONDS``: the caller says nothing that long, in real seconds (``--time-scale``
  does not shorten it: the agent's timers do not run faster); what the agent said meanwhile
  (a reminder) is the turn's reply, for ``expect``.
- ``bad_frame: "<raw text>"`` or ``true``: a malformed frame on the wire; the call must go on.
- ``partials: true`` on a ``say``: cumulative interim ``prompt`` frames (``last: false``)
  before the final one.
- ``noise: true`` or ``{confidence: 0.2, garble: true}``: a poor transcript. Twilio's
  ``prompt`` carries no confidence (its fields are ``voicePrompt``, ``lang`` and ``last``:
  Twilio docs, ConversationRelay WebSocket messages), so low confidence reaches the agent only
  as words lost or misheard: ``confidence`` is the share of the ``say`` words heard right,
  ``garble`` whether the others are misheard (else lost). Alone, a turn of background noise.
- ``hangup: true`` (hang up now) or, on a ``say``/``dtmf``, ``hangup: {after_words: N}``:
  the caller hangs up once N words of the reply have arrived; the call must end as the
  caller's (``completed``) and the relay must take the action callback.

:func:`play_fault` plays the steps (:func:`is_step`: ``drop_socket``, ``silence``,
``bad_frame``, ``hangup``); ``partials`` and ``noise`` change how :func:`utter` says a turn,
which ``run_script`` plays and judges as any other (``crctl.call_script.check_reply``).
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crctl.caller import CallError, Reply, SimulatedCaller, complete_words

if TYPE_CHECKING:
    from crctl.call_script import Turn, TurnResult

#: ``noise: true``: half the words heard right, the rest misheard.
DEFAULT_CONFIDENCE = 0.5
#: ``bad_frame: true`` sends this: JSON cut short, as a broken encoder would leave it.
DEFAULT_BAD_FRAME = '{"type": "prompt", "voicePrompt": "hel'
#: What a speech recognizer makes of background noise (a turn of ``noise`` alone).
NOISE_TRANSCRIPTS = ("Hmm.", "Uh.", "Mm-hmm.", "Huh?")
#: Consonants a recognizer confuses, both ways (a misheard word keeps its shape).
_SOUNDALIKE = dict(zip("bpdtgkvfszmn", "pbtdkgfvzsnm", strict=True))


@dataclass(frozen=True)
class Noise:
    """``noise:``: how much of the caller's speech the recognizer got right."""

    confidence: float = DEFAULT_CONFIDENCE
    garble: bool = True


@dataclass(frozen=True)
class Hangup:
    """``hangup:``: now (``after_words`` None), or after that many words of the reply."""

    after_words: int | None = None


# ------------------------------------------------------------------------ transcripts


def noisy(text: str | None, noise: Noise, seed: int = 0) -> str:
    """The transcript Twilio would send of ``text`` said over noise (deterministic).

    ``None``: background noise alone. Of the words, ``confidence`` (rounded) stay as said,
    the others are misheard (``garble``) or lost; a transcript left empty is noise.
    """
    rng = random.Random(zlib.crc32((text or "").encode()) ^ seed)
    if text is None:
        return rng.choice(NOISE_TRANSCRIPTS)
    words = text.split()
    kept = set(rng.sample(range(len(words)), round(noise.confidence * len(words))))
    heard = [
        word if i in kept else _misheard(word) if noise.garble else ""
        for i, word in enumerate(words)
    ]
    transcript = " ".join(w for w in heard if w)
    return transcript or rng.choice(NOISE_TRANSCRIPTS)


def _misheard(word: str) -> str:
    """``word`` as a recognizer mishears it: its first confusable consonant swapped.

    A word without one loses its last letter (a short word is lost whole).
    """
    for i, char in enumerate(word):
        swap = _SOUNDALIKE.get(char.lower())
        if swap is not None:
            swap = swap.upper() if char.isupper() else swap
            return word[:i] + swap + word[i + 1 :]
    core = re.sub(r"\W+$", "", word)
    return core[:-1] if len(core) > 2 else ""


# ------------------------------------------------------------------------------ playing


async def play_fault(
    caller: SimulatedCaller,
    turn: Turn,
    timeout: float,  # noqa: ASYNC109 (each reply's own wait, as in run_script)
) -> TurnResult:
    """Play one fault turn on a connected caller and judge it; never raises for a failure."""
    from crctl.call_script import TurnResult

    try:
        if turn.drop_socket:
            return await _drop(caller, turn, timeout)
        if turn.silence is not None:
            return await _silence(caller, turn, timeout)
        if turn.bad_frame is not None:
            return await _bad_frame(caller, turn)
        assert turn.hangup is not None, "not a step: run_script plays it (is_step)"
        return await _hangup(caller, turn, turn.hangup, timeout)
    except CallError as exc:  # the call ended while the step was played
        return TurnResult(turn, None, [str(exc)])


async def _drop(caller: SimulatedCaller, turn: Turn, timeout: float) -> TurnResult:  # noqa: ASYNC109
    from crctl.call_script import TurnResult

    session = caller.session_id
    dropped = await caller.drop_socket()
    if caller.session_id == session or caller.plan is None:
        if dropped.action_error:
            why = f"the action callback failed: {dropped.action_error}"
        elif dropped.action:
            why = f"/action answered: {dropped.action}"
        else:
            why = "the TwiML has no <Connect action> to tell the relay"
        return TurnResult(turn, None, [f"the call did not come back after the drop: {why}"])
    greeting = caller.plan.welcome_greeting
    reply = None
    if greeting:
        now = caller.side.clock()
        reply = Reply(input="", sent_at=now, text=greeting, received=greeting, solicited=False)
        reply.tokens, reply.finished_at = 1, now
    await caller.quiet(timeout)
    return TurnResult(
        turn, reply, await _goes_on(caller, "the new session ended at once after the drop")
    )


async def _silence(caller: SimulatedCaller, turn: Turn, timeout: float) -> TurnResult:  # noqa: ASYNC109
    from crctl.call_script import TurnResult, _at_most, check_reply, check_silence

    assert turn.silence is not None
    before = len(caller.replies)
    # real seconds, never scaled by --time-scale: the agent's silence timer runs on its clock,
    # and `--time-scale 0` (CI) would otherwise make every silence step test nothing
    async with _at_most(turn.silence):
        await caller.closed.wait()
    came = [r for r in caller.replies[before:] if r.tokens or r.plays or r.digits]
    expect = turn.expect
    if expect.silent:
        return TurnResult(turn, None, check_silence(came, f"during {turn.silence:g} s of silence"))
    if not came:
        if not expect.model_fields_set:
            return TurnResult(turn, None, [])  # nothing asked of the agent: silence recorded
        return TurnResult(
            turn, None, [f"the agent said nothing during {turn.silence:g} s of silence"]
        )
    reasons = await check_reply(caller, turn, came[0], before, timeout, None)
    return TurnResult(turn, came[0], reasons)


async def _bad_frame(caller: SimulatedCaller, turn: Turn) -> TurnResult:
    from crctl.call_script import TurnResult

    frame = turn.bad_frame if isinstance(turn.bad_frame, str) else DEFAULT_BAD_FRAME
    await caller.send_raw(frame)
    return TurnResult(turn, None, await _goes_on(caller, "the call ended after a malformed frame"))


async def _goes_on(caller: SimulatedCaller, failure: str) -> list[str]:
    """Why the call did not go on for a moment (``failure``: what its ending means)."""
    from crctl.call_script import _END_GRACE, _at_most

    async with _at_most(_END_GRACE):
        await caller.closed.wait()
    if caller.closed.is_set() and caller.outcome is not None:
        return [f"{failure}: {caller.outcome.describe()}"]
    return []


async def _hangup(
    caller: SimulatedCaller,
    turn: Turn,
    hangup: Hangup,
    timeout: float,  # noqa: ASYNC109
) -> TurnResult:
    from crctl.call_script import TurnResult, check

    reply: Reply | None = None
    reasons: list[str] = []
    if hangup.after_words is not None:
        reply = await utter(caller, turn)
        if reply is None:
            return TurnResult(turn, None, [caller.last_drop or "input not sent"])
        if not await caller.words(reply, hangup.after_words, timeout):
            if reply.done:
                reasons.append(
                    f"no hang-up mid-reply: the reply ended after {complete_words(reply.text)} "
                    f"words, before hangup after_words: {hangup.after_words}"
                )
            else:
                reasons.append(f"fewer than {hangup.after_words} words within {timeout:g} s")
    outcome = await caller.hangup()
    if outcome.status != "completed":
        reasons.append(f"the call did not end as the caller's hang-up: {outcome.describe()}")
    elif outcome.action_error:
        reasons.append(f"the action callback failed: {outcome.action_error}")
    if reply is not None and turn.expect.model_fields_set:
        reasons += check(turn.expect, reply, caller)
    return TurnResult(turn, reply, reasons)


def transcript(turn: Turn) -> str | None:
    """What Twilio sends of the turn's speech: its ``say``, or what ``noise`` made of it."""
    if turn.noise is not None:
        return noisy(turn.say, turn.noise, turn.number)
    return turn.say


def is_step(turn: Turn) -> bool:
    """A fault played on its own (:func:`play_fault`); ``partials``/``noise`` change a say."""
    return bool(turn.drop_socket) or any(
        value is not None for value in (turn.silence, turn.bad_frame, turn.hangup)
    )


async def utter(caller: SimulatedCaller, turn: Turn) -> Reply | None:
    """Say the turn's words (``partials``, ``noise`` applied) or press its keys.

    With the turn's ``interrupt_after_words`` (which a ``hangup`` turn never has).
    """
    barge = turn.interrupt_after_words
    text = transcript(turn)
    if text is None:
        assert turn.dtmf is not None
        return await caller.dtmf(turn.dtmf, interrupt_after_words=barge)
    return await caller.say(text, interrupt_after_words=barge, partials=turn.partials)
