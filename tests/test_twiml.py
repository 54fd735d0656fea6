"""TwiML templates: golden output, validation errors, inheritance, lint, the CLI, and /twiml."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from crctl.cli import app
from tests.support import PUBLIC_URL, sign
from twiml_templates import (
    TemplateError,
    lint,
    load_template,
    preset_names,
    render,
    responses,
    schema,
)

GOLDEN = Path(__file__).parent / "golden"
URL = "wss://relay.example.com/ws"
runner = CliRunner()


@pytest.mark.parametrize("name", ["basic", "multilingual", "dtmf-menu", "handoff", "low-latency"])
def test_preset_matches_its_golden_output(name: str) -> None:
    assert name in preset_names()
    xml = render(load_template(name), url=URL, params={"customerId": "42"})
    assert xml + "\n" == (GOLDEN / f"{name}.xml").read_text()
    assert lint(xml) == []


def test_presets_say_what_they_are_for() -> None:
    root = ET.fromstring(render(load_template("basic"), url=URL))
    relay = root.find("Connect/ConversationRelay")
    assert relay is not None
    # Twilio's default is "none" since May 2025: the basic preset must say otherwise
    assert relay.get("reportInputDuringAgentSpeech") == "any"
    assert relay.get("interruptible") == "any" and relay.get("welcomeGreeting")
    # the session end goes back to the relay's /action (hang-up, hand-off, reconnect)
    assert root.find("Connect").get("action") == "https://relay.example.com/action"  # type: ignore[union-attr]
    handoff = ET.fromstring(render(load_template("handoff"), url=URL)).find("Connect")
    assert handoff is not None and handoff.get("action") == "https://relay.example.com/action"
    low = ET.fromstring(render(load_template("low-latency"), url=URL)).find(".//ConversationRelay")
    assert low is not None and low.get("speechModel", "").startswith("flux")
    assert low.get("partialPrompts") == "true" and low.get("speechTimeout") == "1000"
    multi = ET.fromstring(render(load_template("multilingual"), url=URL))
    assert len(multi.findall(".//Language")) >= 3
    menu = ET.fromstring(render(load_template("dtmf-menu"), url=URL)).find(".//ConversationRelay")
    assert menu is not None and menu.get("dtmfDetection") == "true"


def write(tmp_path: Path, text: str, name: str = "mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, **render_args: object) -> str:
    path = write(tmp_path, text)
    with pytest.raises(TemplateError) as info:
        render(load_template(path), url=URL, **render_args)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # enumerations
        ('[relay]\ninterruptible = "sometimes"', ["relay.interruptible", "'sometimes'", "speech"]),
        ('[relay]\nwelcomeGreetingInterruptible = "x"', ["welcomeGreetingInterruptible", "dtmf"]),
        ('[relay]\nttsProvider = "Azure"', ["relay.ttsProvider", "'Azure'", "ElevenLabs"]),
        ('[relay]\ntranscriptionProvider = "Whisper"', ["'Whisper'", "Google, Deepgram"]),
        ('[relay]\ninterruptSensitivity = "max"', ["interruptSensitivity", "low, medium, high"]),
        ('[relay]\nelevenlabsTextNormalization = "yes"', ["'yes'", "on, auto, off"]),
        ('[relay]\nevents = "speaker-events everything"', ["relay.events", "tokens-played"]),
        # booleans
        ('[relay]\ndtmfDetection = "yes"', ["relay.dtmfDetection", "'yes'", "true, false"]),
        ("[relay]\npartialPrompts = 1", ["relay.partialPrompts", "true, false"]),
        # numbers and ranges
        ("[relay]\nspeechTimeout = 100", ["relay.speechTimeout", "100", "600 to 5000"]),
        ('[relay]\nspeechTimeout = "soon"', ["speechTimeout", "auto or a whole number"]),
        (
            '[relay]\ntranscriptionProvider = "Deepgram"\nspeechModel = "flux"\n'
            "eotThreshold = 0.95",
            ["relay.eotThreshold", "0.95", "0.5 to 0.9"],
        ),
        # language codes
        ('[relay]\nlanguage = "english"', ["relay.language", "'english'", "BCP-47"]),
        ('[[language]]\ncode = "spanish"', ["language[0].code", "'spanish'", "BCP-47"]),
        ('[[language]]\nvoice = "x"', ["language[0].code is required"]),
        # multi only where supported
        (
            '[relay]\ntranscriptionLanguage = "multi"\ntranscriptionProvider = "Google"',
            ["transcriptionLanguage", "multi", "Deepgram", "nova-2-general"],
        ),
        (
            '[[language]]\ncode = "multi"\nttsProvider = "Google"',
            ["language[0].code", "multi", "ElevenLabs"],
        ),
        ('[relay]\nlanguage = "multi"', ["relay.language", "'multi'"]),
        # eotThreshold only with flux
        ("[relay]\neotThreshold = 0.7", ["eotThreshold", "flux"]),
        # connect
        ('[connect]\nmethod = "PUT"', ["connect.method", "GET, POST"]),
        # misspelled, removed, invented keys
        (
            '[relay]\nwelcomeGreting = "hi"',
            ["relay.welcomeGreting", "did you mean welcomeGreeting"],
        ),
        ('[relay]\nttsprovider = "Google"', ["did you mean ttsProvider"]),
        (
            "[relay]\ninterruptByDtmf = true",
            ["interruptByDtmf", "removed", 'interruptible = "dtmf"'],
        ),
        ('[relay]\nvoiceName = "x"', ["voiceName", "use voice"]),
        ('[relays]\nvoice = "x"', ["key relays", "did you mean relay"]),
        ('[relay]\nurl = "ws://relay.example.com/ws"', []),  # --url wins; checked below
    ],
)
def test_bad_template_names_file_key_value_and_allowed(
    tmp_path: Path, body: str, expected: list[str]
) -> None:
    message = error_of(tmp_path, body)
    assert str(tmp_path / "mine.toml") in message
    for part in expected:
        assert part in message, message


def test_url_must_be_wss_without_443(tmp_path: Path) -> None:
    tpl = load_template("basic")
    for bad in ("ws://relay.example.com/ws", "https://relay.example.com/ws"):
        with pytest.raises(TemplateError, match="wss://"):
            render(tpl, url=bad)
    with pytest.raises(TemplateError, match=":443"):
        render(tpl, url="wss://relay.example.com:443/ws")
    with pytest.raises(TemplateError, match=r"relay\.url is required"):
        render(tpl)
    assert 'url="wss://relay.example.com:8443/ws"' in render(
        tpl, url="wss://relay.example.com:8443/ws"
    )


def test_not_toml_and_missing_template(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="not valid TOML"):
        load_template(write(tmp_path, "[relay\n"))
    with pytest.raises(TemplateError, match="no template 'nope'; known: basic"):
        load_template("nope")


def test_user_template_extends_a_preset(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'extends = "basic"\n'
        '[relay]\nwelcomeGreeting = "Hi from my shop"\nevents = ""\nvoice = "Joanna-Neural"\n'
        'ttsProvider = "Amazon"\n[parameters]\nshop = "7"\n',
    )
    tpl = load_template(path)
    assert tpl.chain[0] == path and tpl.chain[1].name == "basic.toml"
    assert tpl.relay["welcomeGreeting"] == "Hi from my shop"
    assert "events" not in tpl.relay  # "" removes an inherited value
    assert tpl.relay["interruptible"] == "any"  # inherited
    relay = ET.fromstring(render(tpl, url=URL)).find(".//ConversationRelay")
    assert relay is not None and relay.get("voice") == "Joanna-Neural"
    assert relay.find("Parameter").attrib == {"name": "shop", "value": "7"}  # type: ignore[union-attr]


def test_extends_loop_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, 'extends = "b.toml"', "a.toml")
    write(tmp_path, 'extends = "a.toml"', "b.toml")
    with pytest.raises(TemplateError, match="extends itself"):
        load_template(tmp_path / "a.toml")


def test_error_in_a_parent_names_the_template_being_loaded(tmp_path: Path) -> None:
    parent = write(tmp_path, '[relay]\ninterruptible = "often"', "parent.toml")
    path = write(tmp_path, 'extends = "parent.toml"\n[relay]\nvoice = "x"', "child.toml")
    with pytest.raises(TemplateError, match="interruptible") as info:
        load_template(path)
    assert str(info.value).startswith(f"{parent}:")  # the file that holds the bad value
    write(tmp_path, "[[language]]\nvoice = 'x'", "parent.toml")
    with pytest.raises(TemplateError, match=r"language\[0\]\.code is required") as info:
        load_template(path)
    assert str(info.value).startswith(f"{parent}:")


def test_every_attribute_renders_camel_case(tmp_path: Path) -> None:
    body = """
