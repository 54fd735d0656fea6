"""The pure protocol core (relay_server.protocol): decode Twilio's frames, encode ours.

Plain sync tests, no event loop, in the spirit of websockets' sans-I/O protocol tests. Frames are
shaped like the frames Twilio documents for ConversationRelay (WebSocket messages: inbound
setup, prompt, dtmf, interrupt, info, error; outbound text, play, sendDigits, language, end).

These tests build and read raw JSON on purpose: the wire text is what the codec is tested on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import relay_server.protocol as protocol_pkg
from relay_server.protocol import (
    DEFAULT_MAX_FRAME_BYTES,
    Dtmf,
    End,
    Error,
    Info,
    Interrupt,
    Language,
    Play,
    Prompt,
    ProtocolError,
    SendDigits,
    SentInterrupt,
    SentSetup,
    Setup,
    Text,
    Unknown,
    as_fields,
    decode,
    decode_outbound,
    decode_received,
    encode,
    encode_inbound,
    text_frame,
)

# A setup frame as Twilio sends it on a real call, verbatim.
SETUP_CAPTURED = (
    '{"type":"setup","sessionId":"VX00000000000000000000000000000001",'
    '"callSid":"CA00000000000000000000000000000001",'
    '"parentCallSid":"","from":"+15550100001","to":"+15550100001",'
    '"forwardedFrom":"+15550100001","callerName":"",'
    '"direction":"inbound","callType":"PSTN","callStatus":"RINGING",'
    '"accountSid":"AC00000000000000000000000000000000",'
    '"customParameters":{}}'
)


def _setup_dict(**changes: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(SETUP_CAPTURED)
    frame.update(changes)
    return frame


# --------------------------------------------------------------------------- setup


def test_setup_captured_frame_decodes_every_field() -> None:
    msg = decode(SETUP_CAPTURED)
    assert isinstance(msg, Setup)
    assert msg.session_id == "VX00000000000000000000000000000001"
    assert msg.call_sid == "CA00000000000000000000000000000001"
    assert msg.account_sid == "AC00000000000000000000000000000000"
    assert msg.parent_call_sid == ""  # present as "", not null
    assert msg.from_ == "+15550100001"
    assert msg.to == "+15550100001"
    assert msg.forwarded_from == "+15550100001"
    assert msg.caller_name == ""
    assert msg.direction == "inbound"
    assert msg.call_type == "PSTN"
    assert msg.call_status == "RINGING"
    assert msg.custom_parameters == {}
    assert msg.application_sid is None  # absent in 2026 captures


def test_setup_reconnect_with_custom_parameters_and_null_application_sid() -> None:
    frame = _setup_dict(
        callStatus="IN_PROGRESS",
        direction="outbound-api",
        customParameters={"customerId": "42", "tier": "gold"},
        applicationSid=None,  # 2024-25 captures carry an explicit null
    )
    msg = decode(json.dumps(frame))
    assert isinstance(msg, Setup)
    assert msg.call_status == "IN_PROGRESS"
    assert msg.direction == "outbound-api"
    assert msg.custom_parameters == {"customerId": "42", "tier": "gold"}
    assert msg.application_sid is None


def test_setup_with_application_sid_string() -> None:
    msg = decode(json.dumps(_setup_dict(applicationSid="AP" + "1" * 32)))
    assert isinstance(msg, Setup)
    assert msg.application_sid == "AP" + "1" * 32


def test_setup_ignores_unknown_fields() -> None:
    # Twilio adds fields over time; they must be ignored, not rejected.
    frame = _setup_dict(futureField={"nested": [1, 2]}, anotherOne=7, ts="2026-08-30")
    msg = decode(json.dumps(frame))
    assert isinstance(msg, Setup)
    assert msg == decode(SETUP_CAPTURED)


def test_setup_field_order_is_not_significant() -> None:
    frame = dict(reversed(list(json.loads(SETUP_CAPTURED).items())))
    assert decode(json.dumps(frame)) == decode(SETUP_CAPTURED)


def test_setup_without_call_sid_is_malformed() -> None:
    frame = _setup_dict()
    del frame["callSid"]
    with pytest.raises(ProtocolError, match=r"setup.*callSid"):
        decode(json.dumps(frame))


# ---------------------------------------------------------------------- prompt/dtmf


@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("lang", ["en", "en-US"])
def test_prompt(last: bool, lang: str) -> None:
    frame = json.dumps(
        {
            "type": "prompt",
            "voicePrompt": "Stop. Stop. Stop. I am interrupting you now.",
            "lang": lang,
            "last": last,
        }
    )
    assert decode(frame) == Prompt(
        voice_prompt="Stop. Stop. Stop. I am interrupting you now.", lang=lang, last=last
    )


def test_prompt_keeps_spacing_and_ignores_future_fields() -> None:
    frame = '{"type":"prompt","voicePrompt":"  two  spaces ","lang":"en","last":false,"x":{}}'
    msg = decode(frame)
    assert isinstance(msg, Prompt)
    assert msg.voice_prompt == "  two  spaces "
    assert msg.last is False


@pytest.mark.parametrize("digit", list("0123456789*#"))
def test_dtmf(digit: str) -> None:
    msg = decode(json.dumps({"type": "dtmf", "digit": digit}))
    assert isinstance(msg, Dtmf)
    assert msg.digit == digit


# ------------------------------------------------------------------------ interrupt


def test_interrupt_with_integer_duration() -> None:
    frame = (
        '{"type":"interrupt","utteranceUntilInterrupt":"Sentence 2 of",'
        '"durationUntilInterruptMs":684}'
    )
    msg = decode(frame)
    assert isinstance(msg, Interrupt)
    assert msg.utterance_until_interrupt == "Sentence 2 of"
    assert msg.duration_until_interrupt_ms == 684
    assert type(msg.duration_until_interrupt_ms) is int


def test_interrupt_with_string_duration_as_in_the_early_docs() -> None:
    frame = '{"type":"interrupt","utteranceUntilInterrupt":"This","durationUntilInterruptMs":"460"}'
    msg = decode(frame)
    assert isinstance(msg, Interrupt)
    assert msg.utterance_until_interrupt == "This"
    assert msg.duration_until_interrupt_ms == 460
    assert type(msg.duration_until_interrupt_ms) is int


def test_interrupt_with_empty_utterance() -> None:
    frame = '{"type":"interrupt","utteranceUntilInterrupt":"","durationUntilInterruptMs":15}'
    msg = decode(frame)
    assert isinstance(msg, Interrupt)
    assert (msg.utterance_until_interrupt, msg.duration_until_interrupt_ms) == ("", 15)


@pytest.mark.parametrize("duration", ["abc", "12ms", "nan"])
def test_interrupt_with_non_numeric_string_duration_is_malformed(duration: str) -> None:
    frame = json.dumps(
        {"type": "interrupt", "utteranceUntilInterrupt": "x", "durationUntilInterruptMs": duration}
    )
    with pytest.raises(ProtocolError, match="durationUntilInterruptMs"):
        decode(frame)


@pytest.mark.parametrize("duration", ["inf", "Infinity", "1e400"])
def test_interrupt_with_infinite_string_duration_is_a_protocol_error(duration: str) -> None:
    # decode() promises ProtocolError for malformed input; calls.CallConnection.receive only
    # catches ProtocolError, so any other exception here ends the WebSocket handler (the call).
    frame = json.dumps(
        {"type": "interrupt", "utteranceUntilInterrupt": "x", "durationUntilInterruptMs": duration}
    )
    with pytest.raises(ProtocolError, match="durationUntilInterruptMs"):
        decode(frame)


# ---------------------------------------------------------------------- error/info


def test_error_observed_frame_carries_code_64107() -> None:
    frame = (
        '{"type":"error","description":"Invalid message received, code: 64107, '
        'this is not json #1"}'
    )
    msg = decode(frame)
    assert isinstance(msg, Error)
    assert msg.description == "Invalid message received, code: 64107, this is not json #1"
    assert msg.code == 64107


def test_error_docs_frame_without_a_code_is_64107() -> None:
    frame = r'{"type":"error","description":"Invalid message received: { \"foo\" : \"bar\" }"}'
    msg = decode(frame)
    assert isinstance(msg, Error)
    assert msg.description == 'Invalid message received: { "foo" : "bar" }'
    # the docs' form names no code, but "Invalid message received" is 64107 (Twilio docs: WebSocket
    # messages)
    assert msg.code == 64107
    other = decode('{"type":"error","description":"something else went wrong"}')
    assert isinstance(other, Error) and other.code is None


@pytest.mark.parametrize(
    ("frame", "name", "value"),
    [
        ('{"type":"info","name":"agentSpeaking","value":"on"}', "agentSpeaking", "on"),
        ('{"type":"info","name":"clientSpeaking","value":"off"}', "clientSpeaking", "off"),
        (
            '{"type":"info","name":"tokensPlayed","value":" the quick brown fox."}',
            "tokensPlayed",
            " the quick brown fox.",
        ),
        ('{"type":"info","name":"roundTripDelayMs","value":"148"}', "roundTripDelayMs", "148"),
        ('{"type":"info","name":"roundTripDelayMs","value":148}', "roundTripDelayMs", "148"),
        ('{"type":"info","name":"roundTripDelayMs","value":148.5}', "roundTripDelayMs", "148.5"),
    ],
)
def test_info(frame: str, name: str, value: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, Info)
    assert msg.name == name
    assert msg.value == value
    assert isinstance(msg.value, str)  # value is normalised to a string


# ---------------------------------------------------------------------------- unknown types


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"configUpdated","provider":"Google","language":"en-US"}',
        '{"type":"interrupted","reason":"speech"}',  # a tutorial's invention: not a Twilio type
        '{"type":"media","media":{"payload":"AAAA"}}',  # Media Streams, not CR
        '{"type":""}',
    ],
)
def test_unknown_type_decodes_to_unknown(frame: str) -> None:
    msg = decode(frame)
    assert isinstance(msg, Unknown)
    assert msg.type == json.loads(frame)["type"]


# ------------------------------------------------------------------------ malformed inbound


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        ("this is not json #1", "not JSON"),
        ("", "not JSON"),
        ('{"type":"prompt"', "not JSON"),
        ('[{"type":"prompt","voicePrompt":"hi"}]', "type"),
        ('"setup"', "type"),
        ("null", "type"),
        ('{"voicePrompt":"hi","last":true}', "type"),
        ('{"type":5,"voicePrompt":"hi"}', "type"),
        ('{"type":null}', "type"),
        ('{"type":"prompt","voicePrompt":5,"lang":"en","last":true}', "voicePrompt"),
        # msgspec is strict: "yes" (or "true") is not a bool, and a wrong type is malformed.
        ('{"type":"prompt","voicePrompt":"hi","lang":"en","last":"yes"}', "last"),
        ('{"type":"prompt","voicePrompt":"hi","lang":"en","last":"true"}', "last"),
        ('{"type":"prompt","lang":"en","last":true}', "voicePrompt"),
        ('{"type":"dtmf","digit":9}', "digit"),
        ('{"type":"dtmf"}', "digit"),
        ('{"type":"info","name":"x","value":[1]}', "value"),
        ('{"type":"interrupt","durationUntilInterruptMs":true}', "durationUntilInterruptMs"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frame)
    assert needle in str(info.value)


def test_malformed_known_type_names_the_type() -> None:
    with pytest.raises(ProtocolError, match=r"malformed 'prompt' message.*voicePrompt"):
        decode('{"type":"prompt","voicePrompt":5,"lang":"en","last":true}')


@pytest.mark.parametrize(
    "frame", [b'{"type":"dtmf","digit":"1"}', bytearray(b'{"type":"dtmf","digit":"1"}')]
)
def test_binary_frame_is_refused(frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="binary"):
        decode(frame)


def _prompt_of(text: str) -> str:
    return json.dumps({"type": "prompt", "voicePrompt": text, "last": True}, ensure_ascii=False)


def test_frame_at_the_limit_is_accepted_and_one_byte_more_is_refused() -> None:
    at_limit = _prompt_of("a" * 100)
    limit = len(at_limit.encode())
    assert isinstance(decode(at_limit, max_bytes=limit), Prompt)
    with pytest.raises(ProtocolError, match=f"exceeds the {limit - 1}-byte limit"):
        decode(at_limit, max_bytes=limit - 1)


def test_default_limit_refuses_oversized_frame() -> None:
    frame = _prompt_of("a" * DEFAULT_MAX_FRAME_BYTES)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frame)


def test_multibyte_frame_over_the_byte_limit_is_refused() -> None:
    # The limit is in bytes: 60 "é" are 60 characters but 120 UTF-8 bytes.
    frame = _prompt_of("é" * 60)
    assert len(frame) <= 150 < len(frame.encode())
    with pytest.raises(ProtocolError, match="exceeds the 150-byte limit"):
        decode(frame, max_bytes=150)


# -------------------------------------------------------------------------- outbound

# The examples of Twilio's WebSocket messages docs, verbatim, with the message that should
# produce each.
DOCS_OUTBOUND: list[tuple[Any, str]] = [
    (
        Text(token="Hello world!", last=False, interruptible=False, preemptible=False),
        '{"type":"text","token":"Hello world!","last":false,"interruptible":false,'
        '"preemptible":false}',
    ),
    (
        Play(
            source="https://api.twilio.com/cowbell.mp3",
            loop=1,
            preemptible=False,
            interruptible=True,
        ),
        '{"type":"play","source":"https://api.twilio.com/cowbell.mp3","loop":1,'
        '"preemptible":false,"interruptible":true}',
    ),
    (SendDigits(digits="9www4085551212"), '{"type":"sendDigits","digits":"9www4085551212"}'),
    (
        Language(tts_language="sv-SE", transcription_language="en-US"),
        '{"type":"language","ttsLanguage":"sv-SE","transcriptionLanguage":"en-US"}',
    ),
    (
        End(
            handoff_data='{"reasonCode":"live-agent-handoff",'
            '"reason":"The caller wants to talk to a real person"}'
        ),
        r'{"type":"end","handoffData":"{\"reasonCode\":\"live-agent-handoff\",'
        r'\"reason\":\"The caller wants to talk to a real person\"}"}',
    ),
]
_DOC_IDS = ["text", "play", "sendDigits", "language", "end"]


@pytest.mark.parametrize(("message", "docs"), DOCS_OUTBOUND, ids=_DOC_IDS)
def test_encode_matches_docs_example(message: Any, docs: str) -> None:
    encoded = json.loads(encode(message))
    expected = json.loads(docs)
    if isinstance(message, Play):
        # play.loop defaults to 1 on Twilio's side (Twilio docs: WebSocket messages table) and
        # omit_defaults leaves the
        # default off the wire; everything else must match the docs exactly.
        assert "loop" not in encoded or encoded["loop"] == 1
        encoded.setdefault("loop", 1)
    assert encoded == expected


@pytest.mark.parametrize(("message", "docs"), DOCS_OUTBOUND, ids=_DOC_IDS)
def test_decode_outbound_accepts_docs_example(message: Any, docs: str) -> None:
    assert decode_outbound(docs) == message
    assert decode_outbound(docs.encode()) == message


@pytest.mark.parametrize(("message", "docs"), DOCS_OUTBOUND, ids=_DOC_IDS)
def test_encode_round_trips_through_decode_outbound(message: Any, docs: str) -> None:
    assert decode_outbound(encode(message)) == message


def test_encode_is_compact_json_text() -> None:
    frame = encode(Text(token="hi", last=True))
    assert isinstance(frame, str)
    assert frame == '{"type":"text","token":"hi","last":true}'


def test_play_keeps_a_non_default_loop() -> None:
    assert json.loads(encode(Play(source="https://x.test/a.mp3", loop=0)))["loop"] == 0
    assert json.loads(encode(Play(source="https://x.test/a.mp3", loop=3)))["loop"] == 3


def test_text_always_carries_token_and_last() -> None:
    # A closing frame with an empty token, and a last:false token: both fields on the wire.
    assert json.loads(encode(Text(token="", last=True))) == {
        "type": "text",
        "token": "",
        "last": True,
    }
    assert json.loads(encode(Text(token="", last=False))) == {
        "type": "text",
        "token": "",
        "last": False,
    }


@pytest.mark.parametrize("token", [" hello ", " world", "\n", "  ", "end. "])
def test_tokens_are_not_trimmed(token: str) -> None:
    assert json.loads(encode(Text(token=token, last=False)))["token"] == token


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (Text(token="a", last=True), {"type": "text", "token": "a", "last": True}),
        (
            Text(token="a", last=False, lang="sv-SE"),
            {"type": "text", "token": "a", "last": False, "lang": "sv-SE"},
        ),
        (Play(source="https://x.test/a.mp3"), {"type": "play", "source": "https://x.test/a.mp3"}),
        (Language(tts_language="sv-SE"), {"type": "language", "ttsLanguage": "sv-SE"}),
        (
            Language(transcription_language="en-US"),
            {"type": "language", "transcriptionLanguage": "en-US"},
        ),
        (End(), {"type": "end"}),
    ],
)
def test_none_optional_fields_are_omitted(message: Any, expected: dict[str, Any]) -> None:
    assert json.loads(encode(message)) == expected


def test_end_handoff_data_must_be_a_string() -> None:
    with pytest.raises(ProtocolError, match="handoffData"):
        End(handoff_data={"reason": "spike"})  # type: ignore[arg-type]
    payload = {"reasonCode": "live-agent-handoff", "reason": "spike"}
    frame = json.loads(encode(End(handoff_data=json.dumps(payload))))
    assert isinstance(frame["handoffData"], str)
    assert json.loads(frame["handoffData"]) == payload


@pytest.mark.parametrize("digits", ["9www4085551212", "*#", "0123456789w#*", "1"])
def test_send_digits_accepts(digits: str) -> None:
    assert json.loads(encode(SendDigits(digits=digits))) == {
        "type": "sendDigits",
        "digits": digits,
    }


@pytest.mark.parametrize("digits", ["", "12a", "1 2", "W", "+15550100", "12\n", "\n"])
def test_send_digits_rejects(digits: str) -> None:
    # "12\n": a trailing newline must not slip past the "only 0-9 w # *" rule (Twilio docs:
    # WebSocket messages).
    with pytest.raises(ProtocolError, match="sendDigits"):
        SendDigits(digits=digits)


@pytest.mark.parametrize(
    "kwargs", [{}, {"tts_language": ""}, {"tts_language": "", "transcription_language": ""}]
)
def test_language_needs_one_of_its_fields(kwargs: dict[str, str]) -> None:
    with pytest.raises(ProtocolError, match="ttsLanguage or transcriptionLanguage"):
        Language(**kwargs)


def test_play_needs_a_source_and_a_sane_loop() -> None:
    with pytest.raises(ProtocolError, match="source"):
        Play(source="")
    with pytest.raises(ProtocolError, match="loop"):
        Play(source="https://x.test/a.mp3", loop=-1)


def test_text_token_must_not_be_null() -> None:
    with pytest.raises(ProtocolError, match="token"):
        Text(token=None, last=True)  # type: ignore[arg-type]


TRICKY_TOKENS = [
    "",
    " hello ",
    'say "hi"',
    "back\\slash",
    "naïve café — 日本語 😀",
    "line\nbreak\r\n",
    "\t",
    "</script>",
    "\u2028\u2029",
    "\x00\x1f",
    '{"type":"end"}',
]


@pytest.mark.parametrize("last", [True, False])
@pytest.mark.parametrize("token", TRICKY_TOKENS)
def test_text_frame_equals_encode(token: str, last: bool) -> None:
    frame = text_frame(token, last)
    assert frame == encode(Text(token=token, last=last))
    assert json.loads(frame) == {"type": "text", "token": token, "last": last}


# ------------------------------------------------------------------- decode_outbound rejects


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("not json", "JSON"),
        ("[]", "object"),
        ('{"token":"x","last":true}', "type"),
        ('{"type":"text","token":null,"last":true}', "token"),
        ('{"type":"text","token":"x","last":"true"}', "last"),
        ('{"type":"text","last":true}', "token"),
        ('{"type":"end","handoffData":{"reason":"spike"}}', "handoffData"),
        ('{"type":"sendDigits","digits":"12a"}', "sendDigits"),
        ('{"type":"sendDigits","digits":""}', "sendDigits"),
        ('{"type":"sendDigits","digits":"12\\n"}', "sendDigits"),
        ('{"type":"language"}', "language"),
        ('{"type":"play","source":""}', "source"),
        ('{"type":"play"}', "source"),
        ('{"type":"play","source":"https://x.test/a.mp3","loop":-2}', "loop"),
        ('{"type":"prompt","voicePrompt":"x","last":true}', "prompt"),  # inbound type
        ('{"type":"bogus"}', "bogus"),
    ],
)
def test_decode_outbound_rejects(data: str, needle: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_outbound(data)
    message = str(info.value)
    assert message.startswith("not a valid outbound message")
    assert needle in message


# ------------------------------------------------------------------------------- purity


def test_protocol_core_has_no_io_or_event_loop_imports() -> None:
    # The protocol module never sees asyncio (sans-I/O), and it is the only json owner.
    package_dir = Path(protocol_pkg.__file__).parent
    sources = {p.name: p.read_text(encoding="utf-8") for p in package_dir.glob("*.py")}
    assert {"codec.py", "messages.py", "errors.py"} <= set(sources)
    for name, source in sources.items():
        for forbidden in ("import asyncio", "import quart", "from quart", "import websockets"):
            assert forbidden not in source, f"{name} has {forbidden!r}"


@pytest.mark.parametrize("digit", ["", "12", "a", "A", " "])
def test_dtmf_digit_outside_the_keypad_is_a_protocol_error(digit: str) -> None:
    with pytest.raises(ProtocolError, match=r"dtmf\.digit"):
        decode(json.dumps({"type": "dtmf", "digit": digit}))


# ---------------------------------------------------------------- the Twilio side's codec


@pytest.mark.parametrize(
    "message",
    [
        Prompt(voice_prompt="is my order here", lang="en-US", last=False),
        Prompt(voice_prompt="Stop.", lang="en", last=True),
        Dtmf(digit="#"),
        Interrupt(utterance_until_interrupt="Sentence 2 of", duration_until_interrupt_ms=684),
        Info(name="tokensPlayed", value=" the quick brown fox."),
        Error(description="Invalid message received, code: 64107, this is not json #1"),
    ],
)
def test_what_twilio_sends_round_trips_through_the_relays_decoder(message: Any) -> None:
    assert decode(encode_inbound(message)) == message


def test_twilio_fields_keep_the_docs_order() -> None:
    frame = encode_inbound(Prompt(voice_prompt="hi", lang="en-US", last=True))
    assert frame == '{"type":"prompt","voicePrompt":"hi","lang":"en-US","last":true}'
    interrupt = encode_inbound(Interrupt(utterance_until_interrupt="This"))
    assert interrupt == (
        '{"type":"interrupt","utteranceUntilInterrupt":"This","durationUntilInterruptMs":0}'
    )


def test_a_sent_interrupt_keeps_the_early_docs_string_duration() -> None:
    frame = encode_inbound(
        SentInterrupt(utterance_until_interrupt="Hi", duration_until_interrupt_ms="460")
    )
    assert json.loads(frame)["durationUntilInterruptMs"] == "460"
    decoded = decode(frame)
    assert isinstance(decoded, Interrupt) and decoded.duration_until_interrupt_ms == 460
    with pytest.raises(ProtocolError, match="not a number"):
        SentInterrupt(duration_until_interrupt_ms="soon")


def test_a_sent_setup_leaves_application_sid_out() -> None:
    frame = encode_inbound(SentSetup(call_sid="CA" + "1" * 32))
    assert "applicationSid" not in json.loads(frame)
    decoded = decode(frame)
    assert isinstance(decoded, Setup) and decoded.application_sid is None


def test_as_fields_is_the_frame_as_json_reads_it() -> None:
    assert as_fields(decode_received('{"type":"text","token":"a"}')) == {
        "type": "text",
        "token": "a",
        "last": False,
    }
    assert as_fields(End(handoff_data="{}")) == {"type": "end", "handoffData": "{}"}
    assert as_fields(Play(source="https://x/a.mp3")) == {
        "type": "play",
        "source": "https://x/a.mp3",
    }
