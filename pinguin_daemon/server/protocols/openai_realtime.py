"""/v1/realtime?intent=transcription: OpenAI's realtime transcription protocol, so apps written
against the official SDKs (and Open WebUI, LiveKit, Pipecat) stream to the daemon unchanged.

Client events: `session.update` (GA: a session of type "transcription") or its beta alias
`transcription_session.update`; `input_audio_buffer.append` (base64 pcm16, 24 kHz mono, up to
15 MiB of base64), `input_audio_buffer.commit`, `input_audio_buffer.clear`.
Server events: `session.created` / `session.updated` (beta: `transcription_session.updated`),
`input_audio_buffer.speech_started` / `speech_stopped` / `committed` / `cleared`,
`conversation.item.added` and `.done` (beta: `conversation.item.created`), a
`conversation.item.input_audio_transcription.delta` for each piece of text as it is decoded (the
turn's deltas concatenated are its transcript), `...completed` with the turn's transcript and the
seconds of audio it covers, and `error`.

Turns, as OpenAI defines them:
- `server_vad` (the default): a voice activity detector (Silero) on the incoming audio honours
  `threshold`, `prefix_padding_ms` and `silence_duration_ms`: `speech_started` as soon as speech
  is heard, `speech_stopped` after the silence, then `committed` and `completed` once the model has
  decoded the audio up to the end of the speech (its 0.5 s delay later; no silence is injected).
- `semantic_vad`: speech starts as above; the turn ends when the model's end-of-turn head for the
  `eagerness` says so (checkpoints with the heads: kyutai/stt-1b-en_fr-candle).
- `null`: one turn until the client commits.
A commit ends the open turn at once: the model's delay of silence is fed faster than real time (not
counted in the client's timeline). Every piece of text lands in exactly one completed turn: text
decoded while no turn is open goes to the next one. Times are the client's audio timeline.

As OpenAI's API, a bad event gets an `error` event and the session goes on; only a message that is
not JSON closes it (1007).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...audio.vad import SpeechStarted, SpeechStopped, VadEvent, VadSettings
from ...engine.events import EndOfTurnProbs, Event, TextPiece
from ...model.loader import SAMPLE_RATE
from ..codes import Close
from .base import (
    AudioIn,
    Command,
    FlushIn,
    Protocol,
    Reject,
    Reply,
    SessionInfo,
    VadReset,
    load_json,
    time_of,
)

# What a transcription session says about itself before any session.update (OpenAI's defaults).
DEFAULT_TURN_DETECTION: dict[str, Any] = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                          "silence_duration_ms": 500}
# semantic_vad: eagerness -> the end-of-turn head (pauses of 0.5, 1, 2, 3 s) and its threshold.
EAGERNESS = {"high": (0, 0.5), "medium": (1, 0.5), "auto": (1, 0.5), "low": (3, 0.5)}
# The largest input_audio_buffer.append the SDK sends is 15 MiB of base64; with the JSON around it.
MAX_EVENT_BYTES = 16 * 1024 * 1024
# What the daemon echoes of a client's event (its event_id, an unknown type) is cut to this many
# characters, and a transcription setting (model, language, prompt) may be at most this long.
MAX_ECHO = 256
MAX_SETTING = 2048


@dataclass(slots=True)
class Turn:
    """One item of the conversation: a turn of the user's speech."""

    item_id: str
    start_s: float  # where its audio begins (client timeline)
    end_s: float | None = None  # where its speech ended, once known
    text: str = ""  # its transcript so far
    announced: bool = False  # speech_started was sent


