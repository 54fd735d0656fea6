"""``crctl dial`` against the stateful fake of Twilio's REST API, held to Twilio's contract.

Every request a test makes to the fake is replayed against Prism on Twilio's OpenAPI contract
(``contract``). The live mode runs ``crctl dial`` as a process following a real relay, while the
test plays Twilio's status callbacks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from typer.testing import CliRunner

from crctl.cli import app
from relay_server.dialing import STATUS_EVENTS
from relay_server.routing import ROUTE_PARAMETER
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer, config, sign, wait_until

runner = CliRunner()
PUBLIC = "https://relay.example.com"
TO, FROM = "+18089255327", "+18089255328"
ROOT = Path(__file__).resolve().parents[1]
CRCTL = (sys.executable, "-m", "crctl")
pytestmark = pytest.mark.usefixtures("twilio_env", "contract")


def crctl(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def created(fake: Any) -> list[Any]:
    return list(fake.requests_to("POST", r"/Calls\.json$"))


def test_detach_creates_the_call_twilio_expects_and_prints_its_sid(fake_twilio: Any) -> None:
    # the acceptance command line, as it is
    fake_twilio.add_number(FROM)
    result = crctl("dial", TO, "--from", FROM, "--public-url", PUBLIC, "--detach")
    assert result.exit_code == 0, result.output
    (sid,) = fake_twilio.calls
    assert result.stdout == f"{sid}\n"
    (request,) = created(fake_twilio)
    assert request.status == 201
    assert request.form == {
        "To": TO,
        "From": FROM,
        "Url": PUBLIC + "/twiml",
        "Method": "POST",
        "StatusCallback": PUBLIC + "/status",
        "StatusCallbackMethod": "POST",
        "StatusCallbackEvent": list(STATUS_EVENTS),
    }
    call = fake_twilio.calls[sid]
    assert (call["to"], call["from"], call["status"]) == (TO, FROM, "queued")
    assert call["direction"] == "outbound-api"


def test_the_acceptance_command_line_in_a_process(fake_twilio: Any, tmp_path: Path) -> None:
    fake_twilio.add_number(FROM)
    result = subprocess.run(
        [*CRCTL, "dial", TO, "--from", FROM, "--public-url", PUBLIC, "--detach"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (sid,) = fake_twilio.calls
    assert result.stdout.strip() == sid and sid.startswith("CA")


def test_route_params_and_machine_detection_go_into_the_request(fake_twilio: Any) -> None:
    fake_twilio.add_number(FROM)
    result = crctl(
        "dial",
        TO,
        "--from",
        FROM,
        "--public-url",
        PUBLIC + "/",
        "--route",
        "sales",
        "--param",
        "order=42",
        "--param",
        "note=a b&c",
        "--machine-detection",
        "detectmessageend",
        "--detach",
    )
    assert result.exit_code == 0, result.output
    (request,) = created(fake_twilio)
    url = urlsplit(str(request.form["Url"]))
    assert f"{url.scheme}://{url.netloc}{url.path}" == PUBLIC + "/twiml"
    assert parse_qsl(url.query) == [
        ("route", "sales"),
        ("param_order", "42"),
        ("param_note", "a b&c"),
    ]
    assert request.form["MachineDetection"] == "DetectMessageEnd"
    assert request.form["AsyncAmd"] == "true"
    assert request.form["AsyncAmdStatusCallback"] == PUBLIC + "/amd"
    assert request.form["AsyncAmdStatusCallbackMethod"] == "POST"


def test_the_agent_and_template_are_the_routes_not_options(fake_twilio: Any) -> None:
    # a URL never names code or a template for the relay to load: --route names them
    fake_twilio.add_number(FROM)
    args = ["dial", TO, "--from", FROM, "--public-url", PUBLIC, "--detach"]
    for option, value in (("--agent", "echo"), ("--twiml-template", "handoff")):
        result = crctl(*args, option, value)
        assert result.exit_code == 2 and "No such option" in result.output, result.output
    reserved = crctl(*args, "--param", "crctl_route=support")
    assert reserved.exit_code == 2 and "crctl_ are the relay's own" in reserved.output
    twice = crctl(*args, "--param", "order=1", "--param", "order=2")
    assert twice.exit_code == 2 and "given twice" in twice.output
    assert created(fake_twilio) == []


def test_a_route_the_routes_file_lacks_is_refused_before_calling(
    fake_twilio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the relay would answer it with its default agent: nobody would be called by the wrong one
    fake_twilio.add_number(FROM)
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    args = ["dial", TO, "--from", FROM, "--public-url", PUBLIC, "--detach"]
    typo = crctl(*args, "--route", "sale", "--routes", str(routes))
    assert typo.exit_code == 2, typo.output
    assert typo.output.strip() == (
        f"error: --route sale: {routes} has no route 'sale'; did you mean 'sales'? "
        "(routes: support, sales)"
    )
    monkeypatch.setenv("CRCTL_ROUTES", str(routes))  # the file crctl serve/up read
    unknown = crctl(*args, "--route", "night", "--dry-run")
    assert unknown.exit_code == 2 and "has no route 'night'" in unknown.output, unknown.output
    assert fake_twilio.requests == []
    known = crctl(*args, "--route", "sales")
    assert known.exit_code == 0, known.output
    (request,) = created(fake_twilio)
    assert request.form["Url"] == PUBLIC + "/twiml?route=sales"


def test_a_routes_first_number_is_the_caller_id_without_from(
    fake_twilio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a route's numbers are the ones it answers and calls from
    monkeypatch.delenv("CRCTL_NUMBER", raising=False)
    fake_twilio.add_number(FROM)
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)  # support: numbers = [FROM]
    args = ["dial", TO, "--public-url", PUBLIC, "--routes", str(routes), "--detach"]
    result = crctl(*args, "--route", "support")
    assert result.exit_code == 0, result.output
    (request,) = created(fake_twilio)
    assert (request.form["From"], request.form["Url"]) == (FROM, PUBLIC + "/twiml?route=support")
    no_number = crctl(*args, "--route", "sales")  # a route without numbers: say --from
    assert no_number.exit_code == 2 and "--from NUMBER" in no_number.output


def test_dry_run_prints_the_request_and_sends_nothing(fake_twilio: Any) -> None:
    result = crctl(
        "dial", TO, "--from", FROM, "--public-url", PUBLIC, "--param", "k=v", "--dry-run"
    )
    assert result.exit_code == 0, result.output
    assert fake_twilio.requests == []
    lines = result.stdout.splitlines()
    path = f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Calls.json"
    assert lines[0] == f"POST {fake_twilio.base_url}{path}"
    assert f"  To={TO}" in lines and f"  From={FROM}" in lines
    assert f"  Url={PUBLIC}/twiml?param_k=v" in lines
    assert lines[-1] == "dry run: nothing was sent"


@pytest.mark.parametrize(
    ("to", "from_owned", "setup", "code", "fix"),
    [
        ("12345", True, None, 21211, "E.164"),
        ("+447700900123", True, None, 21215, "Geo permissions"),
        (TO, True, "trial", 21219, "Verified Caller IDs"),
        (TO, False, None, 21210, "numbers list`) or one of its verified caller IDs"),
    ],
    ids=["21211-invalid-number", "21215-geo", "21219-trial", "21210-caller-id"],
)
def test_refusals_are_one_line_with_the_fix(
    fake_twilio: Any, to: str, from_owned: bool, setup: str | None, code: int, fix: str
) -> None:
    if from_owned:
        fake_twilio.add_number(FROM)
    if setup == "trial":
        fake_twilio.trial = True
    result = crctl("dial", to, "--from", FROM, "--public-url", PUBLIC, "--detach")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"error: calling {to} failed: Twilio error {code}: ")
    assert fix in lines[0]
    assert created(fake_twilio)[0].status == 400 and fake_twilio.calls == {}


def test_bad_options_are_usage_errors() -> None:
    base = ["dial", TO, "--from", FROM, "--public-url", PUBLIC, "--dry-run"]
    bad_param = crctl(*base, "--param", "novalue")
    assert bad_param.exit_code == 2 and "NAME=VALUE" in bad_param.output
    bad_amd = crctl(*base, "--machine-detection", "maybe")
    assert bad_amd.exit_code == 2 and "Enable or DetectMessageEnd" in bad_amd.output
    bad_route = crctl(*base, "--route", "sales line")  # no routes file here to check it in
    assert bad_route.exit_code == 2, bad_route.output
    assert "--route 'sales line': not a route's name: letters, digits" in bad_route.output
    local = crctl("dial", TO, "--from", FROM, "--public-url", "http://127.0.0.1:8080")
    assert local.exit_code == 2 and "https://" in local.output


def test_a_relay_it_could_not_follow_is_refused_before_calling(fake_twilio: Any) -> None:
    fake_twilio.add_number(FROM)
    result = crctl("dial", TO, "--from", FROM, "--public-url", PUBLIC, "--url", "ftp://relay")
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: --url must be the relay's http(s):// address, got 'ftp://relay'"
    )
    assert fake_twilio.requests == []  # nobody was called


def test_without_a_public_url_it_says_where_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRCTL_PUBLIC_URL", raising=False)
    result = crctl("dial", TO, "--from", FROM, "--dry-run")
    assert result.exit_code == 2
    assert "--public-url" in result.output and "up` with a --number" in result.output


def test_without_from_it_asks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRCTL_NUMBER", raising=False)
    result = crctl("dial", TO, "--public-url", PUBLIC, "--dry-run")
    assert result.exit_code == 2 and "--from NUMBER" in result.output


def test_a_running_up_lends_its_public_url(fake_twilio: Any) -> None:
    from crctl import up_sessions
    from crctl.state import State

    with State().change() as data:
        data.setdefault(up_sessions.SESSIONS, {})["PN1"] = {
            "pid": os.getpid(),
            "process_started": up_sessions.process_started(os.getpid()),
            "phone": FROM,
            "pointed_at": "https://tunnel.example.net/twiml",
        }
    result = crctl("dial", TO, "--from", FROM, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "  Url=https://tunnel.example.net/twiml" in result.stdout.splitlines()


# ------------------------------------------------------------------------ live, on a relay
def post_signed(relay: RelayServer, path_and_query: str, form: dict[str, str]) -> httpx.Response:
    """POST a webhook as Twilio does: signed over the public URL (with its query)."""
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + path_and_query, form, AUTH_TOKEN)}
    return httpx.post(relay.base_url + path_and_query, data=form, headers=headers, timeout=10)


ROUTES = f"""
[[route]]
name = "support"
numbers = ["{FROM}"]
welcome_greeting = "Support here."

