"""Render templates to TwiML with the twilio SDK, and lint existing TwiML by the same rules.

Never hand-built XML: ``VoiceResponse().connect().conversation_relay(...)`` escapes values and
sorts attributes. Names are passed in camelCase, which the SDK leaves as they are (it only
camel-cases names with an underscore), so every documented attribute, including those the SDK has
no keyword for (``eotThreshold``), comes out as Twilio documents it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from twilio.twiml.voice_response import Connect, VoiceResponse

from twiml_templates import schema
from twiml_templates.errors import TemplateError
from twiml_templates.templates import Template, check_combination


def relay_attributes(
    template: Template,
    *,
    url: str | None = None,
    sets: Mapping[str, object] | None = None,
    local: bool = False,
) -> dict[str, str]:
    """The ``<ConversationRelay>`` attributes as on the wire.

    The template's, overridden by ``sets`` (``--set key=value``; an empty value removes the
    attribute) and ``url``; checked like the template itself. ``local`` also accepts a
    ``ws://`` URL (a relay serving its own TwiML without a public URL, for ``crctl call``).
    """
    attrs = dict(template.relay)
    for key, value in (sets or {}).items():
        if key not in schema.RELAY:
            raise TemplateError(f"--set {key}: {schema.unknown_key(key, schema.RELAY)}")
        if value == "":
            attrs.pop(key, None)
            continue
        try:
            attrs[key] = schema.RELAY[key].check(value)
        except ValueError as exc:
            raise TemplateError(f"--set {key}: value {value!r} is not {exc}") from None
    if url is not None:
        try:
            attrs["url"] = (schema.ws_url_local if local else schema.wss_url)(url)
        except ValueError as exc:
            raise TemplateError(f"--url: value {url!r} is not {exc}") from None
    if "url" not in attrs:
        raise TemplateError(
            f"{template.path}: key relay.url is required; give it with --url wss://host/ws"
        )
    check_combination(attrs, template.languages, template.path)
    return attrs


def connect_attributes(
    template: Template, *, url: str, action: str | None = None
) -> dict[str, str]:
    """``<Connect>`` attributes; a relative action is resolved on the relay's own host."""
    attrs = dict(template.connect)
    if action is not None:
        try:
            attrs["action"] = schema.action_url(action)
        except ValueError as exc:
            raise TemplateError(f"--action: value {action!r} is not {exc}") from None
    target = attrs.get("action")
    if target and target.startswith("/"):
        parts = urlsplit(url)
        scheme = "http" if parts.scheme == "ws" else "https"
        attrs["action"] = f"{scheme}://{parts.netloc}{target}"
    if "action" in attrs:
        attrs.setdefault("method", "POST")
    return attrs


def render(
    template: Template,
    *,
    url: str | None = None,
    action: str | None = None,
    sets: Mapping[str, object] | None = None,
    params: Mapping[str, str] | None = None,
    local: bool = False,
) -> str:
    """The TwiML document for ``template`` (``local``: see :func:`relay_attributes`)."""
    attrs = relay_attributes(template, url=url, sets=sets, local=local)
    response = VoiceResponse()
    connect = Connect(**connect_attributes(template, url=attrs["url"], action=action))
    relay = connect.conversation_relay(**attrs)
    for language in template.languages:
        relay.language(**language)
    for name, value in {**template.parameters, **(params or {})}.items():
        relay.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def lint(document: str | bytes, file: Path | str = "<twiml>") -> list[str]:
    """Problems of an existing TwiML document, by the rules templates follow (empty: fine).

    Bytes are parsed with the encoding the document declares.
    """
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        return [f"{file}: not XML: {exc}"]
    problems: list[str] = []
    relays = root.findall("Connect/ConversationRelay")
    if root.tag != "Response":
        problems.append(f"{file}: the root element is <{root.tag}>, expected <Response>")
    if not relays:
        problems.append(f"{file}: no <Connect><ConversationRelay> found")
    if len(root.findall(".//ConversationRelay")) > len(relays):
        problems.append(f"{file}: <ConversationRelay> must be inside <Response><Connect>")
    if len(relays) > 1:
        problems.append(f"{file}: more than one <ConversationRelay>: a call runs one")
    for connect in root.iter("Connect"):
        problems += _attrs(connect, schema.CONNECT, file, "Connect")
        for child in connect:
            if child.tag != "ConversationRelay":
                problems.append(
                    f"{file}: <{child.tag}> in <Connect>: it cannot be combined with "
                    "<ConversationRelay>"
                )
    for relay in relays:
        problems += _attrs(relay, schema.RELAY, file, "ConversationRelay")
        if "url" not in relay.attrib:
            problems.append(f"{file}: <ConversationRelay> needs a url attribute")
        languages: list[dict[str, str]] = []
        for child in relay:
            if child.tag == "Language":
                problems += _attrs(child, schema.LANGUAGE, file, "Language")
                code = child.get("code")
                if code is None:
                    problems.append(f"{file}: <Language> needs a code attribute")
                elif any(lang.get("code") == code for lang in languages):
                    problems.append(f"{file}: <Language code={code!r}> is declared twice")
                languages.append(dict(child.attrib))
            elif child.tag == "Parameter":
                if set(child.attrib) != {"name", "value"} or not child.get("name"):
                    problems.append(
                        f"{file}: <Parameter> takes exactly a non-empty name and a value"
                    )
            else:
                problems.append(
                    f"{file}: <{child.tag}> is not allowed in <ConversationRelay>; allowed: "
                    "Language, Parameter"
                )
        try:
            check_combination(dict(relay.attrib), languages, lambda _key: Path(str(file)))
        except TemplateError as exc:
            problems.append(str(exc).replace("key relay.", "attribute "))
    return problems


def _attrs(
    element: ET.Element, attrs: dict[str, schema.Attr], file: Path | str, tag: str
) -> list[str]:
    problems = []
    for key, value in element.attrib.items():
        if key not in attrs:
            problems.append(f"{file}: <{tag}> attribute {key}: {schema.unknown_key(key, attrs)}")
            continue
        try:
            attrs[key].check(value)
        except ValueError as exc:
            problems.append(f"{file}: <{tag}> attribute {key}: value {value!r} is not {exc}")
    return problems
