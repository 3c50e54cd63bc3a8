"""/v2: JSON control and events (words, timestamps, end of turn, flush); audio as binary f32 or
s16 at any rate from 8 to 48 kHz."""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import numpy as np

from ...audio.pcm import BadAudio, decode_f32le
from ...audio.vad import SpeechStopped, VadEvent, VadSettings
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

# Numbered events kept for a resumed connection to replay: the last this many (minutes of
# dictation; a few MB at most).
MAX_REPLAY = 10_000
# The longest flush id (characters): `flushed` echoes it.
MAX_FLUSH_ID = 256
# Pause each end-of-turn head predicts (s): the silence detector waits as long for the same head.
HEAD_PAUSES_MS = (500, 1000, 2000, 3000)
# How a session detects the end of a turn: the model's heads, silence on the audio, or not at all.
TURN_DETECTION = ("model", "silence", "none")
# Events that carry transcript or state: numbered (`seq`) and replayed after a resume.
NUMBERED = frozenset({"text", "word", "word_end", "end_of_turn", "vad", "flushed"})


class V2Protocol(Protocol):
    """/v2: JSON messages out; binary audio and JSON control in.

    Every event that carries transcript or state has a `seq` (1, 2, ... per session, across
    reconnections) and is kept for a while, so that a client that lost its connection resumes
    with exactly the events it missed (docs/PROTOCOL.md). Text is never merged: each `seq` is
    one message."""

    path = "/v2"

    def __init__(self, info: SessionInfo) -> None:
        super().__init__(info)
        self.encoding = "f32"  # or "s16": little-endian PCM
        self.sample_rate = SAMPLE_RATE
        self.vad_interval = info.vad_interval
        self.audio_started = False  # `start` is only allowed before the first audio
        self._resampler: Any = None  # soxr stream when sample_rate != 24 kHz
        self._eot_armed = False  # a word was heard since the last end_of_turn
        self.client_samples = 0  # samples taken from the client, at its own rate (for a resume)
        self.turn_detection = ""  # set below: "model" with heads, "silence" without
        self._set_turn_detection("model" if info.vad_heads else "silence")
        self._silence_end: float | None = None  # where silence ended a turn (its words may lag)
        self.seq = 0  # the last event number given
        self._kept: deque[tuple[int, dict[str, Any]]] = deque()  # (seq, event)

    def _ready(self) -> dict[str, Any]:
        ready = {"type": "ready", "session_id": self.info.session_id, "model": self.info.model,
                 "delay": self.info.delay_s, "encoding": self.encoding,
                 "sample_rate": self.sample_rate, "end_of_turn": self.turn_detection != "none",
                 "turn_detection": self.turn_detection, "vad_interval": self.vad_interval}
        if self.info.resume_token is not None:
            ready["resume_token"] = self.info.resume_token
        return ready

    def _set_turn_detection(self, mode: str) -> None:
        self.turn_detection = mode
        # The silence detector waits as long as the configured head's pause.
        pause = HEAD_PAUSES_MS[min(self.info.eot_head, len(HEAD_PAUSES_MS) - 1)]
        self.vad_settings = VadSettings(0.5, 0, pause) if mode == "silence" else None

    def _number(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give transcript and state events their `seq` and keep them for a replay."""
        for item in items:
            if item["type"] in NUMBERED:
                self.seq += 1
                item["seq"] = self.seq
                if self.info.resume_token is not None:
                    self._kept.append((self.seq, item))
        # The last MAX_REPLAY, however old: a connection can drop while a long message is applied
        # (no client acknowledges events). Each is small (a flush id is at most MAX_FLUSH_ID).
        while len(self._kept) > MAX_REPLAY:
            self._kept.popleft()
        return items

    def replay(self, last_seq: int) -> list[dict[str, Any]] | None:
        """The events after `last_seq` in order, or None when some of them are no longer kept."""
        missing = self.seq - last_seq
        if missing <= 0:
            return []
        if len(self._kept) < missing:
            return None
        return [item for _, item in list(self._kept)[-missing:]]

    def resumed(self) -> dict[str, Any]:
        """What a resumed connection hears first: where to send audio from, and the last event."""
        return {"type": "resumed", "session_id": self.info.session_id, "samples": self.client_samples,
                "encoding": self.encoding, "sample_rate": self.sample_rate, "last_seq": self.seq}

    def opening(self) -> list[Any]:
        return [self._ready()]

    def _start(self, msg: dict[str, Any]) -> Command:
        if self.audio_started:
            return Reject(Close.BAD_PAYLOAD, "start must come before any audio", "start_after_audio")
        encoding = msg.get("encoding", "f32")
        rate = msg.get("sample_rate", SAMPLE_RATE)
        interval = msg.get("vad_interval", self.vad_interval)
        turns = msg.get("turn_detection", self.turn_detection)
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
        if turns not in TURN_DETECTION:
            return Reject(Close.BAD_PAYLOAD, f"start: turn_detection must be model, silence or none, "
                          f"got {turns!r}", "bad_start")
        if turns == "model" and not self.info.vad_heads:
            return Reject(Close.BAD_PAYLOAD, f"start: turn_detection 'model' needs the end-of-turn heads, "
                          f"which {self.info.model} has not: use 'silence'", "bad_start")
        unknown = set(msg) - {"type", "encoding", "sample_rate", "vad_interval", "turn_detection"}
        if unknown:
            return Reject(Close.BAD_PAYLOAD, f"start: unknown field(s) {', '.join(sorted(unknown))}",
                          "bad_start")
        self.encoding, self.sample_rate, self.vad_interval = encoding, rate, interval
        self._set_turn_detection(turns)
        self._resampler = None  # (a second start may change the rate back to 24 kHz)
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
        self.client_samples += len(samples)
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
            flush_id = msg.get("id")
            if not (flush_id is None or isinstance(flush_id, (int, float, str))) or (
                    isinstance(flush_id, str) and len(flush_id) > MAX_FLUSH_ID):
                # Every `flushed` echoes it and is kept for a resume: it stays small.
                return [Reject(Close.BAD_PAYLOAD, f"flush: id must be a string of at most {MAX_FLUSH_ID} "
                               "characters, a number or null", "bad_flush")]
            return [FlushIn(flush_id)]
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
                if (self.turn_detection == "model" and self._eot_armed and head < len(event.probs)
                        and event.probs[head] >= self.info.eot_threshold):
                    self._eot_armed = False
                    out.append({"type": "end_of_turn", "source": "model", "head": head,
                                "probability": round(event.probs[head], 4),
                                "time": time_of(event.step, delay)})
        if self._silence_end is not None and self.clock(time_of(step, delay)) >= self._silence_end:
            # The words up to the silence are decoded (the model lags the audio): the turn ends.
            end, self._silence_end = self._silence_end, None
            if self._eot_armed:
                self._eot_armed = False
                out.append({"type": "end_of_turn", "source": "silence", "time": round(end, 3)})
        return self._number(out)

    def on_vad(self, events: list[VadEvent]) -> list[Any]:
        for event in events:
            if isinstance(event, SpeechStopped):
                self._silence_end = event.audio_end_ms / 1000
        return []

    def flushed(self, flush_id: Any) -> list[Any]:
        return self._number([{"type": "flushed", "id": flush_id}])

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
        return [json.dumps(item, ensure_ascii=False) for item in items]
