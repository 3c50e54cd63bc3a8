"""Payload decoding, resampling and re-framing, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from pinguin_daemon.audio.pcm import BadAudio, Reframer, Resampler, decode_f32le, decode_pcm


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1919, 1920, 1921, 2400, 10000])
def test_reframer_keeps_every_sample_in_order(chunk: int) -> None:
    signal = np.arange(20000, dtype=np.float32)
    framer = Reframer()
    frames = [framer.push(signal[i:i + chunk]) for i in range(0, len(signal), chunk)]
    whole = np.concatenate([f.reshape(-1) for f in frames])
    tail = framer.flush()
    assert framer.samples_in == len(signal)
    assert np.array_equal(whole, signal[: len(whole)])  # nothing dropped or reordered
    assert len(whole) == 20000 // 1920 * 1920
    # The partial frame is padded with silence, never dropped.
    assert tail.shape == (1, 1920)
    assert np.array_equal(tail[0, : 20000 - len(whole)], signal[len(whole):])
    assert not tail[0, 20000 - len(whole):].any()
    assert framer.flush().shape == (0, 1920)


def test_decode_accepts_little_endian_float32() -> None:
    samples = np.array([0.5, -0.25, 0.0], "<f4")
    assert decode_f32le(samples.tobytes()).tolist() == [0.5, -0.25, 0.0]
    assert len(decode_f32le(b"")) == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"\x00" * 6, "6 bytes is not whole float32 samples"),
     (np.array([1, np.nan], "<f4").tobytes(), "sample 1 of the message is NaN or infinite"),
     (np.array([-np.inf], "<f4").tobytes(), "sample 0 of the message is NaN or infinite")],
)
def test_decode_rejects_bad_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(BadAudio, match=message):
        decode_f32le(payload)


def test_integer_pcm_of_any_width_and_channel_count_becomes_mono_float() -> None:
    left = np.array([0.5, -0.5, 0.25], np.float32)
    right = np.array([-0.5, 0.5, 0.25], np.float32)
    stereo16 = (np.stack([left, right], axis=1) * 32768).astype("<i2").tobytes()
    assert decode_pcm(stereo16, 2, 2).tolist() == [0.0, 0.0, 0.25]  # channels averaged, not appended
    four = (np.repeat(left[:, None], 4, axis=1) * 2**31).astype("<i4").tobytes()
    assert np.allclose(decode_pcm(four, 4, 4), left)
    assert np.allclose(decode_pcm(bytes([128, 192, 64]), 1, 1), [0.0, 0.5, -0.5])
    with pytest.raises(BadAudio, match="not whole 2-byte samples of 2 channel"):
        decode_pcm(b"\x00" * 6, 2, 2)
    with pytest.raises(BadAudio, match="width 3"):
        decode_pcm(b"\x00" * 6, 3, 1)


def test_resampler_follows_a_change_of_rate_without_losing_audio() -> None:
    resampler = Resampler(24000)
    tone16 = np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000).astype(np.float32)  # 1 s at 16 kHz
    tone48 = np.sin(np.arange(48000) * 2 * np.pi * 440 / 48000).astype(np.float32)  # 1 s at 48 kHz
    out = [resampler.push(tone16[:8000], 16000), resampler.push(tone16[8000:], 16000),
           resampler.push(tone48, 48000), resampler.drain()]
    total = sum(len(o) for o in out)
    assert abs(total - 48000) <= 2  # two seconds at 24 kHz: nothing dropped at the switch
    same = Resampler(24000)
    assert np.array_equal(same.push(tone16[:100] * 0 + 0.1, 24000), tone16[:100] * 0 + 0.1)  # no filter
