"""Uploaded audio files (wav, flac, mp3, m4a/AAC from an iPhone voice memo, ogg, ...) decoded to
float32 mono at 24 kHz with PyAV (FFmpeg's decoders and resampler)."""

from __future__ import annotations

import io

import numpy as np

from ..model.loader import SAMPLE_RATE
from .pcm import BadAudio


def decode_audio_file(data: bytes) -> np.ndarray:
    """The first audio stream of a file, as float32 mono 24 kHz samples.

    Raises:
        BadAudio: not an audio file FFmpeg can decode (the message says so).
    """
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise BadAudio("the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            parts = []
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except av.FFmpegError as exc:
        raise BadAudio(f"cannot decode the file as audio ({exc.strerror or exc})") from None
    samples = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if not np.isfinite(samples).all():
        raise BadAudio("the decoded audio has NaN or infinite samples")
    return samples
