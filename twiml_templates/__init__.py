"""TwiML that connects a call to the relay: validated templates rendered with the twilio SDK."""

from twiml_templates.errors import TemplateError
from twiml_templates.render import connect_attributes, lint, relay_attributes, render
from twiml_templates.templates import Template, load_template, preset_names, user_templates

__all__ = [
    "Template",
    "TemplateError",
    "connect_attributes",
    "lint",
    "load_template",
    "preset_names",
    "relay_attributes",
    "render",
    "user_templates",
]
