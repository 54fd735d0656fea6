"""Render ``<Connect><ConversationRelay>`` documents (protocol.md §1) with the twilio SDK.

Never hand-built XML: the SDK escapes values, camel-cases keyword names and sorts attributes.
"""

from __future__ import annotations

from typing import Any

from twilio.twiml.voice_response import Connect, VoiceResponse

#: Barge-in defaults. ``reportInputDuringAgentSpeech`` is set explicitly: Twilio's default
#: became ``none`` in May 2025, which drops what the caller says over the agent (§1.2, §6.9).
RELAY_DEFAULTS: dict[str, Any] = {
    "interruptible": "any",
    "report_input_during_agent_speech": "any",
    "dtmf_detection": True,
    # speaker events and tokens played let the relay keep only what the caller heard (§2.6).
    "events": "speaker-events tokens-played",
}


def relay_twiml(
    ws_url: str,
    *,
    action_url: str | None = None,
    welcome_greeting: str | None = None,
    parameters: dict[str, str] | None = None,
    **attributes: Any,
) -> str:
    """The TwiML document that connects a call to the relay at ``ws_url`` (``wss://``).

    ``attributes`` are ConversationRelay attributes in snake_case or camelCase; ``None`` values
    are left out. ``parameters`` become ``<Parameter>`` elements (``setup.customParameters``).
    """
    response = VoiceResponse()
    connect = Connect(action=action_url, method="POST" if action_url else None)
    attrs = {**RELAY_DEFAULTS, **attributes}
    relay = connect.conversation_relay(url=ws_url, welcome_greeting=welcome_greeting, **attrs)
    for name, value in (parameters or {}).items():
        relay.parameter(name=name, value=value)
    response.append(connect)
    return str(response)
