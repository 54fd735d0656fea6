"""The deploy files (Dockerfile, compose.yaml, deploy/) say what the relay needs, without a daemon.

No container runs here: these read the files and check them against crctl itself (its CLI
parses the compose file's command line, its settings know every name the env file sets).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from crctl.cli import COMMANDS
from crctl.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RELAYS = ("relay-1", "relay-2")
#: What every replica must share (compose.yaml's env file).
SHARED = ("CRCTL_PUBLIC_URL", "TWILIO_AUTH_TOKEN", "CRCTL_API_TOKEN", "CRCTL_REDIS_URL")
#: The drain's default (crctl serve --drain-timeout, env CRCTL_DRAIN_TIMEOUT).
DEFAULT_DRAIN_S = 300.0


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f"{path.name}: not NAME=value: {line!r}"
            out[name.strip()] = value.strip()
    return out


def relay_env_files(service: dict[str, Any]) -> list[Path]:
    entries = service.get("env_file") or []
    entries = [entries] if isinstance(entries, str | dict) else entries
    return [ROOT / (e["path"] if isinstance(e, dict) else e) for e in entries]


def example_of(path: Path) -> Path:
    """The committed example of an env file (the real one holds secrets and is not committed)."""
    return path if path.exists() else path.with_name(path.name + ".example")


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def command_line(value: str | list[str]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else list(value)


def serve_command() -> Any:
    """The click command ``crctl serve`` runs (Typer builds it from crctl.serve.serve)."""
    return COMMANDS["serve"].load("serve")


def test_compose_has_two_relays_redis_and_a_load_balancer() -> None:
    services = compose()["services"]
    assert set(services) == {*RELAYS, "redis", "lb"}
    assert services["redis"]["image"].split(":")[0] in ("redis", "docker.io/library/redis")
    assert services["lb"]["image"].split(":")[0] in ("haproxy", "docker.io/library/haproxy")
    for name in RELAYS:
        assert services[name]["build"] == ".", name
        assert "redis" in services[name]["depends_on"], name


def test_every_relay_gets_the_four_shared_settings_from_one_env_file() -> None:
    services = compose()["services"]
    files = {name: relay_env_files(services[name]) for name in RELAYS}
    assert files["relay-1"] == files["relay-2"] and len(files["relay-1"]) == 1, files
    settings = env_file(example_of(files["relay-1"][0]))
    for name in RELAYS:
        given = {**settings, **(services[name].get("environment") or {})}
        missing = [s for s in SHARED if not given.get(s)]
        assert not missing, f"{name} lacks {missing}"
    assert settings["CRCTL_REDIS_URL"].startswith("redis://redis:")
    assert settings["CRCTL_PUBLIC_URL"].startswith("https://")


def test_every_crctl_name_in_the_env_file_is_a_setting() -> None:
    # A misspelt CRCTL_ name would be ignored in silence (the settings ignore unknown names).
    path = example_of(relay_env_files(compose()["services"]["relay-1"])[0])
    # drain_timeout: crctl serve --drain-timeout (issue 12's drain), maybe not on this branch yet.
    known = set(Settings.model_fields) | {"drain_timeout"}
    for name in env_file(path):
        if name.startswith("CRCTL_"):
            assert name.removeprefix("CRCTL_").lower() in known, name


def test_stop_grace_period_outlasts_the_drain() -> None:
    services = compose()["services"]
    for name in RELAYS:
        env = env_file(example_of(relay_env_files(services[name])[0]))
        env.update(services[name].get("environment") or {})
        drain = float(env.get("CRCTL_DRAIN_TIMEOUT", DEFAULT_DRAIN_S))
        grace = seconds(services[name]["stop_grace_period"])
        assert grace > drain, f"{name}: stop_grace_period {grace} s <= drain {drain} s"


def test_the_compose_command_line_is_one_crctl_serve_accepts() -> None:
    services = compose()["services"]
    cmd = serve_command()
    for name in RELAYS:
        argv = command_line(services[name]["command"])
        assert argv[:2] == ["crctl", "serve"], argv
        # click parses every flag and value as `crctl serve` would, without running it
        with cmd.make_context("serve", argv[2:]) as ctx:
            assert ctx.params["host"] == "0.0.0.0"
            assert ctx.params["port"] == 8080


def test_a_misspelt_flag_is_refused_by_the_same_check() -> None:
    with pytest.raises(Exception, match="--prot") as refused:
        serve_command().make_context("serve", ["--host", "0.0.0.0", "--prot", "8080"])
    assert type(refused.value).__name__ == "NoSuchOption"


def test_dockerfile_runs_crctl_serve_as_a_non_root_user_on_an_official_slim_image() -> None:
    steps = dockerfile()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"python:3\.11-slim(-\w+)?", froms[0]), froms
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), users
    # the last USER comes before CMD, so CMD runs as it
    order = [word for word, _ in steps]
    assert order.index("CMD") > len(order) - 1 - order[::-1].index("USER")
    cmd = [args for word, args in steps if word == "CMD"]
    assert len(cmd) == 1
    argv = yaml.safe_load(cmd[0])  # the exec form is a JSON array
    assert argv[:2] == ["crctl", "serve"], argv
    with serve_command().make_context("serve", argv[2:]) as ctx:
        assert (ctx.params["host"], ctx.params["port"]) == ("0.0.0.0", 8080)
    run = " ".join(args for word, args in steps if word == "RUN")
    assert "uv sync --frozen --no-dev" in run
    health = [args for word, args in steps if word == "HEALTHCHECK"]
    assert health and "/healthz" in health[0] and ":8080" in health[0], health


def test_dockerfile_pins_uv_as_the_scripts_do() -> None:
    script = (ROOT / "scripts" / "_venv.sh").read_text()
    pinned = re.search(r"^uv_version=(\S+)$", script, re.M)
    assert pinned
    args = [args for word, args in dockerfile() if word == "ARG"]
    assert f"UV_VERSION={pinned.group(1)}" in args, args


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for word, args in dockerfile():
        if word == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert copied and copied <= kept, copied - kept


def test_load_balancer_checks_readyz_and_names_both_replicas() -> None:
    lb = compose()["services"]["lb"]
    mounted = [v.split(":")[0] for v in lb["volumes"]]
    cfg_path = ROOT / next(m for m in mounted if m.endswith("haproxy.cfg"))
    cfg = [
        line.split("#")[0].split()
        for line in cfg_path.read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    servers = {words[1]: words[2] for words in cfg if words[0] == "server"}
    assert servers == {name: f"{name}:8080" for name in RELAYS}
    assert ["option", "httpchk"] in cfg
    assert ["http-check", "send", "meth", "GET", "uri", "/readyz"] in cfg
    assert any(words[:2] == ["default-server", "check"] for words in cfg)
    assert any(w[:2] == ["timeout", "tunnel"] for w in cfg)  # sockets outlive "timeout server"
    published = [p.split(":")[-1] for p in lb["ports"]]
    binds = [words[1].split(":")[-1] for words in cfg if words[0] == "bind"]
    assert binds and set(binds) <= set(published), (binds, published)
