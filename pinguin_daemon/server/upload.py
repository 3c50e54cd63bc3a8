"""Reading the file API's multipart upload with bounds: what a request may make the daemon keep
and how long it may take, decided while the bytes arrive (the slot is already taken).

Every byte of the body, whatever part it belongs to (the file, a field, boundaries, headers, a
preamble), counts against `max_upload_bytes + MULTIPART_SLACK`; a form has at most MAX_PARTS
parts, each named by OpenAI's API; the body must keep arriving at UPLOAD_MIN_RATE on average
after UPLOAD_GRACE_S and end within UPLOAD_DEADLINE_S; and the read ends as soon as the session is
interrupted (idle client, daemon draining).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, MultipartReader
from aiohttp.http_exceptions import HttpProcessingError

if TYPE_CHECKING:
    from aiohttp.streams import StreamReader

    from .session import Session

# Largest text field of the form (model, language, ...).
MAX_FIELD_BYTES = 4096
# Multipart boundaries, part headers and fields, on top of max_upload_bytes, for the whole body.
MULTIPART_SLACK = 64 * 1024
# Parts of one form: OpenAI's fields, some repeated (timestamp_granularities[], include[]).
MAX_PARTS = 32
READ_CHUNK = 64 * 1024
# The body may take this long before it must average UPLOAD_MIN_RATE bytes per second (a phone
# on a poor link, TLS, a client that builds the form as it sends it) ...
UPLOAD_GRACE_S = 30.0
UPLOAD_MIN_RATE = 8 * 1024
# ... and never longer than this in all (25 MiB in 10 minutes is 43 KiB/s): a slot is never held
# by a client that sends a byte now and then.
UPLOAD_DEADLINE_S = 600.0
# OpenAI's fields for /v1/audio/transcriptions (arrays come as `name[]`, chunking_strategy as
# `chunking_strategy[type]` ...): accepted, the ones this server has no use for ignored.
FIELD_NAMES = frozenset({
    "file", "model", "language", "prompt", "response_format", "temperature", "stream",
    "timestamp_granularities", "include", "chunking_strategy", "known_speaker_names",
    "known_speaker_references", "keywords", "languages"})


class Stop(Exception):
    """Ends a request with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass
class Form:
    """The multipart request, read."""

    data: bytes = b""
    filename: str = ""
    fields: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[-1] if values else default


class BoundedBody:
    """The request body as aiohttp's multipart reader takes it (the StreamReader methods it
    calls), read inside `paced()`: every byte counts against the bound, the body must keep its
    pace, and the read ends as soon as the session is interrupted."""

    def __init__(self, content: StreamReader, session: Session, max_upload_bytes: int,
                 grace_s: float = UPLOAD_GRACE_S, min_rate: float = UPLOAD_MIN_RATE,
                 deadline_s: float = UPLOAD_DEADLINE_S) -> None:
        """Args:
            content: the request's body stream.
            session: the request's session (the idle clock; interrupted: stop reading).
            max_upload_bytes: the setting; the body may hold MULTIPART_SLACK more.
            grace_s, min_rate, deadline_s: the pace the body must keep (see the constants).
        """
        self._content = content
        self._session = session
        self.max_upload_bytes = max_upload_bytes
        self.limit = max_upload_bytes + MULTIPART_SLACK
        self.taken = 0  # bytes handed to the reader (less what it gave back)
        self.grace_s, self.min_rate, self.deadline_s = grace_s, min_rate, deadline_s
        self._started = 0.0
        # The one timer of the whole read: moved on as bytes come, to now on an interruption.
        self._timer: asyncio.Timeout | None = None

    @asynccontextmanager
    async def paced(self) -> AsyncIterator[None]:
        """Read the body inside this block.

        Raises:
            Stop: 408 when the body falls behind its pace or the client is idle, 503 when the
                daemon drains.
        """
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        watch = asyncio.ensure_future(self._session.interrupted.wait())
        try:
            async with asyncio.timeout_at(self._allowed()) as self._timer:
                watch.add_done_callback(self._interrupted)
                yield
        except TimeoutError:
            if self._timer is None or not self._timer.expired():
                raise
            raise self._late() from None
        finally:
            self._timer = None
            watch.cancel()

    def _interrupted(self, watch: asyncio.Future[Any]) -> None:
        if not watch.cancelled() and self._timer is not None:
            self._timer.reschedule(asyncio.get_running_loop().time())

    def _allowed(self) -> float:
        return self._started + min(self.deadline_s, self.grace_s + self.taken / self.min_rate)

    def _late(self) -> Stop:
        ending = self._session.interruption
        if ending is not None and ending.error == "idle":
            return Stop(408, ending.reason, "idle")
        if ending is not None:
            return Stop(503, "the server is shutting down; try again shortly", "server_unavailable")
        return Stop(408, f"the upload is too slow: a request body must arrive within {self.grace_s:g} s "
                         f"plus 1 s per {self.min_rate / 1024:g} KiB, and {self.deadline_s:g} s at most",
                    "upload_too_slow")

    def at_eof(self) -> bool:
        return self._content.at_eof()

    def unread_data(self, data: bytes) -> None:
        self.taken -= len(data)
        self._content.unread_data(data)

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        return self._took(await self._content.readline(max_line_length=max_line_length))

    async def read(self, n: int = -1) -> bytes:
        # Never "everything up to the end" (the reader always asks for a size; this is the bound).
        return self._took(await self._content.read(n if n >= 0 else READ_CHUNK))

    def _took(self, data: bytes) -> bytes:
        if not data:
            return data
        self.taken += len(data)
        self._session.heard()
        if self.taken > self.limit:
            raise Stop(413, f"the request is larger than max_upload_bytes ({self.max_upload_bytes} bytes) "
                            f"plus {MULTIPART_SLACK} bytes for the form", "file_too_large", "file")
        if self._timer is not None and not self._session.interrupted.is_set():
            self._timer.reschedule(self._allowed())
        return data


