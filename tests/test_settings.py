"""crctl.settings: flags > environment > .env.local > .env, one-line errors, redacted secrets."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from crctl.settings import Settings, SettingsError, load_settings

TOKEN = "twilio-tok-5ecret-9f8e7d6c5b4a"
KEY = "sk-openai-5ecret-0a1b2c3d4e5f"
API = "api-5ecret-aabbccddeeff"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No CRCTL_/OPENAI_/TWILIO_ variables and an empty working directory (no .env)."""
    for name in list(os.environ):
        if name.startswith(("CRCTL_", "OPENAI_", "TWILIO_")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(path: Path, **values: str) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()), encoding="utf-8")


def _error(**flags: object) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(**flags)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


# ------------------------------------------------------------------------------ defaults


def test_defaults_with_nothing_configured() -> None:
    s = load_settings()
    assert (s.host, s.port, s.public_url) == ("127.0.0.1", 8080, None)
    assert s.openai_api_key is None and s.twilio_auth_token is None and s.api_token is None
    assert s.openai_base_url is None
    assert s.verify_signatures is True
    assert s.log_level == "INFO"


def test_none_and_empty_tuple_flags_mean_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRCTL_PORT", "3333")
    monkeypatch.setenv("CRCTL_MODEL", "env-model")
    s = load_settings(port=None, model=None, tools=(), public_url=None)
    assert (s.port, s.model, s.tools, s.public_url) == (3333, "env-model", [], None)


# ---------------------------------------------------------------------------- precedence


def test_dotenv_is_read(isolated: Path) -> None:
    _write(isolated / ".env", CRCTL_PORT="1111", CRCTL_MODEL="model-dotenv")
    s = load_settings()
    assert (s.port, s.model) == (1111, "model-dotenv")


def test_dotenv_local_beats_dotenv(isolated: Path) -> None:
    _write(isolated / ".env", CRCTL_PORT="1111", CRCTL_MODEL="model-dotenv", CRCTL_HOST="::1")
    _write(isolated / ".env.local", CRCTL_PORT="2222", CRCTL_MODEL="model-local")
    s = load_settings()
    assert (s.port, s.model) == (2222, "model-local")
    assert s.host == "::1"  # only in .env: still visible under .env.local


def test_environment_beats_dotenv_files(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(isolated / ".env", CRCTL_PORT="1111", CRCTL_MODEL="model-dotenv")
    _write(isolated / ".env.local", CRCTL_PORT="2222")
    monkeypatch.setenv("CRCTL_PORT", "3333")
    s = load_settings()
    assert s.port == 3333
    assert s.model == "model-dotenv"


def test_flags_beat_everything(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(isolated / ".env", CRCTL_PORT="1111", OPENAI_BASE_URL="http://dotenv.test/v1")
    _write(isolated / ".env.local", CRCTL_PORT="2222", OPENAI_BASE_URL="http://local.test/v1")
    monkeypatch.setenv("CRCTL_PORT", "3333")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env.test/v1")
    s = load_settings(port=4444, openai_base_url="http://flag.test/v1")
    assert s.port == 4444
    assert s.openai_base_url == "http://flag.test/v1"


def test_vendor_variable_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/")
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("CRCTL_API_TOKEN", API)
    s = load_settings()
    assert s.openai_api_key is not None and s.openai_api_key.get_secret_value() == KEY
    assert s.twilio_auth_token is not None and s.twilio_auth_token.get_secret_value() == TOKEN
    assert s.api_token is not None and s.api_token.get_secret_value() == API
    assert s.openai_base_url == "http://127.0.0.1:11434/v1"  # trailing slash dropped
    config = s.relay_config()
    assert config.auth_token == TOKEN
    assert config.api_token == API
    assert config.llm.api_key == KEY
    assert config.llm.base_url == "http://127.0.0.1:11434/v1"


def test_vendor_variable_names_in_dotenv(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(isolated / ".env", OPENAI_API_KEY="sk-from-dotenv", TWILIO_AUTH_TOKEN="tok-dotenv")
    _write(isolated / ".env.local", TWILIO_AUTH_TOKEN="tok-local")
    s = load_settings()
    assert s.openai_api_key is not None and s.openai_api_key.get_secret_value() == "sk-from-dotenv"
    assert s.twilio_auth_token is not None
    assert s.twilio_auth_token.get_secret_value() == "tok-local"
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "tok-env")
    token = load_settings().twilio_auth_token
    assert token is not None and token.get_secret_value() == "tok-env"


def test_boolean_and_list_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRCTL_VERIFY_SIGNATURES", "false")
    monkeypatch.setenv("CRCTL_LOG_LEVEL", "debug")
    s = load_settings()
    assert s.verify_signatures is False
    assert s.log_level == "DEBUG"


def test_comma_separated_tools_is_a_settings_error_or_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The natural way to write a list in an env var. Either accept it, or say what is wrong
    # in one line; pydantic-settings' own SettingsError must not escape (crctl serve only
    # catches crctl.settings.SettingsError, so the user would get a traceback).
    monkeypatch.setenv("CRCTL_TOOLS", "mod_a,mod_b")
    try:
        s = load_settings()
    except SettingsError as exc:
        assert "CRCTL_TOOLS" in str(exc)
        assert "\n" not in str(exc)
    else:
        assert s.tools == ["mod_a", "mod_b"]


# ---------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("CRCTL_PORT", "abc", "port"),
        ("CRCTL_PORT", "0", "port"),
        ("CRCTL_PORT", "70000", "port"),
        ("CRCTL_PUBLIC_URL", "ftp://x", "public_url"),
        ("CRCTL_PUBLIC_URL", "https://relay.example.test/?a=b", "public_url"),
        ("OPENAI_BASE_URL", "notaurl", "openai_base_url"),
        ("CRCTL_LOG_LEVEL", "LOUD", "log_level"),
        ("CRCTL_LLM_TIMEOUT", "0", "llm_timeout"),
        ("CRCTL_VERIFY_SIGNATURES", "maybe", "verify_signatures"),
    ],
)
def test_bad_setting_is_one_line_naming_setting_and_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    message = _error()
    assert message.startswith(f"setting {field} ({env}): "), message


