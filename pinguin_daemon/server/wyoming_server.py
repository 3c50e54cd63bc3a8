"""A Wyoming server (Home Assistant's voice pipeline protocol) on its own TCP port.

`describe` -> `info` (an ASR program with the model, languages en and fr, transcript streaming);
`transcribe`, then `audio-start` / `audio-chunk` (any rate, width and channels: Home Assistant
sends 16 kHz 16-bit mono) / `audio-stop`. While audio arrives the text comes back as
`transcript-start` and `transcript-chunk`s; after `audio-stop`, the model's delay is flushed
faster than real time and the whole `transcript` follows, then `transcript-stop`. Each audio
stream is a /v2 session of the daemon's own, over loopback: same slots, same text.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from .. import __version__
from ..logs import get_logger
from .loopback import Busy, Endpoint, V2Stream

log = get_logger("wyoming")

LANGUAGES = ["en", "fr"]
# Rates /v2 resamples itself (soxr); others are converted here first.
V2_RATES = range(8000, 48001)


def describe(model: str) -> Info:
    attribution = Attribution(name="Kyutai", url="https://kyutai.org/")
    return Info(asr=[AsrProgram(
        name="pinguin-daemon", attribution=Attribution(name="pinguin-daemon", url=""), installed=True,
        description="Real-time speech to text (Kyutai STT on MLX)", version=__version__,
        models=[AsrModel(name=model, attribution=attribution, installed=True,
                         description="Kyutai STT, English and French", version=None, languages=LANGUAGES)],
        supports_transcript_streaming=True)])


class WyomingHandler(AsyncEventHandler):
    """One Home Assistant connection: any number of transcriptions, one after another."""

    def __init__(self, endpoint: Endpoint, model: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.endpoint = endpoint
        self.model = model
        self.language: str | None = None
        self.stream: V2Stream | None = None
        self.converter: AudioChunkConverter | None = None
        self.chunks: asyncio.Queue[str | None] = asyncio.Queue()  # pieces of text; None: the end
        self.forwarder: asyncio.Task[None] | None = None

    async def handle_event(self, event: Event) -> bool:
        if Describe.is_type(event.type):
            await self.write_event(describe(self.model).event())
        elif Transcribe.is_type(event.type):
            self.language = Transcribe.from_event(event).language
        elif AudioStart.is_type(event.type):
            return await self._start(AudioStart.from_event(event))
        elif AudioChunk.is_type(event.type) and self.stream is not None:
            chunk = AudioChunk.from_event(event)
            if self.converter is not None:
                chunk = self.converter.convert(chunk)
            await self.stream.send(chunk.audio)
        elif AudioStop.is_type(event.type) and self.stream is not None:
            return await self._stop()
        return True

    async def _start(self, start: AudioStart) -> bool:
        if self.stream is not None:
            await self.stream.abort()
        # /v2 takes 16-bit mono at 8-48 kHz and resamples; anything else is converted to that.
        rate = start.rate if start.rate in V2_RATES else 16000
        if (start.width, start.channels, start.rate) != (2, 1, rate):
            self.converter = AudioChunkConverter(rate=rate, width=2, channels=1)
        else:
            self.converter = None
        stream = V2Stream(self.endpoint, sample_rate=rate, encoding="s16")
        try:
            await stream.open()
        except Busy as exc:
            await self.write_event(Error(text=f"pinguin-daemon is busy: {exc}", code="busy").event())
            return True
        self.stream = stream
        self.chunks = asyncio.Queue()
        stream.on_text = self.chunks.put_nowait
        await self.write_event(TranscriptStart(language=self.language).event())
        self.forwarder = asyncio.create_task(self._forward())
        return True

    async def _forward(self) -> None:
        """Text pieces as they are decoded -> transcript-chunk events."""
        first = True
        while (text := await self.chunks.get()) is not None:
            if first:
                text, first = text.lstrip(), False
            if text:
                await self.write_event(TranscriptChunk(text=text).event())

    async def _stop(self) -> bool:
        assert self.stream is not None
        stream, self.stream = self.stream, None
        try:
            result = await stream.finish()
        except ConnectionError as exc:
            await self.write_event(Error(text=str(exc), code="transcription_failed").event())
            return True
        finally:
            self.chunks.put_nowait(None)  # every piece goes out before the transcript
            if self.forwarder is not None:
                await self.forwarder
        await self.write_event(Transcript(text=result.text, language=self.language).event())
        await self.write_event(TranscriptStop().event())
        return True

    async def disconnect(self) -> None:
        if self.stream is not None:
            await self.stream.abort()
            self.stream = None
        if self.forwarder is not None:
            self.forwarder.cancel()


async def start_wyoming(host: str, port: int, endpoint: Endpoint, model: str) -> AsyncTcpServer:
    """Listen for Home Assistant; the server (its bound port: .port after start)."""
    server = AsyncTcpServer(host, port)

    def factory(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> WyomingHandler:
        return WyomingHandler(endpoint, model, reader, writer)

    await server.start(factory)
    bound = cast(asyncio.Server, server._server)  # the bound port, for port 0
    server.port = int(bound.sockets[0].getsockname()[1])
    return server
