"""/ws: the iOS app's contract. Binary float32 24 kHz in, text pieces out."""

from __future__ import annotations

from typing import Any

from ...audio.pcm import BadAudio, decode_f32le
from ...engine.events import Event, TextPiece
from ..codes import Close
from .base import AudioIn, Command, FinishIn, Protocol, Reject


class SeedProtocol(Protocol):
    """/ws: binary float32 24 kHz in, plain text pieces out; an empty message ends the audio."""

    path = "/ws"
    merge_text = True

    def parse(self, message: str | bytes) -> list[Command]:
        if isinstance(message, str):
            return [Reject(Close.UNSUPPORTED, "text messages are not accepted on /ws: send audio as "
                                              "binary float32 little-endian 24 kHz mono samples")]
        if not message:
            return [FinishIn()]
        try:
            return [AudioIn(decode_f32le(message))]
        except BadAudio as exc:
            return [Reject(Close.BAD_PAYLOAD, str(exc))]

    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        return [e.text for e in events if isinstance(e, TextPiece)]

    def wire(self, items: list[Any]) -> list[str | bytes]:
        return ["".join(items)] if items else []
