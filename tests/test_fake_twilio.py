"""The fake Twilio REST API, driven by the real twilio SDK, and the Prism contract check."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import pytest
import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from fakes.fake_twilio import TWILIO_API_BASE, FakeTwilio, RecordedRequest, contains_regex
from fakes.prism import FORM, Prism, patch_spec

if TYPE_CHECKING:
    from fakes.twilio_fixtures import ContractCheck, TwilioEnv

pytest_plugins = ["pytester", "fakes.twilio_fixtures"]

OTHER_APP = "AP" + "9" * 32
MISSING_PN = "PN" + "0" * 32


class RewritingHttpClient(TwilioHttpClient):
    """Sends the SDK's ``https://api.twilio.com`` requests to another base URL."""

    def __init__(self, base_url: str) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        assert self.session is not None
        self.session.trust_env = False  # no proxy from the environment for 127.0.0.1

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        if url.startswith(TWILIO_API_BASE):
            url = self.base_url + url[len(TWILIO_API_BASE) :]
        return super().request(method, url, *args, **kwargs)


def sdk(fake: FakeTwilio, username: str | None = None, password: str | None = None) -> Client:
    """The twilio SDK on the fake; the account's SID and auth token unless told otherwise."""
    return Client(
        username or fake.account_sid,
        password or fake.auth_token,
        fake.account_sid,
        http_client=RewritingHttpClient(fake.base_url),
    )


@pytest.fixture
def client(fake_twilio: FakeTwilio) -> Client:
    return sdk(fake_twilio)


