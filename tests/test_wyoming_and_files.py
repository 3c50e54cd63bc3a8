"""Home Assistant's Wyoming protocol (the `wyoming` package's own client) and OpenAI's file
transcription API (the official `openai` SDK): the text each returns equals what /ws gives for
the same samples."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soxr
from websockets.asyncio.client import connect
from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info

from pinguin_daemon.audio.files import decode_audio_file
from pinguin_daemon.client import stream

from .daemon import DaemonProcess

TOKEN = "sk-files"
SLOTS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", str(SLOTS),
                         "--auth-tokens", TOKEN, "--http-port", str(free_port()),
                         "--wyoming-port", str(free_port()), "--max-upload-bytes", "2000000",
                         "--wyoming-allow", "127.0.0.1")
    yield proc
    proc.stop()


def listening(proc: DaemonProcess) -> dict[str, Any]:
    return proc.events("listening")[0]


def ws_text(proc: DaemonProcess, samples: np.ndarray) -> str:
    result = asyncio.run(stream(f"ws://127.0.0.1:{proc.port}/ws?token={TOKEN}", samples))
    assert result.close_code == 1000
    return result.text.strip()


async def wyoming_session(port: int, pcm: bytes, rate: int, width: int, channels: int) -> list[Any]:
    """What Home Assistant does: describe, then transcribe one utterance in chunks."""
    received: list[Any] = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        received.append(Info.from_event(await client.read_event()))

        async def reader() -> None:
            while (event := await client.read_event()) is not None:
                for kind in (TranscriptStart, TranscriptChunk, Transcript, TranscriptStop):
                    if kind.is_type(event.type):
                        received.append(kind.from_event(event))
                if TranscriptStop.is_type(event.type):
                    return

        task = asyncio.create_task(reader())
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        step = 1024 * width * channels
        for start in range(0, len(pcm), step):
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                                audio=pcm[start:start + step]).event())
            await asyncio.sleep(0.005)
        received.append("--audio-stop--")
        await client.write_event(AudioStop().event())
        await asyncio.wait_for(task, 60)
    return received


def test_home_assistant_transcribes_16k_audio_with_streaming_chunks(
        daemon: DaemonProcess, speech_clips: list[np.ndarray]) -> None:
    pcm16k = np.clip(soxr.resample(speech_clips[2], 24000, 16000) * 32768, -32768, 32767).astype("<i2")
    events = asyncio.run(wyoming_session(listening(daemon)["wyoming_port"], pcm16k.tobytes(), 16000, 2, 1))
    info = events[0]
    [program] = info.asr
    assert program.supports_transcript_streaming and program.models[0].languages == ["en", "fr"]
    kinds = [type(e).__name__ if not isinstance(e, str) else e for e in events[1:]]
    assert kinds[0] == "TranscriptStart" and kinds[-2:] == ["Transcript", "TranscriptStop"]
    assert kinds.index("TranscriptChunk") < kinds.index("--audio-stop--")  # text while audio arrives
    chunks = "".join(e.text for e in events if isinstance(e, TranscriptChunk))
    transcript = next(e for e in events if isinstance(e, Transcript)).text
    heard = soxr.resample(pcm16k.astype(np.float32) / 32768.0, 16000, 24000)  # what /v2 hears
    assert transcript == chunks == ws_text(daemon, heard)
    assert len(transcript.split()) >= 3


def test_wyoming_takes_any_rate_width_and_channels(daemon: DaemonProcess,
                                                   speech_clips: list[np.ndarray]) -> None:
    clip = soxr.resample(speech_clips[0], 24000, 44100)
    stereo32 = (np.repeat(clip[:, None], 2, axis=1) * 2**31 * 0.5).astype("<i4")
    events = asyncio.run(wyoming_session(listening(daemon)["wyoming_port"], stereo32.tobytes(), 44100, 4, 2))
    transcript = next(e for e in events if isinstance(e, Transcript)).text
    assert len(transcript.split()) >= 3


def encode(samples: np.ndarray, fmt: str, codec: str) -> bytes:
    """A real file of the given container and codec, at 22.05 kHz like espeak-ng's WAVs."""
    import av

    rate = 22050
    pcm = soxr.resample(samples, 24000, rate).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        audio = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm[None], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in audio.encode(frame):
            out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize(("name", "fmt", "codec"), [
    ("memo.m4a", "ipod", "aac"), ("speech.wav", "wav", "pcm_s16le"), ("speech.flac", "flac", "flac"),
    ("speech.mp3", "mp3", "mp3")])
def test_openai_sdk_transcribes_files_in_every_response_format(
        daemon: DaemonProcess, speech_clips: list[np.ndarray], name: str, fmt: str, codec: str) -> None:
    data = encode(speech_clips[1], fmt, codec)
    expected = ws_text(daemon, decode_audio_file(data))
    client = openai.OpenAI(api_key=TOKEN, base_url=f"http://127.0.0.1:{listening(daemon)['http_port']}/v1")
    as_json = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=(name, data))
    assert as_json.text == expected and len(expected.split()) >= 3
    if name != "memo.m4a":
        return  # one file is enough for the other formats
    text = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=(name, data),
                                              response_format="text")
    assert text.strip() == expected
    verbose = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=(name, data),
                                                 response_format="verbose_json", language="fr",
                                                 timestamp_granularities=["word"])
    assert verbose.text == expected and verbose.language == "french"  # named as OpenAI does
    assert verbose.duration == pytest.approx(len(decode_audio_file(data)) / 24000, abs=0.01)
    assert verbose.words and all(w.start <= w.end for w in verbose.words)
    assert [w.start for w in verbose.words] == sorted(w.start for w in verbose.words)
    assert verbose.segments and verbose.segments[0].start == verbose.words[0].start
    srt = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=(name, data),
                                             response_format="srt")
    assert srt.startswith("1\n00:00:") and " --> " in srt
    vtt = client.audio.transcriptions.create(model="kyutai/stt-1b-en_fr", file=(name, data),
                                             response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:")
    words_in_subtitles = " ".join(line for line in vtt.splitlines()[2:] if line and "-->" not in line)
    assert words_in_subtitles == " ".join(w.word for w in verbose.words)


def test_file_api_errors(daemon: DaemonProcess, speech_clips: list[np.ndarray]) -> None:
    base = f"http://127.0.0.1:{listening(daemon)['http_port']}/v1"
    client = openai.OpenAI(api_key=TOKEN, base_url=base, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key="wrong", base_url=base, max_retries=0).audio.transcriptions.create(
            model="m", file=("a.wav", encode(speech_clips[0][:4800], "wav", "pcm_s16le")))
    with pytest.raises(openai.BadRequestError, match="not an audio recording"):
        client.audio.transcriptions.create(model="m", file=("notes.txt", b"this is not audio at all"))
    too_big = encode(np.tile(speech_clips[0], 14), "wav", "pcm_s16le")
    assert len(too_big) > 2_000_000
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.audio.transcriptions.create(model="m", file=("long.wav", too_big))
    assert excinfo.value.status_code == 413

    async def hold_every_slot() -> Any:
        sockets = [await connect(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}") for _ in range(SLOTS)]
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, lambda: pytest.raises(
                openai.APIStatusError, client.audio.transcriptions.create, model="m",
                file=("a.wav", encode(speech_clips[0][:4800], "wav", "pcm_s16le"))))
        finally:
            for ws in sockets:
                await ws.close()

    busy = asyncio.run(hold_every_slot())
    assert busy.value.status_code == 503 and busy.value.response.headers["retry-after"] == "1"
