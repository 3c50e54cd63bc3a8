"""The file API's bounds on what one request may make the daemon read, keep and hold: a
compressed, chunked or many-part body, a web page from elsewhere, a broken multipart body, a file
that changes its format mid-stream, a body that trickles in, a client that leaves while its file
decodes. Each gets a 4xx that names its problem (never a 500 or a traceback), and the daemon
serves the next upload."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import struct
import threading
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from pinguin_daemon.audio.files import AudioFile
from pinguin_daemon.audio.pcm import BadAudio
from pinguin_daemon.server.http_api import in_worker
from pinguin_daemon.server.session import Ending
from pinguin_daemon.server.upload import MULTIPART_SLACK, BoundedBody, Stop, read_form

from .daemon import DaemonProcess, http_get
from .test_wyoming_and_files import free_port

MAX_UPLOAD = 300_000
ALLOWED = "https://allowed.example"
BOUNDARY = "limits-boundary"
PATH = "/v1/audio/transcriptions"


@pytest.fixture(scope="module")
def daemon(synthetic_dir: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess("--model", str(synthetic_dir), "--dtype", "f32", "--max-sessions", "2",
                         "--http-port", str(free_port()), "--max-upload-bytes", str(MAX_UPLOAD),
                         "--allowed-origins", ALLOWED)
    yield proc
    proc.stop()


def http_port(proc: DaemonProcess) -> int:
    return int(proc.events("listening")[0]["http_port"])  # type: ignore[call-overload]


def rss_mb(proc: DaemonProcess) -> float:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    extra = f'; filename="{filename}"' if filename else ""
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{extra}\r\n\r\n'.encode()
            + value + b"\r\n")


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def wav(seconds: float, rate: int = 24000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def post(proc: DaemonProcess, body: Any, headers: dict[str, str] | None = None,
         chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a POST to the file API (`body` an iterable of bytes when chunked)."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port(proc), timeout=30)
    try:
        conn.request("POST", PATH, body=body, encode_chunked=chunked,
                     headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error(body: bytes) -> dict[str, Any]:
    answer = json.loads(body)
    assert set(answer) == {"error"} and answer["error"]["type"] == "invalid_request_error", answer
    return dict(answer["error"])


def assert_still_serves(proc: DaemonProcess, since: int) -> None:
    """/healthz and an upload answer, and no log line after line `since` has a traceback."""
    assert http_get(proc.port, "/healthz")[0] == 200
    status, _, body = post(proc, form(part("model", b"m"), part("file", wav(0.5), "a.wav")))
    assert status == 200 and "text" in json.loads(body)
    assert not [line for line in proc.raw[since:] if "Traceback" in line or '"exception"' in line]


def test_a_compressed_body_is_refused_before_it_is_inflated(daemon: DaemonProcess) -> None:
    since = len(daemon.raw)
    # 64 MiB of form fields in 64 KiB of gzip: its Content-Length passes every size check.
    fields = part("prompt", b"p" * 4000) * 256
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = b"".join(packer.compress(fields) for _ in range(64)) + packer.compress(form()) + packer.flush()
    assert len(bomb) < MAX_UPLOAD
    before = rss_mb(daemon)
    status, _, body = post(daemon, bomb, {"Content-Encoding": "gzip"})
    assert status == 415
    assert "Content-Encoding 'gzip'" in error(body)["message"]
    assert error(body)["code"] == "unsupported_content_encoding"
    assert rss_mb(daemon) - before < 30
    assert_still_serves(daemon, since)


def test_a_chunked_body_counts_every_part_against_the_bound(daemon: DaemonProcess) -> None:
    # No Content-Length: each part is within its own bound, the whole is not.
    audio = wav(0.5)
    audio += b"\0" * (MAX_UPLOAD - 5000 - len(audio))
    pieces = [part("prompt", b"p" * 4000) for _ in range(20)] + [part("file", audio, "a.wav"), form()]
    status, _, body = post(daemon, iter(pieces), chunked=True)
    assert status == 413
    assert f"max_upload_bytes ({MAX_UPLOAD} bytes) plus {MULTIPART_SLACK} bytes" in error(body)["message"]


def test_a_chunked_body_without_a_boundary_stops_at_the_bound(daemon: DaemonProcess) -> None:
    since = len(daemon.raw)
    junk = (b"y" * 1022 + b"\r\n") * 64
    status, _, body = post(daemon, iter([junk] * (4 * MAX_UPLOAD // len(junk))), chunked=True)
    assert status == 413 and error(body)["code"] == "file_too_large"
    assert_still_serves(daemon, since)


def test_form_parts_are_named_counted_and_one_file(daemon: DaemonProcess) -> None:
    status, _, body = post(daemon, form(part("model", b"m"), part("voice", b"alloy")))
    assert status == 400
    assert error(body)["param"] == "voice" and "voice" in error(body)["message"]
    status, _, body = post(daemon, form(*[part("include[]", b"logprobs")] * 33))
    assert status == 400 and "more than 32 parts" in error(body)["message"]
    status, _, body = post(daemon, form(part("file", wav(0.1), "a.wav"), part("file", wav(0.1), "b.wav")))
    assert status == 400 and "second 'file'" in error(body)["message"]
    # OpenAI's own fields are taken (and ignored when this server has no use for them).
    status, _, body = post(daemon, form(part("model", b"m"), part("temperature", b"0"), part("prompt", b"hi"),
                                        part("chunking_strategy", b"auto"), part("file", wav(0.3), "a.wav")))
    assert status == 200, body


def test_a_web_page_from_elsewhere_is_refused_before_taking_a_slot(daemon: DaemonProcess) -> None:
    upload = form(part("file", wav(0.3), "a.wav"))

    async def while_every_slot_is_held() -> list[tuple[int, bytes]]:
        sockets = [await connect(f"ws://127.0.0.1:{daemon.port}/ws") for _ in range(2)]
        try:
            return [post(daemon, upload, {"Origin": origin})[::2]
                    for origin in ("https://evil.example", "null")]
        finally:
            for ws in sockets:
                await ws.close()

    for status, body in asyncio.run(while_every_slot_is_held()):
        assert status == 403 and error(body)["code"] == "origin_not_allowed"  # not 503: no slot asked
    status, headers, _ = post(daemon, upload, {"Origin": ALLOWED})
    assert status == 200 and headers["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize(("content_type", "body"), [
    (f"multipart/form-data; boundary={BOUNDARY}", b"no boundary here\r\nnor here\r\n"),
    ("multipart/form-data; boundary=" + "b" * 71, form(part("file", b"x"))),
    (f"multipart/form-data; boundary={BOUNDARY}",
     f"--{BOUNDARY}\r\nX-Long: {'h' * 9000}\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()),
], ids=["boundary-missing", "boundary-too-long", "header-line-too-long"])
def test_a_malformed_multipart_body_is_a_client_error(daemon: DaemonProcess, content_type: str,
                                                      body: bytes) -> None:
    since = len(daemon.raw)
    status, _, answer = post(daemon, body, {"Content-Type": content_type})
    assert status == 400 and error(answer)["code"] == "invalid_request"
    assert_still_serves(daemon, since)


def mp3(rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as out:
        stream = out.add_stream("mp3", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.full((1, rate), 0.1, np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def test_a_file_that_changes_its_rate_mid_stream_is_an_invalid_file(daemon: DaemonProcess) -> None:
    since = len(daemon.raw)
    joined = mp3(44100) + mp3(22050)  # two MP3s end to end: FFmpeg decodes both, at their rates
    status, _, body = post(daemon, form(part("file", joined, "joined.mp3")))
    assert status == 400 and error(body)["code"] == "invalid_file"
    assert "changes mid-stream" in error(body)["message"]
    status, headers, body = post(daemon, form(part("stream", b"true"), part("file", joined, "joined.mp3")))
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["type"] == "error" and last["error"]["code"] == "invalid_file"
    assert_still_serves(daemon, since)


def flac_192k_8ch(seconds: float) -> bytes:
    """A heavy file to decode that uploads small: 8 channels at 192 kHz of silence."""
    import av

    rate = 192000
    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=rate, layout="7.1")
        samples = np.zeros((1, 8 * int(rate * seconds)), np.int16)  # interleaved
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="7.1")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buf.getvalue()


def test_clients_that_leave_while_their_file_decodes_never_crash_the_daemon(daemon: DaemonProcess) -> None:
    since = len(daemon.raw)
    body = form(part("file", flac_192k_8ch(20), "heavy.flac"))
    assert len(body) < MAX_UPLOAD
    request = (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
               f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n").encode() + body
    opened, closed = len(daemon.events("session_opened")), len(daemon.events("session_closed"))
    tries = 6
    for i in range(tries):
        with socket.create_connection(("127.0.0.1", http_port(daemon))) as sock:
            sock.sendall(request)
            daemon.wait_event("session_opened", opened + i + 1, timeout=20)
            threading.Event().wait(0.05 + 0.07 * i)  # somewhere in the decoding
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    ends = daemon.wait_event("session_closed", closed + tries, timeout=30)[closed:]
    assert [(e["code"], e["reason"]) for e in ends] == [(1006, "client disconnected")] * tries
    assert daemon.proc.poll() is None
    assert_still_serves(daemon, since)


# ---- the pieces, without a daemon -----------------------------------------------------------
def test_a_cancelled_request_waits_for_its_worker_thread_before_going_on() -> None:
    started, release = threading.Event(), threading.Event()
    orphans: list[str] = []

    def decode() -> str:
        started.set()
        release.wait(10)
        return "audio"

    async def main() -> None:
        task = asyncio.create_task(in_worker(decode, orphan=orphans.append))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done()  # the thread still decodes: nothing may be freed under it
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert orphans == ["audio"]  # what the thread made is handed on (closed), never dropped

    asyncio.run(main())


def test_closing_a_file_waits_for_the_piece_being_decoded() -> None:
    data = flac_192k_8ch(6)
    for _ in range(5):
        audio = AudioFile(data)
        got: list[Any] = []

        def decode(audio: AudioFile = audio, got: list[Any] = got) -> None:
            try:
                got.append(len(audio.next_piece(10**9)))
            except BadAudio as exc:
                got.append(str(exc))

        thread = threading.Thread(target=decode)
        thread.start()
        audio.close()
        thread.join()
        # A whole piece (2 s at 24 kHz, to the end of its last frame), or none: never a torn one.
        assert got == ["the file was closed"] or (len(got) == 1 and 48000 <= got[0] < 60000), got
        with pytest.raises(BadAudio, match="closed"):
            audio.next_piece(10**9)


class Trickle:
    """A body stream that gives `line` every `pause` seconds, forever."""

    def __init__(self, line: bytes, pause: float) -> None:
        self.line, self.pause = line, pause

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        await asyncio.sleep(self.pause)
        return self.line

    async def read(self, n: int = -1) -> bytes:
        return await self.readline()

    def at_eof(self) -> bool:
        return False

    def unread_data(self, data: bytes) -> None:
        raise AssertionError("not used by a preamble")


def read_trickle(line: bytes, pause: float, interrupt: Ending | None = None, **pace: float) -> Stop:
    async def main() -> Stop:
        session = SimpleNamespace(interrupted=asyncio.Event(), interruption=None, heard=lambda: None)
        if interrupt is not None:
            def stop() -> None:
                session.interruption = interrupt
                session.interrupted.set()
            asyncio.get_running_loop().call_later(0.2, stop)
        body = BoundedBody(Trickle(line, pause), session, 1000, **pace)  # type: ignore[arg-type]
        with pytest.raises(Stop) as caught:
            await read_form({"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, body)
        return caught.value

    return asyncio.run(main())


def test_an_upload_must_keep_its_pace() -> None:
    slow = read_trickle(b"x\r\n", 0.02, grace_s=0.2, min_rate=1000)  # 150 B/s after a 0.2 s grace
    assert (slow.status, slow.code) == (408, "upload_too_slow")
    # 10 KB/s keeps the pace, but would take 6 s to reach the byte bound: the deadline ends it.
    endless = read_trickle(b"x" * 98 + b"\r\n", 0.01, grace_s=0.2, min_rate=100, deadline_s=0.3)
    assert (endless.status, endless.code) == (408, "upload_too_slow")
    fast = read_trickle(b"x" * 998 + b"\r\n", 0.001, grace_s=0.2, min_rate=1000)  # 1 MB/s: the bound ends it
    assert (fast.status, fast.code) == (413, "file_too_large")
    idle = read_trickle(b"x\r\n", 0.02, Ending(1008, "idle: nothing received for 1 s", "idle"), grace_s=60)
    assert (idle.status, idle.code) == (408, "idle")
