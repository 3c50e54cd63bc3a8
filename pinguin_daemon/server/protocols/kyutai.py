"""/api/asr-streaming: msgpack, as Kyutai's moshi-server batched ASR, so Kyutai's own clients work
unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...engine.events import EndOfTurnProbs, Event, Word, WordEnd
from ..codes import Close
from .base import AudioIn, Command, MarkerIn, Protocol, Reject


class KyutaiProtocol(Protocol):
    """/api/asr-streaming: msgpack messages as Kyutai's moshi-server (batched ASR)."""

    path = "/api/asr-streaming"

    def opening(self) -> list[Any]:
        return [{"type": "Ready"}]

    def parse(self, message: str | bytes) -> list[Command]:
        import msgpack

        if isinstance(message, str):
            return [Reject(Close.UNSUPPORTED, "messages on /api/asr-streaming are msgpack (binary)")]
        try:
            msg = msgpack.unpackb(message)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            return [Reject(Close.BAD_PAYLOAD, f"malformed msgpack: {exc}")]
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "Audio":
            pcm = msg.get("pcm")
            if not isinstance(pcm, list | tuple):
                return [Reject(Close.BAD_PAYLOAD, "Audio.pcm must be a list of floats")]
            if not all(isinstance(x, float | int) and not isinstance(x, bool) for x in pcm):
                return [Reject(Close.BAD_PAYLOAD, "Audio.pcm must be a flat list of numbers")]
            samples = np.asarray(pcm, np.float32)
            if not np.isfinite(samples).all():
                return [Reject(Close.BAD_PAYLOAD, "Audio.pcm must be finite floats")]
            return [AudioIn(samples)]
        if kind == "Marker":
            marker = msg.get("id")
            if isinstance(marker, bool) or not isinstance(marker, int):
                return [Reject(Close.BAD_PAYLOAD, "Marker.id must be an integer")]
            return [MarkerIn(marker)]
        return [Reject(Close.UNSUPPORTED, f"unknown message type {kind!r}: use Audio or Marker")]

    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, Word):
                out.append({"type": "Word", "text": event.text, "start_time": event.start_time})
            elif isinstance(event, WordEnd):
                out.append({"type": "EndWord", "stop_time": event.stop_time})
        probs = next((list(e.probs) for e in events if isinstance(e, EndOfTurnProbs)), [])
        out.append({"type": "Step", "step_idx": step, "prs": probs, "buffered_pcm": buffered})
        return out

    def marker(self, marker_id: int) -> list[Any]:
        return [{"type": "Marker", "id": marker_id}]

    def closing(self, code: int, reason: str, error: str | None) -> list[Any]:
        return [{"type": "Error", "message": reason}] if code not in (1000, 1001) else []

    def wire(self, items: list[Any]) -> list[str | bytes]:
        import msgpack

        return [msgpack.packb(item) for item in items]
