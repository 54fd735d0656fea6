"""ConversationRelay wire protocol: typed messages and a pure codec (Twilio docs: WebSocket
messages)."""

from relay_server.protocol.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    decode,
    decode_outbound,
    encode,
    text_frame,
)
from relay_server.protocol.errors import ProtocolError
from relay_server.protocol.messages import (
    Dtmf,
    End,
    Error,
    Inbound,
    Info,
    Interrupt,
    Language,
    Outbound,
    Play,
    Prompt,
    SendDigits,
    Setup,
    Text,
    Unknown,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "Dtmf",
    "End",
    "Error",
    "Inbound",
    "Info",
    "Interrupt",
    "Language",
    "Outbound",
    "Play",
    "Prompt",
    "ProtocolError",
    "SendDigits",
    "Setup",
    "Text",
    "Unknown",
    "decode",
    "decode_outbound",
    "encode",
    "text_frame",
]
