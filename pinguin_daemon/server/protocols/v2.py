"""/v2: JSON control and events (words, timestamps, end of turn, flush); audio as binary f32 or
s16 at any rate from 8 to 48 kHz."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ...audio.pcm import BadAudio, decode_f32le
from ...engine.events import EndOfTurnProbs, Event, TextPiece, Word, WordEnd
from ...model.loader import SAMPLE_RATE
from ..codes import Close
from .base import (
    AudioIn,
    Command,
    FinishIn,
    FlushIn,
    Protocol,
    Reject,
    Reply,
    SessionInfo,
    load_json,
    time_of,
)


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
        msg = load_json(message, "bad_json")
        if isinstance(msg, Reject):
            return [msg]
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