class OpenAIRealtimeProtocol(Protocol):
    """One realtime transcription session."""

    path = "/v1/realtime"

    def __init__(self, info: SessionInfo) -> None:
        super().__init__(info)
        self.session_id = "sess_" + secrets.token_hex(8)
        self.turn_detection: dict[str, Any] | None = dict(DEFAULT_TURN_DETECTION)
        self.vad_settings = VadSettings()
        self.transcription: dict[str, Any] = {"model": info.model}
        self.beta = False  # the client spoke the beta dialect (transcription_session.update)
        self._event_ids = itertools.count(1)
        self._item_ids = itertools.count(1)
        self.open: Turn | None = None  # the turn speech is going into
        self.ending_turn: Turn | None = None  # a turn whose speech ended, waiting for its last words
        self.pending = ""  # text decoded while no turn was open: it goes to the next one
        self.previous_item_id: str | None = None
        self.appended = 0  # samples the client appended (24 kHz)
        self.buffer_start_s = 0.0  # where the audio not yet committed begins
        self.cleared_s = 0.0  # text for audio before this was discarded by input_audio_buffer.clear
        self.speaking = False  # the voice detector hears speech (between started and stopped)

    @property
    def mode(self) -> str | None:
        return self.turn_detection["type"] if self.turn_detection is not None else None

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
        if not isinstance(client_event, str):
            client_event = None
        elif len(client_event) > MAX_ECHO:
            client_event = client_event[:MAX_ECHO]
        return Reply([{"type": "error", "error": {"type": "invalid_request_error", "code": code,
                                                  "message": message, "param": param,
                                                  "event_id": client_event}}])

    def _turn_detection(self, value: Any, event: dict[str, Any]) -> Reply | None:
        """Apply a turn_detection setting; an error Reply when it is not one we do."""
        if value is None:
            self.turn_detection, self.vad_settings = None, None
            return None
        if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
            return self._error("invalid_value", "turn_detection must be null, server_vad or semantic_vad",
                               event, "turn_detection")
        if value["type"] == "semantic_vad":
            eagerness = value.get("eagerness", "auto")
            if not isinstance(eagerness, str) or eagerness not in EAGERNESS:
                return self._error("invalid_value", "eagerness must be low, medium, high or auto", event,
                                   "turn_detection.eagerness")
            if not self.info.vad_heads:
                return self._error("unsupported_value", "semantic_vad needs the model's end-of-turn heads, "
                                   f"and the checkpoint served ({self.info.model}) has none: use server_vad, "
                                   "or serve kyutai/stt-1b-en_fr-candle", event, "turn_detection.type")
            self.turn_detection = {"type": "semantic_vad", "eagerness": eagerness}
            self.vad_settings = VadSettings()  # speech still starts where the voice does
            return None
        threshold = value.get("threshold", 0.5)
        padding = value.get("prefix_padding_ms", 300)
        silence = value.get("silence_duration_ms", 500)
        for name, number, low, high in (("threshold", threshold, 0.0, 1.0),
                                        ("prefix_padding_ms", padding, 0, 10000),
                                        ("silence_duration_ms", silence, 0, 10000)):
            if isinstance(number, bool) or not isinstance(number, int | float) or not low <= number <= high:
                return self._error("invalid_value", f"turn_detection.{name} must be a number from {low} to "
                                   f"{high}", event, f"turn_detection.{name}")
        self.turn_detection = {"type": "server_vad", "threshold": threshold, "prefix_padding_ms": padding,
                               "silence_duration_ms": silence}
        self.vad_settings = VadSettings(float(threshold), int(padding), int(silence))
        return None

    def _transcription(self, value: Any, event: dict[str, Any], param: str) -> Reply | None:
        """Take the transcription settings (echoed in every session.updated: each is bounded)."""
        if not isinstance(value, dict):
            return None
        settings = {k: v for k, v in value.items()
                    if k in ("model", "language", "prompt") and isinstance(v, str)}
        for key, text in settings.items():
            if len(text) > MAX_SETTING:
                return self._error("string_above_max_length", f"{param}.{key} is at most {MAX_SETTING} "
                                   "characters", event, f"{param}.{key}")
        self.transcription = settings
        return None

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
        problem = self._transcription(audio_in.get("transcription"), event,
                                      "session.audio.input.transcription")
        if problem is not None:
            return problem
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
        problem = self._transcription(session.get("input_audio_transcription"), event,
                                      "session.input_audio_transcription")
        if problem is not None:
            return problem
        self.beta = True
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
        self.appended += len(pcm) // 2
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
            # Audio not yet committed is dropped: the open turn, and text still to come for it.
            self.open, self.pending = None, ""
            self.cleared_s = self.buffer_start_s = self.appended / SAMPLE_RATE
            return [VadReset(), Reply([{"type": "input_audio_buffer.cleared"}])]
        if kind == "session.update":
            return [self._update(event)]
        if kind == "transcription_session.update":
            return [self._beta_update(event)]
        return [self._error("unsupported_event", f"event type {kind[:MAX_ECHO]!r} is not supported by a "
                            "transcription session: use session.update and input_audio_buffer.*", event)]

    # ---- turns ------------------------------------------------------------------------------
    def _new_turn(self, start_s: float) -> Turn:
        return Turn(f"item_{self.session_id[5:]}_{next(self._item_ids)}", start_s)

    def _delta(self, turn: Turn, text: str) -> list[Any]:
        delta = text if turn.text else text.lstrip()  # a turn starts with a word
        if not delta:
            return []
        turn.text += delta
        return [{"type": "conversation.item.input_audio_transcription.delta", "item_id": turn.item_id,
                 "content_index": 0, "delta": delta}]

    def _item(self, turn: Turn, status: str) -> dict[str, Any]:
        content = {"type": "input_audio", "transcript": turn.text if status == "completed" else None}
        return {"id": turn.item_id, "object": "realtime.item", "type": "message", "status": status,
                "role": "user", "content": [content]}

    def _complete(self, turn: Turn, end_s: float) -> list[Any]:
        """committed, the item, then completed with the transcript and the seconds it covers."""
        seconds = max(0.0, end_s - self.buffer_start_s)
        self.buffer_start_s = max(self.buffer_start_s, end_s)
        out: list[Any] = [{"type": "input_audio_buffer.committed", "item_id": turn.item_id,
                           "previous_item_id": self.previous_item_id}]
        if self.beta:
            out.append({"type": "conversation.item.created", "previous_item_id": self.previous_item_id,
                        "item": self._item(turn, "completed")})
        else:
            out.append({"type": "conversation.item.added", "previous_item_id": self.previous_item_id,
                        "item": self._item(turn, "in_progress")})
        out.append({"type": "conversation.item.input_audio_transcription.completed", "item_id": turn.item_id,
                    "content_index": 0, "transcript": turn.text,
                    "usage": {"type": "duration", "seconds": round(seconds, 3)}})
        if not self.beta:
            out.append({"type": "conversation.item.done", "previous_item_id": self.previous_item_id,
                        "item": self._item(turn, "completed")})
        self.previous_item_id = turn.item_id
        return out

    def _stopped(self, turn: Turn, end_s: float) -> list[Any]:
        turn.end_s = end_s
        if not turn.announced:
            return []
        return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(end_s * 1000),
                 "item_id": turn.item_id}]

    def on_vad(self, events: list[VadEvent]) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, SpeechStarted):
                self.speaking = True
            elif isinstance(event, SpeechStopped):
                self.speaking = False
            if isinstance(event, SpeechStarted) and (self.open is None or not self.open.announced):
                # (A turn opened unannounced, by speech going on past a turn's end, is this one.)
                turn = self.open or self._new_turn(event.audio_start_ms / 1000)
                if not turn.text:
                    turn.start_s = event.audio_start_ms / 1000
                turn.announced = True
                self.open = turn
                out.append({"type": "input_audio_buffer.speech_started",
                            "audio_start_ms": event.audio_start_ms, "item_id": turn.item_id})
                out += self._delta(turn, self.pending)
                self.pending = ""
            elif isinstance(event, SpeechStopped) and self.mode == "server_vad" and self.open is not None:
                turn, self.open = self.open, None
                previous = self.ending_turn
                if previous is not None:  # (its words are all in by now in practice)
                    out += self._complete(previous, previous.end_s or event.audio_end_ms / 1000)
                out += self._stopped(turn, event.audio_end_ms / 1000)
                self.ending_turn = turn  # completed once the model has decoded up to its end
        return out

    # ---- engine events ------------------------------------------------------------------------
    def render(self, events: list[Event], step: int, buffered: int) -> list[Any]:
        out: list[Any] = []
        for event in events:
            if isinstance(event, TextPiece):
                at = self.clock(time_of(event.step, self.info.delay_steps))
                ending = self.ending_turn
                if ending is not None and at < (ending.end_s or 0.0):
                    out += self._delta(ending, event.text)  # (its speech had ended: a clear spares it)
                elif at < self.cleared_s:
                    continue  # audio the client cleared
                elif self.open is not None:
                    out += self._delta(self.open, event.text)
                elif self.mode is None:  # no turn detection: one turn until the commit
                    self.open = self._new_turn(self.buffer_start_s)
                    out += self._delta(self.open, self.pending + event.text)
                    self.pending = ""
                else:
                    self.pending += event.text
            elif isinstance(event, EndOfTurnProbs) and self.mode == "semantic_vad":
                assert self.turn_detection is not None
                head, threshold = EAGERNESS[self.turn_detection["eagerness"]]
                if (self.open is not None and self.open.text and head < len(event.probs)
                        and event.probs[head] >= threshold):
                    turn, self.open = self.open, None
                    end_s = self.clock(time_of(event.step, self.info.delay_steps))
                    out += self._stopped(turn, end_s) + self._complete(turn, end_s)
                    self._speech_goes_on(end_s)
        decoded_to = self.clock(time_of(step, self.info.delay_steps))
        ending = self.ending_turn
        if ending is not None and decoded_to >= (ending.end_s or 0.0):
            self.ending_turn = None
            out += self._complete(ending, ending.end_s or decoded_to)
        return out

    def flushed(self, flush_id: Any) -> list[Any]:
        """A commit: the model's delay was fed, every word is in; the open turn ends here."""
        end_s = self.appended / SAMPLE_RATE
        out: list[Any] = []
        if self.ending_turn is not None:
            turn, self.ending_turn = self.ending_turn, None
            out += self._complete(turn, turn.end_s or end_s)
        turn = self.open or self._new_turn(self.buffer_start_s)
        self.open = None
        out += self._delta(turn, self.pending)
        self.pending = ""
        out += self._complete(turn, end_s)
        self._speech_goes_on(end_s)
        return out

    def _speech_goes_on(self, end_s: float) -> None:
        """A turn ended (the model's end of turn, a commit) while the voice goes on: what follows
        is the next turn's, at once (announced with speech_started when the voice starts again)."""
        if self.speaking and self.mode is not None:
            self.open = self._new_turn(end_s)

    def _finish_turns(self) -> list[Any]:
        """Closing while the client still listens: the turns with text are completed."""
        out: list[Any] = []
        end_s = self.appended / SAMPLE_RATE
        if self.ending_turn is not None:
            turn, self.ending_turn = self.ending_turn, None
            out += self._complete(turn, turn.end_s or end_s)
        turn, self.open = self.open or self._new_turn(self.buffer_start_s), None
        out += self._delta(turn, self.pending)
        self.pending = ""
        if turn.text:
            out += self._complete(turn, end_s)
        return out

    def closing(self, code: int, reason: str, error: str | None) -> list[Any]:
        out = self._finish_turns()
        if error is not None:
            out.append({"type": "error", "error": {"type": "invalid_request_error", "code": error,
                                                   "message": reason, "param": None, "event_id": None}})
        return out

    def wire(self, items: list[Any]) -> list[str | bytes]:
        return [json.dumps({"event_id": f"event_{next(self._event_ids)}", **item}, ensure_ascii=False)
                for item in items]
