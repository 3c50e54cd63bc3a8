"""Wire protocols: how each endpoint turns messages into commands and engine events into messages.

- `/ws` (SeedProtocol): the iOS app's contract. Binary float32 24 kHz in, text pieces out.
- `/v2` (V2Protocol): JSON control and events (words, timestamps, end of turn, flush), audio as
  binary f32 or s16 at any rate from 8 to 48 kHz.
- `/api/asr-streaming` (KyutaiProtocol): msgpack, as Kyutai's moshi-server batched ASR, so
  Kyutai's own clients work unchanged.

A protocol is pure: no I/O, no asyncio. The session does the I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..audio.pcm import BadAudio, decode_f32le
from ..engine.events import EndOfTurnProbs, Event, TextPiece, Word, WordEnd
from ..logs import get_logger
from ..model.loader import FRAME_RATE, SAMPLE_RATE
from .protocol import Close

# A close frame's payload is at most 125 bytes: the code takes 2.
MAX_REASON_BYTES = 123

log = get_logger("protocol")


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a protocol may tell the client when a session opens."""

    session_id: str
    model: str  # the model setting
    delay_s: float  # text delay behind the audio
    delay_steps: int
    vad_heads: int  # 0 when the checkpoint has no end-of-turn heads
    eot_head: int
    eot_threshold: float
    vad_interval: int


# ---- commands a protocol extracts from client messages -------------------------------------
@dataclass(frozen=True, slots=True)
class AudioIn:
    samples: np.ndarray  # float32 mono at 24 kHz


@dataclass(frozen=True, slots=True)
class FlushIn:
    id: Any  # echoed in `flushed`


@dataclass(frozen=True, slots=True)
class FinishIn:
    pass


@dataclass(frozen=True, slots=True)
class MarkerIn:
    id: int


@dataclass(frozen=True, slots=True)
class Reply:
    items: list[Any]  # messages to send now (e.g. `ready` after `start`)


@dataclass(frozen=True, slots=True)
class Reject:
    code: int  # WebSocket close code
    reason: str  # close reason (one line)
    error: str = "bad_request"  # machine-readable error code for protocols that send one


Command = AudioIn | FlushIn | FinishIn | MarkerIn | Reply | Reject


def clip_reason(reason: str) -> str:
    """A close reason that fits a close frame (123 bytes of UTF-8), cut on a character boundary."""
    data = reason.encode()
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


def time_of(step: int, delay_steps: int) -> float:
    """Seconds of audio a step's text refers to (Kyutai: (step - delay) / 12.5)."""
    return max(0, step - delay_steps) / FRAME_RATE


class Protocol:
    """Base: subclasses override what their endpoint speaks."""

    path = ""
    merge_text = False  # consecutive text items may be merged for a slow reader

    def __init__(self, info: SessionInfo) -> None:
        self.info = info

    def opening(self) -> list[Any]:
        return []

    def parse(self, message: str | bytes) -> list[Command]:
        raise NotImplementedError

    def commands(self, message: str | bytes) -> list[Command]:
        """`parse`, guarded: the one place where client bytes become commands. Whatever a parser
        raises on hostile input (a nesting depth past the recursion limit, a type it did not
        expect) is the client's bad payload (1007), never an internal error; every close reason
        fits a close frame."""
        try:
            commands = self.parse(message)
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad message
            log.warning("unparseable_message", endpoint=self.path, exc_info=True)
            return [Reject(Close.BAD_PAYLOAD, f"malformed message ({type(exc).__name__})", "bad_message")]
        return [Reject(c.code, clip_reason(c.reason), c.error) if isinstance(c, Reject) else c
                for c in commands]

    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        raise NotImplementedError

    def flushed(self, flush_id: Any) -> list[Any]:
        return []

    def drain(self) -> np.ndarray:
        """Audio held back inside the protocol (a resampler's tail), released at a flush."""
        return np.zeros(0, np.float32)

    def marker(self, marker_id: int) -> list[Any]:
        return []

    def closing(self, code: int, reason: str, error: str | None) -> list[Any]:
        return []

    def wire(self, items: list[Any]) -> list[str | bytes]:
        """Serialize pending items, merging text where the protocol allows."""
        raise NotImplementedError


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