def test_bad_vendor_setting_from_dotenv_names_the_real_variable(isolated: Path) -> None:
    _write(isolated / ".env.local", OPENAI_BASE_URL="bogus")
    message = _error()
    assert message.startswith("setting openai_base_url (OPENAI_BASE_URL): "), message
    assert "CRCTL_OPENAI_BASE_URL" not in message  # no such variable exists


def test_bad_flag_is_one_line_too() -> None:
    message = _error(port=0)
    assert message.startswith("setting port (CRCTL_PORT): ")
    assert "greater than or equal to 1" in message


@pytest.mark.parametrize(
    ("field", "env"),
    [
        ("twilio_auth_token", "TWILIO_AUTH_TOKEN"),
        ("openai_api_key", "OPENAI_API_KEY"),
        ("api_token", "CRCTL_API_TOKEN"),
    ],
)
def test_bad_secret_value_is_not_echoed(field: str, env: str) -> None:
    message = _error(**{field: [TOKEN]})
    assert message.startswith(f"setting {field} ({env}): ")
    assert TOKEN not in message
    assert "5ecret" not in message


def test_other_errors_do_not_leak_configured_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("CRCTL_PORT", "not-a-port")
    message = _error()
    assert TOKEN not in message and KEY not in message


# ------------------------------------------------------------------------------- secrets


def test_settings_and_relay_config_never_show_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("CRCTL_API_TOKEN", API)
    monkeypatch.setenv("CRCTL_PUBLIC_URL", "https://relay.example.test")
    s = load_settings()
    config = s.relay_config()
    shown = [repr(s), str(s), s.model_dump_json(), repr(config), str(config)]
    shown += [repr(config.llm), repr(config.agent_config)]
    for text in shown:
        for secret in (TOKEN, KEY, API):
            assert secret not in text
    # ...while the relay does get the real values.
    assert (config.auth_token, config.llm.api_key, config.api_token) == (TOKEN, KEY, API)


# -------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://relay.example.test:443", "https://relay.example.test"),
        ("https://relay.example.test:443/", "https://relay.example.test"),
        ("https://relay.example.test:443/base/", "https://relay.example.test/base"),
        ("https://relay.example.test/", "https://relay.example.test"),
        ("https://relay.example.test:8443", "https://relay.example.test:8443"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ],
)
def test_public_url_normalised(given: str, expected: str) -> None:
    s = load_settings(public_url=given)
    assert s.public_url == expected