def raw(fake: FakeTwilio, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A request outside the SDK (to send what the SDK would not)."""
    kwargs.setdefault("auth", (fake.account_sid, fake.auth_token))
    with requests.Session() as session:
        session.trust_env = False
        return session.request(method, fake.base_url + path, timeout=5, **kwargs)


def twilio_error(exc: TwilioException) -> tuple[int, int, str]:
    """(HTTP status, Twilio code, Twilio's message) of an SDK exception.

    fetch/create/update/delete raise TwilioRestException, its ``msg`` prefixed with "Unable
    to create record: "...; list calls raise a plain TwilioException("Unable to fetch page",
    response), Twilio's error body in the response.
    """
    if isinstance(exc, TwilioRestException):
        return exc.status, exc.code, exc.msg.partition("record: ")[2] or exc.msg
    body = json.loads(exc.args[1].text)
    return body["status"], body["code"], body["message"]


# ---- accounts and credentials ------------------------------------------------------


def test_account_fetch_full_then_trial(fake_twilio: FakeTwilio, client: Client) -> None:
    account = client.api.v2010.accounts(fake_twilio.account_sid).fetch()
    assert (account.sid, account.status, account.type) == (
        fake_twilio.account_sid,
        "active",
        "Full",
    )
    assert account.friendly_name == "crctl test account"
    assert account.date_created is not None  # RFC 2822 parsed by the SDK
    fake_twilio.trial = True
    assert client.api.v2010.accounts(fake_twilio.account_sid).fetch().type == "Trial"


def test_api_key_auth_works_and_bad_credentials_get_20003(fake_twilio: FakeTwilio) -> None:
    with_key = sdk(fake_twilio, fake_twilio.api_key, fake_twilio.api_secret)
    assert (
        with_key.api.v2010.accounts(fake_twilio.account_sid).fetch().sid == fake_twilio.account_sid
    )
    bad = (
        (fake_twilio.account_sid, "wrong"),
        (fake_twilio.api_key, "wrong"),
        ("SK" + "1" * 32, "x"),
    )
    for user, password in bad:
        with pytest.raises(TwilioException) as excinfo:
            sdk(fake_twilio, user, password).incoming_phone_numbers.list(limit=5)
        assert twilio_error(excinfo.value) == (401, 20003, "Authenticate")
    resp = raw(fake_twilio, "GET", f"{fake_twilio.account_path}.json", auth=None)
    assert resp.status_code == 401
    assert resp.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }
    other_account = "/2010-04-01/Accounts/AC" + "f" * 32 + "/IncomingPhoneNumbers.json"
    assert raw(fake_twilio, "GET", other_account).json()["code"] == 20003


def test_unknown_sids_and_paths_get_20404(fake_twilio: FakeTwilio, client: Client) -> None:
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers(MISSING_PN).fetch()
    path = f"{fake_twilio.account_path}/IncomingPhoneNumbers/{MISSING_PN}.json"
    assert twilio_error(excinfo.value) == (
        404,
        20404,
        f"The requested resource {path} was not found",
    )
    with pytest.raises(TwilioException) as excinfo:
        client.applications(OTHER_APP).delete()
    assert twilio_error(excinfo.value)[1] == 20404
    resp = raw(fake_twilio, "GET", f"{fake_twilio.account_path}/Nothing.json")
    assert resp.status_code == 404
    assert set(resp.json()) == {"code", "message", "more_info", "status"}


# ---- available numbers -----------------------------------------------------------------


def test_available_numbers_search_filters(fake_twilio: FakeTwilio, client: Client) -> None:
    us = client.available_phone_numbers("US")
    every = us.local.list()
    assert len(every) == 6
    assert any(not n.capabilities["voice"] for n in every)  # one SMS-only number
    voice = us.local.list(voice_enabled=True)
    assert len(voice) == 5 and all(n.capabilities["voice"] for n in voice)
    sf = us.local.list(area_code=415, voice_enabled=True)
    assert [n.phone_number for n in sf] == ["+14155550101", "+14155550102"]
    assert sf[0].friendly_name == "(415) 555-0101" and sf[0].locality == "San Francisco"
    assert [n.phone_number for n in us.local.list(contains="CALL")] == ["+16465552255"]
    assert [n.phone_number for n in us.local.list(contains="555*1**")] == [
        "+14155550101",
        "+14155550102",
        "+12125550143",
        "+13125550177",
        "+15125550188",
    ]
    assert [n.phone_number for n in us.local.list(area_code=312, voice_enabled=True)] == []
    assert len(us.local.list(limit=2)) == 2
    assert len(us.toll_free.list(voice_enabled=True)) == 2
    gb = client.available_phone_numbers("GB").mobile.list(sms_enabled=True)
    assert [n.phone_number for n in gb] == ["+447700900123"]
    assert client.available_phone_numbers("GB").local.list() == []  # known country, none
    with pytest.raises(TwilioException) as excinfo:
        client.available_phone_numbers("ZZ").local.list()
    assert twilio_error(excinfo.value)[:2] == (404, 20404)
    search = fake_twilio.requests_to("GET", r"/US/Local\.json$")[2]
    assert search.query == {"AreaCode": "415", "VoiceEnabled": "true"}


def test_contains_pattern() -> None:
    assert contains_regex("CALL").pattern == "2255"
    assert contains_regex("4*5").pattern == r"4\d5"


# ---- incoming phone numbers ---------------------------------------------------------------


def test_buy_list_update_detach_release(fake_twilio: FakeTwilio, client: Client) -> None:
    app = client.applications.create(friendly_name="crctl relay")
    number = client.incoming_phone_numbers.create(
        phone_number="+14155550101",
        voice_url="https://relay.example.com/twiml",
        voice_method="POST",
        status_callback="https://relay.example.com/status",
        friendly_name="crctl demo",
    )
    assert number.sid.startswith("PN") and len(number.sid) == 34
    assert (number.phone_number, number.friendly_name) == ("+14155550101", "crctl demo")
    assert number.voice_url == "https://relay.example.com/twiml"
    assert number.status_callback == "https://relay.example.com/status"
    assert number.capabilities == {"voice": True, "sms": True, "mms": True, "fax": False}
    assert number.api_version == "2010-04-01" and number.account_sid == fake_twilio.account_sid
    assert number.date_created is not None and number.type == "local"
    still_available = client.available_phone_numbers("US").local.list()
    assert "+14155550101" not in [n.phone_number for n in still_available]

    fake_twilio.add_number("+15005550006", friendly_name="other")
    listed = client.incoming_phone_numbers.list(phone_number="+14155550101")
    assert [n.sid for n in listed] == [number.sid]
    assert [n.sid for n in client.incoming_phone_numbers.list(friendly_name="crctl demo")] == [
        number.sid
    ]
    assert len(client.incoming_phone_numbers.list()) == 2

    updated = client.incoming_phone_numbers(number.sid).update(
        voice_application_sid=app.sid,
        voice_fallback_url="https://fallback.example.com/twiml",
        voice_method="GET",
        status_callback_method="GET",
    )
    assert updated.voice_application_sid == app.sid
    assert (updated.voice_method, updated.status_callback_method) == ("GET", "GET")
    assert updated.voice_fallback_url == "https://fallback.example.com/twiml"
    assert updated.voice_url == "https://relay.example.com/twiml"  # untouched
    detached = client.incoming_phone_numbers(number.sid).update(voice_application_sid="")
    assert detached.voice_application_sid == ""
    assert fake_twilio.numbers[number.sid]["voice_application_sid"] == ""
    update = fake_twilio.requests_to("POST", number.sid)[-1]
    assert update.form == {"VoiceApplicationSid": ""} and update.status == 200

    assert client.incoming_phone_numbers(number.sid).delete() is True
    assert number.sid not in fake_twilio.numbers
    assert fake_twilio.requests[-1].status == 204
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers(number.sid).fetch()
    assert twilio_error(excinfo.value)[1] == 20404


def test_buy_by_area_code_and_an_owned_number_again(
    fake_twilio: FakeTwilio, client: Client
) -> None:
    number = client.incoming_phone_numbers.create(area_code="212")
    assert number.phone_number == "+12125550143"
    again = client.incoming_phone_numbers.create(
        phone_number="+12125550143", voice_url="https://relay.example.com/twiml"
    )
    assert again.sid == number.sid and again.voice_url == "https://relay.example.com/twiml"
    assert len(fake_twilio.numbers) == 1
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers.create(area_code="999")
    assert twilio_error(excinfo.value)[1] == 21452


def test_unavailable_number_is_21452(fake_twilio: FakeTwilio, client: Client) -> None:
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers.create(phone_number="+19995550100")
    assert twilio_error(excinfo.value) == (400, 21452, "Number +19995550100 is not available")
    assert fake_twilio.numbers == {}


def test_trial_account_limit(fake_twilio: FakeTwilio, client: Client) -> None:
    fake_twilio.trial = True
    client.incoming_phone_numbers.create(phone_number="+18005550199")
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers.create(phone_number="+14155550102")
    assert twilio_error(excinfo.value) == (
        400,
        21404,
        "Trial accounts are allowed only one Twilio number. "
        "To purchase additional numbers, please upgrade your account.",
    )
    assert [n["type"] for n in fake_twilio.numbers.values()] == ["toll-free"]


def test_bad_values_are_refused_like_twilio(fake_twilio: FakeTwilio, client: Client) -> None:
    sid = fake_twilio.add_number("+15005550006")["sid"]
    cases: list[tuple[dict[str, Any], int]] = [
        ({"voice_url": "http://localhost:8080/twiml"}, 21402),
        ({"status_callback": "not a url"}, 21402),
        ({"voice_method": "PUT"}, 21403),
        ({"voice_application_sid": OTHER_APP}, 22108),
    ]
    for fields, code in cases:
        with pytest.raises(TwilioException) as excinfo:
            client.incoming_phone_numbers(sid).update(**fields)
        assert twilio_error(excinfo.value)[:2] == (400, code), fields
    assert fake_twilio.numbers[sid]["voice_url"] is None  # nothing applied
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers.create(
            phone_number="+14155550102", voice_application_sid=OTHER_APP
        )
    assert twilio_error(excinfo.value)[1] == 21420


def test_lists_page_like_twilio(fake_twilio: FakeTwilio, client: Client) -> None:
    for i in range(5):
        fake_twilio.add_number(f"+1500555000{i}")
    assert len(client.incoming_phone_numbers.list(page_size=2)) == 5  # SDK follows next_page_uri
    assert len(fake_twilio.requests_to("GET", "IncomingPhoneNumbers")) == 3
    path = f"{fake_twilio.account_path}/IncomingPhoneNumbers.json"
    body = raw(fake_twilio, "GET", path, params={"PageSize": 2, "Page": 1}).json()
    assert set(body) == {
        "incoming_phone_numbers",
        "first_page_uri",
        "next_page_uri",
        "previous_page_uri",
        "page",
        "page_size",
        "uri",
        "start",
        "end",
    }
    assert (body["page"], body["page_size"], body["start"], body["end"]) == (1, 2, 2, 3)
    assert body["first_page_uri"] == f"{path}?PageSize=2&Page=0"
    assert body["previous_page_uri"] == f"{path}?PageSize=2&Page=0"
    assert body["next_page_uri"].startswith(f"{path}?PageSize=2&Page=2&PageToken=PAPN")
    last = raw(fake_twilio, "GET", path, params={"PageSize": 2, "Page": 2}).json()
    assert (len(last["incoming_phone_numbers"]), last["next_page_uri"]) == (1, None)
    one = raw(fake_twilio, "GET", path, params={"PhoneNumber": "+15005550003"}).json()
    assert [n["phone_number"] for n in one["incoming_phone_numbers"]] == ["+15005550003"]
    assert one["next_page_uri"] is None and one["previous_page_uri"] is None
    assert one["uri"] == f"{path}?PhoneNumber=%2B15005550003&PageSize=50&Page=0"


# ---- applications ---------------------------------------------------------------------------


def test_applications_crud_and_friendly_name_filter(
    fake_twilio: FakeTwilio, client: Client
) -> None:
    fake_twilio.add_application("someone else's app")
    app = client.applications.create(
        friendly_name="crctl relay",
        voice_url="https://relay.example.com/twiml",
        voice_method="POST",
        status_callback="https://relay.example.com/status",
        status_callback_method="POST",
    )
    assert app.sid.startswith("AP") and app.account_sid == fake_twilio.account_sid
    assert (app.voice_url, app.status_callback) == (
        "https://relay.example.com/twiml",
        "https://relay.example.com/status",
    )
    assert [a.sid for a in client.applications.list(friendly_name="crctl relay")] == [app.sid]
    assert len(client.applications.list()) == 2
    assert client.applications.list(friendly_name="nope") == []
    assert client.applications(app.sid).fetch().friendly_name == "crctl relay"
    moved = client.applications(app.sid).update(voice_url="https://new.example.com/twiml")
    assert moved.voice_url == "https://new.example.com/twiml"
    number = fake_twilio.add_number("+15005550006", voice_application_sid=app.sid)
    assert client.applications(app.sid).delete() is True
    assert app.sid not in fake_twilio.applications
    assert number["voice_application_sid"] == ""  # the number no longer points at it


# ---- test controls ---------------------------------------------------------------------------


def test_fail_next_injects_one_error(fake_twilio: FakeTwilio, client: Client) -> None:
    sid = fake_twilio.add_number("+15005550006")["sid"]
    fake_twilio.fail_next("POST", r"/IncomingPhoneNumbers/PN", 400, 21402, "Invalid Url")
    app = client.applications.create(friendly_name="crctl relay")  # not matched
    with pytest.raises(TwilioException) as excinfo:
        client.incoming_phone_numbers(sid).update(voice_application_sid=app.sid)
    assert twilio_error(excinfo.value) == (400, 21402, "Invalid Url")
    assert fake_twilio.numbers[sid]["voice_application_sid"] == ""  # refused half-way
    assert fake_twilio.requests[-1].status == 400
    number = client.incoming_phone_numbers(sid).update(voice_application_sid=app.sid)
    assert number.voice_application_sid == app.sid  # only once


def test_down_refuses_connections_until_up(fake_twilio: FakeTwilio, client: Client) -> None:
    client.incoming_phone_numbers.list(limit=5)  # a pooled keep-alive connection exists
    fake_twilio.down()
    assert not fake_twilio.is_up
    with pytest.raises(requests.ConnectionError):
        client.incoming_phone_numbers.list(limit=5)
    with pytest.raises(requests.ConnectionError):
        sdk(fake_twilio).api.v2010.accounts(fake_twilio.account_sid).fetch()
    fake_twilio.up()
    assert client.incoming_phone_numbers.list(limit=5) == []


def test_recorded_requests(fake_twilio: FakeTwilio) -> None:
    resp = raw(
        fake_twilio,
        "POST",
        f"{fake_twilio.account_path}/Applications.json",
        params={"Debug": ["a", "b"]},
        data=[("FriendlyName", "x"), ("SmsUrl", "https://a.example.com"), ("SmsUrl", "")],
    )
    assert resp.status_code == 201
    rec = fake_twilio.requests[-1]
    assert (rec.method, rec.path, rec.status) == ("POST", resp.request.path_url.split("?")[0], 201)
    assert rec.query == {"Debug": ["a", "b"]}
    assert rec.form == {"FriendlyName": "x", "SmsUrl": ["https://a.example.com", ""]}
    assert rec.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert rec.headers["Authorization"].startswith("Basic ")
    assert rec.raw_query == "Debug=a&Debug=b" and rec.body.startswith(b"FriendlyName=x&")


def test_twilio_env(twilio_env: TwilioEnv, fake_twilio: FakeTwilio) -> None:
    assert os.environ["CRCTL_TWILIO_API_URL"] == fake_twilio.base_url
    assert os.environ["TWILIO_ACCOUNT_SID"] == fake_twilio.account_sid
    assert os.environ["TWILIO_AUTH_TOKEN"] == fake_twilio.auth_token
    assert os.environ["HOME"] == str(twilio_env.home) and not any(twilio_env.home.iterdir())
    assert "TWILIO_API_KEY" not in os.environ and "TWILIO_API_SECRET" not in os.environ


# ---- the OpenAPI contract ----------------------------------------------------------------------


def run_sdk_scenario(fake: FakeTwilio, client: Client) -> None:
    """Every call crctl makes, through the SDK (errors included)."""
    client.api.v2010.accounts(fake.account_sid).fetch()
    sdk(fake, fake.api_key, fake.api_secret).api.v2010.accounts(fake.account_sid).fetch()
    us = client.available_phone_numbers("US")
    us.local.list(area_code=415, voice_enabled=True, contains="555", limit=20)
    us.toll_free.list(voice_enabled=True, limit=20)
    client.available_phone_numbers("GB").mobile.list(voice_enabled=True, limit=20)
    app = client.applications.create(
        friendly_name="crctl relay",
        voice_url="https://relay.example.com/twiml",
        voice_method="POST",
        status_callback="https://relay.example.com/status",
        status_callback_method="POST",
    )
    client.applications.list(friendly_name="crctl relay", limit=50)
    client.applications(app.sid).update(voice_url="https://new.example.com/twiml")
    number = client.incoming_phone_numbers.create(
        phone_number="+14155550101", voice_application_sid=app.sid, friendly_name="crctl"
    )
    client.incoming_phone_numbers.list(phone_number="+14155550101", limit=50)
    client.incoming_phone_numbers(number.sid).update(
        voice_url="https://relay.example.com/twiml",
        voice_method="POST",
        voice_fallback_url="https://relay.example.com/fallback",
        status_callback="https://relay.example.com/status",
        status_callback_method="POST",
        friendly_name="crctl demo",
    )
    client.incoming_phone_numbers(number.sid).update(voice_application_sid="")  # detach
    client.incoming_phone_numbers(number.sid).fetch()
    with pytest.raises(TwilioException):
        client.incoming_phone_numbers.create(phone_number="+19995550100")  # 21452
    with pytest.raises(TwilioException):
        sdk(fake, password="wrong").incoming_phone_numbers.list(limit=5)  # 20003
    client.incoming_phone_numbers(number.sid).delete()
    client.applications(app.sid).delete()


def test_sdk_requests_conform_to_the_contract(
    fake_twilio: FakeTwilio, client: Client, prism: Prism
) -> None:
    run_sdk_scenario(fake_twilio, client)
    assert len(fake_twilio.requests) == 17
    assert prism.validate(fake_twilio.requests) == []


def test_contract_check_reports_wrong_requests(fake_twilio: FakeTwilio, prism: Prism) -> None:
    numbers = f"{fake_twilio.account_path}/IncomingPhoneNumbers"
    pn = fake_twilio.add_number("+15005550006")["sid"]
    typo = {"PhoneNumber": "+14155550102", "VoiceURL": "https://a.example.com/x"}
    raw(fake_twilio, "POST", f"{numbers}.json", data=typo)
    raw(fake_twilio, "POST", f"{numbers}/{pn}.json", data={"VoiceMethod": "PUT"})
    raw(fake_twilio, "POST", f"{numbers}/{pn}.json", data={"VoiceApplicationSid": "APnope"})
    raw(fake_twilio, "POST", f"{numbers}/{pn}.json", data={"StatusCallback": ""})
    raw(fake_twilio, "GET", f"{numbers}.json", params={"pagesize": 5})
    raw(fake_twilio, "GET", f"{numbers}.json", params={"PageSize": 5000})
    raw(fake_twilio, "PUT", f"{numbers}/{pn}.json", data={"VoiceUrl": "https://a.example.com/x"})
    raw(fake_twilio, "GET", f"{fake_twilio.account_path}/Nothing.json")
    raw(fake_twilio, "POST", f"{numbers}/{pn}.json", json={"VoiceUrl": "https://a.example.com/x"})
    assert [r.status for r in fake_twilio.requests] == [201, 400, 400, 200, 200, 200, 405, 404, 200]
    pn_path = f"POST {numbers}/{pn}.json"
    assert prism.validate(fake_twilio.requests) == [
        f"POST {numbers}.json: form parameter 'VoiceURL' is not in the contract",
        f"{pn_path}: Request body property VoiceMethod must be equal to one of the allowed "
        "values: GET, POST (sent 'PUT')",
        f"{pn_path}: Request body property VoiceApplicationSid must NOT have fewer than 34 "
        "characters (sent 'APnope')",
        f"{pn_path}: Request body property VoiceApplicationSid must match pattern "
        "\"^AP[0-9a-fA-F]{32}$\" (sent 'APnope')",
        # "" clears VoiceUrl (a known false positive) but not StatusCallback: still reported
        f"{pn_path}: Request body property StatusCallback must match format \"uri\" (sent '')",
        f"GET {numbers}.json: query parameter 'pagesize' is not in the contract",
        f"GET {numbers}.json: Request query parameter pagesize must be <= 1000 (sent '5000')",
        f"PUT {numbers}/{pn}.json: HTTP 405 Route resolved, but no method matched - The route "
        f'{numbers}/{pn}.json has been matched, but it does not have "put" method defined',
        f"GET {fake_twilio.account_path}/Nothing.json: HTTP 404 Route not resolved, no path "
        f"matched - The route {fake_twilio.account_path}/Nothing.json hasn't been found in the "
        "specification file",
        f"{pn_path}: HTTP 415 Invalid content type - Supported content types: "
        "application/x-www-form-urlencoded",
    ]


def test_contract_requires_credentials_and_valid_sids(
    fake_twilio: FakeTwilio, prism: Prism
) -> None:
    raw(fake_twilio, "GET", f"{fake_twilio.account_path}.json", auth=None)
    raw(fake_twilio, "GET", f"{fake_twilio.account_path}/Applications/APnope.json")
    problems = prism.validate(fake_twilio.requests)
    assert "HTTP 401 Invalid security scheme used" in problems[0]
    assert problems[-1].endswith('path parameter sid must match pattern "^AP[0-9a-fA-F]{32}$"')


def test_form_arrays_are_patched_for_prism(prism: Prism) -> None:
    spec = patch_spec(prism.spec)
    calls = spec["paths"]["/2010-04-01/Accounts/{AccountSid}/Calls.json"]["post"]
    media = calls["requestBody"]["content"][FORM]
    assert media["encoding"]["StatusCallbackEvent"] == {"style": "form", "explode": True}
    original = prism.spec["paths"]["/2010-04-01/Accounts/{AccountSid}/Calls.json"]["post"]
    assert "encoding" not in original["requestBody"]["content"][FORM]
    body = "To=%2B15005550006&From=%2B15005550001&Url=https%3A%2F%2Fa.example.com%2Fx"
    for events in ("", "&StatusCallbackEvent=initiated&StatusCallbackEvent=answered"):
        call = RecordedRequest(
            "POST",
            f"/2010-04-01/Accounts/AC{'a' * 32}/Calls.json",
            query={},
            form={"To": "+15005550006", "From": "+15005550001", "Url": "https://a.example.com/x"},
            headers={
                "Authorization": "Basic " + "QUM6dG9r",
                "Content-Type": FORM,
            },
            body=(body + events).encode(),
        )
        if events:
            call = dataclasses.replace(
                call, form={**call.form, "StatusCallbackEvent": ["initiated", "answered"]}
            )
        assert prism.validate([call]) == []


def test_contract_fixture(fake_twilio: FakeTwilio, client: Client, contract: ContractCheck) -> None:
    run_sdk_scenario(fake_twilio, client)
    apps = f"{fake_twilio.account_path}/Applications.json"
    wrong = raw(fake_twilio, "POST", apps, data={"FriendlyName": "x", "VoiceMethod": "post"})
    assert wrong.status_code == 201  # the fake takes "post" (upper-cased); the contract does not
    assert contract.violations() == [
        f"POST {apps}: Request body property VoiceMethod "
        "must be equal to one of the allowed values: GET, POST (sent 'post')"
    ]
    contract.exclude(fake_twilio.requests[-1])
    assert contract.violations() == []  # and teardown passes


def test_contract_fixture_fails_the_test_at_teardown(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(
        test_inner="""
        import requests

        def call(fake, path, data=None):
            with requests.Session() as session:
                session.trust_env = False
                auth = (fake.account_sid, fake.auth_token)
                method = "POST" if data else "GET"
                url = fake.base_url + fake.account_path + path
                return session.request(method, url, data=data, auth=auth, timeout=5)

        def test_wrong_request(fake_twilio, contract):
            data = {"FriendlyName": "x", "VoiceMethod": "post", "VoiceFallbackURL": "x"}
            assert call(fake_twilio, "/Applications.json", data).status_code == 201

        def test_clean_request(fake_twilio, contract):
            assert call(fake_twilio, ".json").status_code == 200
        """
    )
    result = pytester.runpytest("-p", "fakes.twilio_fixtures", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_wrong_request*",
            "*2 request(s) break Twilio's OpenAPI contract:",
            "*POST /2010-04-01/Accounts/AC*/Applications.json: form parameter 'VoiceFallbackURL'*",
            "*POST /2010-04-01/Accounts/AC*/Applications.json: Request body property VoiceMethod*",
        ]
    )


def test_voice_application_sid_empty_is_the_one_ignored_violation(
    fake_twilio: FakeTwilio, client: Client, prism: Prism
) -> None:
    sid = fake_twilio.add_number("+15005550006")["sid"]
    client.incoming_phone_numbers(sid).update(voice_application_sid="")
    detach = fake_twilio.requests[-1]
    headers = {k: v for k, v in detach.headers.items() if k in ("Authorization", "Content-Type")}
    status, body = prism._request("POST", detach.path, detach.body, headers)
    assert status == 422  # the quirk is still there: Prism rejects it...
    assert json.loads(body)["validation"][0]["location"] == ["body", "VoiceApplicationSid"]
    assert prism.validate([detach]) == []  # ...and validate() ignores exactly that
    sms = dataclasses.replace(detach, form={"SmsApplicationSid": ""}, body=b"SmsApplicationSid=")
    assert len(prism.validate([sms])) == 2  # the same on another field is reported


def test_error_bodies_are_json_with_twilio_shape(fake_twilio: FakeTwilio) -> None:
    resp = raw(fake_twilio, "DELETE", f"{fake_twilio.account_path}.json")
    assert resp.status_code == 405
    assert resp.headers["Content-Type"].startswith("application/json")
    assert json.loads(resp.text) == {
        "code": 20004,
        "message": "Method not allowed",
        "more_info": "https://www.twilio.com/docs/errors/20004",
        "status": 405,
    }
