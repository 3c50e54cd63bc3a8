"""Wyoming (Home Assistant's voice pipeline protocol) on its own TCP port (`wyoming_port`).

`describe` -> `info` (an ASR program: the model, languages en and fr, transcript streaming);
`transcribe` (language en, fr or none), then `audio-start` / `audio-chunk` (each chunk converted
from its own rate, width and channels) / `audio-stop`. While audio arrives the text comes back
as `transcript-start` and `transcript-chunk`s; after `audio-stop` the model's delay is flushed
faster than real time and the whole `transcript` follows, then `transcript-stop`. Each audio
stream is a gateway session like any other: same slots, same text, same guards.

Every failure (busy, idle, bad audio or event, unsupported language) is an `error` event and the
connection closes, so every Home Assistant version sees the end. Events are read with bounds
(header, data and payload sizes) before any of their bytes are kept. A client that leaves what it
was sent unread for DRAIN_S is cut off (the connection is aborted), and a connection holds its
place in the side ports' budget only to stream audio: without a stream it ends after QUIET_S.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Any

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info

from .. import __version__
from ..audio.pcm import BadAudio, Resampler, decode_pcm
from ..engine.events import EndOfTurnProbs, TextPiece
from ..engine.events import Event as EngineEvent
from ..logs import get_logger
from ..model.loader import SAMPLE_RATE
from .codes import Close
from .connections import close_soon
from .gateway import Gateway, Refused
from .session import Ending, Session

log = get_logger("wyoming")

FRONTEND = "wyoming"
LANGUAGES = ("en", "fr")
# Bounds on what a client may announce, checked before anything is read or converted.
MAX_HEADER_BYTES = 64 * 1024  # the JSON header line, and the data block after it
MAX_PAYLOAD_BYTES = 1 << 20  # one event's binary payload (an audio chunk)
RATES = (8000, 48000)
WIDTHS = (1, 2, 4)
MAX_CHANNELS = 8
# A connection without a stream is closed this long after it connected or its last stream
# ended, whatever else it sends (`describe` included): Home Assistant opens one connection per
# utterance and one per `describe`, so a longer one only holds a place in the connection budget.
QUIET_S = 10.0
# Output a client has not read yet (the transport's buffer) before writes wait for it.
MAX_UNREAD_BYTES = 64 * 1024
# How long a write waits for a client to read: past it the client is cut off (aborted).
DRAIN_S = 2.0
NOT_READING = "not_reading"
WIRE_VERSION = "1.5.0"
# After an error, how long what the client still sends is read and dropped before the close.
LINGER_S = 2.0
READ_CHUNK = 64 * 1024


class WyomingFailure(Exception):
    """Ends the connection with an `error` event."""

    def __init__(self, code: str, text: str, close: int = Close.BAD_PAYLOAD) -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.close = close  # the session's end code, for the log and metrics


def describe(model: str) -> Info:
    attribution = Attribution(name="Kyutai", url="https://kyutai.org/")
    return Info(asr=[AsrProgram(
        name="pinguin-daemon", attribution=Attribution(name="pinguin-daemon", url=""), installed=True,
        description="Real-time speech to text (Kyutai STT on MLX)", version=__version__,
        models=[AsrModel(name=model, attribution=attribution, installed=True,
                         description="Kyutai STT, English and French", version=None,
                         languages=list(LANGUAGES))],
        supports_transcript_streaming=True,
        # Home Assistant's own VAD still ends the utterance (older versions know no other end);
        # the daemon ends it earlier when the model's end-of-turn heads say the turn is over.
        requires_external_vad=True,
        # Kyutai STT was trained on untouched audio: no automatic gain, no noise suppression.
        prefers_auto_gain_enabled=False, prefers_noise_reduction_enabled=False)])


def encode(event: Event) -> bytes:
    """An event on the wire: a JSON header line, then the data block, then the payload."""
    header: dict[str, Any] = {"type": event.type, "version": WIRE_VERSION}
    data = json.dumps(event.data, ensure_ascii=False).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header, ensure_ascii=False).encode() + b"\n" + data + (event.payload or b"")


def _length(header: dict[str, Any], key: str, bound: int) -> int:
    value = header.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WyomingFailure("bad_event", f"{key} must be a non-negative integer")
    if value > bound:
        raise WyomingFailure("too_big", f"{key} {value} is over the limit of {bound} bytes")
    return value


async def read_event(reader: asyncio.StreamReader) -> Event | None:
    """The next event, None at the end of the stream.

    Raises:
        WyomingFailure: a header over MAX_HEADER_BYTES, a payload over MAX_PAYLOAD_BYTES (before
            it is read), or anything malformed.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise WyomingFailure("bad_event", "the connection ended inside an event header") from None
    except asyncio.LimitOverrunError:
        raise WyomingFailure("too_big", f"event header over {MAX_HEADER_BYTES} bytes") from None
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise WyomingFailure("bad_event", "an event header is one line of JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise WyomingFailure("bad_event", "an event header is a JSON object with a string 'type'")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise WyomingFailure("bad_event", "an event's data is a JSON object")
    data_length = _length(header, "data_length", MAX_HEADER_BYTES)
    payload_length = _length(header, "payload_length", MAX_PAYLOAD_BYTES)
    try:
        if data_length:
            extra = json.loads(await reader.readexactly(data_length))
            if not isinstance(extra, dict):
                raise WyomingFailure("bad_event", "an event's data is a JSON object")
            data = {**data, **extra}
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise WyomingFailure("bad_event", "the connection ended inside an event") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise WyomingFailure("bad_event", "an event's data block is not JSON") from None
    return Event(type=header["type"], data=data, payload=payload)


def audio_format(data: dict[str, Any]) -> tuple[int, int, int]:
    """(rate, width, channels) of an audio event, checked."""
    rate, width, channels = data.get("rate"), data.get("width"), data.get("channels")
    for name, value in (("rate", rate), ("width", width), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise WyomingFailure("bad_audio", f"audio {name} must be an integer, got {value!r}")
    assert isinstance(rate, int) and isinstance(width, int) and isinstance(channels, int)
    if not RATES[0] <= rate <= RATES[1]:
        raise WyomingFailure("bad_audio", f"audio rate {rate} Hz is not supported: use {RATES[0]} to "
                                          f"{RATES[1]} Hz")
    if width not in WIDTHS:
        raise WyomingFailure("bad_audio", f"audio width {width} is not supported: use 1, 2 or 4 bytes")
    if not 1 <= channels <= MAX_CHANNELS:
        raise WyomingFailure("bad_audio", f"{channels} audio channels are not supported: use 1 to "
                                          f"{MAX_CHANNELS}")
    return rate, width, channels


def language_of(value: Any) -> str | None:
    """The language a `transcribe` asks for, when it is one the model speaks (en-US is English)."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.replace("_", "-").split("-")[0].lower() in LANGUAGES:
        return value
    raise WyomingFailure("unsupported_language", f"language {value!r} is not supported: this model "
                                                 f"transcribes {' and '.join(LANGUAGES)}")


class WyomingStream:
    """One audio stream (audio-start .. audio-stop) of a connection: the session's listener."""

    def __init__(self, writer: asyncio.StreamWriter, language: str | None, eot: tuple[int, float]) -> None:
        self.writer = writer
        self.language = language
        self.eot = eot  # (head, threshold): the end-of-turn head that ends the utterance early
        self.resampler = Resampler(SAMPLE_RATE)
        self.pieces: list[str] = []
        self.session: Session | None = None
        self.turn_over = False  # the model's heads say the speaker has finished
        # The stream ended (its transcript sent, or it failed): steps still in flight then are
        # dropped, never written after `transcript-stop` (into the next utterance's events).
        self.ended = False

    def on_step(self, events: list[EngineEvent], step: int, buffered: int) -> bool:
        sent = False
        if self.ended:
            return sent
        for event in events:
            if isinstance(event, EndOfTurnProbs):
                head, threshold = self.eot
                if self.text and head < len(event.probs) and event.probs[head] >= threshold:
                    self.turn_over = True
            elif isinstance(event, TextPiece):
                text = event.text if self.pieces else event.text.lstrip()
                self.pieces.append(event.text)
                if text:
                    self.writer.write(encode(TranscriptChunk(text=text).event()))
                    sent = True
        return sent

    def on_marker(self, marker_id: int) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()


class WyomingConnection:
    """One client connection: any number of streams, one after another."""

    def __init__(self, server: WyomingServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, peer: str) -> None:
        self.server = server
        self.gateway = server.gateway
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.language: str | None = None  # from the last `transcribe`
        self.stream: WyomingStream | None = None
        self.ended_early = False  # the transcript went out at the end of turn: audio until audio-stop is moot
        self._read: asyncio.Future[Event | None] | None = None  # the event being read
        self._interrupted: asyncio.Future[Any] | None = None  # the stream's session interruption
        self._loop = asyncio.get_running_loop()
        self._quiet_from = self._loop.time()  # when the connection last had a stream (QUIET_S)
        writer.transport.set_write_buffer_limits(high=MAX_UNREAD_BYTES)  # drain() waits past it

    def write(self, event: Event) -> None:
        self.writer.write(encode(event))

    async def run(self) -> None:
        try:
            await self._serve()
        except WyomingFailure as exc:
            log.warning("wyoming_error", peer=self.peer, code=exc.code, error=exc.text)
            self._end_stream(Ending(exc.close, exc.text, exc.code))
            if exc.code == NOT_READING:  # an error event would wait behind what it never read
                self.writer.transport.abort()
            else:
                await self._stop_reading()
                if await self._say(Error(text=exc.text, code=exc.code).event()):
                    await self._linger()
        except (ConnectionError, asyncio.IncompleteReadError):
            self._end_stream(Ending(1006, "connection lost"))
        finally:
            self._end_stream(Ending(1006, "connection lost"))
            for future in (self._read, self._interrupted):
                if future is not None:
                    future.cancel()
            close_soon(self.writer.transport)

    async def _stop_reading(self) -> None:
        """Cancel the event being read (an interruption came first), and wait until it has let go
        of the reader: the stream reader allows one reader at a time."""
        read, self._read = self._read, None
        if read is not None:
            read.cancel()
            await asyncio.wait({read})
            if not read.cancelled():
                read.exception()  # retrieved: it is moot now

    async def _linger(self) -> None:
        """After an error: end our side, then read and drop what the client still sends (for a
        moment), so that closing does not reset the connection before it reads the error."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await self.reader.read(READ_CHUNK):
                    pass
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError, RuntimeError):
            pass  # RuntimeError: the transport is gone already (a cut)

    async def _say(self, event: Event) -> bool:
        """Write a last event and wait (DRAIN_S at most) for the client to take it; False when it
        did not (then the connection is aborted) or is gone."""
        try:
            self.write(event)
            await asyncio.wait_for(self.writer.drain(), DRAIN_S)
            return True
        except TimeoutError:
            self.writer.transport.abort()
        except (ConnectionError, RuntimeError):  # RuntimeError: the transport is gone (a cut)
            pass
        return False

    async def _next(self) -> Event | None:
        """The next event; while a stream is open, its session's interruption (drain, idle)
        is handled first."""
        if self._read is None:
            self._read = asyncio.ensure_future(read_event(self.reader))
        waits: set[asyncio.Future[Any]] = {self._read}
        if self.stream is not None and self.stream.session is not None:
            if self._interrupted is None:
                self._interrupted = asyncio.ensure_future(self.stream.session.interrupted.wait())
            waits.add(self._interrupted)
        quiet = None if self.stream else max(0.0, self._quiet_from + QUIET_S - self._loop.time())
        done, _ = await asyncio.wait(waits, timeout=quiet, return_when=asyncio.FIRST_COMPLETED)
        if self._read in done:
            read, self._read = self._read, None
            return read.result()
        if self._interrupted is not None and self._interrupted in done:
            await self._interrupted_stream()
            return None
        log.info("wyoming_quiet", peer=self.peer, seconds=QUIET_S)  # no stream for QUIET_S: close
        return None

    async def _serve(self) -> None:
        while (event := await self._next()) is not None:
            if self.stream is not None and self.stream.session is not None:
                self.stream.session.heard()
            if Describe.is_type(event.type):
                self.write(describe(self.server.model).event())
            elif Transcribe.is_type(event.type):
                self.language = language_of(event.data.get("language"))
            elif AudioStart.is_type(event.type):
                audio_format(event.data)
                if self.stream is not None:  # a new stream ends the one before, cleanly
                    await self._finish()
                self.ended_early = False
                await self._start()
            elif AudioChunk.is_type(event.type):
                if self.stream is not None:
                    await self._chunk(event)
                    if self.stream.turn_over:
                        self._finish_at_end_of_turn()
                elif self.ended_early:  # the utterance goes on until audio-stop (QUIET_S)
                    self._quiet_from = self._loop.time()
            elif AudioStop.is_type(event.type):
                if self.ended_early:  # its transcript is out already
                    self.ended_early = False
                elif self.stream is None:  # nothing was heard: an empty transcript
                    self.write(Transcript(text="", language=self.language).event())
                    self.write(TranscriptStop().event())
                else:
                    await self._finish()
            # Other events (Home Assistant's satellites speak more of Wyoming) are not ours.
            await self._drain()

    async def _drain(self) -> None:
        """Wait while more than MAX_UNREAD_BYTES are unread, DRAIN_S at most (a stream or not:
        a client spamming `describe` without reading is cut off too)."""
        try:
            await asyncio.wait_for(self.writer.drain(), DRAIN_S)
        except TimeoutError:
            raise WyomingFailure(NOT_READING, "the client is not reading what it was sent",
                                 Close.POLICY) from None

    async def _start(self) -> None:
        stream = WyomingStream(self.writer, self.language, self.server.eot)
        try:
            stream.session = await self.gateway.open(FRONTEND, self.peer, stream)
        except Refused as exc:
            raise WyomingFailure("busy" if exc.busy else "unavailable", f"pinguin-daemon: {exc}") from None
        stream.session.closer = self._cut
        self.stream = stream
        self.write(TranscriptStart(language=self.language).event())

    async def _cut(self, code: int, reason: str) -> None:
        close_soon(self.writer.transport)

    async def _chunk(self, event: Event) -> None:
        assert self.stream is not None and self.stream.session is not None
        rate, width, channels = audio_format(event.data)
        try:
            samples = decode_pcm(event.payload or b"", width, channels)
        except BadAudio as exc:
            raise WyomingFailure("bad_audio", str(exc)) from None
        await self.stream.session.feed(self.stream.resampler.push(samples, rate))

    async def _finish(self) -> None:
        """The last words, then `transcript` and `transcript-stop`; the slot goes back."""
        stream = self.stream
        assert stream is not None and stream.session is not None
        await stream.session.flush(stream.resampler.drain())
        self._end_stream(Ending(Close.NORMAL, "end of audio: transcript complete"))
        self.write(Transcript(text=stream.text, language=stream.language).event())
        self.write(TranscriptStop().event())

    def _finish_at_end_of_turn(self) -> None:
        """The model's heads say the speaker has finished: the transcript goes out now, so Home
        Assistant (2026.10 and later) stops streaming at once instead of waiting for its own VAD;
        older versions read it after their audio-stop. Every word up to the end of turn is decoded
        when the heads say so: no flush is needed."""
        stream = self.stream
        assert stream is not None
        self._end_stream(Ending(Close.NORMAL, "end of turn (the model's end-of-turn heads)"))
        self.ended_early = True
        self.write(Transcript(text=stream.text, language=stream.language).event())
        self.write(TranscriptStop().event())

    async def _interrupted_stream(self) -> None:
        stream = self.stream
        assert stream is not None and stream.session is not None
        ending = stream.session.interruption
        assert ending is not None
        if ending.code == Close.GOING_AWAY:  # the daemon stops: what was heard, then the end
            await stream.session.flush(stream.resampler.drain())
            self._end_stream(ending)
            self.write(Transcript(text=stream.text, language=stream.language).event())
            await self._say(TranscriptStop().event())
            return
        raise WyomingFailure(ending.error or "error", ending.reason, ending.code)

    def _end_stream(self, ending: Ending) -> None:
        stream, self.stream = self.stream, None
        if self._interrupted is not None:
            self._interrupted.cancel()
            self._interrupted = None
        if stream is not None:
            stream.ended = True
            self._quiet_from = self._loop.time()
            if stream.session is not None:
                self.gateway.close(stream.session, ending)


class WyomingServer:
    """The listener: who may connect, and the open connections."""

    def __init__(self, gateway: Gateway, model: str, auth_required: bool,
                 allow: tuple[str, ...], eot: tuple[int, float] = (1, 0.5)) -> None:
        """Args:
            gateway: the daemon's gateway.
            model: the model setting (named in `info`).
            auth_required: `auth_tokens` is set: only `allow`ed peers are served.
            allow: the `wyoming_allow` setting (addresses or CIDR ranges).
            eot: (head, threshold) of the end-of-turn heads that end an utterance early.
        """
        self.gateway = gateway
        self.eot = eot
        self.model = model
        self.auth_required = auth_required
        self.networks = [ipaddress.ip_network(a, strict=False) for a in allow]
        self.connections: dict[asyncio.Task[None], WyomingConnection] = {}  # open ones, by handler task

    def allowed(self, peer: str) -> bool:
        if not self.auth_required:
            return True
        try:
            address = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else ""
        if not self.allowed(peer):
            # Wyoming carries no token: with auth_tokens set, only listed addresses get in.
            log.warning("wyoming_refused", peer=peer, reason="auth_tokens is set and this address is not "
                                                                "in wyoming_allow")
            close_soon(writer.transport)
            return
        task = asyncio.current_task()
        assert task is not None
        connection = WyomingConnection(self, reader, writer, peer)
        self.connections[task] = connection
        try:
            await connection.run()
        except Exception:  # a bug: one log line with its traceback, and the connection ends
            log.exception("wyoming_handler_failed", peer=peer)
            writer.transport.abort()
        finally:
            self.connections.pop(task, None)

    def protocol_factory(self) -> asyncio.StreamReaderProtocol:
        """asyncio's stream protocol for one connection, its reader bounded to a header's size."""
        reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
        return asyncio.StreamReaderProtocol(reader, self.handle)

    async def close_quiet(self) -> None:
        """Draining: connections without a stream end now (those with one finish it first)."""
        quiet = [task for task, connection in self.connections.items() if connection.stream is None]
        for task in quiet:
            task.cancel()
        await asyncio.gather(*quiet, return_exceptions=True)

    async def close_idle(self) -> None:
        """The end: every connection still open is closed."""
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def advertised(auth_required: bool, allow: tuple[str, ...]) -> bool:
    """Whether `_wyoming._tcp` may be advertised: someone must be allowed in."""
    return not auth_required or bool(allow)

