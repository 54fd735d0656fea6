"""The documents the relay answers Twilio's voice webhooks with, built with the twilio SDK.

``/twiml`` and a reconnect from ``/action`` answer with the configured template (a fresh
``<Connect><ConversationRelay>``); the end of a session is answered with ``<Dial>`` (hand-off
to a person), ``<Say>`` or only ``<Hangup>``. What Twilio does with each: Twilio docs,
ConversationRelay, the ``<Connect>`` action URL ("the call continues with the TwiML the action
URL returns").
"""

from __future__ import annotations

from collections.abc import Mapping

from twilio.twiml.voice_response import Dial, Hangup, Say, VoiceResponse

from twiml_templates.render import render
from twiml_templates.templates import Template

#: Said when the agent hands off but the relay has no number to dial.
NOBODY_AVAILABLE = "Sorry, nobody is available to take your call. Goodbye."
#: Said when the session failed and will not be reconnected.
CALL_AGAIN = "Sorry, something went wrong. Please call again."


def connect_relay(
    template: Template,
    *,
    url: str,
    greeting: str | None = None,
    local: bool = False,
    params: Mapping[str, str] | None = None,
    action: str | None = None,
) -> str:
    """``template`` pointed at the relay's socket ``url``.

    ``greeting``, when given, is its ``welcomeGreeting`` (else the template's). ``local``: the
    relay has no public URL, so a ``ws://`` socket URL is accepted. ``params``: more
    ``<Parameter>``s (over the template's); ``action``: the ``<Connect action>`` instead of the
    template's.
    """
    sets = {"welcomeGreeting": greeting} if greeting else None
    return render(template, url=url, sets=sets, local=local, params=params, action=action)


def dial(target: str) -> str:
    """Hand the caller to ``target`` (an E.164 number or a SIP URI), then hang up."""
    response = VoiceResponse()
    response.append(Dial(target))
    response.append(Hangup())
    return str(response)


def hang_up(say: str | None = None) -> str:
    """Hang up, after saying ``say`` when given."""
    response = VoiceResponse()
    if say:
        response.append(Say(say))
    response.append(Hangup())
    return str(response)
