"""OpenAI's file transcription API, `POST /v1/audio/transcriptions`, on its own port (setting
`http_port`): the websockets server answers GET only, so this is an aiohttp server beside it.

multipart fields: `file` (wav, flac, mp3, m4a, ogg, ...), `model` (accepted, the daemon serves
its one model), `language`, `response_format` (json, text, verbose_json, srt, vtt),
`timestamp_granularities[]` (word, segment). The decoded audio is a /v2 session of the daemon's
own, fed as fast as the engine steps it, in the slots live sessions use: 503 with Retry-After
when they are all taken, 413 past `max_upload_bytes`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from ..audio.files import decode_audio_file
from ..audio.pcm import BadAudio
from ..logs import get_logger
from ..model.loader import SAMPLE_RATE
from .loopback import Busy, Endpoint, Transcript, transcribe

log = get_logger("http_api")

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# A segment of srt/vtt/verbose_json ends at an end of turn, or after this many words.
SEGMENT_WORDS = 12


def _error(status: int, message: str, code: str, param: str | None = None,
           headers: Mapping[str, str] | None = None) -> web.Response:
    """An error as OpenAI's API writes it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status=status, headers=headers)


def segments(t: Transcript) -> list[dict[str, Any]]:
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


def _clock(seconds: float, separator: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{separator}{ms % 1000:03d}"


def subtitles(t: Transcript, kind: str) -> str:
    lines = ["WEBVTT", ""] if kind == "vtt" else []
    for segment in segments(t):
        if kind == "srt":
            lines.append(str(segment["id"] + 1))
        sep = "," if kind == "srt" else "."
        lines += [f"{_clock(segment['start'], sep)} --> {_clock(segment['end'], sep)}", segment["text"], ""]
    return "\n".join(lines) + ("\n" if lines else "")


class FileApi:
    """The aiohttp application and its listener."""

    def __init__(self, endpoint: Endpoint, authorized: Callable[[Mapping[str, str], str], bool],
                 max_upload_bytes: int) -> None:
        self.endpoint = endpoint
        self.authorized = authorized  # (headers, query string) -> bool, the daemon's token check
        self.max_upload_bytes = max_upload_bytes
        self.app = web.Application(client_max_size=max_upload_bytes)
        self.app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        self.runner = web.AppRunner(self.app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        if not self.authorized(request.headers, request.query_string):
            return _error(401, "missing or wrong token: send it as Authorization: Bearer", "invalid_api_key")
        try:
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the upload is larger than max_upload_bytes ({self.max_upload_bytes} bytes)",
                          "file_too_large", "file")
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return _error(400, "a multipart field 'file' with the audio is required", "missing_file", "file")
        response_format = str(form.get("response_format", "json"))
        if response_format not in FORMATS:
            return _error(400, f"response_format must be one of {', '.join(FORMATS)}", "invalid_value",
                          "response_format")
        granularities = [str(g) for g in form.getall("timestamp_granularities[]", [])]
        language = str(form.get("language") or "") or None
        data = upload.file.read()
        loop = asyncio.get_running_loop()
        try:
            samples = await loop.run_in_executor(None, decode_audio_file, data)
        except BadAudio as exc:
            return _error(400, f"{upload.filename}: {exc}", "invalid_file", "file")
        try:
            result = await transcribe(self.endpoint, samples)
        except Busy:
            return _error(503, "every slot is busy; try again shortly", "server_busy",
                          headers={"Retry-After": "1"})
        except (ConnectionError, OSError) as exc:
            log.error("file_transcription_failed", error=str(exc))
            return _error(500, f"transcription failed: {exc}", "server_error")
        log.info("file_transcribed", filename=upload.filename, audio_s=round(len(samples) / SAMPLE_RATE, 2),
                 format=response_format, words=len(result.words))
        if response_format == "text":
            return web.Response(text=result.text + "\n", content_type="text/plain")
        if response_format in ("srt", "vtt"):
            kind = "text/vtt" if response_format == "vtt" else "application/x-subrip"
            return web.Response(text=subtitles(result, response_format), content_type=kind)
        if response_format == "json":
            return web.json_response({"text": result.text})
        body: dict[str, Any] = {"task": "transcribe", "language": language or "en",
                                "duration": round(len(samples) / SAMPLE_RATE, 3), "text": result.text,
                                "segments": segments(result)}
        if "word" in granularities:
            body["words"] = result.words
        return web.json_response(body)