async def read_form(headers: Mapping[str, str], body: BoundedBody) -> Form:
    """The multipart body, bounded: the whole body (BoundedBody), the file up to
    max_upload_bytes, each field up to MAX_FIELD_BYTES, at most MAX_PARTS parts, only OpenAI's
    field names, one file.

    Raises:
        Stop: what is wrong with the request (4xx), or the session was interrupted.
    """
    try:
        reader = MultipartReader(headers, body)  # type: ignore[arg-type]  # duck-typed stream
    except (AssertionError, ValueError, KeyError):
        raise Stop(400, "send the audio as multipart/form-data with a 'file' field", "invalid_request",
                   "file") from None
    try:
        async with body.paced():
            return await _read_parts(reader, body.max_upload_bytes)
    except (ValueError, HttpProcessingError) as exc:  # a broken boundary, chunk or header line
        raise Stop(400, f"the multipart/form-data body is malformed: {str(exc)[:200]}",
                   "invalid_request", "file") from None


async def _read_parts(reader: MultipartReader, max_upload_bytes: int) -> Form:
    form = Form()
    parts = 0
    has_file = False
    while (part := await reader.next()) is not None:
        parts += 1
        if parts > MAX_PARTS:
            raise Stop(400, f"the form has more than {MAX_PARTS} parts", "invalid_request")
        if not isinstance(part, BodyPartReader):
            raise Stop(400, "nested multipart bodies are not accepted", "invalid_request")
        name = part.name or ""
        if name.split("[", 1)[0] not in FIELD_NAMES:
            shown = name[:100]
            raise Stop(400, f"Unrecognized request argument supplied: {shown}", "unknown_parameter",
                       shown)
        if name == "file" and has_file:
            raise Stop(400, "send one file per request: the form has a second 'file' field",
                       "invalid_request", "file")
        has_file = has_file or name == "file"
        body = await _read_part(part, name, max_upload_bytes if name == "file" else MAX_FIELD_BYTES)
        if name == "file":
            form.data, form.filename = body, part.filename or "audio"
        else:
            try:
                form.fields.setdefault(name, []).append(body.decode())
            except UnicodeDecodeError:
                raise Stop(400, f"form field '{name}' is not UTF-8 text", "invalid_value", name) from None
    return form


async def _read_part(part: BodyPartReader, name: str, bound: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(READ_CHUNK):
        size += len(chunk)
        if size > bound:
            if name == "file":
                raise Stop(413, f"the upload is larger than max_upload_bytes ({bound} bytes)",
                           "file_too_large", "file")
            raise Stop(400, f"form field '{name}' is longer than {MAX_FIELD_BYTES} bytes", "invalid_value",
                       name)
        chunks.append(chunk)
    return b"".join(chunks)
