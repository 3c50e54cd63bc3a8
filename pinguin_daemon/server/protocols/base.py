"""What every wire protocol shares: the commands a protocol extracts from client messages, the
`Protocol` base class, and the one guard where client bytes become commands.

A protocol is pure: no I/O, no asyncio. The session does the I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...audio.vad import VadEvent, VadSettings
from ...engine.events import Event
from ...logs import get_logger
from ...model.loader import FRAME_RATE
from ..codes import Close

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
    resume_token: str | None = None  # /v2: the secret that resumes this session (None: not resumable)


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
class VadReset:
    """The client discarded its audio buffer: voice activity starts afresh."""


@dataclass(frozen=True, slots=True)
class Reply:
    items: list[Any]  # messages to send now (e.g. `ready` after `start`)


@dataclass(frozen=True, slots=True)
class Reject:
    code: int  # WebSocket close code
    reason: str  # close reason (one line)
    error: str = "bad_request"  # machine-readable error code for protocols that send one


Command = AudioIn | FlushIn | FinishIn | MarkerIn | VadReset | Reply | Reject


def load_json(message: str, error: str) -> Any:
    """The decoded JSON of a text message, or the Reject (1007) a malformed one gets.

    Args:
        message: the text message.
        error: the protocol's machine-readable error code for it.
    """
    try:
        return json.loads(message)
    except json.JSONDecodeError as exc:
        return Reject(Close.BAD_PAYLOAD, f"malformed JSON: {exc.msg} at {exc.pos}", error)
    except RecursionError:
        return Reject(Close.BAD_PAYLOAD, "malformed JSON: nested too deeply", error)


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
        # Voice activity to detect on the incoming audio (None: none); the stream runs the
        # detector and hands its events to on_vad.
        self.vad_settings: VadSettings | None = None
        # The model's audio time (s) as the client's: flushes feed silence the client never sent.
        self.clock: Callable[[float], float] = lambda seconds: seconds

    def on_vad(self, events: list[VadEvent]) -> list[Any]:
        """Speech started or stopped in the client's audio; items to send."""
        return []

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