[connect]
action = "https://relay.example.com/done"
method = "GET"
[relay]
welcomeGreeting = "Hi & <welcome>"
welcomeGreetingInterruptible = false
language = "en-US"
ttsLanguage = "en-GB"
transcriptionLanguage = "en-US"
ttsProvider = "Google"
voice = "en-US-Journey-O"
transcriptionProvider = "Deepgram"
speechModel = "flux-general-en"
interruptible = true
interruptSensitivity = "medium"
dtmfDetection = true
reportInputDuringAgentSpeech = "speech"
preemptible = false
hints = "crctl, Twilio"
debug = "debugging speaker-events"
elevenlabsTextNormalization = "auto"
intelligenceService = "GA00000000000000000000000000000000"
deepgramSmartFormat = true
profanityFilter = true
partialPrompts = true
speechTimeout = "auto"
ignoreBackchannel = true
backgroundNoiseReduction = "on"
events = "speaker-events tokens-played config-updated"
eotThreshold = 0.8
conversationConfiguration = "cfg-1"
partialPromptOnHangup = true
eagerEotThreshold = 0.4
asrSmartFormat = true
ttsTextNormalization = "on"
ttsLanguageTextNormalization = "on"
elevenlabsLanguageTextNormalization = "on"
includeInPrompt = "turn-state prompt-segments"
customerName = "Ada"
applicationReconnect = false
echoPromptFiltering = true
turnDetection = true
[[language]]
code = "es-ES"
ttsProvider = "Google"
voice = "es-ES-Neural2-A"
transcriptionProvider = "Google"
speechModel = "telephony"
hints = "hola"
asrSmartFormat = false
ttsTextNormalization = "auto"
ttsLanguageTextNormalization = "auto"
"""
    xml = render(load_template(write(tmp_path, body)), url=URL)
    assert lint(xml) == []
    relay = ET.fromstring(xml).find(".//ConversationRelay")
    assert relay is not None
    assert relay.get("welcomeGreeting") == "Hi & <welcome>"  # escaped on the wire, intact here
    assert "Hi &amp; &lt;welcome&gt;" in xml
    assert relay.get("welcomeGreetingInterruptible") == "none"  # false means none
    assert relay.get("interruptible") == "any"  # true means any
    assert relay.get("eotThreshold") == "0.8" and relay.get("speechTimeout") == "auto"
    assert relay.get("includeInPrompt") == "turn-state prompt-segments"
    assert set(relay.attrib) == set(schema.RELAY)  # every attribute Twilio documents
    assert all("_" not in name for name in relay.attrib)
    language = relay.find("Language")
    assert language is not None and language.get("asrSmartFormat") == "false"


def test_lint_reports_every_problem_of_a_document(tmp_path: Path) -> None:
    document = (
        '<?xml version="1.0"?><Response><Connect action="http://x.example.com/a">'
        '<ConversationRelay url="ws://x.example.com/ws" interruptByDtmf="true" '
        'interruptible="sometimes" welcomeGreting="hi" transcriptionLanguage="multi" '
        'transcriptionProvider="Google"><Language code="klingon"/><Stream url="x"/>'
        "</ConversationRelay></Connect></Response>"
    )
    problems = lint(document, "call.xml")
    text = "\n".join(problems)
    for part in (
        "url",
        "interruptByDtmf: removed",
        "interruptible: value 'sometimes'",
        "did you mean welcomeGreeting",
        "multi",
        "<Language> attribute code",
        "<Stream> is not allowed",
        "action: value 'http://x.example.com/a'",
    ):
        assert part in text, text
    assert all(p.startswith("call.xml") for p in problems)
    assert lint("<Response><Say>hi</Say></Response>") == [
        "<twiml>: no <Connect><ConversationRelay> found"
    ]
    assert lint("<Response>")[0].startswith("<twiml>: not XML")


def test_cli_list_show_render(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["twiml", "list"])
    assert listed.exit_code == 0
    for name in preset_names():
        assert name in listed.output
    shown = runner.invoke(app, ["twiml", "show", "multilingual"])
    assert shown.exit_code == 0 and "basic.toml" in shown.output and "es-MX" in shown.output
    rendered = runner.invoke(
        app,
        [
            "twiml",
            "render",
            "basic",
            "--url",
            URL,
            "--set",
            "interruptible=speech",
            "--param",
            "crm=9",
            "--action",
            "/done",
        ],
    )
    assert rendered.exit_code == 0, rendered.output
    root = ET.fromstring(rendered.stdout)
    assert root.find("Connect").get("action") == "https://relay.example.com/done"  # type: ignore[union-attr]
    relay = root.find(".//ConversationRelay")
    assert relay is not None and relay.get("interruptible") == "speech"
    assert relay.find("Parameter").attrib == {"name": "crm", "value": "9"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "interruptible=sometimes"], "--set interruptible: value 'sometimes'"),
        (["--set", "interruptByDtmf=true"], "removed"),
        (["--set", "nokey"], "expected key=value"),
        (["--action", "http://plain.example.com/a"], "https://"),
    ],
)
def test_cli_render_error_exits_non_zero_with_one_line(args: list[str], expected: str) -> None:
    result = runner.invoke(app, ["twiml", "render", "basic", "--url", URL, *args])
    assert result.exit_code == 2
    assert expected in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_cli_lint(tmp_path: Path) -> None:
    good = tmp_path / "good.xml"
    good.write_text(render(load_template("handoff"), url=URL))
    assert runner.invoke(app, ["twiml", "lint", str(good)]).exit_code == 0
    bad = tmp_path / "bad.xml"
    bad.write_text(
        '<Response><Connect><ConversationRelay url="wss://a.example.com:443/ws"/></Connect></Response>'
    )
    result = runner.invoke(app, ["twiml", "lint", str(bad)])
    assert result.exit_code == 1 and ":443" in result.stderr and str(bad) in result.stderr
    missing = runner.invoke(app, ["twiml", "lint", str(tmp_path / "nope.xml")])
    assert missing.exit_code == 2 and "cannot read" in missing.stderr


async def test_relay_serves_the_configured_template(relay_factory, tmp_path: Path) -> None:
    path = write(tmp_path, 'extends = "dtmf-menu"\n[parameters]\nline = "sales"\n')
    relay = relay_factory(twiml_template=str(path))
    async with httpx.AsyncClient() as client:
        response = await client.post(
            relay.base_url + "/twiml",
            data={"CallSid": "CA1"},
            headers={"X-Twilio-Signature": sign(PUBLIC_URL + "/twiml", {"CallSid": "CA1"})},
        )
    assert response.status_code == 200
    rendered = runner.invoke(
        app,
        ["twiml", "render", str(path), "--url", PUBLIC_URL.replace("https://", "wss://") + "/ws"],
    )
    assert rendered.exit_code == 0
    # the document `crctl twiml render` prints, but for the call's one-time socket URL
    query = re.compile(r'(?<=/ws)\?callSid=CA1&amp;token=[\w.-]+(?=")')
    assert len(query.findall(response.text)) == 1, response.text
    assert query.sub("", response.text) + "\n" == rendered.stdout


def test_relay_refuses_to_start_with_a_bad_template(tmp_path: Path) -> None:
    from relay_server import ConfigError, RelayConfig, create_app

    with pytest.raises(ConfigError, match="twiml_template"):
        create_app(RelayConfig(twiml_template=str(write(tmp_path, '[relay]\nvoice = ""\nfoo = 1'))))


def test_cli_export_then_reexport_keeps_user_changes(tmp_path: Path) -> None:
    target = tmp_path / "cr-twiml"
    args = ["twiml", "export", "handoff", "--url", URL, "--serverless", str(target)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    function = target / "functions" / "conversation-relay.js"
    assert "wrote" in first.stdout and function.is_file()
    xml = render(load_template("handoff"), url=URL)
    end = xml.index(f'url="{URL}"') + len(f'url="{URL}')  # cut where a call's query goes
    assert all(json.dumps(part) in function.read_text() for part in (xml[:end], xml[end:]))
    function.write_text(function.read_text() + "\n// my change\n")
    again = runner.invoke(app, args)
    # the function still holds the old TwiML: the export says so and fails until merged
    assert again.exit_code == 1 and "kept" in again.stdout and "--force" in again.stdout
    assert function.read_text().endswith("// my change\n")
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0 and "overwritten" in forced.stdout
    assert "// my change" not in function.read_text()


def test_cli_export_errors_are_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    result = runner.invoke(
        app, ["twiml", "export", "basic", "--url", URL, "--serverless", str(a_file)]
    )
    assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.output
    bad = runner.invoke(
        app,
        [
            "twiml",
            "export",
            "basic",
            "--url",
            "ws://x.example.com/ws",
            "--serverless",
            str(tmp_path / "out"),
        ],
    )
    assert bad.exit_code == 2 and "wss://" in bad.stderr
    assert not (tmp_path / "out").exists()


def test_presets_ignore_a_shadowing_user_template(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "twiml").mkdir()
    (tmp_path / "twiml" / "basic.toml").write_text(
        'extends = "basic"\n[relay]\nwelcomeGreeting = "Shop hello"\n'
    )
    mine = load_template("basic")  # the user's file, extending the preset it shadows
    assert mine.relay["welcomeGreeting"] == "Shop hello" and mine.relay["interruptible"] == "any"
    menu = load_template("dtmf-menu")  # a preset extending "basic" gets the preset, not the user's
    assert menu.relay["events"] == "speaker-events tokens-played"
    assert menu.relay["welcomeGreeting"].startswith("Welcome. Press 1")
    (tmp_path / "twiml" / "basic.toml").write_text('[relay]\ninterruptible = "nope"\n')
    listed = runner.invoke(app, ["twiml", "list"])
    assert listed.exit_code == 0 and "invalid" in listed.stdout and "Traceback" not in listed.output


def test_extends_is_relative_to_the_extending_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "lib").mkdir()
    write(tmp_path / "lib", '[relay]\nvoice = "Joanna-Neural"', "shop.toml")
    child = write(tmp_path / "lib", 'extends = "shop"', "child.toml")
    monkeypatch.chdir(tmp_path)
    assert load_template(child).relay["voice"] == "Joanna-Neural"


def test_connect_action_is_checked_when_loading(tmp_path: Path) -> None:
    path = write(tmp_path, '[connect]\naction = "http://plain.example.com/a"')
    with pytest.raises(TemplateError, match=r"connect\.action") as info:
        load_template(path)
    assert str(info.value).startswith(f"{path}:")
    relative = write(tmp_path, '[connect]\naction = "done"\nmethod = "GET"', "rel.toml")
    connect = ET.fromstring(render(load_template(relative), url=URL)).find("Connect")
    assert connect is not None and connect.attrib == {"action": "done", "method": "GET"}
    removed = write(tmp_path, 'extends = "basic"\n[connect]\naction = ""', "noaction.toml")
    assert ET.fromstring(render(load_template(removed), url=URL)).find("Connect").attrib == {}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("interrupt_by_dtmf", "removed"),
        ("interruptbydtmf", "removed"),
        ("stt_provider", "use transcriptionProvider"),
        ("welcome_greeting", "did you mean welcomeGreeting"),
    ],
)
def test_hints_see_through_case_and_underscores(tmp_path: Path, key: str, hint: str) -> None:
    assert hint in error_of(tmp_path, f'[relay]\n{key} = "x"')


def test_relay_key_in_a_language_says_where_it_belongs(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[[language]]\ncode = "es-ES"\ninterruptible = "any"')
    assert "language[0].interruptible" in message and "belongs in [relay]" in message


@pytest.mark.parametrize(
    "url", ["wss://x y/ws", "wss://x.example.com/ws#frag", "wss://:8443/ws", "wss://x:abc/ws"]
)
def test_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(TemplateError, match="allowed: a wss:// URL"):
        render(load_template("basic"), url=url)


def test_set_with_an_empty_value_removes_the_attribute() -> None:
    xml = render(
        load_template("basic"), url=URL, sets={"welcomeGreeting": "", "interruptible": "True"}
    )
    relay = ET.fromstring(xml).find(".//ConversationRelay")
    assert relay is not None and "welcomeGreeting" not in relay.attrib
    assert relay.get("interruptible") == "any"  # True, any case, means any


def test_lint_catches_structure_problems() -> None:
    outside = '<Response><ConversationRelay url="wss://x.example.com/ws"/></Response>'
    assert any("inside <Response><Connect>" in p for p in lint(outside))
    mixed = (
        '<Response><Connect><ConversationRelay url="wss://x.example.com/ws">'
        '<Language code="es-ES"/><Language code="es-ES"/><Parameter name="" value="1"/>'
        '</ConversationRelay><Stream url="wss://x.example.com/s"/></Connect></Response>'
    )
    text = "\n".join(lint(mixed))
    assert "<Stream> in <Connect>" in text and "declared twice" in text and "non-empty name" in text
    utf16 = '<?xml version="1.0" encoding="UTF-16"?><Response/>'.encode("utf-16")
    assert lint(utf16) == ["<twiml>: no <Connect><ConversationRelay> found"]


async def test_local_relay_serves_ws_twiml_without_a_public_url(relay_factory) -> None:
    relay = relay_factory(public_url=None, auth_token=None)
    async with httpx.AsyncClient() as client:
        response = await client.get(relay.base_url + "/twiml")
    assert response.status_code == 200
    relay_el = ET.fromstring(response.text).find(".//ConversationRelay")
    assert relay_el is not None and relay_el.get("url") == f"ws://127.0.0.1:{relay.port}/ws"


def test_export_with_a_changed_function_fails_until_merged(tmp_path: Path) -> None:
    target = tmp_path / "out"
    args = ["twiml", "export", "basic", "--url", URL, "--serverless", str(target)]
    assert runner.invoke(app, args).exit_code == 0
    function = target / "functions" / "conversation-relay.js"
    function.write_text(function.read_text() + "// edited\n")
    other = runner.invoke(
        app, ["twiml", "export", "dtmf-menu", "--url", URL, "--serverless", str(target)]
    )
    assert other.exit_code == 1 and "still hold the TwiML" in other.stderr


# ------------------------------------------------------------- the relay's webhook answers
def test_responses_connect_relay_is_the_template_with_the_greeting_set() -> None:
    template = load_template("basic")
    plain = responses.connect_relay(template, url=URL)
    assert plain == render(template, url=URL)
    greeted = ET.fromstring(responses.connect_relay(template, url=URL, greeting="Where were we?"))
    relay = greeted.find("Connect/ConversationRelay")
    assert relay is not None and relay.get("welcomeGreeting") == "Where were we?"
    assert lint(responses.connect_relay(template, url=URL, greeting="Hi")) == []
    local = responses.connect_relay(template, url="ws://127.0.0.1:8080/ws", local=True)
    assert 'url="ws://127.0.0.1:8080/ws"' in local
    with pytest.raises(TemplateError):
        responses.connect_relay(template, url="ws://127.0.0.1:8080/ws")  # wss:// unless local


def test_responses_dial_then_hang_up() -> None:
    for target in ("+15550100999", "sip:desk@example.com"):
        root = ET.fromstring(responses.dial(target))
        assert [child.tag for child in root] == ["Dial", "Hangup"]
        assert root[0].text == target


def test_responses_hang_up_after_an_optional_say() -> None:
    assert [c.tag for c in ET.fromstring(responses.hang_up())] == ["Hangup"]
    root = ET.fromstring(responses.hang_up("Goodbye & thanks <3"))
    assert [c.tag for c in root] == ["Say", "Hangup"]
    assert root[0].text == "Goodbye & thanks <3"  # escaped by the SDK, read back whole
