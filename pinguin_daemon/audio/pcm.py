"""Payload decoding, resampling to 24 kHz and re-framing into the model's 80 ms frames. No I/O."""

from __future__ import annotations

from typing import Any

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


def decode_pcm(payload: bytes, width: int, channels: int) -> np.ndarray:
    """Little-endian integer PCM (unsigned 8-bit, signed 16- or 32-bit), any channel count, as
    float32 mono (the channels averaged).

    Raises:
        BadAudio: an unsupported width, or a length that is not whole samples of every channel.
    """
    if width not in (1, 2, 4):
        raise BadAudio(f"sample width {width} is not supported: use 1, 2 or 4 bytes")
    if len(payload) % (width * channels):
        raise BadAudio(f"{len(payload)} bytes are not whole {width}-byte samples of {channels} channel(s)")
    if width == 1:
        samples = (np.frombuffer(payload, np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        samples = np.frombuffer(payload, "<i2" if width == 2 else "<i4").astype(np.float32)
        samples /= float(2 ** (8 * width - 1))
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


class Resampler:
    """Audio at any rate, streamed into 24 kHz with soxr (HQ); follows a change of rate between
    chunks (what came before is finished at its own rate first)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.rate = 0  # rate of the audio in the filter (0: none yet)
        self._stream: Any = None  # soxr stream, None when rate == target

    def push(self, samples: np.ndarray, rate: int) -> np.ndarray:
        """Samples at `rate` in; what is ready at the target rate out (the filter keeps a tail)."""
        head = self.drain() if rate != self.rate and self.rate else np.zeros(0, np.float32)
        if rate != self.rate:
            import soxr

            self.rate = rate
            self._stream = (None if rate == self.target else
                            soxr.ResampleStream(rate, self.target, 1, dtype="float32", quality="HQ"))
        out = samples if self._stream is None else self._stream.resample_chunk(samples)
        out = np.asarray(out, np.float32)
        return np.concatenate([head, out]) if len(head) else out

    def drain(self) -> np.ndarray:
        """The filter's last samples; the next push starts a fresh filter."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        tail = np.asarray(self._stream.resample_chunk(np.zeros(0, np.float32), last=True), np.float32)
        self.rate, self._stream = 0, None
        return tail
