"""The Twilio side of the wire (relay_server.protocol.twilio_side), with no event loop or socket.

Frames in through ``receive_data``, frames out through ``data_to_send``, a fake clock.

Shaped after Twilio's ConversationRelay docs (WebSocket messages: talk cycles end at
``last: true``; barge-in reported as ``interrupt`` with what the caller heard; a bad app frame
answered with ``error`` 64107, ten in a row closing the socket with 1007).
"""

from __future__ import annotations

import json

import pytest

from relay_server.protocol import (
    End,
    Language,
    Play,
    ProtocolError,
    SendDigits,
    SentSetup,
    Text,
    decode,
    decode_received,
    encode,
    encode_inbound,
    invalid_message,
)
from relay_server.protocol.replies import Dropped, Invalid, ReplyDone, TokenHeard
from relay_server.protocol.twilio_side import (
    MALFORMED_REASON,
    STALE_WINDOW,
    CallerModes,
    TwilioSide,
)
from tests.test_protocol import SETUP_CAPTURED

EVERY_EVENT = frozenset({"speaker-events", "tokens-played"})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def side(**modes: object) -> tuple[TwilioSide, Clock]:
    clock = Clock()
    return TwilioSide(CallerModes(**modes), clock=clock), clock  # type: ignore[arg-type]


def text(token: str, last: bool = False, **extra: object) -> str:
    return encode(Text(token=token, last=last, **extra))  # type: ignore[arg-type]


def sent(twilio: TwilioSide) -> list[tuple[object, ...]]:
    """What Twilio wrote, decoded by the relay's own decoder, in short."""
    out: list[tuple[object, ...]] = []
    for frame in twilio.data_to_send():
        message = decode(frame)
        kind = type(message).__name__.lower()
        # the raw JSON object on purpose: the values in the order they are on the wire
        values = {k: v for k, v in json.loads(frame).items() if k != "type"}
        out.append((kind, *values.values()))
    return out


# ------------------------------------------------------------------------- the codec's side


def test_setup_is_encoded_byte_for_byte_as_captured() -> None:
    captured = json.loads(SETUP_CAPTURED)  # raw on purpose: the bytes Twilio sends verbatim
    # the one shape every simulated caller sends (crctl call, the tests, bench)
    setup = SentSetup.inbound(
        captured["callSid"],
        from_=captured["from"],
        to=captured["to"],
        account_sid=captured["accountSid"],
        session_id=captured["sessionId"],
    )
    assert encode_inbound(setup) == SETUP_CAPTURED