class V2Protocol(Protocol):
    """/v2: JSON messages out; binary audio and JSON control in."""

    path = "/v2"
    merge_text = True

    def __init__(self, info: SessionInfo) -> None:
        super().__init__(info)
        self.encoding = "f32"  # or "s16": little-endian PCM
        self.sample_rate = SAMPLE_RATE
        self.vad_interval = info.vad_interval
        self.audio_started = False  # `start` is only allowed before the first audio
        self._resampler: Any = None  # soxr stream when sample_rate != 24 kHz
        self._eot_armed = False  # a word was heard since the last end_of_turn

    def _ready(self) -> dict[str, Any]:
        return {"type": "ready", "session_id": self.info.session_id, "model": self.info.model,
                "delay": self.info.delay_s, "encoding": self.encoding,
                "sample_rate": self.sample_rate, "end_of_turn": self.info.vad_heads > 0,
                "vad_interval": self.vad_interval}

    def opening(self) -> list[Any]:
        return [self._ready()]

    def _start(self, msg: dict[str, Any]) -> Command:
        if self.audio_started:
            return Reject(Close.BAD_PAYLOAD, "start must come before any audio", "start_after_audio")
        encoding = msg.get("encoding", "f32")
        rate = msg.get("sample_rate", SAMPLE_RATE)
        interval = msg.get("vad_interval", self.vad_interval)
        if encoding not in ("f32", "s16"):
            return Reject(Close.BAD_PAYLOAD, f"start: encoding must be 'f32' or 's16', got {encoding!r}",
                          "bad_start")
        if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 48000:
            return Reject(Close.BAD_PAYLOAD,
                          f"start: sample_rate must be an integer from 8000 to 48000, got {rate!r}",
                          "bad_start")
        if isinstance(interval, bool) or not isinstance(interval, int) or not 0 <= interval <= 1000:
            return Reject(Close.BAD_PAYLOAD, f"start: vad_interval must be 0-1000 steps, got {interval!r}",
                          "bad_start")
        unknown = set(msg) - {"type", "encoding", "sample_rate", "vad_interval"}
        if unknown:
            return Reject(Close.BAD_PAYLOAD, f"start: unknown field(s) {', '.join(sorted(unknown))}",
                          "bad_start")
        self.encoding, self.sample_rate, self.vad_interval = encoding, rate, interval
        if rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return Reply([self._ready()])

    def _audio(self, payload: bytes) -> Command:
        self.audio_started = True
        try:
            if self.encoding == "s16":
                if len(payload) % 2:
                    raise BadAudio(f"binary message of {len(payload)} bytes is not whole s16 samples "
                                   "(length must be a multiple of 2)")
                samples = np.frombuffer(payload, "<i2").astype(np.float32) / 32768.0
            else:
                samples = decode_f32le(payload)
        except BadAudio as exc:
            return Reject(Close.BAD_PAYLOAD, str(exc), "bad_audio")
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        return AudioIn(np.asarray(samples, np.float32))

    def parse(self, message: str | bytes) -> list[Command]:
        if isinstance(message, bytes):
            return [self._audio(message)] if message else []
        try:
            msg = json.loads(message)
        except json.JSONDecodeError as exc:
            return [Reject(Close.BAD_PAYLOAD, f"malformed JSON: {exc.msg} at {exc.pos}", "bad_json")]
        except RecursionError:
            return [Reject(Close.BAD_PAYLOAD, "malformed JSON: nested too deeply", "bad_json")]
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            return [Reject(Close.BAD_PAYLOAD, "a control message is a JSON object with a string 'type'",
                           "bad_json")]
        kind = msg["type"]
        if kind == "start":
            return [self._start(msg)]
        if kind == "flush":
            return [FlushIn(msg.get("id"))]
        if kind == "finish":
            return [FinishIn()]
        return [Reject(Close.UNSUPPORTED, f"unknown message type {kind!r}: use start, flush or finish",
                       "unknown_type")]

    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        out: list[Any] = []
        delay = self.info.delay_steps
        for event in events:
            if isinstance(event, TextPiece):
                out.append({"type": "text", "text": event.text})
            elif isinstance(event, Word):
                out.append({"type": "word", "text": event.text, "start": round(event.start_time, 3)})
                self._eot_armed = True
            elif isinstance(event, WordEnd):
                out.append({"type": "word_end", "stop": round(event.stop_time, 3)})
            elif isinstance(event, EndOfTurnProbs):
                if self.vad_interval and event.step % self.vad_interval == 0:
                    out.append({"type": "vad", "probs": [round(p, 4) for p in event.probs],
                                "time": time_of(event.step, delay)})
                head = self.info.eot_head
                if (self._eot_armed and head < len(event.probs)
                        and event.probs[head] >= self.info.eot_threshold):
                    self._eot_armed = False
                    out.append({"type": "end_of_turn", "head": head,
                                "probability": round(event.probs[head], 4),
                                "time": time_of(event.step, delay)})
        return out

    def flushed(self, flush_id: Any) -> list[Any]:
        return [{"type": "flushed", "id": flush_id}]

    def drain(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        import soxr

        # The resampler's last samples, then a fresh resampler for what follows the flush (which
        # inserts silence anyway): no audio stays behind in the filter.
        tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        self._resampler = soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                              quality="HQ")
        return np.asarray(tail, np.float32)

    def closing(self, code: int, reason: str, error: str | None) -> list[Any]:
        items: list[Any] = []
        if error is not None:
            items.append({"type": "error", "code": error, "message": reason})
        items.append({"type": "closing", "code": int(code), "reason": reason})
        return items

    def wire(self, items: list[Any]) -> list[str | bytes]:
        merged: list[dict[str, Any]] = []
        for item in items:
            if item["type"] == "text" and merged and merged[-1]["type"] == "text":
                merged[-1] = {"type": "text", "text": merged[-1]["text"] + item["text"]}
            else:
                merged.append(item)
        return [json.dumps(m, ensure_ascii=False) for m in merged]


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


PROTOCOLS: dict[str, type[Protocol]] = {p.path: p for p in (SeedProtocol, V2Protocol, KyutaiProtocol)}
