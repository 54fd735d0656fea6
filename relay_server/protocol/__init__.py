"""ConversationRelay wire protocol: typed messages and a pure codec.

Twilio docs: ConversationRelay WebSocket messages.
"""

from relay_server.protocol.codec import (
    DEFAULT_MAX_FRAME_BYTES,
    as_fields,
    decode,
    decode_outbound,
    decode_received,
    encode,
    encode_inbound,
    invalid_message,
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
    Received,
    ReceivedText,
    SendDigits,
    SentInterrupt,
    SentSetup,
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
    "Received",
    "ReceivedText",
    "SendDigits",
    "SentInterrupt",
    "SentSetup",
    "Setup",
    "Text",
    "Unknown",
    "as_fields",
    "decode",
    "decode_outbound",
    "decode_received",
    "encode",
    "encode_inbound",
    "invalid_message",
    "text_frame",
]
