"""Numbers and TwiML Apps against a stateful fake of Twilio's REST API over real HTTP.

Every request a test makes is also checked against Twilio's OpenAPI contract (Prism, ``contract``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from crctl.cli import app
from crctl.console import crctl_command

runner = CliRunner()
PUBLIC = "https://relay.example.com"
pytestmark = pytest.mark.usefixtures("twilio_env", "contract")


def crctl(*args: str, input: str | None = None) -> Any:
    result = runner.invoke(app, list(args), input=input)
    assert "Traceback" not in result.output, result.output
    return result


def writes(fake: Any) -> list[Any]:
    return [r for r in fake.requests if r.method in ("POST", "DELETE")]


def the_app(fake: Any, name: str = "crctl relay") -> dict[str, Any]:
    (found,) = [a for a in fake.applications.values() if a["friendly_name"] == name]
    return found


def test_whoami_shows_account_and_source_with_secrets_redacted(fake_twilio: Any) -> None:
    result = crctl("whoami")
    assert result.exit_code == 0, result.output
    assert fake_twilio.account_sid in result.stdout and "environment" in result.stdout
    assert fake_twilio.auth_token not in result.output
    assert "auth token" in result.stdout


def test_whoami_with_an_api_key_says_signatures_need_the_token(
    fake_twilio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    monkeypatch.setenv("TWILIO_API_KEY", fake_twilio.api_key)
    monkeypatch.setenv("TWILIO_API_SECRET", fake_twilio.api_secret)
    result = crctl("whoami")
    assert result.exit_code == 0, result.output
    assert fake_twilio.api_key in result.stdout and "TWILIO_AUTH_TOKEN" in result.stdout
    assert fake_twilio.api_secret not in result.output


def test_whoami_from_a_twilio_cli_profile(
    fake_twilio: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name)
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "profiles": {
                    "dev": {
                        "accountSid": fake_twilio.account_sid,
                        "apiKey": fake_twilio.api_key,
                        "apiSecret": fake_twilio.api_secret,
                    }
                },
                "activeProject": "dev",
            }
        )
    )
    monkeypatch.setenv("TWILIO_CLI_CONFIG_DIR", str(folder))
    result = crctl("whoami")
    assert result.exit_code == 0, result.output
    assert "twilio-cli profile dev" in result.stdout


def test_provision_buys_creates_app_points_number_then_changes_nothing(fake_twilio: Any) -> None:
    before = set(fake_twilio.numbers)
    result = crctl("provision-number", "--public-url", PUBLIC, "--yes")
    assert result.exit_code == 0, result.output
    (bought,) = [n for sid, n in fake_twilio.numbers.items() if sid not in before]
    relay_app = the_app(fake_twilio)
    assert relay_app["voice_url"] == PUBLIC + "/twiml"
    assert relay_app["status_callback"] == PUBLIC + "/status"
    assert bought["voice_application_sid"] == relay_app["sid"]
    assert bought["phone_number"] in result.stdout and "done" in result.stdout
    count = len(writes(fake_twilio))
    again = crctl("provision-number", "--public-url", PUBLIC, "--yes")
    assert again.exit_code == 0 and "nothing to change" in again.stdout
    assert len(writes(fake_twilio)) == count  # idempotent: not a single write
    assert len(fake_twilio.numbers) == len(before) + 1


def test_provision_searches_with_filters_and_skips_numbers_without_voice(fake_twilio: Any) -> None:
    result = crctl(
        "provision-number",
        "--public-url",
        PUBLIC,
        "--dry-run",
        "--area-code",
        "415",
        "--contains",
        "55",
    )
    assert result.exit_code == 0, result.output
    search = [r for r in fake_twilio.requests if "AvailablePhoneNumbers" in r.path]
    assert search and search[-1].query.get("AreaCode") == "415"
    assert search[-1].query.get("Contains") == "55" and search[-1].query.get("VoiceEnabled")
    assert "dry run" in result.stdout and writes(fake_twilio) == []


def test_dry_run_changes_nothing(fake_twilio: Any) -> None:
    result = crctl("provision-number", "--public-url", PUBLIC, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "create TwiML App" in result.stdout and "buy +" in result.stdout
    assert writes(fake_twilio) == [] and fake_twilio.applications == {}


def test_provision_asks_before_buying(fake_twilio: Any) -> None:
    before = dict(fake_twilio.numbers)
    result = crctl("provision-number", "--public-url", PUBLIC, input="1\nn\n")
    assert result.exit_code == 1
    assert fake_twilio.numbers.keys() == before.keys()


def test_owned_number_is_pointed_and_restored(fake_twilio: Any) -> None:
    owned = fake_twilio.add_number(
        "+15005550006", voice_url="https://old.example.com/voice", voice_method="GET"
    )
    result = crctl("provision-number", "--public-url", PUBLIC, "--number", "+15005550006")
    assert result.exit_code == 0, result.output
    number = fake_twilio.numbers[owned["sid"]]
    assert number["voice_application_sid"] == the_app(fake_twilio)["sid"]
    listed = crctl("numbers", "list")
    assert "+15005550006" in listed.stdout and "crctl relay" in listed.stdout
    assert "restore available" in listed.stdout
    restored = crctl("numbers", "restore", "+15005550006")
    assert restored.exit_code == 0, restored.output
    number = fake_twilio.numbers[owned["sid"]]
    assert number["voice_url"] == "https://old.example.com/voice"
    assert number["voice_method"] == "GET" and not number["voice_application_sid"]
    assert "nothing recorded" in crctl("numbers", "restore", owned["sid"]).stdout


def test_failure_half_way_is_completed_by_a_rerun(fake_twilio: Any) -> None:
    owned = fake_twilio.add_number("+15005550007")
    fake_twilio.fail_next(
        "POST", r"/IncomingPhoneNumbers/PN\w+\.json$", 400, 21609, "Number update refused"
    )
    failed = crctl("provision-number", "--public-url", PUBLIC, "--number", owned["phone_number"])
    assert failed.exit_code == 1
    assert "21609" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert len(fake_twilio.applications) == 1  # the app was made before the refusal
    rerun = crctl("provision-number", "--public-url", PUBLIC, "--number", owned["phone_number"])
    assert rerun.exit_code == 0, rerun.output
    assert len(fake_twilio.applications) == 1  # reused by name, not created twice
    assert fake_twilio.numbers[owned["sid"]]["voice_application_sid"] == the_app(fake_twilio)["sid"]


def test_app_is_updated_when_the_relay_moved_and_restorable_state_kept(fake_twilio: Any) -> None:
    fake_twilio.add_application("crctl relay", voice_url="https://yesterday.example.com/twiml")
    owned = fake_twilio.add_number("+15005550008")
    result = crctl("provision-number", "--public-url", PUBLIC, "--number", owned["phone_number"])
    assert result.exit_code == 0, result.output
    assert the_app(fake_twilio)["voice_url"] == PUBLIC + "/twiml"  # no longer "it just rings"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://relay.example.com", "https://"),
        ("https://localhost:8080", "not reachable from Twilio"),
        ("https://127.0.0.1", "not reachable from Twilio"),
        ("https://10.0.0.5", "not reachable from Twilio"),
        ("https://relay.example.com/?x=1", "no query"),
    ],
)
def test_urls_are_checked_before_twilio_sees_them(
    fake_twilio: Any, url: str, expected: str
) -> None:
    result = crctl("provision-number", "--public-url", url, "--yes")
    assert result.exit_code == 2 and expected in result.stderr  # a bad flag: usage
    assert fake_twilio.requests == []


@pytest.mark.parametrize(
    ("setup", "args", "expected", "code"),
    [
        ("bad-credentials", ["numbers", "list"], "20003", 1),
        (
            "none",
            ["numbers", "point", "+15005550199", "--url", PUBLIC + "/twiml"],
            "does not own +15005550199",
            1,
        ),
        ("none", ["numbers", "restore", "PN" + "0" * 32], "20404", 1),
        ("none", ["numbers", "point", "+15005550199"], "exactly one of --url", 2),
        ("network", ["numbers", "list"], "cannot reach Twilio", 1),
    ],
)
def test_twilio_errors_are_one_line_with_the_next_step(
    fake_twilio: Any,
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    args: list[str],
    expected: str,
    code: int,
) -> None:
    if setup == "bad-credentials":
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", "w" * 32)
    if setup == "network":
        fake_twilio.down()
    result = crctl(*args)
    assert result.exit_code == code  # 1: Twilio refused or unreachable; 2: a bad flag
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    if setup == "bad-credentials":
        # the hint names crctl as it was run (scripts/dev.sh from a checkout's .venv)
        assert crctl_command() + " whoami` shows" in result.stderr
        assert "w" * 32 not in result.output


def test_number_taken_meanwhile_says_search_again(fake_twilio: Any) -> None:
    fake_twilio.fail_next(
        "POST", r"/IncomingPhoneNumbers\.json$", 400, 21452, "Number is not available"
    )
    result = crctl("provision-number", "--public-url", PUBLIC, "--yes")
    assert result.exit_code == 1 and "21452" in result.stderr and "search again" in result.stderr


def test_trial_account_limit_is_explained(fake_twilio: Any) -> None:
    fake_twilio.trial = True
    fake_twilio.add_number("+15005550010")
    result = crctl("provision-number", "--public-url", PUBLIC, "--yes")
    assert result.exit_code == 1
    assert "trial" in result.stderr.lower() and "--number" in result.stderr


def test_point_url_then_restore(fake_twilio: Any) -> None:
    owned = fake_twilio.add_number("+15005550011", voice_url="https://before.example.com/x")
    result = crctl("numbers", "point", "+15005550011", "--url", "https://new.example.com/twiml")
    assert result.exit_code == 0, result.output
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == "https://new.example.com/twiml"
    bad = crctl("numbers", "point", "+15005550011", "--url", "https://new.example.com")
    assert bad.exit_code == 2 and "path" in bad.stderr
    assert crctl("numbers", "restore", "+15005550011").exit_code == 0
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == "https://before.example.com/x"


def test_release_needs_confirmation(fake_twilio: Any) -> None:
    owned = fake_twilio.add_number("+15005550012")
    declined = crctl("numbers", "release", "+15005550012", input="n\n")
    assert declined.exit_code == 1 and owned["sid"] in fake_twilio.numbers
    released = crctl("numbers", "release", "+15005550012", "--yes")
    assert released.exit_code == 0 and owned["sid"] not in fake_twilio.numbers


def test_app_show_and_delete_refused_while_in_use(fake_twilio: Any) -> None:
    used = fake_twilio.add_application("used", voice_url=PUBLIC + "/twiml")
    fake_twilio.add_number("+15005550013", voice_application_sid=used["sid"])
    shown = crctl("app", "show")
    assert used["sid"] in shown.stdout and "+15005550013" in shown.stdout
    refused = crctl("app", "delete", "used", "--yes")
    assert refused.exit_code == 1 and "+15005550013" in refused.stderr
    assert used["sid"] in fake_twilio.applications
    forced = crctl("app", "delete", used["sid"], "--yes", "--force")
    assert forced.exit_code == 0 and used["sid"] not in fake_twilio.applications


def test_point_at_an_application_by_name(fake_twilio: Any) -> None:
    target = fake_twilio.add_application("support line", voice_url=PUBLIC + "/twiml")
    owned = fake_twilio.add_number("+15005550014", voice_url="https://before.example.com/x")
    result = crctl("numbers", "point", owned["sid"], "--app", "support line")
    assert result.exit_code == 0, result.output
    assert fake_twilio.numbers[owned["sid"]]["voice_application_sid"] == target["sid"]
    listed = crctl("numbers", "list")
    assert target["sid"][:8] in listed.stdout or "support" in listed.stdout


@pytest.mark.parametrize(("country", "kind"), [("US", "toll-free"), ("GB", "mobile")])
def test_other_number_types_are_searched(fake_twilio: Any, country: str, kind: str) -> None:
    result = crctl(
        "provision-number",
        "--public-url",
        PUBLIC,
        "--dry-run",
        "--country",
        country,
        "--type",
        kind,
    )
    assert result.exit_code == 0, result.output
    path = {"toll-free": "TollFree", "mobile": "Mobile"}[kind]
    assert any(
        f"AvailablePhoneNumbers/{country}/{path}.json" in r.path for r in fake_twilio.requests
    )
    assert "buy +" in result.stdout


def test_unknown_number_type_is_refused_before_any_request(fake_twilio: Any) -> None:
    result = crctl("provision-number", "--public-url", PUBLIC, "--type", "pager", "--yes")
    assert result.exit_code == 2 and "local, toll-free, mobile" in result.stderr


@pytest.mark.parametrize("dotenv", [".env", ".env.local"])
@pytest.mark.parametrize(
    "args",
    [
        ["whoami"],
        ["numbers", "list"],
        ["provision-number", "--public-url", PUBLIC, "--dry-run"],
    ],
    ids=" ".join,
)
def test_twilio_credentials_come_from_dotenv_files_for_every_command(
    fake_twilio: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    dotenv: str,
    args: list[str],
) -> None:
    # before issue 10, .env fed `crctl serve` only: these commands found no credentials
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("TWILIO_CLI_CONFIG_DIR", str(tmp_path / "no-twilio-cli"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / dotenv).write_text(
        f"TWILIO_ACCOUNT_SID={fake_twilio.account_sid}\n"
        f"TWILIO_AUTH_TOKEN={fake_twilio.auth_token}\n"
    )
    if dotenv == ".env.local":  # it beats .env, which holds a wrong token here
        (tmp_path / ".env").write_text(
            f"TWILIO_ACCOUNT_SID={fake_twilio.account_sid}\nTWILIO_AUTH_TOKEN={'w' * 32}\n"
        )
    result = crctl(*args)
    assert result.exit_code == 0, result.output
    assert fake_twilio.requests, "the command did not reach Twilio"
    if args == ["whoami"]:
        assert fake_twilio.account_sid in result.stdout and "environment" in result.stdout


def test_environment_beats_dotenv_and_flags_beat_both(
    fake_twilio: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"TWILIO_AUTH_TOKEN={'w' * 32}\n")
    assert crctl("whoami").exit_code == 0  # the environment's right token wins over .env
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "w" * 32)
    flagged = crctl(
        "whoami", "--account-sid", fake_twilio.account_sid, "--auth-token", fake_twilio.auth_token
    )
    assert flagged.exit_code == 0, flagged.output
    assert "from      flags" in flagged.stdout
