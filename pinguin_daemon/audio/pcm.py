"""Payload decoding and re-framing into the model's 80 ms frames. Pure numpy, no I/O."""

from __future__ import annotations

import numpy as np

from ..model.loader import FRAME_SAMPLES


class BadAudio(ValueError):
    """A binary message that is not valid audio; `str(exc)` is the reason sent to the client."""


def decode_f32le(payload: bytes) -> np.ndarray:
    """Raw little-endian float32 mono samples, as the iOS client sends them.

    Raises:
        BadAudio: the length is not a multiple of 4, or a sample is NaN or infinite.
    """
    if len(payload) % 4:
        raise BadAudio(f"binary message of {len(payload)} bytes is not whole float32 samples "
                       "(length must be a multiple of 4)")
    samples = np.frombuffer(payload, dtype="<f4")
    if not np.isfinite(samples).all():
        bad = int(np.flatnonzero(~np.isfinite(samples))[0])
        raise BadAudio(f"sample {bad} of the message is NaN or infinite")
    return samples.astype(np.float32)


class Reframer:
    """Buffers samples of any chunk size into whole 1920-sample frames, in order, losing none."""

    def __init__(self, frame: int = FRAME_SAMPLES) -> None:
        self.frame = frame
        self._buffer: np.ndarray = np.zeros(0, np.float32)  # less than one frame between calls
        self.samples_in = 0  # every sample received (for the session summary)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add samples; return the whole frames now available, shape (n, frame) (n may be 0)."""
        self.samples_in += len(samples)
        data = np.concatenate([self._buffer, samples]) if len(self._buffer) else samples
        whole = len(data) // self.frame * self.frame
        self._buffer = data[whole:].copy()
        return data[:whole].reshape(-1, self.frame)

    def flush(self) -> np.ndarray:
        """The partial frame, zero-padded to a whole one, shape (0 or 1, frame): audio's last bit."""
        if not len(self._buffer):
            return np.zeros((0, self.frame), np.float32)
        out = np.zeros((1, self.frame), np.float32)
        out[0, : len(self._buffer)] = self._buffer
        self._buffer = np.zeros(0, np.float32)
        return out

    @property
    def buffered(self) -> int:
        """Samples waiting for a whole frame."""
        return len(self._buffer)
