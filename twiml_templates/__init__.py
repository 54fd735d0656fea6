"""TwiML that connects a call to the relay, built with the twilio SDK's VoiceResponse."""

from twiml_templates.render import relay_twiml

__all__ = ["relay_twiml"]
