"""``crctl numbers point --route`` and ``provision-number --route`` against the fake Twilio API.

Every request is also checked against Twilio's OpenAPI contract (Prism, ``contract``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crctl.cli import app

runner = CliRunner()
PUBLIC = "https://relay.example.com"
SUPPORT, SALES, OTHER = "+15005550021", "+15005550022", "+15005550029"
pytestmark = pytest.mark.usefixtures("twilio_env", "contract")


@pytest.fixture
def routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # no .env of the repository
    path = tmp_path / "routes.toml"
    path.write_text(
        f'[[route]]\nname = "support"\nnumbers = ["{SUPPORT}"]\n\n'
        f'[[route]]\nname = "sales"\nnumbers = ["{SALES}"]\n'
    )
    return path


def crctl(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_point_a_routed_number_at_the_relay(fake_twilio: Any, routes_file: Path) -> None:
    owned = fake_twilio.add_number(SUPPORT, voice_url="https://before.example.com/x")
    result = crctl(
        "numbers", "point", SUPPORT, "--route", "support", "--routes", str(routes_file),
        "--url", PUBLIC,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # inbound calls are routed by the number called: every routed number rings the same /twiml
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == PUBLIC + "/twiml"
    assert "(route support)" in result.stdout
    assert crctl("numbers", "restore", SUPPORT).exit_code == 0
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == "https://before.example.com/x"


def test_point_takes_the_routes_file_and_url_from_the_environment(
    fake_twilio: Any, routes_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    owned = fake_twilio.add_number(SALES)
    monkeypatch.setenv("CRCTL_ROUTES", str(routes_file))
    monkeypatch.setenv("CRCTL_PUBLIC_URL", PUBLIC)
    result = crctl("numbers", "point", SALES, "--route", "sales")
    assert result.exit_code == 0, result.output
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == PUBLIC + "/twiml"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--route", "support"], f"{SALES} is not one of its numbers"),
        (["--route", "sale"], "has no route 'sale'; did you mean 'sales'?"),
        (["--route", "sales", "--app", "AP" + "0" * 32], "drop --app"),
    ],
)
def test_point_refuses_a_number_not_in_the_route(
    fake_twilio: Any, routes_file: Path, args: list[str], needle: str
) -> None:
    owned = fake_twilio.add_number(SALES, voice_url="https://before.example.com/x")
    result = crctl("numbers", "point", SALES, *args, "--routes", str(routes_file), "--url", PUBLIC)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert fake_twilio.numbers[owned["sid"]]["voice_url"] == "https://before.example.com/x"


def test_point_without_a_routes_file_or_with_a_bad_one(fake_twilio: Any, routes_file: Path) -> None:
    fake_twilio.add_number(SUPPORT)
    missing = crctl("numbers", "point", SUPPORT, "--route", "support", "--url", PUBLIC)
    assert missing.exit_code == 2 and "pass --routes FILE or set CRCTL_ROUTES" in missing.stderr
    routes_file.write_text('[[route]]\nname = "support"\nnumber = ["+15005550021"]\n')
    bad = crctl(
        "numbers", "point", SUPPORT, "--route", "support", "--routes", str(routes_file),
        "--url", PUBLIC,
    )  # fmt: skip
    assert bad.exit_code == 2
    assert "key 'number'" in bad.stderr and "did you mean 'numbers'?" in bad.stderr


def test_provision_number_for_a_route(fake_twilio: Any, routes_file: Path) -> None:
    owned = fake_twilio.add_number(SUPPORT)
    common = ["--public-url", PUBLIC, "--routes", str(routes_file), "--yes"]
    refused = crctl("provision-number", "--number", SUPPORT, "--route", "sales", *common)
    assert refused.exit_code == 2 and f"{SUPPORT} is not one of its numbers" in refused.stderr
    assert fake_twilio.numbers[owned["sid"]]["voice_application_sid"] in (None, "")
    result = crctl("provision-number", "--number", SUPPORT, "--route", "support", *common)
    assert result.exit_code == 0, result.output
    (relay_app,) = fake_twilio.applications.values()
    assert relay_app["voice_url"] == PUBLIC + "/twiml"
    assert fake_twilio.numbers[owned["sid"]]["voice_application_sid"] == relay_app["sid"]
    assert "next:" not in result.stdout


def test_provision_buys_for_a_route_and_says_to_add_the_number(
    fake_twilio: Any, routes_file: Path
) -> None:
    before = set(fake_twilio.numbers)
    result = crctl(
        "provision-number", "--public-url", PUBLIC, "--route", "sales", "--routes",
        str(routes_file), "--yes",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (bought,) = [n for sid, n in fake_twilio.numbers.items() if sid not in before]
    assert f"add {bought['phone_number']} to numbers of route 'sales'" in result.stdout
