"""Twilio credentials: flags > environment > twilio-cli profile; the state file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crctl.credentials import CredentialsError, redact, resolve
from crctl.state import State, StateError

SID = "AC" + "a" * 32
OTHER = "AC" + "b" * 32
TOKEN = "t" * 32
KEY = "SK" + "c" * 32


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_KEY", "TWILIO_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWILIO_CLI_CONFIG_DIR", str(tmp_path / "twilio-cli"))
    return tmp_path


def cli_config(tmp_path: Path, config: dict[str, object]) -> None:
    folder = tmp_path / "twilio-cli"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


PROFILES = {
    "profiles": {
        "work": {"accountSid": SID, "apiKey": KEY, "apiSecret": "s" * 32, "region": None},
        "home": {"accountSid": OTHER, "apiKey": OTHER, "apiSecret": TOKEN},
    },
    "projects": [{"id": "old", "accountSid": SID}],
    "activeProject": "work",
}


def test_flags_beat_environment_and_profile(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    cli_config(clean, PROFILES)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", OTHER)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "e" * 32)
    creds = resolve(account_sid=SID, auth_token=TOKEN)
    assert (creds.account_sid, creds.source, creds.auth_token) == (SID, "flags", TOKEN)
    assert creds.kind == "auth token"


def test_environment_beats_profile(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    cli_config(clean, PROFILES)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", OTHER)
    monkeypatch.setenv("TWILIO_API_KEY", KEY)
    monkeypatch.setenv("TWILIO_API_SECRET", "x" * 32)
    creds = resolve()
    assert (creds.account_sid, creds.username, creds.source) == (OTHER, KEY, "environment")
    assert creds.auth_token is None and creds.kind == f"API key {KEY}"


def test_active_twilio_cli_profile_is_used(clean: Path) -> None:
    cli_config(clean, PROFILES)
    creds = resolve()
    assert creds.source == "twilio-cli profile work" and creds.username == KEY
    home = resolve(profile="home")  # a profile made from an auth token
    assert home.account_sid == OTHER and home.auth_token == TOKEN


def test_named_profile_beats_environment(monkeypatch: pytest.MonkeyPatch, clean: Path) -> None:
    cli_config(clean, PROFILES)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", OTHER)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    assert resolve(profile="work").source == "twilio-cli profile work"


@pytest.mark.parametrize(
    ("kwargs", "config", "expected"),
    [
        ({}, None, "no Twilio credentials: set TWILIO_ACCOUNT_SID"),
        ({"profile": "nope"}, PROFILES, "no twilio-cli profile 'nope'"),
        ({"profile": "old"}, PROFILES, "system keychain"),
        ({"account_sid": SID}, None, "no secret"),
        ({"auth_token": TOKEN}, None, "--account-sid is missing"),
        ({"account_sid": "AC123", "auth_token": TOKEN}, None, "not an account SID"),
        ({"account_sid": SID, "api_key": KEY}, None, "API secret is missing"),
        ({"account_sid": SID, "api_key": "XX1", "api_secret": "s"}, None, "does not start with SK"),
    ],
)
def test_bad_credentials_say_what_to_set(
    clean: Path, kwargs: dict[str, str], config: dict[str, object] | None, expected: str
) -> None:
    if config is not None:
        cli_config(clean, config)
    with pytest.raises(CredentialsError, match=expected) as info:
        resolve(**kwargs)
    assert TOKEN not in str(info.value)


def test_broken_twilio_cli_config_is_named(clean: Path) -> None:
    (clean / "twilio-cli").mkdir()
    (clean / "twilio-cli" / "config.json").write_text("{not json")
    with pytest.raises(CredentialsError, match=r"cannot read .*config\.json"):
        resolve()


def test_secrets_are_redacted_in_repr() -> None:
    creds = resolve(account_sid=SID, auth_token=TOKEN)
    assert TOKEN not in repr(creds) and TOKEN not in redact(TOKEN)
    assert redact(TOKEN) == "tt…tt" and redact(None) == "(none)" and redact("short") == "********"


def test_state_records_once_and_survives_reload(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = State(path)
    assert state.record(SID, "numbers", "PN1", "+15550001", {"voice_url": "https://a/x"}, "t")
    # a second change keeps the first record: restore goes back to before crctl
    assert not state.record(SID, "numbers", "PN1", "+15550001", {"voice_url": "https://b"}, "t")
    again = State(path)
    entry = again.get(SID, "numbers", "PN1")
    assert entry is not None and entry["previous"]["voice_url"] == "https://a/x"
    again.forget(SID, "numbers", "PN1")
    assert State(path).get(SID, "numbers", "PN1") is None


def test_broken_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{")
    with pytest.raises(StateError, match="state file"):
        State(path)
