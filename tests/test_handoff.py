"""HandoffData (``relay_server.protocol.handoff``): pure parsing, no event loop."""

from __future__ import annotations

import json

import pytest

from relay_server.protocol import ProtocolError
from relay_server.protocol.handoff import (
    LIVE_AGENT_HANDOFF,
    HandoffData,
    HandoffDataError,
    encode_handoff,
    parse_handoff,
    wants_person,
)


def test_the_agents_own_shape_parses_to_a_typed_value():
    sent = {"reasonCode": "live-agent-handoff", "reason": "billing", "summary": "a refund"}
    data = parse_handoff(json.dumps(sent))
    assert data == HandoffData(
        reason_code=LIVE_AGENT_HANDOFF, reason="billing", handoff=False, fields=sent
    )
    assert data.wants_person


@pytest.mark.parametrize(
    ("text", "wanted"),
    [
        ('{"handoff": true}', True),
        ('{"handoff": "yes"}', True),
        ('{"handoff": 0}', False),
        ('{"handoff": {}}', False),
        ('{"reasonCode": "end-of-call"}', False),
        ('{"reasonCode": 7, "handoff": [1]}', True),
        ("{}", False),
    ],
)
def test_an_object_asks_for_a_person_by_reason_code_or_a_truthy_handoff(text, wanted):
    assert parse_handoff(text).wants_person is wanted
    assert wants_person(text) is wanted


def test_fields_of_other_types_are_kept_but_not_taken_as_the_named_ones():
    data = parse_handoff('{"reasonCode": 7, "reason": ["a"], "extra": null}')
    assert data.reason_code is None and data.reason is None
    assert data.fields == {"reasonCode": 7, "reason": ["a"], "extra": None}


@pytest.mark.parametrize("text", ["please put me through to a person", "{not json", '{"a":1'])
def test_malformed_json_is_an_error_that_says_so(text):
    with pytest.raises(HandoffDataError, match="HandoffData is not JSON") as caught:
        parse_handoff(text)
    assert caught.value.not_json
    assert isinstance(caught.value, ProtocolError)  # the protocol's one root
    # free text from a custom agent: taken as a request for a person
    assert wants_person(text)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("[1, 2]", "array"),
        ('"a person"', "string"),
        ("42", "number"),
        ("1.5", "number"),
        ("true", "boolean"),
        ("null", "null"),
    ],
)
def test_json_that_is_not_an_object_is_an_error_naming_what_it_is(text, kind):
    with pytest.raises(HandoffDataError, match=f"a JSON {kind}, not an object") as caught:
        parse_handoff(text)
    assert not caught.value.not_json
    assert not wants_person(text)


def test_json_nested_too_deeply_is_an_error_not_a_recursion_error():
    text = "[" * 100_000 + "]" * 100_000
    with pytest.raises(HandoffDataError) as caught:
        parse_handoff(text)
    assert caught.value.not_json


@pytest.mark.parametrize("text", [None, ""])
def test_no_handoff_data_asks_for_nobody(text):
    assert not wants_person(text)


def test_an_object_is_encoded_as_the_relay_has_always_sent_it():
    fields = {"reasonCode": "live-agent-handoff", "reason": "billing", "n": 2}
    text = encode_handoff(fields)
    assert text == '{"reasonCode": "live-agent-handoff", "reason": "billing", "n": 2}'
    assert parse_handoff(text).fields == fields
