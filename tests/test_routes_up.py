"""``crctl up --routes FILE`` as a real process: every routed number pointed, then restored.

The fake tunnel and the fake Twilio API (contract-checked), as in ``test_up``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import sign, wait_until
from tests.test_up import OLD, PATIENCE, TUNNEL, Up, up_env, voice_url

__all__ = ["up_env"]  # the fixture, used by name
pytestmark = pytest.mark.usefixtures("contract")

SUPPORT, SALES, ELSEWHERE = "+15005550031", "+15005550032", "+15005550039"


def test_up_points_every_routed_number_and_restores_them(
    fake_twilio: Any, up_env: dict[str, str], tmp_path: Path
) -> None:
    support = fake_twilio.add_number(SUPPORT, voice_url=OLD)
    sales = fake_twilio.add_number(SALES, voice_url=OLD)
    (tmp_path / "routes.toml").write_text(
        f'[[route]]\nname = "support"\nnumbers = ["{SUPPORT}"]\n'
        'welcome_greeting = "Support, hello!"\n\n'
        f'[[route]]\nname = "sales"\nnumbers = ["{SALES}", "{ELSEWHERE}"]\n'
    )
    up = Up(tmp_path, up_env, "--routes", "routes.toml")
    try:

        def pointed() -> bool:
            sids = (support["sid"], sales["sid"])
            return all(voice_url(fake_twilio, sid) == TUNNEL + "/twiml" for sid in sids)

        assert wait_until(pointed, PATIENCE), up.output
        assert wait_until(up.healthy, PATIENCE), up.output
        assert wait_until(lambda: "Ctrl-C" in up.output, PATIENCE), up.output
        # a number of the file that the account does not own: said, the others still pointed
        assert f"route number {ELSEWHERE} was not pointed" in up.output
        form = {"CallSid": "CA" + "4" * 32, "From": "+15005550001", "To": SUPPORT}
        twiml = httpx.post(
            f"http://127.0.0.1:{up.port}/twiml",
            data=form,
            timeout=2,
            headers={"X-Twilio-Signature": sign(TUNNEL + "/twiml", form, fake_twilio.auth_token)},
        )
        assert twiml.status_code == 200, twiml.text
        assert 'name="crctl_route" value="support"' in twiml.text
        assert 'welcomeGreeting="Support, hello!"' in twiml.text
        assert up.stop(signal.SIGINT) == 0, up.output
    finally:
        if up.proc.poll() is None:
            up.stop(signal.SIGKILL)
    for owned in (support, sales):
        assert voice_url(fake_twilio, owned["sid"]) == OLD
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state.get("up_sessions") == {}
