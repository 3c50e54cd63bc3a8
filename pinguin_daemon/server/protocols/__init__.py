"""Wire protocols, one module each, and the router: the path a client connects to picks its
protocol. A new protocol is one new module and one line here.

- `/ws` (seed.py): the iOS app's contract.
- `/v2` (v2.py): JSON events and control, audio at any rate.
- `/api/asr-streaming` (kyutai.py): Kyutai's msgpack protocol.
- `/v1/realtime` (openai_realtime.py): OpenAI's realtime transcription events.
"""

from __future__ import annotations

from .base import (
    AudioIn,
    Command,
    FinishIn,
    FlushIn,
    MarkerIn,
    Protocol,
    Reject,
    Reply,
    SessionInfo,
    VadReset,
    clip_reason,
)
from .kyutai import KyutaiProtocol
from .openai_realtime import OpenAIRealtimeProtocol
from .seed import SeedProtocol
from .v2 import V2Protocol

PROTOCOLS: dict[str, type[Protocol]] = {
    p.path: p for p in (SeedProtocol, V2Protocol, KyutaiProtocol, OpenAIRealtimeProtocol)}

__all__ = ["PROTOCOLS", "AudioIn", "Command", "FinishIn", "FlushIn", "KyutaiProtocol", "MarkerIn", "Protocol",
           "Reject", "Reply", "SeedProtocol", "SessionInfo", "V2Protocol", "VadReset", "clip_reason"]
