"""/v1/realtime?intent=transcription: OpenAI's realtime transcription protocol, so apps written
against the official SDKs (and Open WebUI, LiveKit, Pipecat) stream to the daemon unchanged.

Client events: `session.update` (GA: a session of type "transcription") or its beta alias
`transcription_session.update`; `input_audio_buffer.append` (base64 pcm16, 24 kHz mono),
`input_audio_buffer.commit`, `input_audio_buffer.clear`.
Server events: `session.created` / `session.updated` (beta: `transcription_session.updated`),
`input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`, a
`conversation.item.input_audio_transcription.delta` for each piece of text as it is decoded (the
pieces /ws sends: append only, the turn's deltas concatenated are its transcript),
`conversation.item.input_audio_transcription.completed` with the turn's transcript when the turn
ends, and `error`.

A turn ends at the model's end-of-turn (its semantic VAD heads, when `turn_detection` is server
VAD and the checkpoint has them: the -candle one) or at `commit`, which first feeds the model's
delay of silence faster than real time so the last words are in. As OpenAI's API, a bad event
gets an `error` event and the session goes on; only a message that is not JSON closes it (1007).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets
from typing import Any

import numpy as np

from ...engine.events import EndOfTurnProbs, Event, TextPiece
from ...model.loader import SAMPLE_RATE
from ..codes import Close
from .base import AudioIn, Command, FlushIn, Protocol, Reject, Reply, SessionInfo, load_json, time_of

# What a transcription session says about itself before any session.update (OpenAI's defaults).
DEFAULT_TURN_DETECTION: dict[str, Any] = {"type": "server_vad"}


class OpenAIRealtimeProtocol(Protocol):
    """One realtime transcription session."""

    path = "/v1/realtime"

    def __init__(self, info: SessionInfo) -> None:
        super().__init__(info)
        self.session_id = "sess_" + secrets.token_hex(8)
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_TURN_DETECTION)
        self.transcription: dict[str, Any] = {"model": info.model}
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        self.item_id: str | None = None  # the turn being transcribed, once a word came
        self.previous_item_id: str | None = None
        self.text = ""  # the current turn's transcript so far

    # ---- session description ------------------------------------------------------------------
    def _session(self) -> dict[str, Any]:
        return {"type": "transcription", "id": self.session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                                    "transcription": self.transcription,
                                    "turn_detection": self.turn_detection,
                                    "noise_reduction": None}},
                "include": []}

    def _beta_session(self) -> dict[str, Any]:
        return {"id": self.session_id, "object": "realtime.transcription_session",
                "input_audio_format": "pcm16", "input_audio_transcription": self.transcription,
                "turn_detection": self.turn_detection, "modalities": ["text"]}

    def opening(self) -> list[Any]:
        return [{"type": "session.created", "session": self._session()}]

    # ---- client events ------------------------------------------------------------------------
    def _error(self, code: str, message: str, event: dict[str, Any] | None = None,
               param: str | None = None) -> Reply:
        client_event = event.get("event_id") if isinstance(event, dict) else None
        return Reply([{"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                  "message": message, "param": param,
                                                  "event_id": client_event}}])

    def _turn_detection(self, value: Any, event: dict[str, Any]) -> Reply | None:
        """Apply a turn_detection setting; an error Reply when it is not one we do."""
        if value is None:
            self.turn_detection = None
            return None
        if isinstance(value, dict) and value.get("type") in ("server_vad", "semantic_vad"):
            self.turn_detection = value
            return None
        return self._error("invalid_value", "turn_detection must be null, server_vad or semantic_vad "
                           "(both end turns with the model's end-of-turn heads)", event, "turn_detection")

    def _transcription(self, value: Any) -> None:
        if isinstance(value, dict):
            self.transcription = {k: v for k, v in value.items()
                                  if k in ("model", "language", "prompt") and isinstance(v, str)}

    def _update(self, event: dict[str, Any]) -> Command:
        session = event.get("session")
        if not isinstance(session, dict):
            return self._error("missing_required_parameter", "session.update needs a session object",
                               event, "session")
        if session.get("type", "transcription") != "transcription":
            return self._error("invalid_value", "this server transcribes only: the session type must be "
                               "'transcription' (connect with ?intent=transcription)", event, "session.type")
        audio = session.get("audio", {})
        audio_in = audio.get("input", {}) if isinstance(audio, dict) else {}
        if not isinstance(audio_in, dict):
            audio_in = {}
        fmt = audio_in.get("format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm"
                                or fmt.get("rate", SAMPLE_RATE) != SAMPLE_RATE):
            return self._error("invalid_value", "input audio must be audio/pcm at 24000 Hz "
                               "(16-bit little-endian mono)", event, "session.audio.input.format")
        if "turn_detection" in audio_in:
            problem = self._turn_detection(audio_in["turn_detection"], event)
            if problem is not None:
                return problem
        self._transcription(audio_in.get("transcription"))
        return Reply([{"type": "session.updated", "session": self._session()}])

    def _beta_update(self, event: dict[str, Any]) -> Command:
        session = event.get("session")
        if not isinstance(session, dict):
            return self._error("missing_required_parameter", "transcription_session.update needs a "
                               "session object", event, "session")
        if session.get("input_audio_format", "pcm16") != "pcm16":
            return self._error("invalid_value", "input_audio_format must be pcm16 (24 kHz mono)", event,
                               "session.input_audio_format")
        if "turn_detection" in session:
            problem = self._turn_detection(session["turn_detection"], event)
            if problem is not None:
                return problem
        self._transcription(session.get("input_audio_transcription"))
        return Reply([{"type": "transcription_session.updated", "session": self._beta_session()}])

    def _append(self, event: dict[str, Any]) -> Command:
        audio = event.get("audio")
        if not isinstance(audio, str):
            return self._error("missing_required_parameter", "input_audio_buffer.append needs base64 audio",
                               event, "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            return self._error("invalid_value", "audio is not valid base64", event, "audio")
        if len(pcm) % 2:
            return self._error("invalid_value", f"audio of {len(pcm)} bytes is not whole pcm16 samples",
                               event, "audio")
        return AudioIn(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0)

    def parse(self, message: str | bytes) -> list[Command]:
        if isinstance(message, bytes):
            return [Reject(Close.UNSUPPORTED, "send JSON events; audio goes base64 in "
                                              "input_audio_buffer.append", "invalid_request_error")]
        event = load_json(message, "invalid_json")
        if isinstance(event, Reject):
            return [event]
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            return [self._error("invalid_request_error", "an event is a JSON object with a string 'type'")]
        kind = event["type"]
        if kind == "input_audio_buffer.append":
            return [self._append(event)]
        if kind == "input_audio_buffer.commit":
            return [FlushIn(event.get("event_id"))]
        if kind == "input_audio_buffer.clear":
            self.text, self.item_id = "", None
            return [Reply([{"type": "input_audio_buffer.cleared"}])]
        if kind == "session.update":
            return [self._update(event)]
        if kind == "transcription_session.update":
            return [self._beta_update(event)]
        return [self._error("unsupported_event", f"event type {kind!r} is not supported by a "
                            "transcription session: use session.update and input_audio_buffer.*", event)]

    # ---- engine events ------------------------------------------------------------------------
    def _start_turn(self, start_s: float) -> list[Any]:
        self.item_id = f"item_{self.session_id[5:]}_{next(self._item_ids)}"
        if self.turn_detection is None:
            return []
        return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": round(start_s * 1000),
                 "item_id": self.item_id}]

    def _end_turn(self, end_ms: int | None) -> list[Any]:
        """committed + completed for the current turn (an empty one when no word came)."""
        out: list[Any] = []
        if self.item_id is None:
            self.item_id = f"item_{self.session_id[5:]}_{next(self._item_ids)}"
        elif end_ms is not None and self.turn_detection is not None:
            out.append({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms,
                        "item_id": self.item_id})
        out.append({"type": "input_audio_buffer.committed", "item_id": self.item_id,
                    "previous_item_id": self.previous_item_id})
        out.append({"type": "conversation.item.input_audio_transcription.completed", "item_id": self.item_id,
                    "content_index": 0, "transcript": self.text,
                    "usage": {"type": "duration", "seconds": 0}})
        self.previous_item_id, self.item_id, self.text = self.item_id, None, ""
        return out

    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, TextPiece):
                delta = event.text if self.text else event.text.lstrip()  # a turn starts with a word
                if not delta:
                    continue
                if self.item_id is None:
                    out += self._start_turn(time_of(event.step, self.info.delay_steps))
                out.append({"type": "conversation.item.input_audio_transcription.delta",
                            "item_id": self.item_id, "content_index": 0, "delta": delta})
                self.text += delta
            elif isinstance(event, EndOfTurnProbs):
                head = self.info.eot_head
                if (self.turn_detection is not None and self.text and head < len(event.probs)
                        and event.probs[head] >= self.info.eot_threshold):
                    out += self._end_turn(round(time_of(event.step, self.info.delay_steps) * 1000))
        return out

    def flushed(self, flush_id: Any) -> list[Any]:
        """A commit: the model's delay was fed, every word is in; the turn ends here."""
        return self._end_turn(None)

    def closing(self, code: int, reason: str, error: str | None) -> list[Any]:
        if error is None:
            return []
        return [{"type": "error", "error": {"type": "invalid_request_error", "code": error,
                                            "message": reason, "param": None, "event_id": None}}]

    def wire(self, items: list[Any]) -> list[str | bytes]:
        return [json.dumps({"event_id": f"event_{next(self._event_ids)}", **item}, ensure_ascii=False)
                for item in items]
