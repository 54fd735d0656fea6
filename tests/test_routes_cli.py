"""``crctl serve --routes FILE`` as a real subprocess: the routed TwiML, and bad files (exit 2).

The same harness as ``test_cli_serve``: ``python -m crctl serve`` in an empty temporary
folder with an environment stripped of CRCTL_/OPENAI_/TWILIO_ variables.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from fakes.fake_llm import FakeLLM
from tests.support import free_port, sign
from tests.test_cli_serve import KEY, TOKEN, Refusal, _env, _http, serve, serve_refusals

SUPPORT, SALES = "+15550100002", "+15550100003"

ROUTES = f"""
[[route]]
name = "support"
numbers = ["{SUPPORT}"]
template = "support.toml"
agent = "llm"
system_prompt = "You are the support line."

[[route]]
name = "sales"
numbers = ["{SALES}"]
template = "dtmf-menu"
agent = "echo"
"""


def _twiml(base: str, public: str, form: dict[str, str], query: str = "") -> ET.Element:
    signature = sign(f"{public}/twiml{query}", form, token=TOKEN)
    status, _, body = _http("POST", f"{base}/twiml{query}", form, {"X-Twilio-Signature": signature})
    assert status == 200, body
    return ET.fromstring(body)


def _route_of(root: ET.Element) -> str | None:
    for parameter in root.iter("Parameter"):
        if parameter.attrib["name"] == "crctl_route":
            return parameter.attrib["value"]
    return None


def _greeting(root: ET.Element) -> str:
    relay = root.find("Connect/ConversationRelay")
    assert relay is not None
    return relay.attrib["welcomeGreeting"]


def test_serve_answers_each_number_with_its_route(tmp_path: Path, fake_llm: FakeLLM) -> None:
    (tmp_path / "routes.toml").write_text(ROUTES)
    (tmp_path / "support.toml").write_text(
        'extends = "basic"\n[relay]\nwelcomeGreeting = "Support, hello!"\n'
    )
    port = free_port()
    public = f"https://127.0.0.1:{port}"
    env = _env(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=fake_llm.base_url, TWILIO_AUTH_TOKEN=TOKEN)
    args = ["--port", str(port), "--public-url", public, "--routes", "routes.toml"]
    with serve(tmp_path, args, env) as relay:
        call = {"CallSid": "CA" + "3" * 32, "From": "+15550100001"}
        support = _twiml(relay.base, public, {**call, "To": SUPPORT})
        assert (_route_of(support), _greeting(support)) == ("support", "Support, hello!")
        sales = _twiml(relay.base, public, {**call, "To": SALES})
        assert _route_of(sales) == "sales"
        assert _greeting(sales).startswith("Welcome. Press 1 for sales")  # dtmf-menu's
        other = _twiml(relay.base, public, {**call, "To": "+15550100009"})
        assert _route_of(other) is None
        assert _greeting(other) == "Hello! How can I help you today?"
        outbound = _twiml(relay.base, public, {**call, "To": "+15550100009"}, "?route=sales")
        assert _route_of(outbound) == "sales"
        assert relay.terminate() == 0
    assert "routes: support (+15550100002), sales (+15550100003) from routes.toml" in (relay.stderr)
    assert "Traceback" not in relay.stderr


#: case -> (routes file, or None for none; extra environment; a text of the one error line)
BAD_ROUTES: dict[str, tuple[str | None, dict[str, str], str]] = {
    "unknown-key": (
        '[[route]]\nname = "a"\nnumbrs = ["+15550100002"]\n',
        {},
        "routes.toml: route 1 (a): key 'numbrs' (value ['+15550100002']): unknown key, did you "
        "mean 'numbers'?",
    ),
    "bad-number": (
        '[[route]]\nname = "a"\nnumbers = ["5550100002"]\n',
        {},
        "'5550100002' is not an E.164 number",
    ),
    "unknown-template": (
        '[[route]]\nname = "a"\ntemplate = "suport"\n',
        {},
        "routes.toml: route 1 (a): key template: value 'suport': no template 'suport'",
    ),
    "duplicate-number": (
        '[[route]]\nname = "a"\nnumbers = ["+15550100002"]\n'
        '[[route]]\nname = "b"\nnumbers = ["+15550100002"]\n',
        {},
        "value '+15550100002' is already in route 'a'",
    ),
    "missing-file": (None, {}, "routes.toml: routes file not found (--routes / CRCTL_ROUTES)"),
    "from-the-environment": (
        '[[route]]\nname = "a"\ntools = ["nosuch_tools_mod"]\n',
        {"CRCTL_ROUTES": "routes.toml"},
        "routes.toml: route a: tools 'nosuch_tools_mod'",
    ),
    "llm-route-without-llm": (
        '[[route]]\nname = "a"\nagent = "llm"\n',
        {},
        "route a: key agent: value 'llm' talks to an LLM and none is configured",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Refusal]:
    """Every BAD_ROUTES case at once (they are independent): case -> (code, out, err)."""
    cases: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    for case, (body, env, _needle) in BAD_ROUTES.items():
        folder = tmp_path_factory.mktemp(case)
        if body is not None:
            (folder / "routes.toml").write_text(body)
        args = ["--port", str(free_port())]
        if "CRCTL_ROUTES" not in env:
            args += ["--routes", "routes.toml"]
        cases[case] = (args, env, folder)
    return serve_refusals(cases)


@pytest.mark.parametrize("case", list(BAD_ROUTES))
def test_a_bad_routes_file_stops_serve_with_one_line(
    bad_runs: dict[str, Refusal], case: str
) -> None:
    code, _out, err = bad_runs[case]
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert BAD_ROUTES[case][2] in lines[0], lines[0]