# Raw text on purpose: frames Twilio rejects, which no typed message can build.
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00\x01", "a binary frame"),
        ("not json", "not JSON"),
        ("[1]", "not a JSON object with a string type"),
        ('{"type":"speak","token":"x"}', "unknown message type 'speak'"),
        ('{"type":"text"}', "malformed 'text' message: Object missing required field `token`"),
        ('{"type":"text","token":null}', "malformed 'text'"),
        ('{"type":"text","token":"a","last":1}', "Expected `bool`, got `int`"),
        ('{"type":"play","source":"https://x/a.mp3","loop":-1}', "play.loop must be 0 or more"),
        ('{"type":"sendDigits","digits":"12a"}', "sendDigits.digits must be"),
        ('{"type":"language"}', "language needs ttsLanguage or transcriptionLanguage"),
        ('{"type":"end","handoffData":{"a":1}}', "malformed 'end'"),
    ],
)
def test_twilio_rejects_app_frames_and_says_why(frame: str | bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_received(frame)
    assert reason in str(caught.value)


def test_twilio_reads_text_without_last_as_false() -> None:
    message = decode_received('{"type":"text","token":"Hi"}')  # raw: no "last" on the wire
    assert isinstance(message, Text) and message.last is False


def test_the_64107_error_quotes_the_frame() -> None:
    assert invalid_message("not json").description == (
        "Invalid message received, code: 64107, not json"
    )
    assert invalid_message(b"ab").code == 64107
    assert "<2 bytes of binary data>" in invalid_message(b"ab").description


# ------------------------------------------------------------------------ malformed frames


def test_each_bad_frame_gets_an_error_and_ten_in_a_row_close_with_1007() -> None:
    twilio, _ = side()
    for _ in range(9):
        twilio.receive_data('{"type":"text"}')  # raw on purpose: malformed
    twilio.receive_data(text("ok"))  # a good frame resets the count
    assert twilio.malformed == 0 and twilio.close_to_send is None
    for _ in range(10):
        twilio.receive_data("nope")
    frames = sent(twilio)
    assert len(frames) == 19 and all(f[0] == "error" for f in frames)
    assert twilio.close_to_send == (1007, MALFORMED_REASON)
    invalid = [e for e in twilio.events_received() if isinstance(e, Invalid)]
    assert len(invalid) == 19 and invalid[-1].frame == "nope"
    assert invalid[-1].reason.startswith("not JSON")


# --------------------------------------------------------------------------- talk cycles


def test_a_talk_cycle_ends_at_last_true_with_speaker_events() -> None:
    twilio, clock = side(events=EVERY_EVENT)
    reply = twilio.end_speech("hello")
    assert sent(twilio) == [("prompt", "hello", "en-US", True)]
    clock.now += 0.2
    for token in ["Hi", " there.", " How", " can I help?"]:
        twilio.receive_data(text(token))
    assert reply.speaking and twilio.speaking() is reply
    twilio.receive_data(text("", last=True))
    assert reply.done and reply.text == "Hi there. How can I help?" and reply.tokens == 4
    assert reply.first_token_ms == pytest.approx(200)
    assert sent(twilio) == [
        ("info", "agentSpeaking", "on"),
        ("info", "tokensPlayed", "Hi there."),  # one per sentence, as Twilio synthesises
        ("info", "tokensPlayed", " How can I help?"),
        ("info", "agentSpeaking", "off"),
    ]
    events = twilio.events_received()
    assert [type(e) for e in events] == [TokenHeard] * 4 + [ReplyDone]
    assert events[-1] == ReplyDone(reply) and events[0] == TokenHeard(reply, "Hi")


def test_a_filler_cycle_does_not_end_the_reply() -> None:
    twilio, _ = side()
    reply = twilio.end_speech("look it up")
    twilio.receive_data(text("One moment.", last=True, preemptible=True))
    assert not reply.done
    twilio.receive_data(text("Found it.", last=True))
    assert reply.done and reply.text == "One moment.Found it."


def test_play_digits_language_and_end_belong_to_the_reply() -> None:
    twilio, _ = side(events=EVERY_EVENT)
    reply = twilio.end_speech("hi")
    twilio.receive_data(encode(Play(source="https://x/a.mp3")))
    twilio.receive_data(encode(SendDigits(digits="12#")))
    twilio.receive_data(encode(Language(transcription_language="sv-SE")))
    assert (reply.plays, reply.digits) == (["https://x/a.mp3"], ["12#"])
    assert reply.languages == [{"transcriptionLanguage": "sv-SE"}] and twilio.lang == "sv-SE"
    twilio.receive_data(encode(End(handoff_data='{"a":1}')))
    assert twilio.end == End(handoff_data='{"a":1}')
    assert twilio.close_to_send == (1000, "Closing websocket session")
    assert ("info", "tokensPlayed", "12#") in sent(twilio)  # sendDigits echoed as tokensPlayed


# ------------------------------------------------------------------------------ barge-in


def test_barge_in_in_twilios_order_with_what_was_heard() -> None:
    twilio, clock = side(events=EVERY_EVENT)
    reply = twilio.end_speech("is my order here", barge_after=3)
    sent(twilio)
    twilio.receive_data(text("Let"))
    clock.now += 0.5  # exact in binary: the duration is whole milliseconds
    for token in [" me", " check", " that"]:
        twilio.receive_data(text(token))
    assert reply.interrupted and reply.done and reply.text == "Let me check"
    assert reply.received == "Let me check that"
    assert sent(twilio) == [
        ("info", "agentSpeaking", "on"),
        ("info", "clientSpeaking", "on"),
        ("info", "tokensPlayed", "Let me check"),
        ("interrupt", "Let me check", 500),
        ("info", "agentSpeaking", "off"),
    ]
    twilio.receive_data(text(" for", last=False))  # in flight: never spoken
    twilio.receive_data(text("", last=True))
    assert reply.late_tokens == 1 and reply.text == "Let me check"
    after = twilio.end_speech("thanks")
    twilio.receive_data(text("Welcome.", last=True))
    assert after.done and after.text == "Welcome."


def test_speech_over_the_agent_is_dropped_when_the_twiml_says_so() -> None:
    twilio, _ = side(interruptible=frozenset({"dtmf"}), report_input_text="none")
    reply = twilio.end_speech("hi")
    twilio.receive_data(text("Hello"))
    assert twilio.begin_speech(partials=False) is None
    (dropped,) = twilio.events_received()[-1:]
    assert isinstance(dropped, Dropped)
    assert "reportInputDuringAgentSpeech='none'" in dropped.reason
    assert not reply.interrupted
    assert twilio.interrupt() is False  # speech cannot interrupt under this TwiML


def test_keys_need_dtmf_detection_and_barge_in_when_allowed() -> None:
    twilio, _ = side()
    assert twilio.begin_keys() is False
    twilio, _ = side(dtmf_detection=True)
    assert twilio.begin_keys() is True
    first = twilio.press("1")
    assert first is not None
    twilio.receive_data(text("You pressed"))
    second = twilio.press("2")
    assert first.interrupted and first.text == "You pressed"
    assert second is not None and second.input == "dtmf 2"
    assert [f[0] for f in sent(twilio)] == ["dtmf", "interrupt", "dtmf"]


def test_a_silent_reply_is_superseded_and_a_cut_cycle_goes_stale() -> None:
    twilio, clock = side()
    silent = twilio.end_speech("one")
    later = twilio.end_speech("two")
    twilio.begin_speech(partials=False)
    assert silent.superseded and silent.error == "superseded by the caller's next input"
    assert later.superseded
    cut = twilio.end_speech("three")
    twilio.receive_data(text("Sure"))
    assert twilio.interrupt()
    clock.now += STALE_WINDOW + 0.1  # the agent never closed the cut cycle
    twilio.receive_data(text("Unasked.", last=True))
    unsolicited = twilio.replies[-1]
    assert cut.late_tokens == 0 and not unsolicited.solicited
    assert unsolicited.text == "Unasked."


def test_a_closed_socket_ends_open_replies_with_an_error() -> None:
    twilio, _ = side()
    reply = twilio.end_speech("hi")
    twilio.connection_closed()
    assert reply.done and reply.error == "the call ended before the reply finished"
