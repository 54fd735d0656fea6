"""Usage per call in the CLI: ``crctl calls show`` / ``calls stats`` against a real relay.

Two calls through a relay with an events database (the fake LLM answering, one tool round),
Twilio's ``/action`` callback for the session's duration, then the usage as JSON and as text,
with and without a price table.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crctl.cli import app as cli
from crctl.errors import UsageError
from crctl.turns import Price, load_prices
from fakes.fake_llm import FakeLLM, Script, ToolCallSpec
from relay_server import events as ev
from relay_server.protocol import Language
from tests.events_support import TOKEN, post_signed, wait_kind
from tests.support import RelayServer, TwilioCaller

CA1 = "CA" + "6" * 32
CA2 = "CA" + "8" * 32
PRICES = '[models."gpt-4o-mini"]\ninput_per_million = 0.15\noutput_per_million = 0.60\n'


def run(args: list[str], tmp_path: Path, code: int = 0, **env: str) -> Any:
    result = CliRunner().invoke(
        cli, args, env={"CRCTL_STATE_DIR": str(tmp_path), "COLUMNS": "200", **env}
    )
    assert result.exit_code == code, result.output
    return result


async def call(relay: RelayServer, fake_llm: FakeLLM, sid: str, *, tool: bool, length: str) -> None:
    """One turn (with a tool round when ``tool``), the hang-up and Twilio's /action callback."""
    if tool:
        fake_llm.enqueue(
            Script(tool_calls=[ToolCallSpec("switch_language", '{"language": "es-ES"}')]),
            Script(tokens=["Hola", " amigo."]),
        )
    caller = await TwilioCaller(relay, call_sid=sid).connect()
    await caller.prompt("hello there")
    if tool:
        assert isinstance(await caller.recv(), Language)
    await caller.reply_text()
    await wait_kind(relay, sid, "agent.reply")
    await caller.hangup()
    await wait_kind(relay, sid, "socket.closed")
    action = {"CallSid": sid, "SessionStatus": "completed", "SessionDuration": length}
    assert (await post_signed(relay, "/action", action)).status_code == 200
    await wait_kind(relay, sid, "session.end")


def requests(relay: RelayServer, sid: str | None = None) -> list[ev.LlmRequest]:
    """Every chat request the events report (own events, and those replies carry)."""
    return [
        r for e in list(relay.events) if sid is None or e.call_sid == sid for r in ev.requests_in(e)
    ]


def cost(found: list[ev.LlmRequest]) -> float:
    tokens_in = sum(r.input_tokens or 0 for r in found)
    tokens_out = sum(r.output_tokens or 0 for r in found)
    return round((tokens_in * 0.15 + tokens_out * 0.60) / 1_000_000, 6)


