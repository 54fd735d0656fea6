"""Test your agents in-process.

A chat model you release step by step, a call without a socket, a clock you move.

```python
from relay_server import LLMAgent
from relay_server.services import Services
from relay_server.testing import FakeCall, FakeChatModel, FakeClock

async def test_my_agent_answers() -> None:
    model, clock = FakeChatModel(), FakeClock()
    call = await FakeCall(LLMAgent, services=Services(chat=model, clock=clock)).connect()
    await call.prompt("hi")
    reply = await model.requested(1)
    reply.say("Hello", " there.").end()
    assert await call.reply_text() == "Hello there."
```
"""

from relay_server.testing.call import FakeCall, FakeClock
from relay_server.testing.model import ChatRequest, FakeChatModel, FakeReply

__all__ = ["ChatRequest", "FakeCall", "FakeChatModel", "FakeClock", "FakeReply"]
