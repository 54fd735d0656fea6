"""The webhook prologue (``relay_server.webhooks``) in-process, over Quart's test client.

The signature is checked over the configured public URL, the route's path and the raw query; a
refused request never reaches the route; bodies are bounded before they are read. The same rules
over real sockets: ``test_http.py`` and ``test_harden_http.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client  # (as: not a test class)

from relay_server import EchoAgent, RelayConfig, create_app
from relay_server.state import relay_state
from relay_server.webhooks import BODY_MAX_BYTES, Fields, twilio_webhook
from tests.support import AUTH_TOKEN, PUBLIC_URL, sign

CA1 = "CA" + "1" * 32
FORM = {"CallSid": CA1, "CallStatus": "completed"}


class Probe:
    """A relay app with one extra webhook, ``/probe``, that records the fields it is given."""

    def __init__(self, **overrides: Any) -> None:
        settings: dict[str, Any] = {"public_url": PUBLIC_URL, "auth_token": AUTH_TOKEN}
        config = RelayConfig(**{**settings, **overrides})
        self.app: Quart = create_app(config, agent=EchoAgent)
        self.seen: list[dict[str, list[str]]] = []

        @self.app.route("/probe", methods=["GET", "POST"])
        @twilio_webhook
        async def probe(fields: Fields) -> str:
            self.seen.append(fields.to_dict(flat=False))
            return "reached"


@pytest.fixture
async def probe() -> AsyncIterator[tuple[Probe, Client]]:
    made = Probe()
    async with made.app.test_app() as test_app:
        yield made, test_app.test_client()


async def test_a_signed_post_reaches_the_route_with_its_form(probe):
    made, client = probe
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/probe", FORM)}
    response = await client.post("/probe", form=FORM, headers=headers)
    assert response.status_code == 200
    assert await response.get_data(as_text=True) == "reached"
    assert made.seen == [{"CallSid": [CA1], "CallStatus": ["completed"]}]


async def test_a_signed_get_is_signed_over_its_query_and_gets_the_query_as_fields(probe):
    made, client = probe
    query = {"CallSid": CA1, "From": "+15550100"}
    headers = {"X-Twilio-Signature": sign(f"{PUBLIC_URL}/probe?CallSid={CA1}&From=%2B15550100")}
    response = await client.get("/probe", query_string=query, headers=headers)
    assert response.status_code == 200
    assert made.seen == [{"CallSid": [CA1], "From": ["+15550100"]}]


@pytest.mark.parametrize(
    "signature",
    [
        None,  # missing
        "",  # empty
        sign(PUBLIC_URL + "/probe", {**FORM, "CallStatus": "ringing"}),  # over other fields
        sign("http://localhost/probe", FORM),  # over the URL the relay sees, not the public one
        sign(PUBLIC_URL + "/twiml", FORM),  # over another route's path
        sign(PUBLIC_URL + "/probe", FORM, token="another-auth-token"),  # another account's
    ],
)
async def test_a_refused_webhook_gets_403_and_never_reaches_the_route(probe, caplog, signature):
    made, client = probe
    headers = {} if signature is None else {"X-Twilio-Signature": signature}
    response = await client.post("/probe", form=FORM, headers=headers)
    assert response.status_code == 403
    assert await response.get_data(as_text=True) == "forbidden\n"
    assert made.seen == []
    refusals = [r.getMessage() for r in caplog.records if r.name == "relay_server.webhooks"]
    assert refusals == [
        f"refused POST /probe: bad or missing X-Twilio-Signature (checked {PUBLIC_URL}/probe)"
    ]


async def test_a_query_not_covered_by_the_signature_is_refused(probe):
    made, client = probe
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/probe", FORM)}
    response = await client.post("/probe?x=1", form=FORM, headers=headers)
    assert response.status_code == 403
    assert made.seen == []


@pytest.mark.parametrize("overrides", [{"verify_signatures": False}, {"auth_token": None}])
async def test_without_signature_checks_every_request_reaches_the_route(overrides):
    made = Probe(**overrides)
    assert relay_state(made.app).checker is None
    async with made.app.test_app() as test_app:
        response = await test_app.test_client().post("/probe", form=FORM)
    assert response.status_code == 200
    assert made.seen == [{"CallSid": [CA1], "CallStatus": ["completed"]}]


async def test_a_body_over_the_bound_is_refused_with_413_before_the_signature(probe, caplog):
    """Signed or not, a body larger than the bound is never parsed: 413 and one log line."""
    made, client = probe
    form = {**FORM, "Junk": "x" * BODY_MAX_BYTES}
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/probe", form)}
    response = await client.post("/probe", form=form, headers=headers)
    assert response.status_code == 413
    assert await response.get_json() == {
        "error": f"request body too large: at most {BODY_MAX_BYTES} bytes"
    }
    assert made.seen == []
    assert any(
        r.name == "relay_server.webhooks" and r.getMessage().startswith("refused POST /probe")
        for r in caplog.records
    )


async def test_a_body_just_within_the_bound_is_served(probe):
    made, client = probe
    form = {**FORM, "Junk": ""}
    room = BODY_MAX_BYTES - len("CallSid=&CallStatus=completed&Junk=") - len(CA1)
    form["Junk"] = "y" * room
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + "/probe", form)}
    response = await client.post("/probe", form=form, headers=headers)
    assert response.status_code == 200
    assert made.seen[0]["Junk"] == ["y" * room]


async def test_the_bound_grows_with_a_larger_frame_limit():
    """Pushed messages may be a frame long, so a frame limit above 64 KiB raises the bound."""
    made = Probe(max_frame_bytes=BODY_MAX_BYTES * 2)
    assert made.app.config["MAX_CONTENT_LENGTH"] == BODY_MAX_BYTES * 2
    assert Probe().app.config["MAX_CONTENT_LENGTH"] == BODY_MAX_BYTES
