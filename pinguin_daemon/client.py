"""A reference client: streams audio to /ws the way the iOS app does and collects the text."""

from __future__ import annotations

import asyncio
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .errors import UserError
from .model.loader import SAMPLE_RATE

IOS_CHUNK = 2400  # samples per message, what the seed's AVAudioConverter tap produces


@dataclass(frozen=True, slots=True)
class Transcript:
    text: str  # every text message, concatenated as the iOS client does
    messages: int  # how many text messages arrived
    close_code: int | None
    close_reason: str


def read_wav(path: Path) -> np.ndarray:
    """A PCM WAV file (any rate, any channel count) as float32 mono at 24 kHz."""
    import soxr

    try:
        with wave.open(str(path), "rb") as wav:
            width, channels, rate = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except FileNotFoundError:
        raise UserError(f"audio file {path} does not exist") from None
    except (wave.Error, EOFError) as exc:
        raise UserError(f"{path} is not a PCM WAV file ({exc}); convert it with "
                        f"`sox {path} -b 16 out.wav`") from None
    samples: np.ndarray
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width in (2, 4):
        dtype = "<i2" if width == 2 else "<i4"
        samples = np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise UserError(f"{path}: {8 * width}-bit WAV is not supported; use 16-bit PCM")
    mono = samples.reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return np.ascontiguousarray(mono, dtype=np.float32)


async def stream(url: str, pcm: np.ndarray, chunk: int = IOS_CHUNK, realtime: bool = False,
                 end_of_audio: bool = True, on_text: Callable[[str], None] | None = None,
                 headers: dict[str, str] | None = None) -> Transcript:
    """Send `pcm` in binary float32 chunks, then (optionally) the end-of-audio message.

    Args:
        url: e.g. ws://127.0.0.1:8000/ws.
        pcm: float32 mono 24 kHz samples.
        chunk: samples per message.
        realtime: pace the messages like a microphone.
        end_of_audio: send an empty binary message at the end, so the daemon sends the last
            words and closes with 1000; otherwise close from the client side after sending.
        on_text: called with each text message as it arrives.
    """
    parts: list[str] = []
    async with connect(url, max_size=None, additional_headers=headers, compression=None) as ws:
        async def send() -> None:
            for start in range(0, len(pcm), chunk):
                await ws.send(pcm[start:start + chunk].astype("<f4").tobytes())
                if realtime:
                    await asyncio.sleep(min(chunk, len(pcm) - start) / SAMPLE_RATE)
            if end_of_audio:
                await ws.send(b"")
            else:
                await ws.close()

        sender = asyncio.create_task(send())
        try:
            async for message in ws:
                if isinstance(message, str):
                    parts.append(message)
                    if on_text is not None:
                        on_text(message)
        except ConnectionClosed:
            pass
        try:
            await sender
        except ConnectionClosed:
            pass  # the server closed first (an error): its close code says why
        code = ws.close_code
        reason = ws.close_reason or ""
    return Transcript("".join(parts), len(parts), code, reason)


def cmd_transcribe(path: Path, url: str, realtime: bool, chunk: int) -> int:
    pcm = read_wav(path)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        result = asyncio.run(stream(url, pcm, chunk=chunk, realtime=realtime, on_text=show))
    except OSError as exc:
        raise UserError(f"cannot connect to {url} ({exc}); is the daemon running (`make run`)?") from None
    print()
    if result.close_code != 1000:
        print(f"closed with {result.close_code}: {result.close_reason}", file=sys.stderr)
        return 1
    return 0
