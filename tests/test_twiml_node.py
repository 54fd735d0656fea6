"""Python TwiML against the Node twilio SDK's ``conversationRelay()`` (C14N 2.0 comparison).

Every preset, plus templates that set every ``<ConversationRelay>`` attribute, ``<Language>``
entries with every attribute of theirs and ``<Parameter>``s, is rendered twice from the same
attributes: by
``twiml_templates.render`` (Python SDK) and by ``tests/node/render_cr.js`` (Node SDK,
``VoiceResponse().connect().conversationRelay().language().parameter()``). The two documents
must be the same XML once canonicalised. Node runs once for the whole module.

The Node tools come from ``tests/node`` (``npm ci``, run by ``scripts/test.sh``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from twiml_templates import (
    Template,
    connect_attributes,
    load_template,
    preset_names,
    relay_attributes,
    render,
    schema,
)

NODE_DIR = Path(__file__).parent / "node"
URL = "wss://relay.example.com/ws"

#: Every ``<ConversationRelay>`` attribute Twilio documents (the removed ``interruptByDtmf``
#: aside), with values that need escaping where text is free.
ALL_RELAY_TOML = """\
description = "Every ConversationRelay attribute"
extends = "basic"

[connect]
action = "https://relay.example.com/action?a=1&b=2"
method = "GET"

[relay]
welcomeGreeting = "Hi & welcome <friend>, \\"quoted\\" 'single'\\nline two\\ttab ¡olé! 👋"
welcomeGreetingInterruptible = "speech"
language = "en-US"
ttsLanguage = "en-GB"
transcriptionLanguage = "es-ES"
ttsProvider = "Amazon"
voice = "Joanna-Neural"
transcriptionProvider = "Deepgram"
speechModel = "flux-general-en"
interruptible = "dtmf"
interruptSensitivity = "medium"
dtmfDetection = false
reportInputDuringAgentSpeech = "speech"
preemptible = true
hints = "crctl, ConversationRelay, Twilio"
debug = "debugging speaker-events tokens-played"
elevenlabsTextNormalization = "auto"
intelligenceService = "GA00000000000000000000000000000000"
deepgramSmartFormat = false
profanityFilter = true
partialPrompts = true
speechTimeout = 1200
ignoreBackchannel = true
backgroundNoiseReduction = "near-field"
events = "speaker-events tokens-played config-updated"
eotThreshold = 0.65
conversationConfiguration = "CC00000000000000000000000000000000"
partialPromptOnHangup = true
eagerEotThreshold = 0.4
asrSmartFormat = true
ttsTextNormalization = "on"
ttsLanguageTextNormalization = "en-GB:on"
elevenlabsLanguageTextNormalization = "es-ES:off"
includeInPrompt = "turn-state prompt-segments"
customerName = "Zoë & Co <VIP>"
applicationReconnect = true
echoPromptFiltering = true
turnDetection = true

[[language]]
code = "en-GB"
ttsProvider = "Google"
voice = "en-GB-Neural2-A"
transcriptionProvider = "Google"
speechModel = "telephony"
hints = "lift, flat"
asrSmartFormat = false
ttsTextNormalization = "off"
ttsLanguageTextNormalization = "on"

[[language]]
code = "es-ES"
ttsProvider = "ElevenLabs"
voice = "UgBBYS2sOqTuMpoF3BR0"
transcriptionProvider = "Deepgram"
speechModel = "nova-3-general"

[parameters]
customerId = "42"
"42" = "a key that looks like a number"
note = "a & b < c > d \\"e\\" 'f'"
unicode = "ñandú 🐦"
"""

#: ``multi`` (and defaults elsewhere): Deepgram nova-3-general with ElevenLabs.
MULTI_TOML = """\
description = "multi: language detection"

[relay]
ttsProvider = "ElevenLabs"
transcriptionProvider = "Deepgram"
speechModel = "nova-3-general"
transcriptionLanguage = "multi"
interruptible = true
welcomeGreetingInterruptible = false

