"""The relay's ``POST /calls``: a real relay creating calls on the stateful fake of Twilio's API.

Every request the relay makes to the fake is replayed against Prism on Twilio's contract
(``contract``); the form is the one ``crctl dial`` sends for the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from relay_server.config import TwilioAccount
from relay_server.dialing import call_request
from tests.support import PUBLIC_URL, RelayServer, config

TO, FROM = "+18089255327", "+18089255328"
TOKEN = "api-test-token"
pytestmark = pytest.mark.usefixtures("contract")


def account(fake: Any) -> TwilioAccount:
    return TwilioAccount(fake.account_sid, fake.account_sid, fake.auth_token, fake.base_url)


def post_call(relay: RelayServer, body: Any, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(relay.base_url + "/calls", json=body, headers=headers, timeout=30)


@pytest.fixture
def relay(fake_twilio: Any, tmp_path: Path) -> Any:
    fake_twilio.add_number(FROM)
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[route]]\nname = "sales"\nnumbers = ["{FROM}"]\n\n[[route]]\nname = "support"\n'
    )
    cfg = config(
        events_db=None,
        api_token=TOKEN,
        twilio_account=account(fake_twilio),
        routes_file=str(routes),
    )
    with RelayServer(cfg) as server:
        yield server


def test_post_calls_creates_the_call_crctl_dial_would(relay: RelayServer, fake_twilio: Any) -> None:
    body = {
        "to": TO,
        "from": FROM,
        "route": "sales",
        "params": {"order": "42"},
        "machine_detection": "DetectMessageEnd",
    }
    answer = post_call(relay, body)
    assert answer.status_code == 201, answer.text
    (sid,) = fake_twilio.calls
    assert answer.json() == {"call_sid": sid, "status": "queued", "to": TO}
    (request,) = fake_twilio.requests_to("POST", r"/Calls\.json$")
    same = call_request(
        PUBLIC_URL,
        TO,
        FROM,
        route="sales",
        params={"order": "42"},
        machine_detection="DetectMessageEnd",
    )
    assert list(request.form.items()) == list(_multi(same.form()).items())
    assert request.form["Url"] == PUBLIC_URL + "/twiml?route=sales&param_order=42"
    assert request.form["AsyncAmdStatusCallback"] == PUBLIC_URL + "/amd"


def _multi(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            out[key] = [*out[key], value] if isinstance(out[key], list) else [out[key], value]
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    ("to", "from_", "code", "fix"),
    [
        ("12345", FROM, 21211, "E.164"),
        ("+447700900123", FROM, 21215, "Geo permissions"),
        (TO, "+15550000000", 21210, "verified caller IDs"),
    ],
    ids=["21211", "21215", "21210"],
)
def test_twilio_refusals_come_back_as_json_with_the_code_and_the_fix(
    relay: RelayServer, fake_twilio: Any, to: str, from_: str, code: int, fix: str
) -> None:
    answer = post_call(relay, {"to": to, "from": from_})
    assert answer.status_code == 400
    data = answer.json()
    assert data["code"] == code and fix in data["fix"]
    assert data["error"].startswith(f"calling {to} failed: Twilio error {code}: ")
    assert data["error"].endswith(data["fix"])
    assert fake_twilio.calls == {}


def test_a_trial_account_calling_an_unverified_number(relay: RelayServer, fake_twilio: Any) -> None:
    fake_twilio.trial = True
    answer = post_call(relay, {"to": TO, "from": FROM})
    assert answer.status_code == 400 and answer.json()["code"] == 21219
    fake_twilio.verified_caller_ids.add(TO)
    assert post_call(relay, {"to": TO, "from": FROM}).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ([], 400, "JSON object"),
        ({"to": TO}, 400, "from: required"),
        ({"to": TO, "from": FROM, "rout": "x"}, 400, "unknown key 'rout'"),
        ({"to": TO, "from": FROM, "params": ["a"]}, 400, "params:"),
        ({"to": TO, "from": FROM, "params": {"crctl_route": "x"}}, 400, "are the relay's own"),
        ({"to": TO, "from": FROM, "agent": "echo"}, 400, "unknown key 'agent'"),
        ({"to": TO, "from": FROM, "machine_detection": "yes"}, 400, "Enable or DetectMessageEnd"),
        (
            {"to": TO, "from": FROM, "route": "sale"},
            400,
            "route: no route 'sale'; did you mean 'sales'? (routes: sales, support)",
        ),
        ({"to": TO, "from": FROM, "route": "night"}, 400, "(routes: sales, support)"),
    ],
)
def test_bad_requests_are_refused_before_twilio_sees_them(
    relay: RelayServer, fake_twilio: Any, body: Any, status: int, words: str
) -> None:
    answer = post_call(relay, body)
    assert answer.status_code == status
    assert words in answer.json()["error"]
    assert fake_twilio.requests == []


def test_a_routes_number_is_its_caller_id(relay: RelayServer, fake_twilio: Any) -> None:
    answer = post_call(relay, {"to": TO, "route": "sales"})  # no "from": the route's number
    assert answer.status_code == 201, answer.text
    (request,) = fake_twilio.requests_to("POST", r"/Calls\.json$")
    assert (request.form["From"], request.form["Url"]) == (FROM, PUBLIC_URL + "/twiml?route=sales")
    no_number = post_call(relay, {"to": TO, "route": "support"})  # a route without numbers
    assert no_number.status_code == 400 and no_number.json()["error"].startswith("from: required")


def test_a_route_on_a_relay_without_routes_is_refused(fake_twilio: Any) -> None:
    # the call would otherwise ring and get the default agent, the route silently lost
    fake_twilio.add_number(FROM)
    cfg = config(events_db=None, api_token=TOKEN, twilio_account=account(fake_twilio))
    with RelayServer(cfg) as relay:
        answer = post_call(relay, {"to": TO, "from": FROM, "route": "sales"})
        assert post_call(relay, {"to": TO, "from": FROM, "route": ""}).status_code == 201
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        "route 'sales': this relay has no routes (crctl serve --routes FILE): leave route out"
    )
    assert len(fake_twilio.calls) == 1  # the call without a route only


def test_the_api_token_is_required(relay: RelayServer, fake_twilio: Any) -> None:
    assert post_call(relay, {"to": TO, "from": FROM}, token=None).status_code == 401
    assert post_call(relay, {"to": TO, "from": FROM}, token="wrong").status_code == 401
    assert fake_twilio.requests == []


def test_a_relay_without_credentials_says_what_to_set(fake_twilio: Any) -> None:
    with RelayServer(config(events_db=None, api_token=TOKEN)) as relay:
        answer = post_call(relay, {"to": TO, "from": FROM})
    assert answer.status_code == 503
    assert "TWILIO_ACCOUNT_SID" in answer.json()["error"]
    assert fake_twilio.requests == []


def test_the_relays_wrong_credentials_are_a_502_saying_what_to_check(
    fake_twilio: Any, contract: Any
) -> None:
    wrong = TwilioAccount(
        fake_twilio.account_sid, fake_twilio.account_sid, "x", fake_twilio.base_url
    )
    with RelayServer(config(events_db=None, api_token=TOKEN, twilio_account=wrong)) as relay:
        answer = post_call(relay, {"to": TO, "from": FROM})
    contract.exclude(*fake_twilio.requests)  # unauthenticated on purpose
    assert answer.status_code == 502  # not the application's request: the relay's setting
    error = answer.json()["error"]
    assert error.startswith(f"calling {TO} failed: Twilio error 20003: ")
    assert "check the relay's" in error and "TWILIO_AUTH_TOKEN" in error
    assert fake_twilio.calls == {}


def test_twilio_unreachable_is_a_502_with_one_line(fake_twilio: Any) -> None:
    cfg = config(events_db=None, api_token=TOKEN, twilio_account=account(fake_twilio))
    with RelayServer(cfg) as relay:
        fake_twilio.down()
        try:
            answer = post_call(relay, {"to": TO, "from": FROM})
        finally:
            fake_twilio.up()
    assert answer.status_code == 502
    assert "cannot reach Twilio" in answer.json()["error"]


def test_serve_settings_give_the_relay_its_account(monkeypatch: pytest.MonkeyPatch) -> None:
    from crctl.settings import load_settings

    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "1" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "tok")
    monkeypatch.setenv("CRCTL_TWILIO_API_URL", "http://127.0.0.1:4010/")
    monkeypatch.setenv("CRCTL_MACHINE_MESSAGE", "Call us back.")
    relay_config = load_settings().relay_config()
    assert relay_config.twilio_account == TwilioAccount(
        "AC" + "1" * 32, "AC" + "1" * 32, "tok", "http://127.0.0.1:4010"
    )
    assert relay_config.agent_config.machine_message == "Call us back."
    monkeypatch.setenv("TWILIO_API_KEY", "SK" + "2" * 32)
    monkeypatch.setenv("TWILIO_API_SECRET", "secret")
    keyed = load_settings().relay_config().twilio_account
    assert keyed is not None and (keyed.username, keyed.password) == ("SK" + "2" * 32, "secret")