async def test_usage_per_call_and_over_a_window(relay_factory, fake_llm, tmp_path):
    relay = relay_factory(api_token=TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    await call(relay, fake_llm, CA1, tool=True, length="12")
    await call(relay, fake_llm, CA2, tool=False, length="5")
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    first = requests(relay, CA1)
    assert len(first) == 2 and all(r.input_tokens for r in first)
    url = ["--url", relay.base_url, "--token", TOKEN]

    shown = await asyncio.to_thread(run, ["calls", "show", CA1, "--json", *url], tmp_path)
    assert json.loads(shown.output)["usage"] == {
        "llm_requests": 2,
        "input_tokens": sum(r.input_tokens or 0 for r in first),
        "output_tokens": 4 + 2,  # the tool call's 4 chunks, then "Hola amigo."
        "tool_calls": 1,
        "duration_s": 12.0,
        "cost": None,  # no price table
    }
    priced = await asyncio.to_thread(
        run, ["calls", "show", CA1, "--json", "--prices", str(prices), *url], tmp_path
    )
    assert json.loads(priced.output)["usage"]["cost"] == cost(first) > 0
    # the same from the environment, and from the database without the relay
    db = ["--db", str(tmp_path / "events.sqlite3")]
    stored = await asyncio.to_thread(
        run, ["calls", "show", CA1, "--json", *db], tmp_path, CRCTL_PRICES=str(prices)
    )
    assert json.loads(stored.output)["usage"] == json.loads(priced.output)["usage"]

    text = await asyncio.to_thread(
        run, ["calls", "show", CA1, "--prices", str(prices), *url], tmp_path
    )
    tokens_in = sum(r.input_tokens or 0 for r in first)
    assert f"usage  2 LLM requests · {tokens_in} in + 6 out tokens · 1 tool call · 12.0 s" in (
        text.output
    )
    assert f"12.0 s · cost {cost(first):.6f}".rstrip("0") + "\n" in text.output
    assert "gpt-4o-mini #1 completed" in text.output  # the request, in the transcript

    stats = await asyncio.to_thread(
        run, ["calls", "stats", "--since", "10m", "--json", "--prices", str(prices), *url], tmp_path
    )
    everything = requests(relay)
    assert json.loads(stats.output)["usage"] == {
        "llm_requests": 3,
        "input_tokens": sum(r.input_tokens or 0 for r in everything),
        "output_tokens": sum(r.output_tokens or 0 for r in everything),
        "tool_calls": 1,
        "duration_s": 17.0,
        "cost": cost(everything),
    }
    table = await asyncio.to_thread(run, ["calls", "stats", "--since", "10m", *url], tmp_path)
    assert "usage  3 LLM requests" in table.output and "17.0 s" in table.output
    assert "cost" not in table.output  # no price table: no money said


async def test_a_model_not_in_the_table_is_an_unknown_cost_said_once(
    relay_factory, fake_llm, tmp_path
):
    relay = relay_factory(api_token=TOKEN, events_db=str(tmp_path / "events.sqlite3"))
    await call(relay, fake_llm, CA1, tool=True, length="3")
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4o"]\ninput_per_million = 2.5\noutput_per_million = 10\n')
    url = ["--url", relay.base_url, "--token", TOKEN, "--prices", str(prices)]
    shown = await asyncio.to_thread(run, ["calls", "show", CA1, "--json", *url], tmp_path)
    used = json.loads(shown.output)["usage"]
    assert used["cost"] is None and used["llm_requests"] == 2
    text = (await asyncio.to_thread(run, ["calls", "show", CA1, *url], tmp_path)).output
    assert text.count("cost unknown: no price in") == 1, text
    assert "for model gpt-4o-mini" in text and "cost ?" in text


async def test_a_bad_price_file_is_one_line(relay_factory, tmp_path):
    relay = relay_factory(api_token=TOKEN, events_db="")
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."gpt-4o-mini"]\ninput_per_million = "cheap"\n')
    args = ["calls", "stats", "--url", relay.base_url, "--token", TOKEN, "--prices", str(prices)]
    result = await asyncio.to_thread(run, args, tmp_path, 2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert str(prices) in lines[0] and "models.gpt-4o-mini.input_per_million" in lines[0]
    assert "'cheap'" in lines[0] and "a number ≥ 0" in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("not = [toml", "not TOML"),
        ("[other]\nx = 1\n", "key models: got None"),
        ('[models]\n"gpt-4o-mini" = 3\n', "key models.gpt-4o-mini: got 3"),
        (
            '[models."m"]\ninput_per_million = -1\noutput_per_million = 1\n',
            "models.m.input_per_million: got -1",
        ),
        (
            '[models."m"]\ninput_per_million = 1\noutput_per_million = 1\ncached = 2\n',
            "models.m.cached: got 2; allowed keys are input_per_million and output_per_million",
        ),
    ],
)
def test_price_file_errors_name_the_key_and_what_is_allowed(tmp_path, text, words):
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as raised:
        load_prices(path)
    message = str(raised.value)
    assert message.startswith(f"--prices {path}: ") and words in message
    assert "\n" not in message


def test_a_missing_price_file_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        load_prices(tmp_path / "none.toml")


def test_prices_load(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(PRICES + '[models."local"]\ninput_per_million = 0\noutput_per_million = 0\n')
    assert load_prices(path) == {
        "gpt-4o-mini": Price(0.15, 0.60),
        "local": Price(0.0, 0.0),
    }
