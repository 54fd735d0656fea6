"""Routes (``--routes FILE``): one relay, two numbers, two agents, over real sockets.

The relay runs on a free loopback port with the fake LLM over real HTTP; calls are placed by
``crctl call``'s simulated caller (``POST /twiml`` signed as Twilio signs it, then the socket),
so each call gets what its TwiML says: its greeting, its ``crctl_route`` parameter, and on the
socket its route's prompt and tools, as the fake LLM sees them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from crctl.caller import SimulatedCaller
from fakes.fake_llm import FakeLLM
from relay_server.routing import ROUTE_PARAMETER, RoutesError, load_routes
from tests.support import AUTH_TOKEN, PUBLIC_URL, RelayServer, TwilioCaller, sign, wait_until

SUPPORT, SALES, OTHER = "+15550100002", "+15550100003", "+15550100009"
CALLER = "+15550100001"

ROUTES = f"""
[[route]]
name = "support"
numbers = ["{SUPPORT}"]
template = "support.toml"
agent = "llm"
tools = ["shop_tools"]
system_prompt = "You are the support line of Example Shop."
model = "support-model"

[[route]]
name = "sales"
numbers = ["{SALES}"]
template = "low-latency"
system_prompt = "You are the sales line of Example Shop."
welcome_greeting = "Sales here, what can I sell you?"
"""

SUPPORT_TEMPLATE = """
extends = "basic"
[relay]
welcomeGreeting = "Support here, how can I help?"
"""

SHOP_TOOLS = '''
from relay_server.tools import tool


@tool
def order_status(order_id: str) -> str:
    """The status of an order."""
    return "shipped"
'''


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    (tmp_path / "support.toml").write_text(SUPPORT_TEMPLATE)
    (tmp_path / "shop_tools.py").write_text(SHOP_TOOLS)
    path = tmp_path / "routes.toml"
    path.write_text(ROUTES)
    return path


@pytest.fixture
def routed(relay_factory: Callable[..., RelayServer], routes_file: Path) -> RelayServer:
    return relay_factory(
        routes_file=str(routes_file),
        app_dir=str(routes_file.parent),
        agent_system_prompt="You are the default agent.",
    )


async def _call(relay: RelayServer, fake_llm: FakeLLM, to: str) -> tuple[Any, dict[str, Any]]:
    """Call ``to`` with the simulated caller, say one thing: (the plan, the LLM's request)."""
    caller = SimulatedCaller(
        relay.base_url, auth_token=AUTH_TOKEN, public_url=PUBLIC_URL, from_=CALLER, to=to
    )
    plan = await caller.fetch()
    await caller.connect(plan)
    before = len(fake_llm.records)
    reply = await caller.say("hello there")
    assert reply is not None
    assert await caller.finished(reply, 5)
    assert reply.text == "You said: hello there"
    await caller.hangup()
    assert len(fake_llm.records) == before + 1
    return plan, fake_llm.records[-1].body


def _tool_names(body: dict[str, Any]) -> set[str]:
    return {t["function"]["name"] for t in body.get("tools") or []}


async def test_two_routes_one_relay_each_call_gets_its_own_agent(
    routed: RelayServer, fake_llm: FakeLLM
) -> None:
    plan, body = await _call(routed, fake_llm, SUPPORT)
    assert plan.welcome_greeting == "Support here, how can I help?"  # its template's
    assert plan.parameters == {ROUTE_PARAMETER: "support"}
    assert body["messages"][0] == {
        "role": "system",
        "content": "You are the support line of Example Shop.",
    }
    assert body["model"] == "support-model"
    assert "order_status" in _tool_names(body)
    # the greeting the caller heard is in the conversation the LLM sees
    assert body["messages"][1]["content"] == "Support here, how can I help?"

    plan, body = await _call(routed, fake_llm, SALES)
    assert plan.welcome_greeting == "Sales here, what can I sell you?"  # the route's own
    assert plan.parameters == {ROUTE_PARAMETER: "sales"}
    assert plan.attributes["speechModel"] == "flux-general-en"  # its template: low-latency
    assert body["messages"][0]["content"] == "You are the sales line of Example Shop."
    assert body["model"] != "support-model"
    assert "order_status" not in _tool_names(body)  # the relay's tools (none), not support's


async def test_a_number_matching_no_route_gets_the_default(
    routed: RelayServer, fake_llm: FakeLLM
) -> None:
    plan, body = await _call(routed, fake_llm, OTHER)
    assert plan.welcome_greeting == "Hello! How can I help you today?"  # the basic preset's
    assert plan.parameters == {}  # the default's TwiML is what it was without routes
    assert body["messages"][0]["content"] == "You are the default agent."
    assert "order_status" not in _tool_names(body)


async def _twiml(
    relay: RelayServer, query: dict[str, str], form: dict[str, str], path: str = "/twiml"
) -> ET.Element:
    """POST ``path?query`` signed as Twilio signs it (the query is in the signed URL)."""
    suffix = path + ("?" + urlencode(query) if query else "")
    headers = {"X-Twilio-Signature": sign(PUBLIC_URL + suffix, form)}
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(relay.base_url + suffix, data=form, headers=headers)
    assert response.status_code == 200, response.text
    return ET.fromstring(response.text)


def _parameters(root: ET.Element) -> dict[str, str]:
    return {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")}


async def test_outbound_calls_pick_their_route_by_name_or_by_the_number_calling(
    routed: RelayServer, caplog: pytest.LogCaptureFixture
) -> None:
    outbound = {"CallSid": "CA" + "5" * 32, "From": SUPPORT, "To": OTHER}
    # ?route=NAME wins over the numbers; param_<k> become <Parameter>s; crctl_* are the relay's
    query = {"route": "sales", "param_customer": "42", "param_crctl_route": "support"}
    root = await _twiml(routed, query, {**outbound, "Direction": "outbound-api"})
    relay = root.find("Connect/ConversationRelay")
    assert relay is not None
    assert relay.attrib["welcomeGreeting"] == "Sales here, what can I sell you?"
    assert _parameters(root) == {ROUTE_PARAMETER: "sales", "customer": "42"}
    connect = root.find("Connect")
    assert connect is not None
    assert connect.attrib["action"] == (
        f"{PUBLIC_URL}/action?route=sales&param_customer=42"
    )  # a reconnect from /action keeps both
    assert "param_crctl_route" in caplog.text

    # without ?route=, an outbound call is routed by the number calling (From)
    root = await _twiml(routed, {}, {**outbound, "Direction": "outbound-api"})
    assert _parameters(root) == {ROUTE_PARAMETER: "support"}
    # inbound, by the number called (To)
    root = await _twiml(routed, {}, {**outbound, "Direction": "inbound"})
    assert _parameters(root) == {}

    # an unknown route name: the default, said in the log
    root = await _twiml(routed, {"route": "nope"}, outbound)
    assert _parameters(root) == {}
    assert "no route 'nope'" in caplog.text


async def test_a_dropped_socket_reconnects_on_its_route(
    routed: RelayServer, fake_llm: FakeLLM
) -> None:
    sid = "CA" + "6" * 32
    caller = TwilioCaller(routed, call_sid=sid)
    await caller.connect(custom_parameters={ROUTE_PARAMETER: "sales"})
    await caller.prompt("hello there")
    assert await caller.reply_text() == "You said: hello there"
    assert fake_llm.records[-1].body["messages"][0]["content"].startswith("You are the sales")
    await caller.ws.close(4000, "dropped")  # not a hang-up (1000): the call may come back
    assert wait_until(lambda: routed.registry.parked == 1)
    # Twilio posts the <Connect action> the TwiML named: /action?route=sales
    form = {"CallSid": sid, "SessionStatus": "failed", "ErrorCode": "64105", "To": OTHER}
    root = await _twiml(routed, {"route": "sales"}, form, path="/action")
    assert _parameters(root) == {ROUTE_PARAMETER: "sales"}
    connect = root.find("Connect")
    assert connect is not None and connect.attrib["action"] == f"{PUBLIC_URL}/action?route=sales"
    relay = root.find("Connect/ConversationRelay")
    assert relay is not None
    assert relay.attrib["welcomeGreeting"] == routed.config.reconnect_greeting


async def test_parameters_without_routes(relay_factory: Callable[..., RelayServer]) -> None:
    relay = relay_factory()
    form = {"CallSid": "CA" + "7" * 32, "To": OTHER}
    root = await _twiml(relay, {"param_lead": "7", "route": "x"}, form)
    assert _parameters(root) == {"lead": "7"}
    connect = root.find("Connect")
    assert connect is not None and connect.attrib["action"] == f"{PUBLIC_URL}/action?param_lead=7"


# ----------------------------------------------------------------- the routes file


def test_load_routes_reads_the_issue_format(routes_file: Path) -> None:
    routes = load_routes(routes_file)
    assert [r.name for r in routes] == ["support", "sales"]
    assert routes[0].spec.numbers == (SUPPORT,)
    assert routes[0].template.path == routes_file.parent / "support.toml"
    assert routes[1].template.name == "low-latency"


BAD_ROUTES = {
    "unknown key": (
        'name = "support"\nnumbers = ["+15550100002"]\ntemplat = "basic"',
        "route 1 (support): key 'templat' (value 'basic'): unknown key, did you mean 'template'?",
    ),
    "bad number": (
        'name = "support"\nnumbers = ["555-0100"]',
        "route 1 (support): key numbers: value ['555-0100'] is not allowed ('555-0100' is not "
        "an E.164 number)",
    ),
    "unknown template": (
        'name = "support"\ntemplate = "nosuch"',
        "route 1 (support): key template: value 'nosuch': no template 'nosuch'; known: basic",
    ),
    "duplicate number": (
        'name = "a"\nnumbers = ["+15550100002"]\n[[route]]\nname = "b"\nnumbers = ["+15550100002"]',
        "route 2 (b): key numbers: value '+15550100002' is already in route 'a'",
    ),
    "duplicate name": (
        'name = "a"\n[[route]]\nname = "a"',
        "route 2 (a): key name: value 'a' is already the name of another route",
    ),
    "missing name": ('numbers = ["+15550100002"]', "route 1: key name is required"),
    "bad agent": ('name = "a"\nagent = "my_agent"', "key agent: value 'my_agent' is not allowed"),
    "string not list": ('name = "a"\nnumbers = "+15550100002"', "key numbers: value"),
}


@pytest.mark.parametrize("case", list(BAD_ROUTES))
def test_a_bad_routes_file_is_one_line(tmp_path: Path, case: str) -> None:
    body, needle = BAD_ROUTES[case]
    path = tmp_path / "routes.toml"
    path.write_text("[[route]]\n" + body + "\n")
    with pytest.raises(RoutesError) as info:
        load_routes(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert needle in message, message


def test_a_missing_or_empty_routes_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(RoutesError, match=r"routes\.toml: routes file not found"):
        load_routes(tmp_path / "routes.toml")
    (tmp_path / "empty.toml").write_text("[[rout]]\nname = 'a'\n")
    with pytest.raises(RoutesError, match=r"key 'rout': unknown top-level key, did you mean"):
        load_routes(tmp_path / "empty.toml")


def test_crctl_call_to_a_routed_number_gets_that_route(
    routed: RelayServer, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    from tests.test_call import run, signed

    script = tmp_path / "turns.yaml"
    script.write_text("- say: where is my order\n  expect:\n    contains: where is my order\n")
    result = run(*signed(routed), "--to", SUPPORT, "--script", str(script))
    assert result.exit_code == 0, result.output
    assert "Support here, how can I help?" in result.output  # the route's greeting
    body = fake_llm.records[-1].body
    assert body["messages"][0]["content"] == "You are the support line of Example Shop."
    assert "order_status" in _tool_names(body)
