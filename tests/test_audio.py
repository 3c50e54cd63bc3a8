"""Payload decoding, re-framing and the encoder pool, without a server."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from pinguin_daemon.audio.encoder import EncoderPool
from pinguin_daemon.audio.pcm import BadAudio, Reframer, decode_f32le


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


class FakeEncoder:
    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.used = False

    def encode_step(self, pcm: np.ndarray) -> np.ndarray:
        self.used = True
        return np.full((1, 32, pcm.shape[-1] // 1920), self.serial, np.uint32)


def test_encoder_pool_never_hands_out_a_used_encoder() -> None:
    serials = itertools.count()
    pool = EncoderPool(lambda: FakeEncoder(next(serials)), max_encoders=2, threads=2)

    async def scenario() -> list[FakeEncoder]:
        pool.preload()
        seen = []
        for _ in range(4):
            enc = await pool.acquire()
            assert not enc.used
            codes = await pool.encode(enc, np.zeros((3, 1920), np.float32))
            assert codes.shape == (3, 32)
            seen.append(enc)
            pool.release(enc)
        a, b = await pool.acquire(), await pool.acquire()
        seen += [a, b]
        assert pool._alive <= 2  # never more encoders than slots (each ~450 MB)
        return seen

    seen = asyncio.run(scenario())
    pool.shutdown()
    assert len({e.serial for e in seen}) == len(seen)
