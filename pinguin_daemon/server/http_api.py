"""OpenAI's file transcription API on its own port (`http_port`): `POST /v1/audio/transcriptions`,
`GET /v1/models` and `/v1/models/{id}`; every other path or method gets OpenAI's JSON error.

multipart fields: `file` (wav, flac, mp3, m4a, ogg/opus, webm, aac, aiff, caf), `model` (accepted:
the daemon serves its one model), `language` (en, fr or absent), `response_format` (json, text,
verbose_json, srt, vtt), `timestamp_granularities[]` (word, segment), `stream` (true: Server-Sent
Events `transcript.text.delta` as words are decoded, then `transcript.text.done`).

A request is a gateway session like a live stream. Before its slot is taken: a web page's
`Origin` must be allowed (403), the token (401), no `Content-Encoding` (415: a compressed body
would escape the size bound), a declared length within the bound (413). Then the slot (503 with
Retry-After when every slot is busy); the body is read with bounds on its bytes, parts and pace
(upload.py: 413, 400, 408) and the idle timeout; the file is decoded a piece at a time, on worker
threads, into the session as fast as the engine steps it, up to `max_upload_seconds` (413); with
`stream=true` the slot goes back once the audio is transcribed, however slowly the client reads;
and a client that leaves frees the slot at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from ..audio.files import AudioFile
from ..audio.pcm import BadAudio
from ..engine.events import EndOfTurnProbs, Event, TextPiece, Word, WordEnd
from ..logs import get_logger
from ..model.loader import SAMPLE_RATE
from .auth import origin_allowed
from .codes import Close
from .gateway import Gateway, Refused
from .session import Ending, Session
from .upload import MULTIPART_SLACK, BoundedBody, Stop, read_form

log = get_logger("http_api")

FRONTEND = "files"
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
LANGUAGES = {"en": "english", "fr": "french"}
# A segment of srt/vtt/verbose_json ends at an end of turn, or after this many words.
SEGMENT_WORDS = 12
# Seconds an idle keep-alive connection stays open.
KEEPALIVE_S = 10.0
# Seconds one Server-Sent Event may wait for a client that does not read (then the connection is
# aborted); the slot is already free by then.
SSE_WRITE_S = 10.0
MODEL_CREATED = 1735689600  # 2025-01-01: Kyutai STT's public release, for /v1/models

T = TypeVar("T")


class Gone(Exception):
    """The client of a Server-Sent Events response left or stopped reading: the response ends."""


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, code: str | None, param: str | None = None,
           headers: Mapping[str, str] | None = None) -> web.Response:
    """An error as OpenAI's API writes it."""
    return web.json_response(error_body(status, message, code, param), status=status, headers=headers)


@dataclass
class FileTranscript:
    """What the session decoded: the listener of a file's session."""

    pieces: list[str] = field(default_factory=list)
    words: list[dict[str, Any]] = field(default_factory=list)  # {"word", "start", "end"}
    turns: list[int] = field(default_factory=list)  # index into words where each turn ended
    deltas: asyncio.Queue[str | None] | None = None  # streamed text (stream=true)
    eot_head: int = 1
    eot_threshold: float = 0.5
    spoken: bool = False  # a piece with text came (the first one loses its leading space)

    @property
    def text(self) -> str:
        return "".join(self.pieces).strip()

    def on_step(self, events: list[Event], step: int, buffered: int) -> bool:
        for event in events:
            if isinstance(event, TextPiece):
                delta = event.text if self.spoken else event.text.lstrip()
                self.pieces.append(event.text)
                if delta:
                    self.spoken = True
                    if self.deltas is not None:
                        self.deltas.put_nowait(delta)
            elif isinstance(event, Word):
                self.words.append({"word": event.text, "start": round(event.start_time, 3),
                                   "end": round(event.start_time, 3)})
            elif isinstance(event, WordEnd) and self.words:
                self.words[-1]["end"] = round(event.stop_time, 3)
            elif isinstance(event, EndOfTurnProbs):
                head = self.eot_head
                if (head < len(event.probs) and event.probs[head] >= self.eot_threshold
                        and self.words and (not self.turns or self.turns[-1] < len(self.words))):
                    self.turns.append(len(self.words))
        return False

    def on_marker(self, marker_id: int) -> None:
        pass


