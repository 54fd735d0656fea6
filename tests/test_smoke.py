from relay_server.protocol import Text
from tests.support import TwilioCaller


async def test_llm_reply_streams_and_closes_turn(relay, fake_llm):
    caller = await TwilioCaller(relay).connect()
    await caller.prompt("hello there")
    frames = await caller.recv_turn()
    assert "".join(f.token for f in frames) == "You said: hello there"
    assert frames[-1] == Text(token="", last=True)
    await caller.hangup()
