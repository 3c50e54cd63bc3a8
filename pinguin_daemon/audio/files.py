"""Uploaded audio files (wav, flac, mp3, m4a/AAC from an iPhone voice memo, ogg/opus, webm from a
browser, ...) decoded with PyAV (FFmpeg) to float32 mono at 24 kHz, a piece at a time.

An upload is hostile until proven otherwise: only the recording containers phones and browsers
write are opened (no network protocol, playlist, concat list or SDP file ever reaches FFmpeg's
probing), the stream's rate and channels are checked before anything is decoded, and decoding
yields pieces so that the caller bounds what a file may claim to hold.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from ..model.loader import SAMPLE_RATE
from .pcm import BadAudio

# FFmpeg demuxers an upload may use: what iPhones (m4a, caf, wav), Android phones (m4a, ogg, amr in
# 3gp), browsers (webm, ogg) and recorders (wav, flac, mp3, aiff) write. Names as FFmpeg knows
# them; "mov" covers mp4, m4a and 3gp.
CONTAINERS = ("wav", "flac", "mp3", "mov", "mp4", "m4a", "ogg", "matroska", "webm", "aac", "caf", "aiff")
RATES = (8000, 192000)
MAX_CHANNELS = 8
# Decoded audio handed out per piece (seconds at 24 kHz): small enough to stay off the event loop
# for long, large enough that a file is a few dozen calls.
PIECE_SECONDS = 2.0


class AudioFile:
    """One uploaded file, opened and checked; `next_piece` decodes the next part.

    Call `next_piece` from one thread at a time (any thread). `close` may come from any thread: it
    waits for a piece being decoded (FFmpeg must never free the container under a decode).
    """

    def __init__(self, data: bytes) -> None:
        """Open the container and check its first audio stream.

        Raises:
            BadAudio: not a container on the allowlist, no audio stream, or a rate or channel
                count outside what any recording has (the message says which).
        """
        import av

        try:
            self.container: Any = av.open(io.BytesIO(data), mode="r",
                                          options={"format_whitelist": ",".join(CONTAINERS)})
        except (av.FFmpegError, ValueError, UnicodeDecodeError) as exc:
            raise BadAudio("not an audio recording this server reads (wav, flac, mp3, m4a, ogg/opus, "
                           f"webm, aac, aiff, caf): {getattr(exc, 'strerror', None) or exc}") from None
        try:
            if not self.container.streams.audio:
                raise BadAudio("the file has no audio stream")
            stream = self.container.streams.audio[0]
            _check_shape(int(stream.codec_context.sample_rate or 0), int(stream.codec_context.channels or 0))
            # What the container claims, when it says (checked again while decoding).
            duration = stream.duration * stream.time_base if stream.duration and stream.time_base else None
            self.claimed_seconds = float(duration) if duration is not None else None
        except BaseException:
            self.container.close()
            raise
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._frames = self.container.decode(audio=0)
        # (format, layout, rate) of the first decoded frame: the resampler is set up for it, and a
        # frame's own rate is what gets resampled (it is checked again, as the header was).
        self._shape: tuple[str, str, int] | None = None
        self._lock = threading.Lock()  # held by next_piece and close
        self.closed = False
        self.done = False
        self.samples_out = 0  # decoded samples handed out so far (24 kHz)

    def next_piece(self, max_samples: int) -> np.ndarray:
        """The next ~PIECE_SECONDS of audio (float32 mono 24 kHz); empty once the file is done.

        Args:
            max_samples: stop decoding once this many samples were handed out in all (a file
                longer than the limit is not decoded further; the caller sees `samples_out`).

        Raises:
            BadAudio: the file is damaged, changes its rate or channels mid-stream, or decodes to
                NaN or infinite samples.
        """
        with self._lock:
            if self.closed:
                raise BadAudio("the file was closed")
            samples = self._decode(max_samples)
        if not np.isfinite(samples).all():
            raise BadAudio("the decoded audio has NaN or infinite samples")
        self.samples_out += len(samples)
        return samples

    def _decode(self, max_samples: int) -> np.ndarray:
        import av

        parts: list[np.ndarray] = []
        got = 0
        want = int(PIECE_SECONDS * SAMPLE_RATE)
        try:
            while got < want and not self.done and self.samples_out + got <= max_samples:
                frame = next(self._frames, None)
                if frame is not None:
                    self._check_frame(frame)
                outs = self.resampler.resample(frame)  # None flushes the resampler
                if frame is None:
                    self.done = True
                for out in outs:
                    piece = out.to_ndarray().reshape(-1)
                    parts.append(piece)
                    got += len(piece)
        except BadAudio:
            raise
        except av.FFmpegError as exc:
            raise BadAudio(f"cannot decode the file as audio ({exc.strerror or exc})") from None
        except ValueError as exc:  # PyAV's own checks on a frame it cannot convert
            raise BadAudio(f"cannot decode the file as audio ({exc})") from None
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def _check_frame(self, frame: Any) -> None:
        shape = (frame.format.name, frame.layout.name, int(frame.sample_rate))
        if self._shape is None:
            _check_shape(shape[2], int(frame.layout.nb_channels))
            self._shape = shape
        elif shape != self._shape:
            raise BadAudio(f"the audio changes mid-stream from {self._shape[2]} Hz {self._shape[1]} to "
                           f"{shape[2]} Hz {shape[1]}: convert it to one rate and channel layout first")

    def close(self) -> None:
        """Free the container; waits for a piece being decoded on another thread. Idempotent."""
        with self._lock:
            if not self.closed:
                self.closed = True
                self.container.close()


def _check_shape(rate: int, channels: int) -> None:
    """A rate and channel count any recording has, else BadAudio saying which is off."""
    if not RATES[0] <= rate <= RATES[1]:
        raise BadAudio(f"the audio's sample rate is {rate} Hz: a recording has {RATES[0]} to {RATES[1]} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadAudio(f"the audio has {channels} channels: a recording has 1 to {MAX_CHANNELS}")


def decode_audio_file(data: bytes, max_seconds: float = 3600.0) -> np.ndarray:
    """A whole file as float32 mono 24 kHz samples (tests and the CLI; the server streams).

    Raises:
        BadAudio: as AudioFile, or longer than `max_seconds`.
    """
    audio = AudioFile(data)
    limit = int(max_seconds * SAMPLE_RATE)
    parts = []
    try:
        while not audio.done:
            parts.append(audio.next_piece(limit))
            if audio.samples_out > limit:
                raise BadAudio(f"the audio is longer than {max_seconds:g} s")
    finally:
        audio.close()
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