[[language]]
code = "multi"
ttsProvider = "ElevenLabs"
transcriptionProvider = "Deepgram"
speechModel = "nova-2-general"
"""


@dataclass
class Case:
    id: str
    template: Template
    action: str | None = None
    sets: dict[str, object] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def python(self) -> str:
        return render(
            self.template, url=URL, action=self.action, sets=self.sets, params=self.params
        )

    def spec(self) -> dict[str, object]:
        """What the Node side gets: the same attributes, as on the wire (camelCase)."""
        relay = relay_attributes(self.template, url=URL, sets=self.sets)
        return {
            "id": self.id,
            "connect": connect_attributes(self.template, url=relay["url"], action=self.action),
            "relay": relay,
            "languages": self.template.languages,
            # pairs, not an object: JavaScript orders integer-like keys ("42") first
            "parameters": list({**self.template.parameters, **self.params}.items()),
        }


def _cases(folder: Path) -> list[Case]:
    (folder / "all.toml").write_text(ALL_RELAY_TOML, encoding="utf-8")
    (folder / "multi.toml").write_text(MULTI_TOML, encoding="utf-8")
    cases = [Case(name, load_template(name)) for name in preset_names()]
    cases += [
        Case("all-attributes", load_template(folder / "all.toml")),
        Case("multi", load_template(folder / "multi.toml")),
        Case(
            "basic-overrides",
            load_template("basic"),
            action="https://relay.example.com/action",
            sets={"welcomeGreeting": 'Ça va? <3 & "more"', "speechTimeout": "auto"},
            params={"customerId": "42", "empty": ""},
        ),
        Case("handoff-action-path", load_template("handoff"), action="/other?x=1&y=2"),
    ]
    return cases


@dataclass
class Rendered:
    cases: dict[str, Case]
    node: dict[str, str]
    node_twilio: str


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    cases = _cases(tmp_path_factory.mktemp("templates"))
    node = shutil.which("node")
    assert node, "node is required for this test (scripts/test.sh checks for it)"
    assert (NODE_DIR / "node_modules" / "twilio").is_dir(), (
        "the Node twilio SDK is missing: run scripts/test.sh (npm ci --prefix tests/node)"
    )
    proc = subprocess.run(
        [node, str(NODE_DIR / "render_cr.js")],
        input=json.dumps({"cases": [c.spec() for c in cases]}),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    return Rendered({c.id: c for c in cases}, out["documents"], out["twilio"])


def c14n(document: str) -> str:
    # ElementTree's parser does not take an XML declaration in a str with an encoding; drop it.
    body = document.split("?>", 1)[1] if document.startswith("<?xml") else document
    return ET.canonicalize(body)


CASE_IDS = [
    *preset_names(),
    "all-attributes",
    "multi",
    "basic-overrides",
    "handoff-action-path",
]


def test_every_preset_is_cross_checked() -> None:
    assert set(preset_names()) >= {"basic", "multilingual", "dtmf-menu", "handoff", "low-latency"}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_python_matches_node_sdk(rendered: Rendered, case_id: str) -> None:
    python = rendered.cases[case_id].python()
    node = rendered.node[case_id]
    assert python.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    assert node.startswith('<?xml version="1.0" encoding="UTF-8"?><Response>')
    assert c14n(python) == c14n(node)


def test_node_sdk_is_the_version_the_export_pins(rendered: Rendered) -> None:
    major, minor, *_ = (int(x) for x in rendered.node_twilio.split("."))
    assert (major, minor) >= (5, 13) and major == 5, rendered.node_twilio


def test_all_attributes_case_covers_every_attribute(rendered: Rendered) -> None:
    """The big template really sets every <ConversationRelay> and <Language> attribute.

    Node emitted each of them: no name dropped or renamed.
    """
    case = rendered.cases["all-attributes"]
    relay = ET.fromstring(c14n(rendered.node["all-attributes"])).find(".//ConversationRelay")
    assert relay is not None
    assert set(relay.attrib) == set(schema.RELAY)
    languages = relay.findall("Language")
    assert {k for lang in languages for k in lang.attrib} == set(schema.LANGUAGE)
    params = {p.get("name"): p.get("value") for p in relay.findall("Parameter")}
    assert params == case.template.parameters
    assert [p.get("name") for p in relay.findall("Parameter")] == list(case.template.parameters)


def test_canonical_form_is_sensitive_to_values(rendered: Rendered) -> None:
    """The comparison can fail: a changed value or order of <Language>s shows up after C14N."""
    case = rendered.cases["multilingual"]
    node = rendered.node["multilingual"]
    assert c14n(case.python()) == c14n(node)
    changed = render(case.template, url=URL, sets={"welcomeGreeting": "Something else"})
    assert c14n(changed) != c14n(node)
    swapped = Template(**{**vars(case.template), "languages": case.template.languages[::-1]})
    assert c14n(render(swapped, url=URL)) != c14n(node)


def test_serialisations_differ_only_in_form(rendered: Rendered) -> None:
    """What C14N evens out (documented for the report).

    Node keeps attribute order as given and writes ``<X/>``, Python sorts attributes and writes
    ``<X />``; values are identical.
    """
    python = rendered.cases["basic"].python()
    node = rendered.node["basic"]
    assert python != node
    assert " />" in python and " />" not in node

    def attrs(document: str) -> Mapping[str, str]:
        element = ET.fromstring(c14n(document)).find(".//ConversationRelay")
        assert element is not None
        return element.attrib

    assert attrs(python) == attrs(node)