[[route]]
name = "sales"
template = "low-latency"
welcome_greeting = "Sales here, what can I sell you?"
"""


def test_a_dialled_call_gets_its_routes_twiml_with_its_parameters(
    fake_twilio: Any, tmp_path: Path
) -> None:
    """Twilio fetches the Url it was given, signed: the relay answers with the route's TwiML.

    The number calling (``From``) is the support route's, so only ``route=sales`` in the Url can
    pick sales; ``--param order=42`` is a ``<Parameter>`` of the call.
    """
    fake_twilio.add_number(FROM)
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    cfg = config(events_db=None, routes_file=str(routes), app_dir=str(tmp_path))
    with RelayServer(cfg) as relay:
        args = ["dial", TO, "--from", FROM, "--public-url", PUBLIC_URL, "--detach"]
        result = crctl(*args, "--route", "sales", "--param", "order=42")
        assert result.exit_code == 0, result.output
        (sid,) = fake_twilio.calls
        url = urlsplit(str(fake_twilio.call_request(sid)["Url"]))
        assert f"{url.scheme}://{url.netloc}{url.path}" == PUBLIC_URL + "/twiml"
        form = {"CallSid": sid, "From": FROM, "To": TO, "Direction": "outbound-api"}
        answer = post_signed(relay, f"{url.path}?{url.query}", form)
        assert answer.status_code == 200, answer.text
        root = ET.fromstring(answer.text)
        # the same call without the route in its Url: the number calling picks support
        plain = post_signed(relay, "/twiml", form)
        assert plain.status_code == 200, plain.text
    conversation = root.find("Connect/ConversationRelay")
    assert conversation is not None
    assert conversation.attrib["welcomeGreeting"] == "Sales here, what can I sell you?"
    assert conversation.attrib["speechModel"] == "flux-general-en"  # the low-latency template
    parameters = [(p.attrib["name"], p.attrib["value"]) for p in root.iter("Parameter")]
    assert sorted(parameters) == [(ROUTE_PARAMETER, "sales"), ("order", "42")]
    connect = root.find("Connect")
    assert connect is not None
    assert connect.attrib["action"] == f"{PUBLIC_URL}/action?route=sales&param_order=42"
    assert 'welcomeGreeting="Support here."' in plain.text


def live_dial(relay: RelayServer, cwd: Path) -> subprocess.Popen[str]:
    """``crctl dial`` in live mode, following ``relay``."""
    follow = ["--url", relay.base_url, "--token", "dial-test-token"]
    return subprocess.Popen(
        [*CRCTL, "dial", TO, "--from", FROM, "--public-url", PUBLIC_URL, *follow],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextlib.contextmanager
def dialling(fake: Any, tmp_path: Path) -> Iterator[tuple[RelayServer, Any, str]]:
    """A relay, ``crctl dial`` following it live, and the SID of the call it created."""
    fake.add_number(FROM)
    with RelayServer(config(events_db=None, api_token="dial-test-token")) as relay:
        process = live_dial(relay, tmp_path)
        try:
            assert wait_until(lambda: bool(fake.calls), timeout=60)
            (sid,) = fake.calls
            yield relay, process, sid
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_live_mode_shows_the_call_until_it_completes(fake_twilio: Any, tmp_path: Path) -> None:
    with dialling(fake_twilio, tmp_path) as (relay, process, sid):
        for status in ("initiated", "ringing", "in-progress"):
            form = {"CallSid": sid, "CallStatus": status}
            assert post_signed(relay, "/status", form).status_code == 204
        time.sleep(0.2)
        assert process.poll() is None  # still following: the call is not over
        form = {"CallSid": sid, "CallStatus": "completed", "CallDuration": "12"}
        assert post_signed(relay, "/status", form).status_code == 204
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"calling {TO} from {FROM}: {sid}" in err
    assert "call ringing" in out and "call completed (12 s)" in out
    assert f"call {sid} completed after 12 s" in err


def test_live_mode_exits_1_when_nobody_answers(fake_twilio: Any, tmp_path: Path) -> None:
    with dialling(fake_twilio, tmp_path) as (relay, process, sid):
        form = {"CallSid": sid, "CallStatus": "no-answer"}
        assert post_signed(relay, "/status", form).status_code == 204
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"error: the call to {TO} ended no-answer: nobody answered" in err


def test_live_mode_ends_on_twilios_word_when_the_relay_hears_nothing(
    fake_twilio: Any, tmp_path: Path
) -> None:
    # the status callbacks went to another host (a wrong --public-url): no wait for ever
    with dialling(fake_twilio, tmp_path) as (relay, process, sid):
        fake_twilio.set_call_status(sid, "completed")
        _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    said = " ".join(err.split())
    assert (
        f"error: Twilio says the call to {TO} ended completed, but no status callback said so to "
        f"the relay at {relay.base_url}: Twilio sends the call to {PUBLIC_URL}/twiml; is that this "
        "relay"
    ) in said
    assert list(fake_twilio.requests_to("GET", rf"/Calls/{sid}\.json$"))  # Twilio was asked