def test_public_url_default_port_goes_into_the_websocket_url_without_port() -> None:
    config = load_settings(public_url="https://relay.example.test:443/").relay_config()
    assert config.websocket_url("http://127.0.0.1:8080") == "wss://relay.example.test/ws"


@pytest.mark.parametrize(
    "given",
    [
        "https://Relay.Example.Test:443",
        "https://[2001:db8::1]:443",
        "https://relay.example.test:443",
    ],
)
def test_public_url_https_port_443_dropped_for_any_host_spelling(given: str) -> None:
    # An explicit :443 breaks Twilio signature checks, whatever the host looks like
    # (mixed case, IPv6 literal).
    public_url = load_settings(public_url=given).public_url
    assert public_url is not None
    assert urlsplit(public_url).port is None, public_url
    assert urlsplit(public_url).hostname == urlsplit(given).hostname


# ---------------------------------------------------------------------- startup problems


def test_token_without_public_url_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    errors, _warnings = load_settings().startup_problems()
    assert len(errors) == 1
    assert "public_url" in errors[0] and "CRCTL_PUBLIC_URL" in errors[0]
    assert TOKEN not in errors[0]


def test_token_with_public_url_is_fine_on_any_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    s = load_settings(host="0.0.0.0", public_url="https://relay.example.test")
    assert s.startup_problems() == ([], [])


def test_no_token_on_all_interfaces_is_an_error() -> None:
    errors, warnings = load_settings(host="0.0.0.0").startup_problems()
    assert len(errors) == 1
    assert "TWILIO_AUTH_TOKEN" in errors[0]
    assert "0.0.0.0" in errors[0]
    assert warnings == []


def test_no_verify_signatures_is_a_warning_even_on_all_interfaces() -> None:
    errors, warnings = load_settings(host="0.0.0.0", verify_signatures=False).startup_problems()
    assert errors == []
    assert len(warnings) == 1
    assert "--no-verify-signatures" in warnings[0]


def test_no_verify_signatures_with_token_needs_no_public_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    errors, warnings = load_settings(verify_signatures=False).startup_problems()
    assert errors == []
    assert len(warnings) == 1 and "OFF" in warnings[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_no_token_on_loopback_is_only_a_warning(host: str) -> None:
    errors, warnings = load_settings(host=host).startup_problems()
    assert errors == []
    assert len(warnings) == 1
    assert "TWILIO_AUTH_TOKEN" in warnings[0]


# ----------------------------------------------------------------------- system prompt


def test_system_prompt_file_is_read(isolated: Path) -> None:
    (isolated / "prompt.txt").write_text("\n  You are Ada, a ferry clerk.  \n", encoding="utf-8")
    config = load_settings(system_prompt_file=Path("prompt.txt")).relay_config()
    assert config.agent_config.system_prompt == "You are Ada, a ferry clerk."


def test_system_prompt_file_from_environment(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (isolated / "p.md").write_text("Speak like a pirate.", encoding="utf-8")
    monkeypatch.setenv("CRCTL_SYSTEM_PROMPT_FILE", str(isolated / "p.md"))
    assert load_settings().relay_config().agent_config.system_prompt == "Speak like a pirate."


def test_system_prompt_text_is_used_without_file() -> None:
    config = load_settings(system_prompt="Be brief.").relay_config()
    assert config.agent_config.system_prompt == "Be brief."


def test_missing_system_prompt_file_is_a_settings_error(isolated: Path) -> None:
    missing = isolated / "nope" / "prompt.txt"
    s = load_settings(system_prompt_file=missing)
    with pytest.raises(SettingsError) as info:
        s.relay_config()
    message = str(info.value)
    assert "system_prompt_file" in message
    assert str(missing) in message
    assert "\n" not in message


def test_settings_is_the_pydantic_settings_model() -> None:
    # load_settings returns the class the rest of crctl types against.
    assert isinstance(load_settings(), Settings)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "EchoAgent"),
        ({"OPENAI_API_KEY": "sk-x"}, "LLMAgent"),
        # a local model (Ollama, vLLM) needs no key: a base URL alone picks the LLM agent
        ({"OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"}, "LLMAgent"),
    ],
)
def test_default_agent_follows_the_llm_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: str
) -> None:
    from relay_server.app import resolve_agent

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_agent(load_settings().relay_config()).__name__ == expected
