"""Errors at the edge: one exception tree per package, caught once by the CLI's root group.

The root group applies the exit-code rule (1 = the operation failed, 2 = usage or configuration).
Also the helpers the edge uses: the resolved environment, process identity, the atomic write, the
tunnel setting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from twilio.base.exceptions import TwilioRestException
from typer.testing import CliRunner

import crctl.errors
import relay_server.errors
import twiml_templates.errors
from crctl import up_sessions
from crctl.call_script import ScriptError
from crctl.caller import CallError, Unreachable
from crctl.cli import COMMANDS, LazyCommand, app
from crctl.environment import Environment, current, load_environment, resolved
from crctl.errors import (
    ConfigurationError,
    CrctlError,
    CredentialsError,
    ProvisioningError,
    SettingsError,
    StateError,
    TunnelError,
    UsageError,
    exit_code,
)
from crctl.provisioning import twilio_errors
from crctl.settings import load_settings
from crctl.tail import TailError
from crctl.tunnel import open_tunnel
from relay_server.errors import ConfigError, RelayError
from relay_server.llm import LLMError
from relay_server.protocol import ProtocolError
from relay_server.socket_tokens import TokenRefused
from twiml_templates.errors import TemplateError, TemplatesError
from twiml_templates.files import write_atomic
from twiml_templates.serverless import ExportError

runner = CliRunner()

TREES = [
    (
        crctl.errors,
        CrctlError,
        [
            ConfigurationError,
            UsageError,
            SettingsError,
            CredentialsError,
            ScriptError,
            ProvisioningError,
            StateError,
            TunnelError,
            TailError,
            CallError,
            Unreachable,
        ],
    ),
    (relay_server.errors, RelayError, [ConfigError, LLMError, TokenRefused, ProtocolError]),
    (twiml_templates.errors, TemplatesError, [TemplateError, ExportError]),
]


@pytest.mark.parametrize(
    ("module", "root", "classes"), TREES, ids=lambda v: getattr(v, "__name__", "")
)
def test_each_package_has_one_root_drawn_in_its_errors_docstring(
    module: object, root: type, classes: list[type]
) -> None:
    doc = module.__doc__ or ""
    assert root.__name__ in doc
    for cls in classes:
        assert issubclass(cls, root), cls
        assert cls.__name__ in doc, f"{cls.__name__} is not drawn in {module}"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CrctlError("x"), 1),
        (ProvisioningError("x", code=20404), 1),
        (Unreachable("x"), 1),
        (TailError("x"), 1),
        (SettingsError("x"), 2),
        (UsageError("x"), 2),
        (CredentialsError("x"), 2),
        (ScriptError("x"), 2),
        (ConfigError("x"), 2),
        (LLMError("timeout", "no token"), 1),
        (ProtocolError("x"), 1),
        (TemplateError("x"), 2),
        (ExportError("x"), 2),
        (ValueError("x"), None),
        (RuntimeError("x"), None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_the_exit_code_rule(error: Exception, code: int | None) -> None:
    assert exit_code(error) == code


def _raises(error: Exception) -> None:
    raise error


def _command(error: Exception) -> object:
    def command() -> None:
        """Fail on purpose."""
        _raises(error)

    return command


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ProvisioningError("buying +1555 failed: Twilio error 21452; search again"), 1),
        (UsageError("give exactly one of --url URL or --app AP…"), 2),
        (ConfigError("setting agent (CRCTL_AGENT): no module x"), 2),
        (LLMError("connection", "connection refused to 127.0.0.1:9"), 1),
        (TemplateError("basic.toml: key voice: bad"), 2),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else str(v),
)
def test_the_root_group_prints_a_known_failure_as_one_line_with_its_code(
    monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "failing", _command(error), raising=False)
    monkeypatch.setitem(COMMANDS, "failing", LazyCommand(__name__, "failing", "Fail."))
    result = runner.invoke(app, ["failing"])
    assert result.exit_code == code
    assert result.stderr.strip().splitlines() == [f"error: {error}"]
    assert "Traceback" not in result.output


def test_an_unexpected_exception_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "failing", _command(KeyError("bug")), raising=False)
    monkeypatch.setitem(COMMANDS, "failing", LazyCommand(__name__, "failing", "Fail."))
    result = runner.invoke(app, ["failing"])
    assert isinstance(result.exception, KeyError)  # not turned into an error line
    assert "error:" not in result.stderr


def test_known_failures_of_real_commands_go_through_the_handler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_API_KEY", "TWILIO_API_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWILIO_CLI_CONFIG_DIR", str(tmp_path / "no-twilio-cli"))
    missing = runner.invoke(app, ["numbers", "list"])
    assert missing.exit_code == 2  # missing credentials: configuration
    assert "no Twilio credentials" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    template = runner.invoke(app, ["twiml", "render", "no-such-template"])
    assert template.exit_code == 2 and len(template.stderr.strip().splitlines()) == 1


def test_twilio_error_code_is_an_attribute() -> None:
    with pytest.raises(ProvisioningError) as caught, twilio_errors("looking up PN1"):
        raise TwilioRestException(404, "https://api.twilio.com/x", "not found", code=20404)
    assert (caught.value.code, caught.value.status) == (20404, 404)
    assert caught.value.action == "looking up PN1"
    assert str(caught.value).startswith("looking up PN1 failed: Twilio error 20404")


# ------------------------------------------------------------------- the resolved environment
def test_environment_precedence_env_over_dotenv_local_over_dotenv(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("NGROK_PATH", "NGROK_AUTHTOKEN", "CRCTL_TUNNEL_FACTORY", "CRCTL_NUMBER"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "NGROK_PATH=/from/env\nNGROK_AUTHTOKEN=t1\nCRCTL_TUNNEL_FACTORY=a:B\n"
    )
    (tmp_path / ".env.local").write_text(
        "NGROK_PATH=/from/env.local\nNGROK_AUTHTOKEN=t2\nCRCTL_NUMBER=+15550100003\n"
    )
    monkeypatch.setenv("NGROK_PATH", "/from/environment")
    env = current()
    assert env.ngrok_path == "/from/environment"
    assert env.ngrok_authtoken is not None and env.ngrok_authtoken.get_secret_value() == "t2"
    assert env.tunnel_factory == "a:B"
    assert env.number == "+15550100003"  # `crctl up --number`'s default, from a dotenv file too
    assert "t2" not in repr(env)  # secrets stay redacted


def test_the_environment_is_resolved_once_per_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CRCTL_STATE_DIR", str(tmp_path / "first"))
    with resolved() as env:
        monkeypatch.setenv("CRCTL_STATE_DIR", str(tmp_path / "second"))
        assert current() is env and current().crctl_dir() == tmp_path / "first"
    assert current().crctl_dir() == tmp_path / "second"  # outside a command: read afresh


def test_a_bad_environment_value_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRCTL_TWILIO_API_URL", "ftp://mock.example.test")
    result = runner.invoke(app, ["whoami"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: CRCTL_TWILIO_API_URL: Value error, must be an http(s):// URL "
        "(got 'ftp://mock.example.test')"
    ]
    with pytest.raises(SettingsError) as caught:
        load_environment()
    assert caught.value.setting == "CRCTL_TWILIO_API_URL"
    with pytest.raises(SettingsError) as bad_flag:
        load_settings(port=0)
    assert bad_flag.value.setting == "port"


def test_the_tunnel_factory_is_a_setting() -> None:
    fake = {"CRCTL_TUNNEL_FACTORY": "fakes.fake_tunnel:FakeTunnel"}
    tunnel = open_tunnel(8080, Environment(**fake))
    assert tunnel.public_url.startswith("https://") and type(tunnel).__name__ == "FakeTunnel"
    with pytest.raises(TunnelError, match=r"CRCTL_TUNNEL_FACTORY='fakes\.nothing:X'"):
        open_tunnel(8080, Environment(**{"CRCTL_TUNNEL_FACTORY": "fakes.nothing:X"}))


# ------------------------------------------------------------------- process identity (psutil)
def test_a_live_run_is_told_from_a_dead_or_reused_pid() -> None:
    me = os.getpid()
    started = up_sessions.process_started(me)
    assert started is not None
    assert up_sessions.alive({"pid": me, "process_started": started})
    assert not up_sessions.alive({"pid": me, "process_started": repr(1.5)})  # pid reused
    assert up_sessions.alive({"pid": me, "process_started": "12345"})  # an older crctl's record
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not up_sessions.alive({"pid": finished.pid, "process_started": None})
    assert not up_sessions.alive({"pid": 0})


def test_an_exited_child_not_yet_collected_is_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, left a zombie
        assert not up_sessions.alive({"pid": child.pid, "process_started": None})
    finally:
        child.wait()


# ------------------------------------------------------------------- the atomic write
def test_write_atomic_replaces_or_keeps_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file"
    assert write_atomic(target, b"one", mode=0o600)
    assert target.read_bytes() == b"one" and target.stat().st_mode & 0o777 == 0o600
    assert not write_atomic(target, b"two", replace=False)  # first writer wins
    assert target.read_bytes() == b"one"
    assert write_atomic(target, b"three")
    assert target.read_bytes() == b"three"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file"]


def test_fail_takes_the_rules_code_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    from crctl.console import fail

    assert fail(UsageError("bad --type")).exit_code == 2
    assert fail(TailError("refused")).exit_code == 1
    assert fail("a plain message").exit_code == 1
    assert fail(UsageError("forced"), 3).exit_code == 3
    assert capsys.readouterr().err.count("error:") == 4
