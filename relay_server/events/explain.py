"""Words for the codes of error-bearing call events, whoever publishes them.

A 64xxx code from Twilio gets its title, what happened and the fix (Twilio docs: error codes);
an LLM fault gets an explanation and a fix for its kind.
"""

from __future__ import annotations

from typing import Any

import msgspec

from relay_server.events.kinds import AgentPushed, CallEvent, Error, LlmFault, SessionEnd

#: ConversationRelay error codes (Twilio docs: error codes): title, what happened, how to fix it.
TWILIO_ERRORS: dict[int, tuple[str, str, str]] = {
    64101: (
        "Invalid parameter",
        "Twilio rejected a <ConversationRelay> attribute value (a bad value, a voice that does "
        "not match its ttsProvider, or ElevenLabs not enabled on the account).",
        "check the TwiML with `crctl twiml lint` and the voice/ttsProvider pair in your template",
    ),
    64102: (
        "Unable to connect to WebSocket URL",
        "Twilio could not open the relay's WebSocket: the URL is wrong or not wss://, the relay "
        "or tunnel is down, or the relay refused the handshake (signature check failed). "
        "The caller heard a busy tone.",
        "make sure the relay runs and --public-url is the tunnel's https:// URL, and that "
        "TWILIO_AUTH_TOKEN is the account's primary auth token",
    ),
    64104: (
        "Max call duration reached",
        "The session reached ConversationRelay's maximum duration and Twilio ended it.",
        "keep calls shorter (Twilio does not publish the limit); hand long calls off",
    ),
    64105: (
        "WebSocket ended",
        "The relay's WebSocket closed in the middle of the call (the relay stopped or crashed, "
        "the tunnel dropped, or 10 malformed frames in a row).",
        "end calls with an `end` message, never by closing the socket; check the relay's log "
        "for a crash or for 64107 errors just before",
    ),
    64106: (
        "Invalid argument",
        "A setting is not supported by the chosen provider (a language and voice combination "
        "it does not offer).",
        "pick a voice and language the ttsProvider supports (the template's <Language> entries)",
    ),
    64107: (
        "Invalid message received",
        "Twilio rejected a frame the relay sent (invalid message); it dropped that frame and "
        "the call goes on. Ten in a row end the call (64105).",
        "check what the agent sends against the protocol: text needs a string token, "
        "sendDigits only 0-9 w # *, language needs a language, handoffData must be a string",
    ),
    64108: (
        "RTP timeout",
        "Audio stopped flowing between Twilio and the caller.",
        "usually the caller's network; nothing to fix in the relay",
    ),
    64109: (
        "Concurrency limit reached",
        "Twilio rejected the call: the account runs as many ConversationRelay sessions as it may.",
        "end idle calls, or ask Twilio support to raise the limit",
    ),
    64111: (
        "Text-to-speech provider error",
        "The text-to-speech provider failed on part of a reply (the session goes on).",
        "check the voice and ttsProvider, or try another provider",
    ),
    64112: (
        "Text-to-speech conversion error",
        "The text-to-speech provider could not convert part of a reply (the session goes on).",
        "look for SSML or characters the provider does not accept in the agent's replies",
    ),
    64114: (
        "Speech recognition provider connection error",
        "Twilio could not reach the speech-recognition provider, so the caller was not heard.",
        "try another transcriptionProvider or speechModel; check status.twilio.com",
    ),
}

_LLM_FIXES = {
    "connection": "check OPENAI_BASE_URL and that the model server is reachable",
    "timeout": "the model was slower than --llm-timeout: raise it or use a faster model",
    "rate_limit": "the provider rate-limited the key (429): slow down or raise the quota",
    "server": "the provider failed (5xx): retry later or switch model",
    "status": "the provider refused the request: check OPENAI_API_KEY and --model",
    "stream_cut": "the stream broke off: check the model server or proxy in between",
    "bad_chunk": "the endpoint is not OpenAI-compatible streaming: check OPENAI_BASE_URL",
}


def explain(code: int | str | None) -> dict[str, str]:
    """``title``, ``explanation`` and ``fix`` for a ConversationRelay 64xxx error code.

    Twilio docs: error codes. An empty dict for no code; unknown codes point at Twilio's error
    page.
    """
    try:
        number = int(code) if code not in (None, "") else None
    except (TypeError, ValueError):
        return {}
    if number is None:
        return {}
    known = TWILIO_ERRORS.get(number)
    if known is None:
        return {
            "title": f"Twilio error {number}",
            "explanation": f"Twilio reported error {number}.",
            "fix": f"see https://www.twilio.com/docs/api/errors/{number}",
        }
    title, explanation, fix = known
    return {"title": title, "explanation": explanation, "fix": fix}


#: The kinds :func:`enrich` may add words to.
EXPLAINED: frozenset[type[CallEvent]] = frozenset({Error, SessionEnd, LlmFault})


def enrich(event: CallEvent) -> CallEvent:
    """``event`` with the words for its code (errors, session ends, LLM faults).

    Unless it has them already; any other event as it is.
    """
    if isinstance(event, (Error, SessionEnd)):
        code = event.code if isinstance(event, Error) else event.error_code
        if code and event.title is msgspec.UNSET:  # UNSET is falsy
            words = explain(code)
            if words:
                return msgspec.structs.replace(event, **words)
        return event
    if isinstance(event, LlmFault) and event.explanation is msgspec.UNSET:
        fix = event.fix if isinstance(event.fix, str) and event.fix else None
        return msgspec.structs.replace(
            event,
            explanation="The LLM did not answer; the caller heard the apology and the call "
            "goes on.",
            fix=fix or _LLM_FIXES.get(event.fault, "see the relay's log for the cause"),
        )
    return event


def pushed(call_sid: str, message: Any) -> AgentPushed:
    """The ``agent.pushed`` event for an outbound frame pushed into a call.

    Its ``type`` and ``text`` (what it says), plus ``last`` for a text frame.
    """
    frame_type = str(type(message).__struct_config__.tag)
    if frame_type == "language":
        parts = [("tts", message.tts_language), ("transcription", message.transcription_language)]
        text = ", ".join(f"{name} {value}" for name, value in parts if value)
    else:
        field_name = {"text": "token", "play": "source", "sendDigits": "digits"}.get(
            frame_type, "handoff_data"
        )
        text = getattr(message, field_name, None) or ""
    last = message.last if frame_type == "text" else msgspec.UNSET
    return AgentPushed(call_sid=call_sid, frame_type=frame_type, text=text, last=last)