def segments(t: FileTranscript) -> list[dict[str, Any]]:
    """Words grouped into segments: split at each end of turn and every SEGMENT_WORDS words."""
    out: list[list[dict[str, Any]]] = []
    bounds = set(t.turns)
    current: list[dict[str, Any]] = []
    for i, word in enumerate(t.words):
        if current and (i in bounds or len(current) == SEGMENT_WORDS):
            out.append(current)
            current = []
        current.append(word)
    if current:
        out.append(current)
    return [{"id": i, "seek": 0, "start": ws[0]["start"], "end": ws[-1]["end"],
             "text": " ".join(w["word"] for w in ws), "tokens": [], "temperature": 0.0,
             "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0}
            for i, ws in enumerate(out)]


# Words that mark one of the model's two languages and not the other: the transcript's language,
# told the honest way when the request named none (the model itself does not report it).
MARKERS = {
    "english": frozenset("the and you he she we they is are not that which with this to of it my me was "
                         "have what there".split()),
    "french": frozenset("le la les des du une et je tu il elle nous vous est pas que qui pour dans sur "
                        "avec ce cette au aux mais ou très".split()),
}


def guess_language(text: str) -> str:
    """"english" or "french" by the marker words the transcript holds; "unknown" without any."""
    words = [w.strip(".,;:!?«»\"'()").lower() for w in text.split()]
    counts = {name: sum(w in markers for w in words) for name, markers in MARKERS.items()}
    best = max(counts, key=lambda name: counts[name])
    return best if counts[best] and list(counts.values()).count(counts[best]) == 1 else "unknown"


def _clock(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def subtitles(t: FileTranscript, kind: str) -> str:
    lines = ["WEBVTT", ""] if kind == "vtt" else []
    for segment in segments(t):
        if kind == "srt":
            lines.append(str(segment["id"] + 1))
        sep = "," if kind == "srt" else "."
        lines += [f"{_clock(segment['start'], sep)} --> {_clock(segment['end'], sep)}", segment["text"], ""]
    return "\n".join(lines) + ("\n" if lines else "")


async def in_worker(fn: Callable[..., T], *args: Any, orphan: Callable[[T], Any] | None = None) -> T:
    """`fn(*args)` on the default executor. A thread cannot be stopped: a caller cancelled
    meanwhile still waits for the call to end (the container it decodes must not be freed under
    it), hands what it returned to `orphan` (in a worker too), then is cancelled."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:  # cancelled again: the thread still runs
                continue
        if not future.cancelled() and future.exception() is None and orphan is not None:
            await in_worker(orphan, future.result())
        raise


class FileApi:
    """The aiohttp application; its listener is started by the daemon on a bound socket."""

    def __init__(self, gateway: Gateway, authorized: Callable[[Mapping[str, str], str], bool], model: str,
                 max_upload_bytes: int, max_upload_seconds: float, allowed_origins: tuple[str, ...] = (),
                 eot: tuple[int, float] = (1, 0.5)) -> None:
        """Args:
            gateway: the daemon's gateway (slots).
            authorized: (headers, query string) -> bool, the daemon's token check.
            model: the model setting (listed by /v1/models).
            max_upload_bytes: largest file (413 above).
            max_upload_seconds: longest decoded audio (413 above).
            allowed_origins: web origins that may call the API from a browser (CORS); "*" = any.
            eot: (head, threshold) of the end-of-turn heads, for segment breaks.
        """
        self.gateway = gateway
        self.authorized = authorized
        self.model = model
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_seconds = max_upload_seconds
        self.allowed_origins = allowed_origins
        self.eot = eot
        self.app = web.Application(middlewares=[self._errors_and_cors])
        self.app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/models/{model:.+}", self.model_info)
        self.app.router.add_route("OPTIONS", "/{tail:.*}", self.preflight)
        # Cancel a request's handler when its client disconnects: the slot is freed at once.
        self.runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                    keepalive_timeout=KEEPALIVE_S)

    async def setup(self) -> None:
        await self.runner.setup()

    def protocol(self) -> Any:
        """A new connection's protocol (the daemon wraps it in its connection budget)."""
        assert self.runner.server is not None
        return self.runner.server()

    async def stop(self) -> None:
        await self.runner.cleanup()

    # ---- around every request -----------------------------------------------------------------
    def _cors_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        if "*" in self.allowed_origins:
            return "*"
        return origin if origin in self.allowed_origins else None

    @web.middleware
    async def _errors_and_cors(self, request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                               ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            response = _error(404, f"Invalid URL ({request.method} {request.path})", None)
        except web.HTTPMethodNotAllowed as exc:
            if set(exc.allowed_methods) <= {"OPTIONS"}:  # only the CORS preflight route matched
                response = _error(404, f"Invalid URL ({request.method} {request.path})", None)
            else:
                response = _error(405, f"Invalid method for URL ({request.method} {request.path})", None)
        origin = self._cors_origin(request)
        if origin is not None and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    async def preflight(self, request: web.Request) -> web.StreamResponse:
        if self._cors_origin(request) is None:
            return _error(403, "this origin is not in allowed_origins", "origin_not_allowed")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, OpenAI-Organization, "
                                            "OpenAI-Project, X-Stainless-Lang, kyutai-api-key",
            "Access-Control-Max-Age": "600"})

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        """403 for a web page whose origin may not use the API (a cross-site form POST needs no
        preflight), 401 without the token; None when the request may go on."""
        if not origin_allowed(request.headers, self.allowed_origins):
            log.warning("origin_refused", path=request.path, peer=request.remote or "",
                        origin=request.headers.get("Origin", "")[:200])
            return _error(403, "this web origin may not use the API: add it to allowed_origins",
                          "origin_not_allowed")
        if self.authorized(request.headers, request.query_string):
            return None
        log.warning("unauthorized", path=request.path, peer=request.remote or "")
        return _error(401, "missing or wrong token: send it as Authorization: Bearer", "invalid_api_key")

    # ---- models -------------------------------------------------------------------------------
    def _model(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": MODEL_CREATED, "owned_by": "kyutai"}

    async def models(self, request: web.Request) -> web.StreamResponse:
        return self._unauthorized(request) or web.json_response({"object": "list", "data": [self._model()]})

    async def model_info(self, request: web.Request) -> web.StreamResponse:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        if request.match_info["model"] != self.model:
            return _error(404, f"The model '{request.match_info['model']}' does not exist; this server "
                               f"serves '{self.model}'", "model_not_found", "model")
        return web.json_response(self._model())

    # ---- transcriptions -----------------------------------------------------------------------
    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":  # aiohttp would inflate it past every bound checked here
            return _error(415, f"Content-Encoding '{encoding[:40]}' is not accepted: send the form "
                               "uncompressed (audio files are compressed already)",
                          "unsupported_content_encoding")
        declared = request.content_length
        if declared is not None and declared > self.max_upload_bytes + MULTIPART_SLACK:
            return self._too_big()
        transcript = FileTranscript(eot_head=self.eot[0], eot_threshold=self.eot[1])
        try:
            session = await self.gateway.open(FRONTEND, request.remote or "", transcript)
        except Refused as exc:
            return _error(503, f"{exc}", "server_busy" if exc.busy else "server_unavailable",
                          headers={"Retry-After": "1"})
        try:
            response = await self._transcribe(request, session, transcript)
            session.ending = session.ending or Ending(Close.NORMAL, "transcribed")
            return response
        except Stop as stop:
            session.ending = Ending(Close.BAD_PAYLOAD, stop.message, stop.code)
            return _error(stop.status, stop.message, stop.code, stop.param)
        except asyncio.CancelledError:
            session.ending = session.ending or Ending(1006, "client disconnected")
            raise
        finally:
            self.gateway.close(session)

    def _too_big(self) -> web.Response:
        return _error(413, f"the upload is larger than max_upload_bytes ({self.max_upload_bytes} bytes)",
                      "file_too_large", "file")

    async def _transcribe(self, request: web.Request, session: Session,
                          transcript: FileTranscript) -> web.StreamResponse:
        form = await read_form(request.headers, BoundedBody(request.content, session, self.max_upload_bytes))
        if not form.data:
            raise Stop(400, "a multipart field 'file' with the audio is required", "missing_file", "file")
        response_format = form.get("response_format", "json")
        if response_format not in FORMATS:
            raise Stop(400, f"response_format must be one of {', '.join(FORMATS)}", "invalid_value",
                       "response_format")
        language = form.get("language") or None
        if language is not None and language not in LANGUAGES:
            raise Stop(400, f"language '{language}' is not supported: this model transcribes "
                            f"{' and '.join(LANGUAGES)} (or leave it out)", "unsupported_language",
                       "language")
        stream = form.get("stream", "false").lower() == "true"
        if stream and response_format not in ("json", "text"):
            raise Stop(400, "stream=true answers Server-Sent Events: response_format must be json or text",
                       "invalid_value", "stream")
        granularities = form.fields.get("timestamp_granularities[]", [])
        try:
            audio = await in_worker(AudioFile, form.data, orphan=AudioFile.close)
        except BadAudio as exc:
            raise Stop(400, f"{form.filename}: {exc}", "invalid_file", "file") from None
        try:
            if audio.claimed_seconds is not None and audio.claimed_seconds > self.max_upload_seconds + 1:
                raise Stop(413, f"{form.filename}: {audio.claimed_seconds:.0f} s of audio is longer than "
                                f"max_upload_seconds ({self.max_upload_seconds:g} s)", "audio_too_long",
                           "file")
            if stream:
                return await self._stream(request, session, transcript, audio, form.filename)
            started = time.perf_counter()
            partial = await self._feed(session, audio, form.filename)
        finally:
            await in_worker(audio.close)
        seconds = audio.samples_out / SAMPLE_RATE
        log.bind(session_id=session.id).info(
            "file_transcribed", filename=form.filename, audio_s=round(seconds, 2), format=response_format,
            words=len(transcript.words), seconds=round(time.perf_counter() - started, 2), partial=partial)
        headers = {"X-Pinguin-Partial": partial} if partial else None
        return self._respond(transcript, response_format, language, granularities, seconds, headers)

    async def _feed(self, session: Session, audio: AudioFile, filename: str) -> str:
        """Decode the file into the session, then flush; "" or why the transcript stops early."""
        limit = int(self.max_upload_seconds * SAMPLE_RATE)
        partial = ""
        while not audio.done:
            if session.interrupted.is_set():  # the daemon is draining: what was heard, now
                partial = "server shutting down"
                break
            try:
                piece = await in_worker(audio.next_piece, limit)
            except BadAudio as exc:
                raise Stop(400, f"{filename}: {exc}", "invalid_file", "file") from None
            if audio.samples_out > limit:
                raise Stop(413, f"{filename}: the audio is longer than max_upload_seconds "
                                f"({self.max_upload_seconds:g} s)", "audio_too_long", "file")
            session.heard()
            await session.feed(piece)
        await session.flush()
        return partial

    def _respond(self, t: FileTranscript, response_format: str, language: str | None,
                 granularities: list[str], seconds: float,
                 headers: Mapping[str, str] | None) -> web.StreamResponse:
        usage = {"type": "duration", "seconds": round(seconds, 3)}
        if response_format == "text":
            return web.Response(text=t.text + "\n", content_type="text/plain", headers=headers)
        if response_format in ("srt", "vtt"):
            kind = "text/vtt" if response_format == "vtt" else "application/x-subrip"
            return web.Response(text=subtitles(t, response_format), content_type=kind, headers=headers)
        if response_format == "json":
            return web.json_response({"text": t.text, "usage": usage}, headers=headers)
        named = LANGUAGES[language] if language else guess_language(t.text)
        body: dict[str, Any] = {"task": "transcribe", "language": named,
                                "duration": round(seconds, 3), "text": t.text,
                                "segments": segments(t), "usage": usage}
        if "word" in granularities:
            body["words"] = t.words
        return web.json_response(body, headers=headers)

    async def _stream(self, request: web.Request, session: Session, transcript: FileTranscript,
                      audio: AudioFile, filename: str) -> web.StreamResponse:
        """Server-Sent Events: a delta per piece of text as it is decoded, then the whole text. The
        slot goes back as soon as the audio is transcribed: what is left is writing, each event
        within SSE_WRITE_S, else the connection is aborted."""
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        transcript.deltas = deltas
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        origin = self._cors_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
        await response.prepare(request)

        async def write(data: bytes) -> None:
            try:
                async with asyncio.timeout(SSE_WRITE_S):
                    await response.write(data)
            except TimeoutError:
                if request.transport is not None:
                    request.transport.abort()
                raise Gone from None
            except ConnectionError:
                raise Gone from None

        async def send(event: dict[str, Any]) -> None:
            await write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())

        async def forward() -> None:
            while (delta := await deltas.get()) is not None:
                await send({"type": "transcript.text.delta", "delta": delta})

        forwarder = asyncio.create_task(forward())
        try:
            try:
                await self._feed(session, audio, filename)
            except Stop as stop:  # the status line is gone: the error is an event (the SDK raises it)
                session.ending = Ending(Close.BAD_PAYLOAD, stop.message, stop.code)
                last = {"type": "error", **error_body(stop.status, stop.message, stop.code, stop.param)}
                forwarder.cancel()
            else:
                session.ending = session.ending or Ending(Close.NORMAL, "transcribed")
                last = {"type": "transcript.text.done", "text": transcript.text,
                        "usage": {"type": "duration", "seconds": round(audio.samples_out / SAMPLE_RATE, 3)}}
                deltas.put_nowait(None)
            self.gateway.close(session)  # the transcript is whole: the slot is free for others
            if last["type"] == "error":
                await asyncio.gather(forwarder, return_exceptions=True)
            else:
                await forwarder  # every delta, then the whole text
            await send(last)
            await write(b"data: [DONE]\n\n")
            async with asyncio.timeout(SSE_WRITE_S):
                await response.write_eof()
        except (Gone, TimeoutError, ConnectionError):
            session.ending = session.ending or Ending(1006, "client stopped reading")
            if request.transport is not None:
                request.transport.abort()
        finally:
            forwarder.cancel()
        return response
